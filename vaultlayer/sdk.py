"""The SDK a training script calls: resume, should_save, save (docs/agent-sdk-contract.md).

It talks to the host agent only through environment variables and local files (vaultlayer/protocol.py),
so a save never waits on the network. Without a staging directory it is inactive and the script runs plainly.
Standard library only: `import vaultlayer` must stay light in a training environment.

Under torchrun (a torch.distributed process group initialized, more than one rank) every rank calls the same
functions at the same steps, and the SDK makes them agree: `should_save` answers the same on every rank at the
same step (one all-reduce of three integers), and a save is one directory that every rank writes its own files
into, committed by the last rank to finish, so it is a checkpoint only when every rank's part is in
(docs/distributed.md). The SDK never imports torch: it uses torch.distributed only when the script has.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import gc
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
import weakref
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
    world_size: int = 1  # how many ranks wrote it: a restore into another number of ranks must reshard


@dataclass
class _Slot:
    """A save being written: its temporary directory becomes a checkpoint on commit (by the last of its ranks)."""

    step: int
    path: Path
    final: Path
    notice: protocol.NoticeDocument | None
    rank: int = 0
    world_size: int = 1
    node_ranks: range | None = None  # the ranks whose parts this host's staging directory gets; None: all of them
    abandon: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        if self.node_ranks is None:
            self.node_ranks = range(self.world_size)


class _Ranks:
    """The torch.distributed world of this process: its rank, the world's size and the one collective the SDK uses.

    Found in `sys.modules`, never imported: a script that did not import torch.distributed has no world.
    """

    def __init__(self, dist: Any, torch: Any) -> None:
        self.dist = dist
        self.torch = torch
        # Weakly: a process group the SDK kept alive would be destroyed at interpreter exit, after the threads its
        # destructor joins, which aborts the process ("terminate called without an active exception").
        self.group = weakref.ref(dist.group.WORLD)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        # The ranks on this host (torchrun numbers a host's ranks consecutively): on a gang each host stages its own
        # ranks' parts, and the agents join the hosts' parts in storage. Without torchrun's variables: one host.
        local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        first = self.rank - local_rank
        self.node_ranks = range(first, first + int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size)))
        nccl = "nccl" in str(dist.get_backend())
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def agree(self, *values: int) -> list[int]:
        """The largest of each value over every rank: one all-reduce of a few integers, so it cannot deadlock as
        long as every rank calls it at the same point (every rank calls `should_save` at every step)."""
        flags = self.torch.tensor(values, dtype=self.torch.int64, device=self.device)
        self.dist.all_reduce(flags, op=self.dist.ReduceOp.MAX)
        return [int(value) for value in flags.tolist()]


@functools.cache
def _release_world_before_exit() -> None:
    """Free the process group at exit, before the interpreter's own teardown. A gloo process group left in a
    reference cycle (after `destroy_process_group`, under DDP) was otherwise freed by the final collection, when its
    worker threads can no longer take the GIL: in 9 of 85 runs of examples/train_ddp.py (2 ranks, gloo) one rank
    aborted at exit ("terminate called without an active exception", SIGABRT) and torchrun failed a run that had
    finished; 0 of 72 with this collection. A script that never destroys its group (the HF Trainer's) leaves it to
    that teardown too: a rank of the HF sample aborted so once in CI, so a group still up is destroyed here."""
    atexit.register(_release_world)


def _release_world() -> None:
    gc.collect()
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):  # at exit: a failure here must not turn a finished run into a failed one
            dist.destroy_process_group()
        gc.collect()


def _find_ranks(known: _Ranks | None) -> _Ranks | None:
    """The world this process trains in now, or None outside torchrun (or with a world of one)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    if known is not None and known.group() is dist.group.WORLD:
        return known
    ranks = _Ranks(dist, sys.modules["torch"])
    _release_world_before_exit()
    return ranks if ranks.world_size > 1 else None


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
        self.known_ranks: _Ranks | None = None
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        if self.control_dir:
            self.control_dir.mkdir(parents=True, exist_ok=True)

    def ranks(self) -> _Ranks | None:
        self.known_ranks = _find_ranks(self.known_ranks)
        return self.known_ranks

    def should_save(self, step: int) -> bool:
        if _monotonic() - self.last_progress_time >= _PROGRESS_EVERY_SECONDS:
            self.write_progress(step)
        notice = self.pending_notice() is not None
        ranks = self.ranks()
        if ranks is None:
            # One save at a time: requests while one is in flight are coalesced into it; a notice never waits.
            return notice or (not self.saving() and self.interval_due(step))
        # Every rank's view at once: a notice seen by any rank, the interval reached on any, a save in flight on
        # any. So all ranks save at this step, or none does.
        due, notice_seen, busy = ranks.agree(int(self.interval_due(step)), int(notice), int(self.saving()))
        return bool(notice_seen) or (bool(due) and not busy)

    def interval_due(self, step: int) -> bool:
        if self.interval is None:
            return False
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

    def agree_on_save(self, ranks: _Ranks | None) -> tuple[bool, bool, str, float]:
        """What every rank must agree on before a save: a notice pending on any rank, a save in flight on any,
        the save's directory name (rank 0's), and the latest deadline of the notices (0 without one)."""
        notice = self.pending_notice()
        deadline = notice.deadline if notice is not None else 0.0
        if ranks is None:
            return notice is not None, self.saving(), uuid.uuid4().hex[:12], deadline
        token = int.from_bytes(os.urandom(6), "big") | 1 if ranks.rank == 0 else 0
        notice_seen, busy, token, deadline_ms = ranks.agree(int(notice is not None), int(self.saving()), token,
                                                            math.ceil(deadline * 1000))
        return bool(notice_seen), bool(busy), f"{token:012x}", deadline_ms / 1000

    def begin(self, step: int, ranks: _Ranks | None, nonce: str, notice_seen: bool) -> _Slot:
        self.write_progress(step)
        notice = self.pending_notice()
        if notice is None and notice_seen:  # another rank read it first: it is there, or saved for already
            self.notice_stat = None
            notice = self.pending_notice()
        slot = _Slot(step=step, path=self.staging_dir / protocol.staging_name(step, nonce),
                     final=self.staging_dir / protocol.committed_name(step, nonce), notice=notice,
                     rank=ranks.rank if ranks else 0, world_size=ranks.world_size if ranks else 1,
                     node_ranks=ranks.node_ranks if ranks else None)
        slot.path.mkdir(exist_ok=ranks is not None)  # many ranks, one directory
        return slot

    def commit(self, slot: _Slot) -> None:
        record = protocol.SaveRecord(step=slot.step, emergency=slot.notice is not None,
                                     notice_id=slot.notice.id if slot.notice else None, created_at=time.time(),
                                     world_size=slot.world_size)
        if slot.world_size == 1:
            protocol.write_save_record(slot.path, dataclasses.replace(record, files=_digests(slot.path)))
            slot.path.rename(slot.final)
        else:
            _commit_part(slot, record)
        slot.done.set()

    def abort(self, slot: _Slot) -> None:
        if slot.world_size == 1:
            shutil.rmtree(slot.path, ignore_errors=True)
        # With many ranks the others may still write into the directory: this rank's part record never comes, so
        # the save is never committed, and the agent removes the attempt's staging directory with the attempt.
        slot.done.set()

    def accepted(self, slot: _Slot, blocked_seconds: float) -> None:
        self.last_save_step = slot.step
        self.last_save_time = _monotonic()
        if slot.notice is None:
            self.save_cost = blocked_seconds

    @contextlib.contextmanager
    def save(self, step: int) -> Iterator[Path]:
        began = _monotonic()
        ranks = self.ranks()
        notice_seen, _, nonce, deadline = self.agree_on_save(ranks)
        slot = self.begin(step, ranks, nonce, notice_seen)
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
        if notice_seen:
            # Every rank holds after the emergency save, not only those whose host has the notice: a rank that
            # trained on would only wait in its next collective for ranks that are gone (a gang's other hosts),
            # and report steps that no checkpoint holds.
            _wait_until(deadline + EMERGENCY_GRACE_SECONDS)

    def save_async(self, step: int, snapshot: Callable[[], Any], write: Callable[[Any, Path], None]) -> str:
        ranks = self.ranks()
        notice_seen, busy, nonce, _ = self.agree_on_save(ranks)
        if notice_seen:
            with self.save(step) as directory:
                write(snapshot(), directory)
            return "saved"
        if busy:
            self.coalesced += 1
            return "coalesced"
        began = _monotonic()
        state = snapshot()
        slot = self.begin(step, ranks, nonce, notice_seen=False)
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
        if self.control_dir is None or (self.known_ranks is not None and self.known_ranks.rank != 0):
            return  # the ranks step together: rank 0 speaks for them
        every, why = self.interval_seconds()
        progress = protocol.Progress(step=step, time=time.time(), save_blocked_seconds=self.save_cost,
                                     interval_seconds=every or None, interval_reason=why,
                                     saves_coalesced=self.coalesced)
        protocol.write_progress(self.control_dir, progress, f".progress-{os.getpid()}-{threading.get_ident()}.tmp")


def _commit_part(slot: _Slot, record: protocol.SaveRecord) -> None:
    """This rank's part of a save is complete: record it, and commit the save if it was the last part in on this host.

    Each part record is written then renamed, so a part counts only once its files are in. Two ranks that both
    see every part race for the commit claim (O_EXCL); the one that wins writes the save record and renames.
    """
    protocol.write_part_record(slot.path, slot.rank, record)
    if not all((slot.path / protocol.part_record_name(rank)).exists() for rank in slot.node_ranks):
        return
    try:
        os.close(os.open(slot.path / protocol.COMMIT_CLAIM, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    parts = [protocol.read_part_record(slot.path, rank) for rank in slot.node_ranks]
    emergency = [part for part in parts if part.emergency]
    protocol.write_save_record(slot.path, dataclasses.replace(
        record, emergency=bool(emergency), notice_id=emergency[0].notice_id if emergency else None))
    slot.path.rename(slot.final)


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
    world_size = environ.get(protocol.ENV_RESTORE_WORLD_SIZE, "1")
    if not world_size.isdigit() or int(world_size) < 1:
        raise ValueError(f"{protocol.ENV_RESTORE_WORLD_SIZE} is {world_size!r}, not a number of ranks")
    return Restored(step=int(step), path=Path(restore_dir), world_size=int(world_size))


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
    if session is None:
        return None
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0) > 0:
        # torchrun restarted its workers inside the attempt: they start again from the attempt's checkpoint, not
        # from the saves made since (docs/distributed.md: leave restarts to vl, --max-restarts 0).
        print("vaultlayer: torchrun restarted this worker; it resumes from the attempt's checkpoint at step "
              f"{session.restored.step if session.restored else 0}, not from later saves: run torchrun with "
              "--max-restarts 0 under vl", flush=True)
    return session.restored


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
