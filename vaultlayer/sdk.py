"""The SDK a training script calls: resume, should_save, save (docs/agent-sdk-contract.md).

It talks to the host agent only through environment variables and local files (vaultlayer/protocol.py),
so a save never waits on the network. Without a staging directory it is inactive and the script runs plainly.
Standard library only: `import vaultlayer` must stay light in a training environment.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vaultlayer import interval as intervals
from vaultlayer import protocol
from vaultlayer.durations import parse_duration, parse_interval

# After an emergency save the host may still be taken a little after its announced deadline.
EMERGENCY_GRACE_SECONDS = 5.0
_PROGRESS_EVERY_SECONDS = 0.2
_WAIT_POLL_SECONDS = 0.5
_monotonic = time.monotonic  # the SDK's clock for intervals and throttling, looked up at each call: tests set it


@dataclass(frozen=True)
class Restored:
    """The checkpoint to resume from: its step, and the directory holding the files saved at that step."""

    step: int
    path: Path


@dataclass
class _Slot:
    """A save being written: its temporary directory becomes a checkpoint on commit."""

    step: int
    path: Path
    final: Path
    notice: protocol.NoticeDocument | None
    abandon: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)


class _Session:
    """The SDK's state for this process, built once from the environment the agent set."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.staging_dir = Path(environ[protocol.ENV_STAGING_DIR])
        control = environ.get(protocol.ENV_CONTROL_DIR)
        self.control_dir = Path(control) if control else None
        self.restored = _restored_from(environ)
        every = environ.get(protocol.ENV_CHECKPOINT_EVERY)
        try:
            self.interval = ("auto", 0.0) if every == "auto" else parse_interval(every) if every else None
        except ValueError as err:
            raise ValueError(f"{protocol.ENV_CHECKPOINT_EVERY}: {err}") from None
        try:
            self.mtbf_seconds = float(environ.get(protocol.ENV_MTBF_SECONDS, intervals.PRIOR_HOURS * 3600))
            life = environ.get(protocol.ENV_SHORTEST_HOST_LIFE)
            self.shortest_life = float(life) if life else None
            since = environ.get(protocol.ENV_HOST_SINCE)
            host_age = max(time.time() - float(since), 0.0) if since else 0.0
            self.min_seconds = parse_duration(environ.get(protocol.ENV_CHECKPOINT_MIN, "60s"))
            self.max_seconds = parse_duration(environ.get(protocol.ENV_CHECKPOINT_MAX, "30m"))
        except ValueError as err:
            raise ValueError(f"VL_CHECKPOINT_*: {err}") from None
        self.save_cost: float | None = None  # seconds training was blocked by the last periodic save
        self.in_flight: _Slot | None = None
        self.coalesced = 0
        self.last_save_step = self.restored.step if self.restored else 0
        # Hosts that die young are timed from their start, not the script's: imports and a restore take part
        # of a short life before the first step.
        self.host_started = _monotonic() - host_age
        self.last_save_time = self.host_started if self.shortest_life is not None else _monotonic()
        self.last_progress_time = float("-inf")
        self.saved_notice_ids: set[str] = set()
        self.notice_stat: tuple[int, int, int] | None = None
        self.notice: protocol.NoticeDocument | None = None
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        if self.control_dir:
            self.control_dir.mkdir(parents=True, exist_ok=True)

    def should_save(self, step: int) -> bool:
        if _monotonic() - self.last_progress_time >= _PROGRESS_EVERY_SECONDS:
            self.write_progress(step)
        if self.pending_notice() is not None:
            return True
        if self.interval is None or self.saving():
            return False  # one save at a time: requests while one is in flight are coalesced into it
        unit, amount = self.interval
        if unit == "steps":
            return step - self.last_save_step >= amount
        return _monotonic() - self.last_save_time >= self.interval_seconds()[0]

    def interval_seconds(self) -> tuple[float, str]:
        unit, amount = self.interval or ("none", 0.0)
        if unit == "auto":
            return intervals.choose_interval(self.save_cost, self.mtbf_seconds, self.min_seconds, self.max_seconds,
                                             self.shortest_life, _monotonic() - self.host_started)
        if unit == "seconds":
            return amount, "--checkpoint-every"
        return 0.0, f"every {amount:g} steps (--checkpoint-every)" if unit == "steps" else "only on notices"

    def saving(self) -> bool:
        return self.in_flight is not None and not self.in_flight.done.is_set()

    def begin(self, step: int) -> _Slot:
        self.write_progress(step)
        nonce = uuid.uuid4().hex[:12]
        slot = _Slot(step=step, path=self.staging_dir / protocol.staging_name(step, nonce),
                     final=self.staging_dir / protocol.committed_name(step, nonce), notice=self.pending_notice())
        slot.path.mkdir()
        return slot

    def commit(self, slot: _Slot) -> None:
        record = protocol.SaveRecord(step=slot.step, emergency=slot.notice is not None,
                                     notice_id=slot.notice.id if slot.notice else None, created_at=time.time(),
                                     files=_digests(slot.path))
        protocol.write_save_record(slot.path, record)
        slot.path.rename(slot.final)
        slot.done.set()

    def abort(self, slot: _Slot) -> None:
        shutil.rmtree(slot.path, ignore_errors=True)
        slot.done.set()

    def accepted(self, slot: _Slot, blocked_seconds: float) -> None:
        self.last_save_step = slot.step
        self.last_save_time = _monotonic()
        if slot.notice is None:
            self.save_cost = blocked_seconds

    @contextlib.contextmanager
    def save(self, step: int) -> Iterator[Path]:
        began = _monotonic()
        slot = self.begin(step)
        if slot.notice is not None and self.in_flight is not None:
            self.in_flight.abandon.set()  # the emergency save goes first; a periodic one in flight is dropped
        try:
            yield slot.path
        except BaseException:
            self.abort(slot)
            raise
        self.commit(slot)
        self.accepted(slot, _monotonic() - began)
        self.write_progress(step)
        if slot.notice is not None:
            self.saved_notice_ids.add(slot.notice.id)
            _wait_until(slot.notice.deadline + EMERGENCY_GRACE_SECONDS)

    def save_async(self, step: int, snapshot: Callable[[], Any], write: Callable[[Any, Path], None]) -> str:
        if self.pending_notice() is not None:
            with self.save(step) as directory:
                write(snapshot(), directory)
            return "saved"
        if self.saving():
            self.coalesced += 1
            return "coalesced"
        began = _monotonic()
        state = snapshot()
        slot = self.begin(step)
        self.in_flight = slot
        self.accepted(slot, _monotonic() - began)
        self.write_progress(step)
        threading.Thread(target=self._write_in_background, args=(slot, state, write), name="vl-save").start()
        return "started"

    def _write_in_background(self, slot: _Slot, state: Any, write: Callable[[Any, Path], None]) -> None:
        try:
            write(state, slot.path)
        except BaseException as err:  # noqa: BLE001 - reported, never raised into an unrelated thread
            self.abort(slot)
            print(f"vaultlayer: background save of step {slot.step} failed: {err}", flush=True)
            return
        if slot.abandon.is_set():
            self.abort(slot)
        else:
            self.commit(slot)

    def wait(self) -> None:
        if self.in_flight is not None:
            self.in_flight.done.wait()

    def pending_notice(self) -> protocol.NoticeDocument | None:
        """The agent's notice, unless it was already saved for. One stat per call; reads only a changed file."""
        if self.control_dir is None:
            return None
        try:
            stat = protocol.notice_path(self.control_dir).stat()
        except FileNotFoundError:
            self.notice_stat, self.notice = None, None
            return None
        key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if key != self.notice_stat:
            self.notice = protocol.read_notice(self.control_dir)
            # A half-written notice is read again on the next call rather than remembered as none.
            self.notice_stat = key if self.notice is not None else None
        if self.notice is None or self.notice.id in self.saved_notice_ids:
            return None
        return self.notice

    def write_progress(self, step: int) -> None:
        self.last_progress_time = _monotonic()
        if self.control_dir is None:
            return
        every, why = self.interval_seconds()
        progress = protocol.Progress(step=step, time=time.time(), save_blocked_seconds=self.save_cost,
                                     interval_seconds=every or None, interval_reason=why,
                                     saves_coalesced=self.coalesced)
        protocol.write_progress(self.control_dir, progress, f".progress-{os.getpid()}-{threading.get_ident()}.tmp")


def _digests(directory: Path) -> dict[str, dict[str, Any]]:
    """Size, mtime and BLAKE3 of every file of a save, taken by the writer (in the background for `save_async`)
    while the bytes are still in the page cache, so the agent uploads them without reading them again
    (docs/checkpoint-format.md). Empty when the blake3 package is absent: the agent then hashes as it uploads."""
    try:
        import blake3
    except ImportError:
        return {}
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and not path.is_symlink() and path.name != protocol.SAVE_RECORD:
            stat = path.stat()
            digest = blake3.blake3(max_threads=blake3.blake3.AUTO).update_mmap(path).hexdigest()
            files[path.relative_to(directory).as_posix()] = {
                "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "blake3": digest}
    return files


def _restored_from(environ: Mapping[str, str]) -> Restored | None:
    restore_dir = environ.get(protocol.ENV_RESTORE_DIR)
    if not restore_dir:
        return None
    step = environ.get(protocol.ENV_RESTORE_STEP, "")
    if not step.isdigit():
        raise ValueError(f"{protocol.ENV_RESTORE_DIR} is set but {protocol.ENV_RESTORE_STEP} is {step!r},"
                         f" not a step number")
    return Restored(step=int(step), path=Path(restore_dir))


def _wait_until(epoch_seconds: float) -> None:
    """Sleep in short steps against the wall clock, which is what the deadline is measured in."""
    while (left := epoch_seconds - time.time()) > 0:
        time.sleep(min(left, _WAIT_POLL_SECONDS))


@functools.cache
def _session() -> _Session | None:
    if not os.environ.get(protocol.ENV_STAGING_DIR):
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


def save_async(step: int, snapshot: Callable[[], Any], write: Callable[[Any, Path], None]) -> str:
    """Checkpoint without stalling training: `snapshot()` runs now (copy the state into host memory),
    `write(state, directory)` runs in a background thread, and the directory becomes a checkpoint when it
    returns. Returns "started"; "coalesced" when a save is already in flight (nothing is queued, so at
    most one snapshot is held in memory); "saved" when a reclaim notice is pending: then the save is
    written at once, ahead of any save in flight, and blocks like an emergency `save`.
    """
    session = _session()
    if session is None:
        return "coalesced"
    return session.save_async(step, snapshot, write)


def wait_for_saves() -> None:
    """Block until a background save in flight is written (at the end of training, for instance)."""
    session = _session()
    if session is not None:
        session.wait()
