"""A plain Lightning script, with no VaultLayer in it: `vl init` makes it resumable.

Shuffled batches, dropout and a scheduler: a resume that replayed any of them differently would diverge.
"""

import argparse
import os
import time

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Regression(L.LightningModule):
    def __init__(self, step_time):
        super().__init__()
        self.step_time = step_time
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        time.sleep(self.step_time)
        inputs, targets = batch
        return nn.functional.mse_loss(self.net(inputs), targets)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-2)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.8)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--step-time", type=float, default=0.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    inputs = torch.randn(64, 8)
    data = DataLoader(TensorDataset(inputs, inputs.sum(dim=1, keepdim=True).sin()), batch_size=8, shuffle=True)
    model = Regression(args.step_time)
    ranks = int(os.environ.get("WORLD_SIZE", "1"))  # under torchrun: DDP on gloo, one process per rank
    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", devices=ranks,
                        strategy="ddp" if ranks > 1 else "auto", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data)
    if trainer.is_global_zero:
        torch.save(model.state_dict(), args.out)


if __name__ == "__main__":
    main()
