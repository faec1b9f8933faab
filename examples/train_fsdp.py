"""A tiny transformer trained with FSDP2 (`fully_shard`), for trying VaultLayer's sharded checkpoints.

Plain PyTorch FSDP2; only the `Checkpointer` lines are VaultLayer. Model and optimizer state are sharded
across the ranks and saved through torch.distributed.checkpoint, so a checkpoint written by 2 ranks
resumes on 1 (or 4). CPU and gloo by default. Rank 0 writes the full final state_dict.

    torchrun --nproc_per_node 2 examples/train_fsdp.py --steps 200 --out /tmp/fsdp.pt
    vl run -- torchrun --nproc_per_node 2 examples/train_fsdp.py --steps 200 --out /tmp/fsdp.pt
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from train_ddp import TinyTransformer, parse_args, train


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
    loss = train(model, args, rank)  # the Checkpointer sees DTensor parameters: sharded saves
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        partial = args.out.with_name(f".{args.out.name}.partial-{os.getpid()}")
        torch.save(full, partial)
        os.replace(partial, args.out)
        print(f"done: {args.steps} steps, last loss {loss.item():.5f}, model saved to {args.out}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
