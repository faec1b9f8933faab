"""Moving checkpoints: upload a staged save (files in parallel, the manifest last) and restore a verified one.

Every byte is checked on the way, without slowing the copy: a digest is taken alongside the transfer
(docs/checkpoint-speed.md). Synchronous on purpose: the agent and the activities call it from threads.
"""

from __future__ import annotations

import errno
import math
import mmap
import os
import queue
import threading
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

import blake3
import fsspec
from fsspec.core import url_to_fs
from pydantic import Field, ValidationError

from vaultlayer import protocol
from vaultlayer.checkpoint import storage
from vaultlayer.checkpoint.format import (
    MANIFEST_NAME,
    CheckpointError,
    Manifest,
    ManifestFile,
    checkpoint_name,
    first_error,
    local_blake3,
    local_digest,
    new_digest,
    node_manifest_name,
    sha256,
    unsafe_path_reason,
)
from vaultlayer.models import CheckpointRef, VLModel

# Part sizes (docs/checkpoint-speed.md): below SINGLE_PUT_BYTES a file goes up in one request, like s3fs's own
# default (one PUT below 100 MiB); above, in about TARGET_PARTS parts sent in parallel (s3fs; gcsfs sends
# them in turn), each at most MAX_PART_BYTES (s3fs holds 10 parts in memory at once) unless S3's limit of
# MAX_PARTS parts needs more, and never under S3's minimum part of MIN_PART_BYTES.
SINGLE_PUT_BYTES = 128 << 20
TARGET_PARTS = 16
MIN_PART_BYTES = 5 << 20
MAX_PART_BYTES = 128 << 20
MAX_PARTS = 10_000
# file:// restore copies in chunks of this size, each hashed right after the kernel copied it.
COPY_CHUNK_BYTES = 32 << 20


def part_bytes(size: int) -> int:
    """The part size for a file of `size` bytes, a whole number of MiB (gcsfs wants multiples of 256 KiB).

    Fewer, bigger parts than a fixed 8 MiB: every part is a request with its own latency (12 of them for a
    96 MiB file where one PUT does), while about 16 parts still keep a parallel upload busy.
    """
    if size < SINGLE_PUT_BYTES:  # s3fs sends one PUT when size < 2 x part size
        return max(MIN_PART_BYTES, _whole_mib(size))
    part = min(MAX_PART_BYTES, _whole_mib(math.ceil(size / TARGET_PARTS)))
    return max(MIN_PART_BYTES, part, _whole_mib(math.ceil(size / MAX_PARTS)))


def _whole_mib(size: int) -> int:
    return math.ceil(size / (1 << 20)) << 20


def upload_checkpoint(
    local_dir: Path,
    storage_url: str,
    run_id: str,
    attempt: int,
    step: int,
    skip: Iterable[str] = (),
    world_size: int = 1,
    node: tuple[int, int] | None = None,
) -> CheckpointRef | None:
    """Upload every file of `local_dir` (but the top-level names in `skip` and the SDK's save records), then the
    manifest, last. `world_size`: how many ranks wrote the files, recorded in the manifest.

    `node` (rank, nodes) for one host of a gang: its files and its node manifest go up, and the checkpoint is not
    complete until node 0 merges every node manifest (`commit_gang_checkpoint`); returns None then.

    A file's digest is the one the SDK's writer recorded in its save record when the file is unchanged since
    (same size and mtime), else computed alongside the upload; either way the file must not change while it
    is sent, so the manifest describes exactly what storage got.
    """
    local_dir = Path(local_dir)
    recorded = _recorded_digests(local_dir)
    skipped = set(skip)
    relative_paths = [path for path in _local_files(local_dir)
                      if path not in skipped and not ("/" not in path and protocol.is_save_bookkeeping(path))]
    for relative in relative_paths:
        reason = unsafe_path_reason(relative)
        if reason is not None:
            raise CheckpointError(f"cannot upload {local_dir / relative}: {reason}")
    name = checkpoint_name(step, attempt)
    url = storage.checkpoint_url(storage_url, run_id, name)
    fs, remote_dir = url_to_fs(url)

    def send(relative: str) -> ManifestFile:
        remote = f"{remote_dir}/{relative}"
        known = recorded.get(relative)
        return storage.retry(lambda: _send_file(fs, local_dir / relative, remote, relative, known),
                             f"upload {relative}")

    files = storage.in_threads(send, relative_paths)
    files.sort(key=lambda entry: entry.path)
    manifest = Manifest(run_id=run_id, attempt=attempt, step=step, created_at=datetime.now(UTC), files=files,
                        world_size=world_size)
    manifest_bytes = manifest.model_dump_json(indent=2).encode()
    written = MANIFEST_NAME if node is None else node_manifest_name(node[0])
    storage.retry(lambda: storage.write_atomically(fs, f"{remote_dir}/{written}", manifest_bytes),
                  "write the manifest")
    if node is not None:
        return None
    return CheckpointRef(name=name, step=step, attempt=attempt, url=url, manifest_sha256=sha256(manifest_bytes))


def gang_nodes_missing(storage_url: str, run_id: str, attempt: int, step: int, nodes: int) -> list[int]:
    """The node ranks whose part of the gang's checkpoint (step, attempt) is not stored yet (no node manifest)."""
    fs, remote_dir = url_to_fs(storage.checkpoint_url(storage_url, run_id, checkpoint_name(step, attempt)))
    fs.invalidate_cache(remote_dir)
    try:
        names = {PurePosixPath(path).name
                 for path in storage.retry(lambda: fs.ls(remote_dir, detail=False), "list node manifests")}
    except FileNotFoundError:
        names = set()
    return [rank for rank in range(nodes) if node_manifest_name(rank) not in names]


def gang_checkpoint_committed(storage_url: str, run_id: str, attempt: int, step: int) -> bool:
    """Whether node 0 committed the gang's checkpoint (step, attempt): its manifest is stored. Before that, a
    node's stored part is no checkpoint anyone can resume from."""
    fs, remote_dir = url_to_fs(storage.checkpoint_url(storage_url, run_id, checkpoint_name(step, attempt)))
    fs.invalidate_cache(remote_dir)
    return storage.retry(lambda: fs.exists(f"{remote_dir}/{MANIFEST_NAME}"), "look for a gang's manifest")


def commit_gang_checkpoint(storage_url: str, run_id: str, attempt: int, step: int, nodes: int) -> CheckpointRef:
    """Node 0's commit of a gang's checkpoint once every node's part is stored: one manifest listing every node's
    files (which must not overlap: each rank writes files of its own), written last like any manifest."""
    name = checkpoint_name(step, attempt)
    url = storage.checkpoint_url(storage_url, run_id, name)
    fs, remote_dir = url_to_fs(url)
    parts = []
    for rank in range(nodes):
        raw = storage.retry(lambda rank=rank: fs.cat_file(f"{remote_dir}/{node_manifest_name(rank)}"),
                            "read a node manifest")
        try:
            parts.append(Manifest.model_validate_json(raw))
        except ValidationError as err:
            raise CheckpointError(f"unparsable {url}/{node_manifest_name(rank)}: {first_error(err)}") from None
    files = sorted((entry for part in parts for entry in part.files), key=lambda entry: entry.path)
    paths = [entry.path for entry in files]
    if len(set(paths)) != len(paths):
        twice = sorted({path for path in paths if paths.count(path) > 1})
        raise CheckpointError(f"two nodes of the gang wrote {', '.join(twice[:3])} for step {step}: each rank must "
                              "write files of its own (docs/distributed.md)")
    manifest = Manifest(run_id=run_id, attempt=attempt, step=step, created_at=datetime.now(UTC), files=files,
                        world_size=max(part.world_size for part in parts))
    manifest_bytes = manifest.model_dump_json(indent=2).encode()
    storage.retry(lambda: storage.write_atomically(fs, f"{remote_dir}/{MANIFEST_NAME}", manifest_bytes),
                  "write the manifest")
    return CheckpointRef(name=name, step=step, attempt=attempt, url=url, manifest_sha256=sha256(manifest_bytes))


def restore_checkpoint(ref: CheckpointRef, dest_dir: Path) -> Manifest:
    """Download a verified checkpoint into `dest_dir`, checking every byte against the manifest; returns it.

    The manifest must be the very one that was verified (same sha256), and every path in it must stay
    inside `dest_dir`; both are checked before anything is written.
    """
    fs, remote_dir = url_to_fs(ref.url)
    try:
        manifest_bytes = storage.retry(lambda: fs.cat_file(f"{remote_dir}/{MANIFEST_NAME}"), "read the manifest")
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ref.url} has no {MANIFEST_NAME}") from None
    if sha256(manifest_bytes) != ref.manifest_sha256:
        raise CheckpointError(f"{ref.url}/{MANIFEST_NAME} changed since it was verified: sha256 differs")
    try:
        manifest = Manifest.model_validate_json(manifest_bytes)
    except ValidationError as err:
        raise CheckpointError(f"unparsable {ref.url}/{MANIFEST_NAME}: {first_error(err)}") from None
    if (manifest.step, manifest.attempt) != (ref.step, ref.attempt):
        raise CheckpointError(
            f"{ref.url}/{MANIFEST_NAME} is for step {manifest.step} attempt {manifest.attempt},"
            f" expected step {ref.step} attempt {ref.attempt}"
        )
    dest_root = Path(dest_dir).resolve()
    targets = {}
    for entry in manifest.files:
        reason = unsafe_path_reason(entry.path)
        target = dest_root.joinpath(*PurePosixPath(entry.path).parts) if reason is None else None
        if target is not None and not target.resolve().is_relative_to(dest_root):
            reason = f"resolves to {target.resolve()}, outside {dest_root}"
        if reason is not None:
            raise CheckpointError(f"refusing to restore {ref.url}: manifest path {entry.path!r} {reason}")
        targets[entry.path] = target

    def fetch(entry: ManifestFile) -> None:
        remote = f"{remote_dir}/{entry.path}"
        storage.retry(lambda: _fetch_file(fs, remote, targets[entry.path], entry), f"download {entry.path}")

    storage.in_threads(fetch, manifest.files)
    return manifest


def _local_files(local_dir: Path) -> list[str]:
    """Relative posix paths of every file under `local_dir`, sorted."""
    if not local_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {local_dir} does not exist")
    found = []
    for parent, _, names in os.walk(local_dir):
        for name in names:
            found.append((Path(parent) / name).relative_to(local_dir).as_posix())
    return sorted(found)


def _send_file(fs: fsspec.AbstractFileSystem, local: Path, remote: str, relative: str,
               known: _RecordedDigest | None = None) -> ManifestFile:
    """Upload one file (multipart when big). Its digest is `known` when the file still has the size and
    mtime it was hashed at, else another thread hashes it during the upload, so the upload runs at the
    storage's speed rather than the sum of both; stat before and after checks the file did not change.

    Staged saves belong to the agent once committed, so a change means something else writes there.
    """
    before = local.stat()
    fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
    if known is not None and (known.size, known.mtime_ns) == (before.st_size, before.st_mtime_ns):
        fs.put_file(str(local), remote, chunksize=part_bytes(before.st_size))
        checksum = known.blake3
    else:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vl-hash") as hasher:
            digest = hasher.submit(local_blake3, local)
            fs.put_file(str(local), remote, chunksize=part_bytes(before.st_size))
            checksum = digest.result()
    after = local.stat()
    if (after.st_size, after.st_mtime_ns, after.st_ino) != (before.st_size, before.st_mtime_ns, before.st_ino):
        raise CheckpointError(f"{local} changed while it was uploaded")
    return ManifestFile(path=relative, size=before.st_size, blake3=checksum)


class _RecordedDigest(VLModel):
    size: int
    mtime_ns: int
    blake3: str = Field(pattern=r"^[0-9a-f]{64}$")


def _recorded_digests(local_dir: Path) -> dict[str, _RecordedDigest]:
    """The digests the SDK's writer recorded in its save record; none when it has no valid "files" entry."""
    try:
        files = protocol.read_save_record(local_dir).files
        return {path: _RecordedDigest.model_validate(entry) for path, entry in files.items()}
    except (OSError, ValueError, KeyError, AttributeError, TypeError):  # pydantic's ValidationError is a ValueError
        return {}


def _fetch_file(fs: fsspec.AbstractFileSystem, remote: str, target: Path, entry: ManifestFile) -> None:
    """Download to a temporary name beside `target` and rename only once size and digest match."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.vl-partial-{uuid.uuid4().hex[:8]}")
    try:
        if storage.is_local(fs):
            size, digest = _copy_hashing(fs, remote, partial, entry.algorithm)
        else:  # one streamed GET, then hash the local copy: far faster than the network, so nearly free
            fs.get_file(remote, str(partial))
            size, digest = partial.stat().st_size, local_digest(partial, entry.algorithm)
        if size != entry.size or digest != entry.digest:
            raise CheckpointError(
                f"{remote}: got {size} bytes with {entry.algorithm} {digest},"
                f" manifest says {entry.size} bytes with {entry.algorithm} {entry.digest}"
            )
        os.replace(partial, target)
    except FileNotFoundError:
        raise CheckpointError(f"{remote} is in the manifest but missing from storage") from None
    finally:
        partial.unlink(missing_ok=True)


def _copy_hashing(fs: fsspec.AbstractFileSystem, remote: str, partial: Path, algorithm: str) -> tuple[int, str]:
    """Copy a file of a local (or mounted) file system chunk by chunk with the kernel's copy, while another
    thread hashes each chunk of the stored file right behind it: the copy has just brought those pages into
    memory, so the file is read from disk once, the check overlaps the copy, and no byte passes through
    Python. Stored checkpoint files are never rewritten, so the bytes hashed are the bytes copied. The hash
    takes every core but one, which the copy keeps."""
    hasher = _new_hasher(algorithm)
    copied: queue.SimpleQueue[int | None] = queue.SimpleQueue()  # end offset of each chunk copied; None: done
    with open(fs._strip_protocol(remote), "rb") as source, open(partial, "xb") as target:
        size = os.fstat(source.fileno()).st_size
        hashing = threading.Thread(target=_hash_behind, args=(source, size, hasher, copied), name="vl-hash")
        hashing.start()
        offset = 0
        try:
            while offset < size:
                sent = _kernel_copy(source.fileno(), target.fileno(), offset, min(COPY_CHUNK_BYTES, size - offset))
                if sent == 0:  # the stored file is shorter than it was a moment ago
                    break
                offset += sent
                copied.put(offset)
        finally:
            copied.put(None)
            hashing.join()
    return offset, hasher.hexdigest()


def _new_hasher(algorithm: str):
    if algorithm == "blake3":
        return blake3.blake3(max_threads=max(1, len(os.sched_getaffinity(0)) - 1))
    return new_digest(algorithm)


def _hash_behind(source, size: int, hasher, copied: queue.SimpleQueue) -> None:
    """Hash the stored file up to each offset the copy reports, through one read-only map of it."""
    if size == 0:
        while copied.get() is not None:
            pass
        return
    with mmap.mmap(source.fileno(), size, access=mmap.ACCESS_READ) as mapped, memoryview(mapped) as view:
        hashed = 0
        while (end := copied.get()) is not None:
            hasher.update(view[hashed:end])
            hashed = end


def _kernel_copy(source: int, target: int, offset: int, count: int) -> int:
    """Copy `count` bytes at `offset` in the kernel: copy_file_range (a reflink where the file system can),
    else sendfile."""
    try:
        return os.copy_file_range(source, target, count, offset, offset)
    except OSError as err:
        if err.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    os.lseek(target, offset, os.SEEK_SET)
    return os.sendfile(target, source, offset, count)
