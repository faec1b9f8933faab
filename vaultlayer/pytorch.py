"""PyTorch helpers: save and restore everything a bit-identical resume needs.

That is the model, the optimizer, the scheduler and every RNG the training loop may draw from
(python `random`, numpy's global generator, torch CPU and every CUDA device). Every file loads with
`torch.load(weights_only=True)`: RNG states are stored as tensors, ints, floats and strings only.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

import vaultlayer

MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"


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

    def resume(self) -> int:
        """Load the restored checkpoint, if there is one, and return the step to start from (0 when fresh)."""
        restored = vaultlayer.resume()
        if restored is None:
            return 0
        self.model.load_state_dict(_load(restored.path / MODEL_FILE))
        if self.optimizer is not None:
            self.optimizer.load_state_dict(_load(restored.path / OPTIMIZER_FILE))
        if self.scheduler is not None:
            self.scheduler.load_state_dict(_load(restored.path / SCHEDULER_FILE))
        set_rng_state(_load(restored.path / RNG_FILE))
        return restored.step

    def save(self, step: int) -> str:
        """Save the state after `step` steps; resuming from it starts the loop at `step`.

        Training is blocked only while the state is copied into host memory (pinned memory for GPU
        tensors); serialisation happens in the background and the agent uploads the result. Returns the
        SDK's answer: "started", "coalesced" (a save is in flight) or "saved" (an emergency save, written
        at once). With background=False the whole save blocks, as a plain `torch.save` would.
        """
        if not self.background:
            with vaultlayer.save(step) as directory:
                write_state(self.state(), directory)
            return "saved"
        return vaultlayer.save_async(step, lambda: self.snapshotter(self.state()), write_state)

    def state(self) -> dict[str, Any]:
        parts: dict[str, Any] = {MODEL_FILE: self.model.state_dict(), RNG_FILE: rng_state()}
        if self.optimizer is not None:
            parts[OPTIMIZER_FILE] = self.optimizer.state_dict()
        if self.scheduler is not None:
            parts[SCHEDULER_FILE] = self.scheduler.state_dict()
        return parts

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
        torch.save(part, directory / name)


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
