"""A plain Hugging Face Trainer script, with no VaultLayer in it: `vl init` makes it resumable.

A tiny model built here (no download), shuffled batches, dropout and a learning-rate schedule. Under torchrun
the Trainer runs DDP (gloo, CPU).
"""

import argparse
import os
import time

import torch
from torch import nn
from transformers import Trainer, TrainingArguments, set_seed


class Regression(nn.Module):
    def __init__(self, step_time):
        super().__init__()
        self.step_time = step_time
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 1))

    def forward(self, inputs, targets):
        time.sleep(self.step_time)
        return {"loss": nn.functional.mse_loss(self.net(inputs), targets)}


class Pairs(torch.utils.data.Dataset):
    def __init__(self):
        self.inputs = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.inputs)

    def __getitem__(self, index):
        inputs = self.inputs[index]
        return {"inputs": inputs, "targets": inputs.sum(dim=0, keepdim=True).sin()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--step-time", type=float, default=0.0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--output-dir", default="hf-output")
    args = parser.parse_args()

    torch.set_num_threads(1)
    set_seed(0)
    training_args = TrainingArguments(output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=8,
                                      learning_rate=1e-2, lr_scheduler_type="linear", save_strategy="no",
                                      logging_strategy="no", report_to="none", use_cpu=True, seed=0,
                                      disable_tqdm=True,
                                      ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None)
    trainer = Trainer(model=Regression(args.step_time), args=training_args, train_dataset=Pairs())
    trainer.train()
    if trainer.is_world_process_zero():  # under torchrun, one writer
        torch.save(trainer.model.state_dict(), args.out)


if __name__ == "__main__":
    main()
