"""A run's setup cache: what its setup commands left in the package managers' caches (pip's wheels, built
and downloaded; uv's cache) on the first host that finished setup, stored in the same content-addressed
store as the code and named by a pointer in the run's own storage. Every later host restores it before
setup, so a reclaim pays for a download from the run's storage, not for the builds and index downloads
again (docs/code-and-outputs.md, "Setup that does not repeat forever"). It only ever speeds setup up:
a cache that cannot be stored or restored leaves setup as it was.
"""

from __future__ import annotations

import os
from pathlib import Path

from vaultlayer.checkpoint import storage
from vaultlayer.models import SnapshotRef
from vaultlayer.workdir.errors import WorkdirError
from vaultlayer.workdir.selection import human_bytes, select_outputs
from vaultlayer.workdir.snapshot import read_pointer, store_snapshot, write_pointer

SETUP_CACHE_POINTER = "SETUP_CACHE.json"
# A cache bigger than this is not stored: restoring it would cost more than most setups it saves.
MAX_SETUP_CACHE_BYTES = 8_000_000_000


def setup_cache_pointer_url(storage_url: str, run_id: str) -> str:
    return f"{storage.run_url(storage_url, run_id)}/{SETUP_CACHE_POINTER}"


def setup_cache_env(directory: Path) -> dict[str, str]:
    """Where setup's package managers keep their caches: inside the directory that travels."""
    return {"VL_SETUP_CACHE": str(directory), "PIP_CACHE_DIR": str(directory / "pip"),
            "UV_CACHE_DIR": str(directory / "uv")}


def store_setup_cache(directory: str | os.PathLike[str], storage_url: str, run_id: str,
                      max_bytes: int = MAX_SETUP_CACHE_BYTES) -> SnapshotRef:
    """Store every file of the cache `directory`, then point the run at it. Raises WorkdirError when the cache
    is over `max_bytes` (nothing is stored) or cannot be read."""
    selection = select_outputs(directory)
    if selection.total_bytes > max_bytes:
        raise WorkdirError(f"the setup cache holds {human_bytes(selection.total_bytes)}, over the "
                           f"{human_bytes(max_bytes)} worth restoring on every host; not stored")
    ref = store_snapshot(selection, storage_url)
    write_pointer(setup_cache_pointer_url(storage_url, run_id), ref, "the setup cache pointer")
    return ref


def stored_setup_cache(storage_url: str, run_id: str) -> SnapshotRef | None:
    """The run's stored setup cache, or None while no host has stored one."""
    return read_pointer(setup_cache_pointer_url(storage_url, run_id), "the setup cache pointer")
