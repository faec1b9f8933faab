"""A tiny transformer trained with DistributedDataParallel, for trying VaultLayer under torchrun.

Plain PyTorch DDP; only the `Checkpointer` lines are VaultLayer, the same on every rank. Each rank draws its own
batches from its own seeded RNGs, so a resume that restored any rank's RNG state wrongly would diverge.
CPU and gloo by default (NCCL on GPUs with --backend nccl). Rank 0 writes the final model's state_dict.

    torchrun --nproc_per_node 2 examples/train_ddp.py --steps 200 --out /tmp/ddp.pt
    vl run -- torchrun --nproc_per_node 2 examples/train_ddp.py --steps 200 --out /tmp/ddp.pt
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import vaultlayer
from vaultlayer.pytorch import Checkpointer

VOCAB, WIDTH, SEQUENCE = 64, 32, 16


class TinyTransformer(nn.Module):
    """One encoder layer over token embeddings, predicting each next token."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.position = nn.Parameter(torch.zeros(SEQUENCE, WIDTH))
        self.block = nn.TransformerEncoderLayer(WIDTH, nhead=4, dim_feedforward=64, dropout=0.1, batch_first=True)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(tokens) + self.position))


def batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences that count up from a random start (mod VOCAB): the next token is learnable."""
    start = torch.randint(0, VOCAB, (size, 1))
    tokens = (start + torch.arange(SEQUENCE + 1)) % VOCAB
    return tokens[:, :-1], tokens[:, 1:]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, required=True, help="total number of training steps")
    parser.add_argument("--out", type=Path, required=True, help="where rank 0 writes the final model state_dict")
    parser.add_argument("--step-time", type=float, default=0.0, help="pad each step to at least this many seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--crash-rank", type=int, default=None, help="(tests) this rank raises at --crash-step")
    parser.add_argument("--crash-step", type=int, default=None)
    return parser.parse_args()


def train(model: nn.Module, args: argparse.Namespace, rank: int) -> torch.Tensor:
    """The training loop of both examples (DDP here, FSDP2 in train_fsdp.py), from a wrapped model; the last loss."""
    torch.manual_seed(args.seed + 1 + rank)  # each rank its own batches and dropout
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=50, gamma=0.8)

    ckpt = Checkpointer(model, optimizer, scheduler)
    start = ckpt.resume()
    if start and rank == 0:
        print(f"resuming at step {start} on {dist.get_world_size()} ranks", flush=True)

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
        ckpt.maybe_save(step + 1)  # every rank, every step: the ranks agree on when to save

    vaultlayer.wait_for_saves()
    return loss


def main() -> None:
    args = parse_args()
    dist.init_process_group(args.backend)
    rank = dist.get_rank()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    # find_unused_parameters: DDP then never rebuilds its gradient buckets, so a resumed process sums every gradient
    # of 3+ ranks in the same order as the uninterrupted run did (a rebuild happens after each process's first step,
    # and a resumed one would take that step in the initial order): bit-identical resumes (docs/distributed.md).
    model = DistributedDataParallel(TinyTransformer(), find_unused_parameters=True)
    loss = train(model, args, rank)
    if rank == 0:
        partial = args.out.with_name(f".{args.out.name}.partial-{os.getpid()}")
        torch.save(model.module.state_dict(), partial)
        os.replace(partial, args.out)
        print(f"done: {args.steps} steps, last loss {loss.item():.5f}, model saved to {args.out}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
