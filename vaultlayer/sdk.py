"""The SDK a training script calls: resume, should_save, save (docs/agent-sdk-contract.md).

It talks to the host agent only through environment variables and local files, so a save never
waits on the network. Without `VL_STAGING_DIR` it is inactive and the script runs plainly.
Standard library only: `import vaultlayer` must stay light in a training environment.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from vaultlayer.durations import parse_interval

SAVE_RECORD = "vl-save.json"
# After an emergency save the host may still be taken a little after its announced deadline.
EMERGENCY_GRACE_SECONDS = 5.0
_PROGRESS_EVERY_SECONDS = 0.2
_WAIT_POLL_SECONDS = 0.5


@dataclass(frozen=True)
class Restored:
    """The checkpoint to resume from: its step, and the directory holding the files saved at that step."""

    step: int
    path: Path


@dataclass(frozen=True)
class _Notice:
    id: str
    deadline: float


class _Session:
    """The SDK's state for this process, built once from the environment the agent set."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.staging_dir = Path(environ["VL_STAGING_DIR"])
        control = environ.get("VL_CONTROL_DIR")
        self.control_dir = Path(control) if control else None
        self.restored = _restored_from(environ)
        every = environ.get("VL_CHECKPOINT_EVERY")
        try:
            self.interval = parse_interval(every) if every else None
        except ValueError as err:
            raise ValueError(f"VL_CHECKPOINT_EVERY: {err}") from None
        self.last_save_step = self.restored.step if self.restored else 0
        self.last_save_time = time.monotonic()
        self.last_progress_time = float("-inf")
        self.saved_notice_ids: set[str] = set()
        self.notice_stat: tuple[int, int, int] | None = None
        self.notice: _Notice | None = None
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        if self.control_dir:
            self.control_dir.mkdir(parents=True, exist_ok=True)

    def should_save(self, step: int) -> bool:
        if time.monotonic() - self.last_progress_time >= _PROGRESS_EVERY_SECONDS:
            self.write_progress(step)
        if self.pending_notice() is not None:
            return True
        if self.interval is None:
            return False
        unit, amount = self.interval
        if unit == "steps":
            return step - self.last_save_step >= amount
        return time.monotonic() - self.last_save_time >= amount

    @contextlib.contextmanager
    def save(self, step: int) -> Iterator[Path]:
        self.write_progress(step)
        notice = self.pending_notice()
        nonce = uuid.uuid4().hex[:12]
        tmp_dir = self.staging_dir / f".tmp-{step}-{nonce}"
        tmp_dir.mkdir()
        try:
            yield tmp_dir
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        record = {
            "step": step,
            "emergency": notice is not None,
            "notice_id": notice.id if notice else None,
            "created_at": time.time(),
        }
        (tmp_dir / SAVE_RECORD).write_text(json.dumps(record))
        tmp_dir.rename(self.staging_dir / f"{step:012d}-{nonce}")
        self.last_save_step = step
        self.last_save_time = time.monotonic()
        if notice is not None:
            self.saved_notice_ids.add(notice.id)
            _wait_until(notice.deadline + EMERGENCY_GRACE_SECONDS)

    def pending_notice(self) -> _Notice | None:
        """The agent's notice, unless it was already saved for. One stat per call; reads only a changed file."""
        if self.control_dir is None:
            return None
        try:
            stat = (self.control_dir / "notice.json").stat()
        except FileNotFoundError:
            self.notice_stat, self.notice = None, None
            return None
        key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if key != self.notice_stat:
            self.notice = _read_notice(self.control_dir / "notice.json")
            # A half-written notice is read again on the next call rather than remembered as none.
            self.notice_stat = key if self.notice is not None else None
        if self.notice is None or self.notice.id in self.saved_notice_ids:
            return None
        return self.notice

    def write_progress(self, step: int) -> None:
        self.last_progress_time = time.monotonic()
        if self.control_dir is None:
            return
        partial = self.control_dir / f".progress-{os.getpid()}.tmp"
        partial.write_text(json.dumps({"step": step, "time": time.time()}))
        os.replace(partial, self.control_dir / "progress.json")


def _restored_from(environ: Mapping[str, str]) -> Restored | None:
    restore_dir = environ.get("VL_RESTORE_DIR")
    if not restore_dir:
        return None
    step = environ.get("VL_RESTORE_STEP", "")
    if not step.isdigit():
        raise ValueError(f"VL_RESTORE_DIR is set but VL_RESTORE_STEP is {step!r}, not a step number")
    return Restored(step=int(step), path=Path(restore_dir))


def _read_notice(path: Path) -> _Notice | None:
    try:
        data = json.loads(path.read_text())
        return _Notice(id=str(data["id"]), deadline=float(data["deadline"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _wait_until(epoch_seconds: float) -> None:
    """Sleep in short steps against the wall clock, which is what the deadline is measured in."""
    while (left := epoch_seconds - time.time()) > 0:
        time.sleep(min(left, _WAIT_POLL_SECONDS))


@functools.cache
def _session() -> _Session | None:
    if not os.environ.get("VL_STAGING_DIR"):
        return None
    return _Session(os.environ)


def active() -> bool:
    """Whether a `vl` host agent runs this script (otherwise the SDK does nothing)."""
    return _session() is not None


def resume() -> Restored | None:
    """The checkpoint the agent restored for this attempt, or None on a fresh start (or without `vl`)."""
    session = _session()
    return session.restored if session else None


def should_save(step: int) -> bool:
    """True when the periodic interval is reached or a reclaim notice is pending. Cheap: call it every step."""
    session = _session()
    return session.should_save(step) if session else False


@contextlib.contextmanager
def save(step: int) -> Iterator[Path]:
    """A directory to write the state at `step` into; it becomes a checkpoint when the block exits cleanly.

    After an emergency save (a reclaim notice is pending) this blocks until the notice's deadline plus
    a few seconds: steps taken then would be lost with the host. If the host is still here, it was a
    false alarm and training goes on.
    """
    session = _session()
    if session is None:
        with tempfile.TemporaryDirectory(prefix="vl-save-") as scratch:
            yield Path(scratch)
        return
    with session.save(step) as path:
        yield path
