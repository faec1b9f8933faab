"""A plain Lightning script with no VaultLayer in it, for zero-code mode.

It writes its own checkpoints into --ckpt-dir (every --save-every steps, and `last.ckpt`) and resumes with
`ckpt_path="last"`, as many scripts already do. `vl run --checkpoint-dir DIR` makes that durable:

    vl run --checkpoint-dir /tmp/ckpts -- python examples/train_lightning.py --steps 200 --ckpt-dir /tmp/ckpts
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TinyRegression(L.LightningModule):
    def __init__(self, step_time: float) -> None:
        super().__init__()
        self.step_time = step_time
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        began = time.monotonic()
        inputs, targets = batch
        loss = nn.functional.mse_loss(self.net(inputs), targets)
        time.sleep(max(0.0, self.step_time - (time.monotonic() - began)))
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class ReportStart(Callback):
    """Remember the step training (re)started at, after Lightning restored `last.ckpt`."""

    def __init__(self) -> None:
        self.start_step = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.start_step = trainer.global_step
        print(f"training starts at step {self.start_step}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--ckpt-dir", type=Path, required=True)
    parser.add_argument("--save-every", type=int, default=10, help="steps between checkpoints")
    parser.add_argument("--step-time", type=float, default=0.0, help="pad each step to at least this many seconds")
    parser.add_argument("--result", type=Path, help="write {start_step, global_step} here at the end")
    args = parser.parse_args()

    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    inputs = torch.randn(256, 16)
    data = DataLoader(TensorDataset(inputs, inputs.sum(dim=1, keepdim=True).sin()), batch_size=16, shuffle=True)
    start = ReportStart()
    trainer = L.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=args.ckpt_dir,
        callbacks=[ModelCheckpoint(dirpath=args.ckpt_dir, every_n_train_steps=args.save_every, save_last=True), start],
    )
    trainer.fit(TinyRegression(args.step_time), train_dataloaders=data, ckpt_path="last")
    print(f"done at step {trainer.global_step}", flush=True)
    if args.result:
        partial = args.result.with_name(f".{args.result.name}.partial-{os.getpid()}")
        partial.write_text(json.dumps({"start_step": start.start_step, "global_step": trainer.global_step}))
        os.replace(partial, args.result)


if __name__ == "__main__":
    main()
