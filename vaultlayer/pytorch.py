"""PyTorch helpers: save and restore everything a bit-identical resume needs.

That is the model, the optimizer, the scheduler and every RNG the training loop may draw from
(python `random`, numpy's global generator, torch CPU and every CUDA device). Every file loads with
`torch.load(weights_only=True)`: RNG states are stored as tensors, ints, floats and strings only.
"""

from __future__ import annotations

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
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler

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

    def save(self, step: int) -> None:
        """Save the state after `step` steps; resuming from it starts the loop at `step`."""
        with vaultlayer.save(step) as directory:
            torch.save(self.model.state_dict(), directory / MODEL_FILE)
            if self.optimizer is not None:
                torch.save(self.optimizer.state_dict(), directory / OPTIMIZER_FILE)
            if self.scheduler is not None:
                torch.save(self.scheduler.state_dict(), directory / SCHEDULER_FILE)
            torch.save(rng_state(), directory / RNG_FILE)

    def maybe_save(self, step: int) -> None:
        """Save when the SDK says so (interval reached or a reclaim notice pending); call it every step."""
        if vaultlayer.should_save(step):
            self.save(step)


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
