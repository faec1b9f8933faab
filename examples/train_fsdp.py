"""A tiny transformer trained with FSDP2 (`fully_shard`), for trying VaultLayer's sharded checkpoints.

Plain PyTorch FSDP2; only the `Checkpointer` lines are VaultLayer. Model and optimizer state are sharded
across the ranks and saved through torch.distributed.checkpoint, so a checkpoint written by 2 ranks
resumes on 1 (or 4). CPU and gloo by default. Rank 0 writes the full final state_dict.

    torchrun --nproc_per_node 2 examples/train_fsdp.py --steps 200 --out /tmp/fsdp.pt
    vl run -- torchrun --nproc_per_node 2 examples/train_fsdp.py --steps 200 --out /tmp/fsdp.pt
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import vaultlayer
from train_ddp import VOCAB, TinyTransformer, batch, parse_args
from vaultlayer.pytorch import Checkpointer


def main() -> None:
    args = parse_args()
    dist.init_process_group(args.backend)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)  # the same initial weights on every rank, then sharded
    model = TinyTransformer()
    mesh = init_device_mesh("cuda" if args.backend == "nccl" else "cpu", (world_size,))
    fully_shard(model.block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    torch.manual_seed(args.seed + 1 + rank)  # each rank its own batches and dropout
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=50, gamma=0.8)

    ckpt = Checkpointer(model, optimizer, scheduler)  # after fully_shard: it sees DTensor parameters
    start = ckpt.resume()
    if start and rank == 0:
        print(f"resuming at step {start} on {world_size} ranks", flush=True)

    loss = torch.tensor(float("nan"))
    for step in range(start, args.steps):
        began = time.monotonic()
        if rank == args.crash_rank and step == args.crash_step:
            raise RuntimeError(f"rank {rank} crashed at step {step} (--crash-rank)")
        inputs, targets = batch(8)
        loss = nn.functional.cross_entropy(model(inputs).reshape(-1, VOCAB), targets.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if (step + 1) % 50 == 0 and rank == 0:
            print(f"step {step + 1}/{args.steps} loss {loss.item():.5f}", flush=True)
        time.sleep(max(0.0, args.step_time - (time.monotonic() - began)))
        ckpt.maybe_save(step + 1)

    vaultlayer.wait_for_saves()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        partial = args.out.with_name(f".{args.out.name}.partial-{os.getpid()}")
        torch.save(full, partial)
        os.replace(partial, args.out)
        print(f"done: {args.steps} steps, last loss {loss.item():.5f}, model saved to {args.out}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
