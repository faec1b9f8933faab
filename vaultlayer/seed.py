"""`vl resume`: a new run starts from another run's newest verified checkpoint.

The checkpoint is copied into the new run as `<step>-a0` (attempt 0: no attempt of the new run has that
number, so none can fence it or write over it) with a manifest of its own that names the new run and the
checkpoint it came from, written last after every file. The copy is verified byte for byte before the new
run starts, and the new run verifies it again before its first attempt, like any checkpoint of its own. The
old run's storage is only read: not even a quarantine record is written there.

Synchronous on purpose, like vaultlayer/checkpoint/: callers run it in threads.
"""

from __future__ import annotations

from datetime import UTC, datetime

from fsspec.core import url_to_fs

from vaultlayer.checkpoint.format import MANIFEST_NAME, CheckpointError, Manifest, checkpoint_name, sha256
from vaultlayer.checkpoint.listing import Standing, classify_checkpoints, verify_checkpoint
from vaultlayer.checkpoint.retention import remove_checkpoint
from vaultlayer.checkpoint.storage import checkpoint_url, in_threads, retry, write_atomically
from vaultlayer.models import CheckpointRef

SEED_ATTEMPT = 0


def newest_verified(storage_url: str, run_id: str, fences: dict[int, int]) -> CheckpointRef | None:
    """The checkpoint the run would resume from next (checkpoint.choose_checkpoint), found without writing."""
    for entry in classify_checkpoints(storage_url, run_id, fences):
        if entry.standing in (Standing.FENCED, Standing.QUARANTINED):
            continue
        _, ref = verify_checkpoint(storage_url, run_id, entry.name)
        if ref is not None:
            return ref
    return None


def copy_checkpoint(source: CheckpointRef, storage_url: str, run_id: str) -> CheckpointRef:
    """Copy the verified checkpoint `source` (in the same storage) into run `run_id`; the verified copy."""
    fs, source_dir = url_to_fs(source.url)
    manifest_bytes = retry(lambda: fs.cat_file(f"{source_dir}/{MANIFEST_NAME}"), "read the manifest")
    if sha256(manifest_bytes) != source.manifest_sha256:
        raise CheckpointError(f"{source.url}/{MANIFEST_NAME} changed since it was verified: sha256 differs")
    manifest = Manifest.model_validate_json(manifest_bytes)
    name = checkpoint_name(source.step, SEED_ATTEMPT)
    _, target_dir = url_to_fs(checkpoint_url(storage_url, run_id, name))

    def copy(relative: str) -> None:
        target = f"{target_dir}/{relative}"
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        retry(lambda: fs.copy(f"{source_dir}/{relative}", target), f"copy {relative}")  # server-side on S3/GCS

    in_threads(copy, [entry.path for entry in manifest.files])
    seed = Manifest(format_version=manifest.format_version, run_id=run_id, attempt=SEED_ATTEMPT, step=source.step,
                    created_at=datetime.now(UTC), files=manifest.files, copied_from=source.url)
    data = seed.model_dump_json(indent=2).encode()
    retry(lambda: write_atomically(fs, f"{target_dir}/{MANIFEST_NAME}", data), "write the manifest")
    check, ref = verify_checkpoint(storage_url, run_id, name)
    if ref is None:
        remove_checkpoint(fs, target_dir)
        raise CheckpointError(f"the copy of {source.url} is not what was copied: {check.reason}")
    return ref
