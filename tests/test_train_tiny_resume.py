"""A run resumed from a checkpoint ends bit-identical to one that was never interrupted.

The host agent's part is played by hand, through the contract: staging and control directories,
then upload, choose and restore through the checkpoint format, then a second run from the first save (step 10).
"""

import os
import subprocess
import sys
from pathlib import Path

import torch

from vaultlayer.checkpoint import choose_checkpoint, restore_checkpoint, upload_checkpoint

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "train_tiny.py"
STEPS = 40


def train(out: Path, **vl_env: str) -> str:
    env = {name: value for name, value in os.environ.items() if not name.startswith("VL_")}
    env |= {"PYTHONPATH": str(REPO), **vl_env}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", str(STEPS), "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def staged(staging: Path) -> dict[int, Path]:
    return {int(d.name.split("-")[0]): d for d in staging.iterdir() if not d.name.startswith(".tmp-")}


def assert_identical(left: Path, right: Path) -> None:
    a, b = torch.load(left, weights_only=True), torch.load(right, weights_only=True)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def assert_every_10_steps(saves: dict[int, Path], first: int) -> None:
    """Saves are written in the background, and none is started while another is being written: on a loaded
    machine one falls due during a write and is taken at the first step after it (20, 32 rather than 20, 30).
    The first is always on time (nothing is in flight before it), and no two are less than 10 steps apart."""
    steps = sorted(saves)
    assert steps and steps[0] == first and steps[-1] <= STEPS, steps
    assert all(later - earlier >= 10 for earlier, later in zip(steps, steps[1:])), steps


def test_resumed_run_is_bit_identical(tmp_path):
    plain = tmp_path / "plain.pt"
    train(plain)

    first_staging = tmp_path / "attempt-1" / "staging"
    checkpointed = tmp_path / "checkpointed.pt"
    train(
        checkpointed,
        VL_RUN_ID="tiny",
        VL_ATTEMPT="1",
        VL_STAGING_DIR=str(first_staging),
        VL_CONTROL_DIR=str(tmp_path / "attempt-1" / "control"),
        VL_CHECKPOINT_EVERY="10",
    )
    assert_identical(plain, checkpointed)  # saving does not disturb training
    saves = staged(first_staging)
    assert_every_10_steps(saves, first=10)
    for path in saves[10].glob("*.pt"):
        torch.load(path, weights_only=True)  # no pickled objects that a safe load refuses

    storage = (tmp_path / "storage").as_uri()
    upload_checkpoint(saves[10], storage, "tiny", 1, 10)
    chosen = choose_checkpoint(storage, "tiny", fences={}).chosen
    assert chosen is not None and chosen.step == 10
    restore_dir = tmp_path / "attempt-2" / "restore"
    restore_checkpoint(chosen, restore_dir)

    resumed = tmp_path / "resumed.pt"
    output = train(
        resumed,
        VL_RUN_ID="tiny",
        VL_ATTEMPT="2",
        VL_STAGING_DIR=str(tmp_path / "attempt-2" / "staging"),
        VL_CONTROL_DIR=str(tmp_path / "attempt-2" / "control"),
        VL_CHECKPOINT_EVERY="10",
        VL_RESTORE_DIR=str(restore_dir),
        VL_RESTORE_STEP="10",
    )
    assert "resuming at step 10" in output
    resaved = staged(tmp_path / "attempt-2" / "staging")
    assert_every_10_steps(resaved, first=20)  # the interval counts from the restore
    assert_identical(plain, resumed)
