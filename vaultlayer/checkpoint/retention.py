"""Retention: which checkpoints no attempt will resume from, as a pure plan, and the removal that applies it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping

import fsspec
import structlog
from fsspec.core import url_to_fs

from vaultlayer.checkpoint import storage
from vaultlayer.checkpoint.format import MANIFEST_NAME
from vaultlayer.checkpoint.listing import Classified, Standing, classify_checkpoints

log = structlog.get_logger(__name__)


def retention_plan(
    classified: Iterable[Classified], keep: int, reported: Mapping[int, int], protect: Iterable[str] = ()
) -> list[str]:
    """The checkpoints to remove, newest first. Pure.

    Keeps the newest `keep` complete checkpoints (a manifest, neither fenced nor quarantined) and those in
    `protect` (the one a running attempt resumed from). Removes older complete ones, and the partial uploads
    left by attempts that ended (`reported`: attempt -> the durable step it reported, -1 for none): no
    manifest and above that step, so their host died or was written off before finishing them, fenced or not.
    Fenced and quarantined checkpoints stay as evidence (`vl checkpoints` says why), and so does a directory
    without a manifest at or below the reported step: it was complete once; verification will report it.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, not {keep}")
    protected = set(protect)
    kept, remove = 0, []
    for entry in classified:
        if not entry.has_manifest:
            if entry.attempt in reported and entry.step > reported[entry.attempt]:
                remove.append(entry.name)
        elif entry.standing in (Standing.FENCED, Standing.QUARANTINED):
            continue
        elif kept < keep:
            kept += 1
        elif entry.name not in protected:
            remove.append(entry.name)
    return remove


def prune_checkpoints(
    storage_url: str,
    run_id: str,
    keep: int,
    fences: dict[int, int],
    reported: dict[int, int],
    protect: Iterable[str] = (),
) -> list[str]:
    """Retention (`retention_plan`) applied to the run's storage; returns the names removed."""
    plan = retention_plan(classify_checkpoints(storage_url, run_id, fences), keep, reported, protect)
    fs, checkpoints_dir = url_to_fs(storage.checkpoints_url(storage_url, run_id))
    for name in plan:
        remove_checkpoint(fs, f"{checkpoints_dir}/{name}")
    return plan


def remove_checkpoint(fs: fsspec.AbstractFileSystem, remote_dir: str) -> None:
    """Manifest first: a removal cut short leaves a partial upload, never a complete-looking checkpoint."""
    with contextlib.suppress(FileNotFoundError):
        storage.retry(lambda: fs.rm_file(f"{remote_dir}/{MANIFEST_NAME}"), "remove a manifest")
    with contextlib.suppress(FileNotFoundError):
        storage.retry(lambda: fs.rm(remote_dir, recursive=True), "remove a checkpoint")
    log.info("checkpoint removed", checkpoint=remote_dir.rsplit("/", 1)[-1])
