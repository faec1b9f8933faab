"""A tiny deterministic CPU training run, for trying VaultLayer and for testing bit-identical resumes.

Plain PyTorch; only the `Checkpointer` lines are VaultLayer. Without `vl` around it, it trains plainly.
Every step draws from torch's, numpy's and python's global RNGs (data, noise level, batch size,
dropout), so a resume that forgot any of them would diverge.

    python examples/train_tiny.py --steps 400 --out /tmp/tiny.pt --step-time 0.05
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vaultlayer.pytorch import Checkpointer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, required=True, help="total number of training steps")
    parser.add_argument("--out", type=Path, required=True, help="where to write the final model state_dict")
    parser.add_argument("--step-time", type=float, default=0.0, help="pad each step to at least this many seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args()

    torch.set_num_threads(1)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    # The function to learn comes from its own generator: it is the same on every attempt.
    true_weights = torch.randn(32, 1, generator=torch.Generator().manual_seed(1234))

    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=25, gamma=0.9)

    ckpt = Checkpointer(model, optimizer, scheduler)
    start = ckpt.resume()
    if start:
        print(f"resuming at step {start}", flush=True)

    loss = torch.tensor(float("nan"))
    for step in range(start, args.steps):
        began = time.monotonic()
        batch_size = random.choice([8, 16, 32])
        noise_level = float(np.random.uniform(0.0, 0.1))
        inputs = torch.randn(batch_size, 32)
        targets = torch.sin(inputs @ true_weights) + noise_level * torch.randn(batch_size, 1)
        loss = nn.functional.mse_loss(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if (step + 1) % 50 == 0:
            print(f"step {step + 1}/{args.steps} loss {loss.item():.5f}", flush=True)
        time.sleep(max(0.0, args.step_time - (time.monotonic() - began)))
        ckpt.maybe_save(step + 1)

    partial = args.out.with_name(f".{args.out.name}.partial-{os.getpid()}")
    torch.save(model.state_dict(), partial)
    os.replace(partial, args.out)
    print(f"done: {args.steps} steps, last loss {loss.item():.5f}, model saved to {args.out}", flush=True)


if __name__ == "__main__":
    main()
