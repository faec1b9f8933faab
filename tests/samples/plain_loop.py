"""A plain PyTorch training loop, with no VaultLayer in it: `vl init` makes it resumable.

Every step draws from python's, numpy's and torch's global RNGs (batch size, noise, data, dropout).
"""

import argparse
import random
import time

import numpy as np
import torch
from torch import nn


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--step-time", type=float, default=0.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    torch.set_num_threads(1)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.8)

    for step in range(args.steps):
        inputs = torch.randn(random.choice([4, 8]), 8)
        targets = inputs.sum(dim=1, keepdim=True).sin() + float(np.random.uniform(0, 0.1))
        loss = nn.functional.mse_loss(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        time.sleep(args.step_time)

    torch.save(model.state_dict(), args.out)


if __name__ == "__main__":
    main()
