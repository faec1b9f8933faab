"""Zero-code mode: the script writes and reads its own checkpoints in a directory; the agent keeps it durable.

Before the script starts, the directory is restored from the run's checkpoint, replacing what is there,
as it would be on a fresh host. While the script runs, the directory is snapshotted into the staging
directory, in the SDK's staged-save format, once it has changed and then stayed unchanged for a while
(a save in progress is never half-copied), so the Uploader stores it like any save. A checkpoint's step in
this mode is the snapshot's sequence number in the run: the script's own step is not known here.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

import structlog

from vaultlayer import checkpoint, protocol
from vaultlayer.models import CheckpointRef

log = structlog.get_logger(__name__)

# A changed directory is copied once it has stayed unchanged this long: the script's save has finished.
# Short, so that a script saving every few seconds is still caught between saves; a write during the copy
# is caught anyway (the directory is compared before and after).
SETTLE_SECONDS = 1.0

Signature = tuple[tuple[str, int, int], ...]


def signature(directory: Path) -> Signature:
    """(relative path, size, mtime) of every file under `directory`; symlinks count as what they point to."""
    found = []
    for parent, _, names in os.walk(directory):
        for name in names:
            path = Path(parent) / name
            try:
                stat = path.stat()
            except FileNotFoundError:  # removed while we looked: the next look sees the change
                continue
            found.append((path.relative_to(directory).as_posix(), stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(found))


def restore_directory(ref: CheckpointRef, directory: Path) -> None:
    """Make `directory` hold exactly the checkpoint's files: restored beside it, then swapped in by renames."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    nonce = uuid.uuid4().hex[:8]
    fresh = directory.with_name(f".{directory.name}.vl-restore-{nonce}")
    old = directory.with_name(f".{directory.name}.vl-old-{nonce}")
    fresh.mkdir()
    try:
        checkpoint.restore_checkpoint(ref, fresh)
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    if directory.exists() or directory.is_symlink():
        directory.rename(old)
    fresh.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


class DirectorySnapshots:
    """Stages a snapshot of `directory` whenever it has changed and settled since the last one."""

    def __init__(self, directory: Path, staging: Path, step: int, restored: bool) -> None:
        self.directory = directory
        self.staging = staging
        self.step = step  # of the newest snapshot
        # Restored contents are stored already; an empty directory has nothing to store.
        self.stored = signature(directory) if restored else ()
        self.seen: Signature | None = None
        self.seen_since = 0.0
        self.covered_notice: str | None = None  # a notice whose moment is staged (or needed nothing new)

    def snapshot_if_settled(self, settle_seconds: float, notice_id: str | None = None) -> bool:
        """Stage a snapshot when the directory changed and then stayed unchanged for `settle_seconds`.

        With `notice_id`, a settled directory marks that notice covered, whether it needed a snapshot or not.
        Blocking (copies files): run it in a thread. Returns whether a snapshot was staged.
        """
        now = time.monotonic()
        current = signature(self.directory)
        if current != self.seen:
            self.seen, self.seen_since = current, now
            if settle_seconds > 0:
                return False
        if now - self.seen_since < settle_seconds:
            return False
        staged = current != self.stored and bool(current) and self._stage(current, notice_id)
        if notice_id is not None and (staged or current == self.stored or not current):
            self.covered_notice = notice_id
        return staged

    def _stage(self, expected: Signature, notice_id: str | None) -> bool:
        step = self.step + 1
        nonce = uuid.uuid4().hex[:12]
        partial = self.staging / protocol.staging_name(step, nonce)
        for relative, _, _ in expected:
            target = partial / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copyfile(self.directory / relative, target)
            except FileNotFoundError:
                break
        if signature(self.directory) != expected:  # the script wrote while we copied: wait for it to settle
            shutil.rmtree(partial, ignore_errors=True)
            self.seen = None
            return False
        record = protocol.SaveRecord(step=step, emergency=notice_id is not None, notice_id=notice_id,
                                     created_at=time.time())
        partial.mkdir(parents=True, exist_ok=True)
        protocol.write_save_record(partial, record)
        partial.rename(self.staging / protocol.committed_name(step, nonce))
        self.step, self.stored = step, expected
        log.info("directory snapshot staged", step=step, files=len(expected), notice=notice_id is not None)
        return True
