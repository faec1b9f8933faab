"""The checkpoint format on durable storage (any fsspec URL), and everything done with it.

Layout: `<storage_url>/<run_id>/checkpoints/<step:012d>-a<attempt>/{files..., MANIFEST.json}`; the manifest
is written last, so a checkpoint is complete exactly when its manifest exists (docs/checkpoint-format.md).
One module per job: `format` (names, manifest, digests), `storage` (URLs, retries, atomic writes),
`transfer` (upload, restore), `listing` (the one classification of a directory, verification, the choice of
the checkpoint to resume from), `retention` (what to remove, as a pure plan, and its application).
This module is the package's public API. Synchronous on purpose: the agent and the activities call it from
threads.
"""

from vaultlayer.checkpoint.format import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    READABLE_FORMAT_VERSIONS,
    CheckpointError,
    Manifest,
    ManifestFile,
    checkpoint_name,
    parse_checkpoint_name,
)
from vaultlayer.checkpoint.listing import (
    CheckpointListing,
    CheckpointState,
    Classified,
    Standing,
    choose_checkpoint,
    classify,
    classify_checkpoints,
    describe_checkpoints,
    list_checkpoints,
    quarantine_records,
    verify_checkpoint,
)
from vaultlayer.checkpoint.retention import prune_checkpoints, retention_plan
from vaultlayer.checkpoint.storage import StorageUnusable, check_writable, connect, validate_storage_url
from vaultlayer.checkpoint.transfer import (
    commit_gang_checkpoint,
    gang_checkpoint_committed,
    gang_nodes_missing,
    restore_checkpoint,
    upload_checkpoint,
)

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "READABLE_FORMAT_VERSIONS",
    "CheckpointError",
    "CheckpointListing",
    "CheckpointState",
    "Classified",
    "Manifest",
    "ManifestFile",
    "Standing",
    "checkpoint_name",
    "choose_checkpoint",
    "classify",
    "classify_checkpoints",
    "commit_gang_checkpoint",
    "connect",
    "describe_checkpoints",
    "gang_checkpoint_committed",
    "gang_nodes_missing",
    "list_checkpoints",
    "parse_checkpoint_name",
    "prune_checkpoints",
    "quarantine_records",
    "restore_checkpoint",
    "retention_plan",
    "upload_checkpoint",
    "validate_storage_url",
    "check_writable",
    "StorageUnusable",
    "verify_checkpoint",
]
