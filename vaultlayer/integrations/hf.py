"""A Hugging Face `transformers.Trainer` callback that saves through VaultLayer and resumes after a reclaim.

    vl_callback = VaultLayerCallback()
    trainer = Trainer(..., callbacks=[vl_callback])
    trainer.train(resume_from_checkpoint=vl_callback.restored_checkpoint())

A save is the Trainer's own checkpoint (model, optimizer, scheduler, scaler, every RNG and the trainer
state), asked for with `control.should_save` whenever `vaultlayer.should_save` says so: at the interval, and at
once on a reclaim notice. Its files are hard-linked (cheap, and safe from the Trainer's checkpoint rotation)
and handed to `vaultlayer.save_async`, which moves them into the checkpoint in the background. On a restart
`restored_checkpoint()` is the restored checkpoint, and the Trainer's own resume skips the batches already
trained on and restores the RNGs, so the run goes on as if never interrupted. A checkpoint the Trainer wrote
only for VaultLayer is removed from `output_dir` once linked. Without `vl` around it the callback does nothing
and `restored_checkpoint()` is None.

Under torchrun (DDP) every rank runs the callback: the SDK makes the ranks agree on the save step, and each rank
hands over its own part of the Trainer's checkpoint (rank 0 everything but the other ranks' RNG files, rank r
its `rng_state_r.pth`), so the save is complete only when every rank's part is in.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from pathlib import Path

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

import vaultlayer


class VaultLayerCallback(TrainerCallback):
    """Saves at the SDK's save points, reacts to reclaim notices, and names the checkpoint to resume from."""

    def __init__(self) -> None:
        self.requested = False  # this step's save was asked for by VaultLayer
        self.requested_only = False  # ... and by nothing else: the local copy is ours to remove

    def restored_checkpoint(self) -> str | None:
        """The restored checkpoint for `trainer.train(resume_from_checkpoint=...)`, or None on a fresh start."""
        restored = vaultlayer.resume()
        if restored is None:
            return None
        print(f"vaultlayer: resuming the Trainer at step {restored.step}", flush=True)
        return str(restored.path)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if vaultlayer.active() and args.save_only_model:
            raise ValueError("VaultLayerCallback: TrainingArguments(save_only_model=True) leaves the optimizer, "
                             "scheduler and RNG states out of checkpoints, so a resume would diverge; drop it")

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        self.requested = vaultlayer.should_save(state.global_step)
        if self.requested:
            self.requested_only = not control.should_save
            control.should_save = True

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if not self.requested:
            return
        self.requested = False
        local = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not local.is_dir():  # a hyperparameter search saves under a run folder of its own
            print(f"vaultlayer: no Trainer checkpoint at {local}; step {state.global_step} not saved", flush=True)
            return
        mine = rank_files(local, args.process_index, args.world_size)
        vaultlayer.save_async(state.global_step, lambda: _link_copy(local, mine), _move_files)
        if self.requested_only:
            _remove(local, mine)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        vaultlayer.wait_for_saves()


_RANK_RNG_FILE = re.compile(r"rng_state_(\d+)\.pth")


def rank_files(checkpoint: Path, rank: int, world_size: int) -> list[Path]:
    """The files of the Trainer's checkpoint that this rank hands over: all of them in one process; with many
    ranks, rank r its own RNG file, rank 0 also everything that is not another rank's RNG file. Only rank 0
    walks the folder: another rank may be removing its own file from it meanwhile, never a folder."""
    if rank != 0:
        own = Path(f"rng_state_{rank}.pth")
        return [own] if (checkpoint / own).is_file() else []
    files = sorted(path.relative_to(checkpoint) for path in checkpoint.rglob("*") if path.is_file())
    if world_size == 1:
        return files

    def owner(path: Path) -> int:
        match = _RANK_RNG_FILE.fullmatch(path.name) if len(path.parts) == 1 else None
        return int(match[1]) if match else 0

    return [path for path in files if owner(path) == rank]


def _link_copy(source: Path, files: list[Path]) -> Path:
    """A copy of `files` of `source` beside it made of hard links (a plain copy where links are refused)."""
    target = source.with_name(f".vl-{source.name}-{uuid.uuid4().hex[:8]}")
    for relative in files:
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(str(source / relative), str(target / relative))
    target.mkdir(exist_ok=True)
    return target


def _remove(checkpoint: Path, files: list[Path]) -> None:
    """Remove this rank's files of a checkpoint written only for VaultLayer; the last rank removes the folder."""
    for relative in files:
        (checkpoint / relative).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # the folder may be gone: another rank removed it once it was empty
        for directory in sorted((p for p in checkpoint.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                directory.rmdir()
    with contextlib.suppress(OSError):
        checkpoint.rmdir()  # not empty while another rank's files are still there


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _move_files(snapshot: Path, directory: Path) -> None:
    for item in snapshot.rglob("*"):
        if item.is_file():
            (directory / item.relative_to(snapshot)).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(item, directory / item.relative_to(snapshot))
    shutil.rmtree(snapshot, ignore_errors=True)
