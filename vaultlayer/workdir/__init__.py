"""The code travels with the run: a snapshot of the working directory, packed once into the run's storage,
content-addressed, and unpacked and verified on every host (docs/code-and-outputs.md).

    selection = select_files(root, exclude_paths=[checkpoint_dir, vl_home])   # reads the tree, writes nothing
    ref = store_snapshot(selection, storage_url)                              # -> SnapshotRef (the spec keeps it)
    restore_snapshot(ref, attempt_dir)                                        # on the host, before setup
    store_outputs(output_dir, storage_url, run_id)                            # on the host, when the script succeeds
    store_setup_cache(cache_dir, storage_url, run_id)                         # on the host, once setup finished

One module per job: `ignore` (gitignore syntax), `selection` (what goes in, and the checks before anything
is written), `snapshot` (manifest, content address, store, verified restore), `outputs` (a run's output
directory and its pointer), `setup_cache` (what setup's package managers cached, and its pointer), `errors`.
This module is the package's public API.
"""

from vaultlayer.models import SnapshotRef
from vaultlayer.workdir.errors import (
    SecretsRefused,
    SnapshotCorrupt,
    UnsafeLinks,
    WorkdirError,
    WorkdirTooLarge,
)
from vaultlayer.workdir.outputs import OUTPUTS_POINTER, outputs_pointer_url, stored_outputs, store_outputs
from vaultlayer.workdir.selection import (
    ALLOW_SECRET_FLAG,
    DEFAULT_EXCLUDES,
    DEFAULT_MAX_BYTES,
    MAX_SIZE_FLAG,
    SECRET_NAMES,
    SelectedFile,
    SelectedLink,
    Selection,
    human_bytes,
    is_likely_secret,
    parse_size,
    select_files,
    select_outputs,
)
from vaultlayer.workdir.setup_cache import (
    MAX_SETUP_CACHE_BYTES,
    SETUP_CACHE_POINTER,
    setup_cache_env,
    store_setup_cache,
    stored_setup_cache,
)
from vaultlayer.workdir.snapshot import (
    CODE_DIR,
    WorkdirFile,
    WorkdirLink,
    WorkdirManifest,
    code_url,
    read_manifest,
    restore_snapshot,
    store_snapshot,
)

__all__ = [
    "ALLOW_SECRET_FLAG",
    "CODE_DIR",
    "DEFAULT_EXCLUDES",
    "DEFAULT_MAX_BYTES",
    "MAX_SETUP_CACHE_BYTES",
    "MAX_SIZE_FLAG",
    "OUTPUTS_POINTER",
    "SECRET_NAMES",
    "SETUP_CACHE_POINTER",
    "SecretsRefused",
    "SelectedFile",
    "SelectedLink",
    "Selection",
    "SnapshotCorrupt",
    "SnapshotRef",
    "UnsafeLinks",
    "WorkdirError",
    "WorkdirFile",
    "WorkdirLink",
    "WorkdirManifest",
    "WorkdirTooLarge",
    "code_url",
    "human_bytes",
    "is_likely_secret",
    "outputs_pointer_url",
    "parse_size",
    "read_manifest",
    "restore_snapshot",
    "select_files",
    "select_outputs",
    "setup_cache_env",
    "store_outputs",
    "store_setup_cache",
    "store_snapshot",
    "stored_outputs",
    "stored_setup_cache",
]
