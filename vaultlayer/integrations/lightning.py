"""A Lightning callback that saves through VaultLayer and resumes bit-identically after a reclaim.

    trainer = L.Trainer(..., callbacks=[VaultLayerCallback()])
    trainer.fit(model, data)

A save is Lightning's own full checkpoint (model, optimizers, schedulers, loops, callbacks, precision),
written in the background through `vaultlayer.save_async` whenever `vaultlayer.should_save` says so: at the
interval, and at once on a reclaim notice. On a restart the callback loads it before training starts.

Lightning alone replays a plain DataLoader from the start of the epoch after a mid-epoch resume; this
callback makes the resumed run draw the same batches as the uninterrupted one. It keeps every global RNG
state (python, numpy, torch, CUDA) as it was when the epoch's batches were drawn, and as it was at the save;
on resume it draws the epoch again from the first, skips the batches already trained on, then puts the RNGs
back where the save left them. Without `vl` around it the callback does nothing.

Under torchrun (DDP) every rank runs the callback and the SDK makes them agree on the save step: rank 0 writes
the checkpoint (the model and optimizers are the same on every rank), and every rank its own RNG states and
place in the epoch (rng/rank-NNNNN.pt), which it takes back on resume.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback

import vaultlayer
from vaultlayer.pytorch import Snapshotter, World, rng_state, set_rng_state, write_state

CHECKPOINT_FILE = "lightning.ckpt"


class VaultLayerCallback(Callback):
    """Saves at the SDK's save points, reacts to reclaim notices, and resumes the run on restart."""

    def __init__(self) -> None:
        self.epoch_rng: dict[str, Any] | None = None  # the RNGs just before this epoch's batches were drawn
        self.loaded: dict[str, Any] | None = None  # this callback's state from the checkpoint being resumed
        self.epoch_restarted = False
        self.snapshotter = Snapshotter()
        self.trainer: Trainer | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        batches = self.trainer.fit_loop.epoch_loop.batch_progress.current.ready if self.trainer else 0
        return {"epoch_rng": self.epoch_rng, "rng": rng_state(), "batches": batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.loaded = state_dict

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        restored = vaultlayer.resume()
        if restored is not None:
            # Lightning restores the optimizers, schedulers and loops from this right after this hook.
            trainer._checkpoint_connector._restore_modules_and_callbacks(  # noqa: SLF001 - no public hook
                restored.path / CHECKPOINT_FILE, weights_only=True)
            if restored.world_size > 1:  # this rank's own RNGs and place, not rank 0's from the checkpoint
                saved = World(rank=trainer.global_rank % restored.world_size, size=restored.world_size)
                self.loaded = torch.load(restored.path / saved.rng_file, weights_only=True)
            print(f"vaultlayer: resuming Lightning at step {restored.step}", flush=True)
        if self.loaded is not None:
            set_rng_state(self.loaded["epoch_rng"])  # the epoch's batches are drawn again, as they were
        self.epoch_rng = rng_state()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.loaded is None:
            return
        # A DistributedSampler (DDP) orders each epoch by its epoch number, which Lightning sets only after this
        # hook: set it first, or the batches skipped would be epoch 0's.
        for loader in trainer.fit_loop._combined_loader.flattened:  # noqa: SLF001
            _set_sampler_epoch(loader, trainer.fit_loop.epoch_progress.current.processed)
        iterator = trainer.fit_loop._data_fetcher.iterator  # noqa: SLF001 - the epoch's batches, drawn again
        for _ in range(self.loaded["batches"]):
            next(iterator)
        set_rng_state(self.loaded["rng"])
        self.loaded, self.epoch_restarted = None, True

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.epoch_restarted:  # the epoch resumed mid-way: its RNGs came with the checkpoint
            self.epoch_restarted = False
        elif trainer.current_epoch > 0:  # epoch 0's were taken at fit start, before its batches were drawn
            self.epoch_rng = rng_state()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if not vaultlayer.should_save(step):
            return
        # A save only between optimizer steps and inside an epoch: a save requested at an epoch's last batch
        # (or mid-accumulation) is made one batch later, where resuming replays exactly what follows.
        if (batch_idx + 1) % trainer.accumulate_grad_batches or batch_idx + 1 >= trainer.num_training_batches:
            return
        connector = trainer._checkpoint_connector  # noqa: SLF001 - Lightning's own full checkpoint dict
        world = World(rank=trainer.global_rank, size=trainer.world_size)

        def snapshot() -> dict[str, Any]:
            parts = {world.rng_file: self.state_dict()} if world.size > 1 else {}
            if world.rank == 0:
                parts[CHECKPOINT_FILE] = connector.dump_checkpoint(weights_only=False)
            return self.snapshotter(parts)

        vaultlayer.save_async(step, snapshot, write_state)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        vaultlayer.wait_for_saves()

