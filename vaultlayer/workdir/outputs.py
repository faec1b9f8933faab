"""A run's outputs: the directory the script writes its results to (`--output-dir`), stored when the script
succeeds as a snapshot in the same content-addressed store as the code, and named by a pointer in the run's
own storage, so `vl pull` finds them from storage alone (docs/code-and-outputs.md)."""

from __future__ import annotations

import os

from fsspec.core import url_to_fs

from vaultlayer.checkpoint import storage
from vaultlayer.models import SnapshotRef
from vaultlayer.workdir.selection import select_outputs
from vaultlayer.workdir.snapshot import store_snapshot

OUTPUTS_POINTER = "OUTPUTS.json"


def outputs_pointer_url(storage_url: str, run_id: str) -> str:
    return f"{storage.run_url(storage_url, run_id)}/{OUTPUTS_POINTER}"


def store_outputs(directory: str | os.PathLike[str], storage_url: str, run_id: str) -> tuple[SnapshotRef, list[str]]:
    """Store every file of `directory`, then point the run at them (the pointer is written last and whole).
    Returns the snapshot and what was skipped (special files, links that leave the directory)."""
    selection = select_outputs(directory)
    ref = store_snapshot(selection, storage_url)
    fs, path = url_to_fs(outputs_pointer_url(storage_url, run_id))
    storage.retry(lambda: storage.write_atomically(fs, path, ref.model_dump_json(indent=1).encode()),
                  "write the outputs pointer")
    return ref, list(selection.skipped)


def stored_outputs(storage_url: str, run_id: str) -> SnapshotRef | None:
    """The run's stored outputs, or None when it stored none."""
    fs, path = url_to_fs(outputs_pointer_url(storage_url, run_id))
    fs.invalidate_cache()
    try:
        data = storage.retry(lambda: fs.cat_file(path), "read the outputs pointer")
    except FileNotFoundError:
        return None
    return SnapshotRef.model_validate_json(data)
