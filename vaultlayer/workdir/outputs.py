"""A run's outputs: the directory the script writes its results to (`--output-dir`), stored when the script
succeeds as a snapshot in the same content-addressed store as the code, and named by a pointer in the run's
own storage, so `vl pull` finds them from storage alone (docs/code-and-outputs.md)."""

from __future__ import annotations

import os

from vaultlayer.checkpoint import storage
from vaultlayer.models import SnapshotRef
from vaultlayer.workdir.selection import select_outputs
from vaultlayer.workdir.snapshot import read_pointer, store_snapshot, write_pointer

OUTPUTS_POINTER = "OUTPUTS.json"


def outputs_pointer_url(storage_url: str, run_id: str) -> str:
    return f"{storage.run_url(storage_url, run_id)}/{OUTPUTS_POINTER}"


def store_outputs(directory: str | os.PathLike[str], storage_url: str, run_id: str) -> tuple[SnapshotRef, list[str]]:
    """Store every file of `directory`, then point the run at them (the pointer is written last and whole).
    Returns the snapshot and what was skipped (special files, links that leave the directory)."""
    selection = select_outputs(directory)
    ref = store_snapshot(selection, storage_url)
    write_pointer(outputs_pointer_url(storage_url, run_id), ref, "the outputs pointer")
    return ref, list(selection.skipped)


def stored_outputs(storage_url: str, run_id: str) -> SnapshotRef | None:
    """The run's stored outputs, or None when it stored none."""
    return read_pointer(outputs_pointer_url(storage_url, run_id), "the outputs pointer")
