"""PyTorch helpers: save and restore everything a bit-identical resume needs.

That is the model, the optimizer, the scheduler and every RNG the training loop may draw from
(python `random`, numpy's global generator, torch CPU and every CUDA device). Every file loads with
`torch.load(weights_only=True)`: RNG states are stored as tensors, ints, floats and strings only.

Three layouts, chosen by what is being trained (docs/distributed.md):
- one process: model.pt, optimizer.pt, scheduler.pt, rng.pt;
- many ranks with replicated state (DDP, or any model without DTensor parameters): rank 0 writes model.pt
  (of the module DDP wraps), optimizer.pt and scheduler.pt, every rank its own rng/rank-NNNNN.pt;
- many ranks with sharded state (FSDP2, DTensor parameters): model and optimizer through
  torch.distributed.checkpoint into sharded/ (each rank its shards, rank 0 the metadata), which reshards
  on restore; scheduler.pt from rank 0, rng/rank-NNNNN.pt from every rank.
"""

from __future__ import annotations

import copy
import random
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import vaultlayer

MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"
RNG_DIR = "rng"  # many ranks: one file per rank
SHARDED_DIR = "sharded"  # many ranks, sharded state: torch.distributed.checkpoint's files


@dataclass(frozen=True)
class World:
    """The ranks this process trains with: none (one process), replicated state, or sharded state."""

    rank: int = 0
    size: int = 1
    sharded: bool = False

    @property
    def rng_file(self) -> str:
        return f"{RNG_DIR}/rank-{self.rank:05d}.pt" if self.size > 1 else RNG_FILE


def world_of(model: torch.nn.Module) -> World:
    """The layout `model` is saved in: by torch.distributed's world and whether any parameter is a DTensor."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return World()
    from torch.distributed.tensor import DTensor

    sharded = any(isinstance(parameter, DTensor) for parameter in model.parameters())
    return World(rank=torch.distributed.get_rank(), size=torch.distributed.get_world_size(), sharded=sharded)


class RestoreError(RuntimeError):
    """A checkpoint that this run's ranks cannot load, with why and what to do."""


class Checkpointer:
    """Saves and restores a training loop's state through the SDK (`vaultlayer.save` / `resume`)."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        background: bool = True,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.background = background
        self.snapshotter = Snapshotter()
        self.world = world_of(model)
        # Background saves of sharded state run torch.distributed.checkpoint's own collectives in a thread while
        # training runs its collectives: on a process group of their own, so the two never interleave.
        self.save_group = torch.distributed.new_group(backend="gloo") if self.world.sharded else None

    @property
    def module(self) -> torch.nn.Module:
        """The model without its DDP wrapper: its state_dict loads into a model with any number of ranks."""
        return getattr(self.model, "module", self.model) if _is_ddp(self.model) else self.model

    def resume(self) -> int:
        """Load the restored checkpoint, if there is one, and return the step to start from (0 when fresh).

        Every rank loads the same step. Replicated state loads into any number of ranks; sharded state is
        resharded by torch.distributed.checkpoint; a checkpoint of one layout does not load into the other.
        """
        restored = vaultlayer.resume()
        if restored is None:
            return 0
        sharded_files = (restored.path / SHARDED_DIR).is_dir()
        if sharded_files != self.world.sharded:
            saved = "sharded (FSDP2/DTensor)" if sharded_files else "replicated (one process or DDP)"
            raise RestoreError(f"the checkpoint of step {restored.step} holds {saved} state, which this "
                               f"{'sharded' if self.world.sharded else 'replicated'} model cannot load; fix: resume "
                               f"with the same kind of model wrapping (FSDP2 or not) it was saved with")
        if self.world.sharded:
            self._load_sharded(restored.path)
        else:
            self.module.load_state_dict(_load(restored.path / MODEL_FILE))
            if self.optimizer is not None:
                self.optimizer.load_state_dict(_load(restored.path / OPTIMIZER_FILE))
        if self.scheduler is not None:
            self.scheduler.load_state_dict(_load(restored.path / SCHEDULER_FILE))
        set_rng_state(_load(self._rng_file(restored.path, restored.world_size)))
        return restored.step

    def _load_sharded(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        optimizers = [self.optimizer] if self.optimizer is not None else []
        model_state, optimizer_state = get_state_dict(self.model, optimizers)
        state = {"model": model_state, "optimizer": optimizer_state} if optimizers else {"model": model_state}
        dcp.load(state, checkpoint_id=path / SHARDED_DIR)  # reshards: any number of ranks may load it
        set_state_dict(self.model, optimizers, model_state_dict=state["model"],
                       optim_state_dict=state.get("optimizer", {}))

    def _rng_file(self, path: Path, saved_world_size: int) -> Path:
        """This rank's RNG file. Resumed on another number of ranks, rank r takes saved rank r mod N: the run goes
        on, but its random draws differ from an uninterrupted run on the old number of ranks."""
        if saved_world_size == 1 and self.world.size == 1:
            return path / RNG_FILE
        if saved_world_size != self.world.size:
            print(f"vaultlayer: the checkpoint was written by {saved_world_size} ranks and {self.world.size} resume "
                  f"it; rank {self.world.rank} takes the RNG state of saved rank "
                  f"{self.world.rank % saved_world_size}", flush=True)
        saved_rank = self.world.rank % saved_world_size
        return path / (World(rank=saved_rank, size=saved_world_size).rng_file)

    def save(self, step: int) -> str:
        """Save the state after `step` steps; resuming from it starts the loop at `step`.

        Training is blocked only while the state is copied into host memory (pinned memory for GPU
        tensors); serialisation happens in the background and the agent uploads the result. Returns the
        SDK's answer: "started", "coalesced" (a save is in flight) or "saved" (an emergency save, written
        at once). With background=False the whole save blocks, as a plain `torch.save` would.
        """
        if self.world.sharded:
            return self._save_sharded(step)
        if not self.background:
            with vaultlayer.save(step) as directory:
                write_state(self.state(), directory)
            return "saved"
        return vaultlayer.save_async(step, lambda: self.snapshotter(self.state()), write_state)

    def state(self) -> dict[str, Any]:
        """What this rank writes: everything on one process; with many ranks, rank 0 the replicated state and
        every rank its RNG states."""
        parts: dict[str, Any] = {self.world.rng_file: rng_state()}
        if self.world.rank != 0:
            return parts
        if not self.world.sharded:
            parts[MODEL_FILE] = self.module.state_dict()
            if self.optimizer is not None:
                parts[OPTIMIZER_FILE] = self.optimizer.state_dict()
        if self.scheduler is not None:
            parts[SCHEDULER_FILE] = self.scheduler.state_dict()
        return parts

    def _save_sharded(self, step: int) -> str:
        """Model and optimizer shards through torch.distributed.checkpoint; the rest as files (`state`)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        def snapshot() -> tuple[dict[str, Any], dict[str, Any]]:
            optimizers = [self.optimizer] if self.optimizer is not None else []
            model_state, optimizer_state = get_state_dict(self.model, optimizers)
            sharded = {"model": model_state, "optimizer": optimizer_state} if optimizers else {"model": model_state}
            return _cpu_copy(sharded), self.snapshotter(self.state())

        if not self.background:
            with vaultlayer.save(step) as directory:
                _write_sharded(snapshot(), directory, None)
            return "saved"
        group = self.save_group
        # An emergency save is written at once, on the main thread, while a background one may still run its
        # collectives on `save_group`: the SDK writes it with `write` too, so it takes the default group then.
        return vaultlayer.save_async(step, snapshot, lambda state, directory: _write_sharded(
            state, directory, group if threading.current_thread() is not threading.main_thread() else None))

    def maybe_save(self, step: int) -> None:
        """Save when the SDK says so (interval reached or a reclaim notice pending); call it every step."""
        if vaultlayer.should_save(step):
            self.save(step)


class Snapshotter:
    """Copies training state into host memory, reusing the same buffers save after save.

    CPU tensors are copied into host buffers; GPU tensors into pinned host buffers asynchronously, awaited
    once, so the copy runs at full PCIe bandwidth. Reusing the buffers spares the allocation and page
    faults of a fresh copy, which cost more than the copy itself. This copy is the only part of a
    background save that blocks training; memory bound: one extra copy of the state in host memory (the
    SDK never holds a second snapshot: requests while a save is in flight are coalesced).
    """

    def __init__(self) -> None:
        self.buffers: list[torch.Tensor] = []

    def __call__(self, state: Any) -> Any:
        tensors: list[torch.Tensor] = []
        on_gpu = False

        def copy_of(value: Any) -> Any:
            nonlocal on_gpu
            if isinstance(value, torch.Tensor):
                index = len(tensors)
                tensors.append(value)
                buffer = self.buffers[index] if index < len(self.buffers) else None
                if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
                    buffer = torch.empty(value.shape, dtype=value.dtype, device="cpu", pin_memory=value.is_cuda)
                    if index < len(self.buffers):
                        self.buffers[index] = buffer
                    else:
                        self.buffers.append(buffer)
                on_gpu = on_gpu or value.is_cuda
                return buffer.copy_(value.detach(), non_blocking=value.is_cuda)
            if isinstance(value, dict):
                return type(value)((key, copy_of(item)) for key, item in value.items())
            if isinstance(value, (list, tuple)):
                return type(value)(copy_of(item) for item in value)
            return copy.deepcopy(value)

        copied = copy_of(state)
        del self.buffers[len(tensors):]
        if on_gpu:
            torch.cuda.synchronize()
        return copied


def snapshot(state: Any) -> Any:
    """A one-off copy of `state` that training cannot change any more (see Snapshotter)."""
    return Snapshotter()(state)


def write_state(parts: dict[str, Any], directory: Path) -> None:
    for name, part in parts.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        torch.save(part, directory / name)


def _write_sharded(state: tuple[dict[str, Any], dict[str, Any]], directory: Path, group: Any) -> None:
    import torch.distributed.checkpoint as dcp

    sharded, files = state
    dcp.save(sharded, checkpoint_id=directory / SHARDED_DIR, process_group=group)
    write_state(files, directory)


def _cpu_copy(state: Any) -> Any:
    """A copy of a sharded state dict in host memory that training cannot change any more: each DTensor keeps its
    mesh and placements, with a copy of its local shard."""
    from torch.distributed.tensor import DTensor

    if isinstance(state, DTensor):
        local = state.to_local().detach().to("cpu", copy=True)
        return DTensor.from_local(local, state.device_mesh, state.placements, run_check=False,
                                  shape=state.size(), stride=state.stride())
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return type(state)((key, _cpu_copy(value)) for key, value in state.items())
    if isinstance(state, (list, tuple)):
        return type(state)(_cpu_copy(value) for value in state)
    return copy.deepcopy(state)


def _is_ddp(model: torch.nn.Module) -> bool:
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


def rng_state() -> dict[str, Any]:
    """Every global RNG state, in types `torch.load(weights_only=True)` accepts."""
    python_version, python_internal, python_gauss = random.getstate()
    numpy_name, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {
            "version": python_version,
            "internal": torch.tensor(python_internal, dtype=torch.int64),
            "gauss_next": python_gauss,
        },
        "numpy": {
            "name": numpy_name,
            "keys": torch.from_numpy(numpy_keys.astype(np.int64)),
            "pos": int(numpy_pos),
            "has_gauss": int(numpy_has_gauss),
            "cached_gaussian": float(numpy_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved. CUDA states go to the devices present, by index."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"].tolist()), python["gauss_next"]))
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state((numpy["name"], keys, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for device, device_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, device)


def _load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)
