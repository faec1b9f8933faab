"""The checkpoint format on durable storage (any fsspec URL).

Layout: `<storage_url>/<run_id>/checkpoints/<step:012d>-a<attempt>/{files..., MANIFEST.json}`.
The manifest is written last, so a checkpoint is complete exactly when its manifest exists; listing
manifests is the only truth, there is no "latest" pointer a crash could leave wrong. Bad checkpoints
are not moved (a move is a copy on object stores); a small record under
`<storage_url>/<run_id>/quarantine/<name>.json` says why they are skipped.

Storage is configured the way each backend is usually configured: s3:// (s3fs) takes credentials and an
S3-compatible endpoint from the AWS chain (AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_S3, ~/.aws/config), gs://
(gcsfs) from Google's default credentials or STORAGE_EMULATOR_HOST, and any protocol takes fsspec's own
config (FSSPEC_S3_ENDPOINT_URL, ~/.config/fsspec/*.json).

Synchronous on purpose: the agent and the activities call it from threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import TypeVar

import blake3
import fsspec
import structlog
from fsspec.core import url_to_fs
from fsspec.registry import known_implementations
from pydantic import Field, ValidationError, model_validator

from vaultlayer.models import CheckpointCheck, CheckpointRef, VerifyResult, VLModel
from vaultlayer.run_ids import run_id_problem

if os.environ.get("STORAGE_EMULATOR_HOST"):
    # gcsfs otherwise first tries gRPC to the emulator, which only speaks JSON over HTTP, for about a minute.
    # It reads this once, when it is first imported (by fsspec, on the first gs:// URL).
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

FORMAT_VERSION = 2  # 2: files are hashed with BLAKE3; 1 (sha256) is still read
READABLE_FORMAT_VERSIONS = (1, 2)
MANIFEST_NAME = "MANIFEST.json"

_CHUNK_BYTES = 1 << 20
# Files of at least two parts go up as a multipart upload, parts in parallel (s3fs; gcsfs sends them in turn).
_PART_BYTES = 8 << 20
_TRANSFER_THREADS = 8
_CHUNKS_IN_FLIGHT = 4  # a download's chunks waiting to be hashed: bounds its memory to 4 parts
_RETRY_DELAYS_SECONDS = (0.5, 2.0, 5.0)
# Protocols whose objects appear whole or not at all, so a plain write is already atomic.
_ATOMIC_WRITE_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "memory"}
# Attempt 0 holds the checkpoint a run was resumed from (vl resume, vaultlayer/seed.py): attempts count from 1,
# so no attempt of the new run can fence it or write over it.
_NAME = re.compile(r"(?P<step>\d{12,})-a(?P<attempt>0|[1-9]\d*)")

T = TypeVar("T")
log = structlog.get_logger(__name__)


class CheckpointError(Exception):
    """A checkpoint cannot be written or restored as asked; the message says what is wrong."""


# Errors about the request itself, not about the storage being briefly unavailable. Everything else is retried:
# storage clients raise their own connection errors (botocore's EndpointConnectionError is no OSError).
_PERMANENT_ERRORS = (
    FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError,
    CheckpointError, ValueError, TypeError, KeyError, AttributeError, NotImplementedError,
)


class ManifestFile(VLModel):
    """One file of a checkpoint: exactly one digest, BLAKE3 (written since format 2) or sha256 (format 1).

    BLAKE3 is a cryptographic hash several times faster than sha256, so checking every byte keeps up with
    the copy itself on upload and restore (docs/checkpoint-speed.md).
    """

    path: str  # relative posix path inside the checkpoint directory
    size: int
    blake3: str | None = None
    sha256: str | None = None

    @model_validator(mode="after")
    def _one_digest(self) -> ManifestFile:
        if (self.blake3 is None) == (self.sha256 is None):
            raise ValueError(f"{self.path}: needs exactly one of blake3 or sha256")
        return self

    @property
    def algorithm(self) -> str:
        return "blake3" if self.blake3 is not None else "sha256"

    @property
    def digest(self) -> str:
        return self.blake3 or self.sha256 or ""


class Manifest(VLModel):
    format_version: int = FORMAT_VERSION
    run_id: str
    attempt: int
    step: int
    created_at: datetime
    files: list[ManifestFile]
    copied_from: str | None = None  # attempt 0: the URL of the other run's checkpoint these files were copied from


class CheckpointState(StrEnum):
    COMPLETE = "complete"
    BAD = "bad"  # corrupt, partial or fenced: never resumed from; `reason` says which
    UPLOADING = "uploading"  # no manifest yet, and its attempt has not ended


class CheckpointListing(VLModel):
    """One checkpoint as `vl checkpoints` shows it."""

    name: str
    step: int
    attempt: int
    url: str
    state: CheckpointState
    reason: str = ""
    size: int  # bytes in storage
    created_at: datetime | None = None  # from the manifest


def validate_storage_url(url: str) -> None:
    """Fail early, with the fix in the message, on a storage URL that fsspec cannot open."""
    protocol, has_scheme, path = url.partition("://")
    if not has_scheme:
        raise ValueError(
            f"storage URL {url!r} has no scheme; use file:///abs/path, s3://bucket/prefix or gs://bucket/prefix"
        )
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise ValueError(
            f"storage URL {url!r}: fsspec knows no protocol {protocol!r}; use file://, s3:// or gs://"
        ) from None
    except ImportError as err:
        package = known_implementations.get(protocol, {}).get("class", protocol).split(".")[0]
        # fsspec's own implementations name the missing package in `err` (sftp needs paramiko, ...).
        fix = "install the package it names" if package == "fsspec" else f"install {package} (pip install {package})"
        raise ValueError(
            f"storage URL {url!r}: protocol {protocol!r} needs a package that is not installed ({err}); {fix}"
        ) from None
    if protocol in ("file", "local") and not path.startswith("/"):
        raise ValueError(
            f"storage URL {url!r} is a relative path, which means something different on every host;"
            f" use file:///abs/path"
        )


def checkpoint_name(step: int, attempt: int) -> str:
    return f"{step:012d}-a{attempt}"


def parse_checkpoint_name(name: str) -> tuple[int, int] | None:
    """(step, attempt) of a checkpoint directory name, or None for anything else in the directory."""
    match = _NAME.fullmatch(name)
    if match is None:
        return None
    return int(match["step"]), int(match["attempt"])


def upload_checkpoint(
    local_dir: Path,
    storage_url: str,
    run_id: str,
    attempt: int,
    step: int,
    skip: Iterable[str] = ("vl-save.json",),
) -> CheckpointRef:
    """Upload every file of `local_dir` (but the top-level names in `skip`), then the manifest, last.

    A file's digest is the one the SDK's writer recorded in vl-save.json when the file is unchanged since
    (same size and mtime), else computed alongside the upload; either way the file must not change while it
    is sent, so the manifest describes exactly what storage got.
    """
    local_dir = Path(local_dir)
    recorded = _recorded_digests(local_dir)
    skipped = set(skip)
    relative_paths = [path for path in _local_files(local_dir) if path not in skipped]
    for relative in relative_paths:
        reason = _unsafe_path_reason(relative)
        if reason is not None:
            raise CheckpointError(f"cannot upload {local_dir / relative}: {reason}")
    name = checkpoint_name(step, attempt)
    url = _checkpoint_url(storage_url, run_id, name)
    fs, remote_dir = url_to_fs(url)

    def send(relative: str) -> ManifestFile:
        remote = f"{remote_dir}/{relative}"
        known = recorded.get(relative)
        return _retry(lambda: _send_file(fs, local_dir / relative, remote, relative, known), f"upload {relative}")

    files = _in_threads(send, relative_paths)
    files.sort(key=lambda entry: entry.path)
    manifest = Manifest(run_id=run_id, attempt=attempt, step=step, created_at=datetime.now(UTC), files=files)
    manifest_bytes = manifest.model_dump_json(indent=2).encode()
    _retry(lambda: _write_atomically(fs, f"{remote_dir}/{MANIFEST_NAME}", manifest_bytes), "write the manifest")
    return CheckpointRef(name=name, step=step, attempt=attempt, url=url, manifest_sha256=_sha256(manifest_bytes))


def list_checkpoints(storage_url: str, run_id: str) -> list[tuple[str, int, int]]:
    """(name, step, attempt) of every checkpoint directory, complete or not, newest first."""
    fs, checkpoints_dir = url_to_fs(_run_url(storage_url, run_id) + "/checkpoints")
    fs.invalidate_cache(checkpoints_dir)  # another host may have written since this fs listed
    try:
        entries = _retry(lambda: fs.ls(checkpoints_dir, detail=True), "list checkpoints")
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        name = PurePosixPath(entry["name"].rstrip("/")).name
        parsed = parse_checkpoint_name(name)
        if entry["type"] == "directory" and parsed is not None:
            found.append((name, *parsed))
    return sorted(found, key=lambda item: (item[1], item[2]), reverse=True)


def verify_checkpoint(storage_url: str, run_id: str, name: str) -> tuple[CheckpointCheck, CheckpointRef | None]:
    """Check a checkpoint against its manifest, re-reading every byte from storage.

    A bad checkpoint comes back as ok=False with the reason. Storage that stays unreachable through
    the retries raises instead: an outage must not get a good checkpoint quarantined.
    """
    parsed = parse_checkpoint_name(name)
    if parsed is None:
        raise ValueError(f"{name!r} is not a checkpoint name (<step:012d>-a<attempt>)")
    step, attempt = parsed
    url = _checkpoint_url(storage_url, run_id, name)
    fs, remote_dir = url_to_fs(url)

    def bad(reason: str) -> tuple[CheckpointCheck, None]:
        return CheckpointCheck(name=name, step=step, attempt=attempt, ok=False, reason=reason), None

    read = _read_manifest(fs, remote_dir, run_id=run_id, step=step, attempt=attempt)
    if isinstance(read, str):
        return bad(read)
    manifest, manifest_bytes = read
    problem = _stored_files_problem(fs, remote_dir, manifest)
    if problem is not None:
        return bad(problem)
    ref = CheckpointRef(name=name, step=step, attempt=attempt, url=url, manifest_sha256=_sha256(manifest_bytes))
    return CheckpointCheck(name=name, step=step, attempt=attempt, ok=True), ref


def _read_manifest(
    fs: fsspec.AbstractFileSystem, remote_dir: str, *, run_id: str, step: int, attempt: int
) -> tuple[Manifest, bytes] | str:
    """The checkpoint's manifest and its bytes, or why it is not a usable manifest of this checkpoint."""
    try:
        manifest_bytes = _retry(lambda: fs.cat_file(f"{remote_dir}/{MANIFEST_NAME}"), "read the manifest")
    except FileNotFoundError:
        return f"no {MANIFEST_NAME}: the upload never finished"
    try:
        manifest = Manifest.model_validate_json(manifest_bytes)
    except ValidationError as err:
        return f"unparsable {MANIFEST_NAME}: {_first_error(err)}"
    reason = _manifest_mismatch(manifest, run_id=run_id, step=step, attempt=attempt)
    return reason if reason is not None else (manifest, manifest_bytes)


def _stored_files_problem(fs: fsspec.AbstractFileSystem, remote_dir: str, manifest: Manifest) -> str | None:
    """The first file whose stored bytes differ from the manifest (size, then the digest of every byte), if any."""

    def check(entry: ManifestFile) -> str | None:
        remote = f"{remote_dir}/{entry.path}"
        try:
            size = _retry(lambda: fs.size(remote), f"stat {entry.path}")
        except FileNotFoundError:
            return f"{entry.path}: missing"
        if size != entry.size:
            return f"{entry.path}: size {size} bytes, manifest says {entry.size}"
        digest = _retry(lambda: _remote_digest(fs, remote, entry.algorithm), f"read {entry.path}")
        if digest != entry.digest:
            return f"{entry.path}: {entry.algorithm} {digest}, manifest says {entry.digest}"
        return None

    problems = [problem for problem in _in_threads(check, manifest.files) if problem is not None]
    return problems[0] if problems else None


def choose_checkpoint(storage_url: str, run_id: str, fences: dict[int, int]) -> VerifyResult:
    """The newest checkpoint that is neither fenced, nor quarantined, nor bad; and why the newer ones were not.

    `fences` maps an attempt to the highest step accepted from it: anything newer came from a host
    that was already written off (a zombie) and must not win.
    """
    quarantined = {record.name: record for record in quarantine_records(storage_url, run_id)}
    result = VerifyResult()
    for name, step, attempt in list_checkpoints(storage_url, run_id):
        if _fenced(step, attempt, fences):
            reason = _fence_reason(attempt, fences)
            result.rejected.append(CheckpointCheck(name=name, step=step, attempt=attempt, ok=False, reason=reason))
        elif name in quarantined:
            result.rejected.append(quarantined[name])
        else:
            check, ref = verify_checkpoint(storage_url, run_id, name)
            if ref is not None:
                result.chosen = ref
                return result
            _write_quarantine_record(storage_url, run_id, check)
            result.rejected.append(check)
    return result


def describe_checkpoints(
    storage_url: str, run_id: str, fences: dict[int, int], ended: Iterable[int] = (), verify: bool = False
) -> list[CheckpointListing]:
    """Every checkpoint directory of the run, newest first, as `choose_checkpoint` would judge it.

    `ended`: the attempts that are over; a directory without a manifest is still being uploaded only by an
    attempt that is not. Reads manifests and quarantine records; with `verify`, also re-hashes every stored
    byte. Writes nothing.
    """
    ended = set(ended)
    fs, checkpoints_dir = url_to_fs(_run_url(storage_url, run_id) + "/checkpoints")
    stored = _stored_checkpoints(fs, checkpoints_dir)
    quarantined = {record.name: record for record in quarantine_records(storage_url, run_id)}
    listings = []
    for name, step, attempt in _newest_first(stored):
        listing = CheckpointListing(name=name, step=step, attempt=attempt, url=_checkpoint_url(storage_url, run_id, name),
                                    state=CheckpointState.BAD, size=sum(stored[name].values()))
        listings.append(listing)
        if _fenced(step, attempt, fences):
            listing.reason = _fence_reason(attempt, fences)
            continue
        if name in quarantined:
            listing.reason = quarantined[name].reason
            continue
        remote_dir = f"{checkpoints_dir}/{name}"
        read = _read_manifest(fs, remote_dir, run_id=run_id, step=step, attempt=attempt)
        if isinstance(read, str):
            if MANIFEST_NAME not in stored[name] and attempt not in ended:
                listing.state, listing.reason = CheckpointState.UPLOADING, f"attempt {attempt} is still running"
            else:
                listing.reason = read
            continue
        manifest, _ = read
        listing.created_at = manifest.created_at
        problem = _stored_files_problem(fs, remote_dir, manifest) if verify else None
        if problem is not None:
            listing.reason = problem
        else:
            listing.state = CheckpointState.COMPLETE
    return listings


def prune_checkpoints(
    storage_url: str,
    run_id: str,
    keep: int,
    fences: dict[int, int],
    reported: dict[int, int],
    protect: Iterable[str] = (),
) -> list[str]:
    """Retention: remove what no attempt will resume from, and return the names removed.

    Keeps the newest `keep` complete checkpoints (a manifest, neither fenced nor quarantined) and those in
    `protect` (the one a running attempt resumed from). Removes older complete ones, and the partial uploads
    left by attempts that ended (`reported`: attempt -> the durable step it reported, -1 for none): no
    manifest and above that step, so their host died or was written off before finishing them.
    Fenced and quarantined checkpoints stay as evidence (`vl checkpoints` says why), and so does a directory
    without a manifest at or below the reported step: it was complete once; verification will report it.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, not {keep}")
    fs, checkpoints_dir = url_to_fs(_run_url(storage_url, run_id) + "/checkpoints")
    stored = _stored_checkpoints(fs, checkpoints_dir)
    quarantined = {record.name for record in quarantine_records(storage_url, run_id)}
    protected = set(protect)
    kept, removed = 0, []
    for name, step, attempt in _newest_first(stored):
        if MANIFEST_NAME not in stored[name]:
            if attempt in reported and step > reported[attempt]:
                _remove_checkpoint(fs, f"{checkpoints_dir}/{name}")
                removed.append(name)
        elif _fenced(step, attempt, fences) or name in quarantined:
            continue
        elif kept < keep:
            kept += 1
        elif name not in protected:
            _remove_checkpoint(fs, f"{checkpoints_dir}/{name}")
            removed.append(name)
    return removed


def restore_checkpoint(ref: CheckpointRef, dest_dir: Path) -> None:
    """Download a verified checkpoint into `dest_dir`, checking every byte against the manifest.

    The manifest must be the very one that was verified (same sha256), and every path in it must stay
    inside `dest_dir`; both are checked before anything is written.
    """
    fs, remote_dir = url_to_fs(ref.url)
    try:
        manifest_bytes = _retry(lambda: fs.cat_file(f"{remote_dir}/{MANIFEST_NAME}"), "read the manifest")
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ref.url} has no {MANIFEST_NAME}") from None
    if _sha256(manifest_bytes) != ref.manifest_sha256:
        raise CheckpointError(f"{ref.url}/{MANIFEST_NAME} changed since it was verified: sha256 differs")
    try:
        manifest = Manifest.model_validate_json(manifest_bytes)
    except ValidationError as err:
        raise CheckpointError(f"unparsable {ref.url}/{MANIFEST_NAME}: {_first_error(err)}") from None
    if (manifest.step, manifest.attempt) != (ref.step, ref.attempt):
        raise CheckpointError(
            f"{ref.url}/{MANIFEST_NAME} is for step {manifest.step} attempt {manifest.attempt},"
            f" expected step {ref.step} attempt {ref.attempt}"
        )
    dest_root = Path(dest_dir).resolve()
    targets = {}
    for entry in manifest.files:
        reason = _unsafe_path_reason(entry.path)
        target = dest_root.joinpath(*PurePosixPath(entry.path).parts) if reason is None else None
        if target is not None and not target.resolve().is_relative_to(dest_root):
            reason = f"resolves to {target.resolve()}, outside {dest_root}"
        if reason is not None:
            raise CheckpointError(f"refusing to restore {ref.url}: manifest path {entry.path!r} {reason}")
        targets[entry.path] = target

    def fetch(entry: ManifestFile) -> None:
        remote = f"{remote_dir}/{entry.path}"
        _retry(lambda: _fetch_file(fs, remote, targets[entry.path], entry), f"download {entry.path}")

    _in_threads(fetch, manifest.files)


def quarantine_records(storage_url: str, run_id: str) -> list[CheckpointCheck]:
    """Every checkpoint found bad so far, newest first. An unreadable record is ignored: its checkpoint is
    simply verified (and quarantined) again."""
    fs, quarantine_dir = url_to_fs(_run_url(storage_url, run_id) + "/quarantine")
    fs.invalidate_cache(quarantine_dir)
    try:
        paths = _retry(lambda: fs.ls(quarantine_dir, detail=False), "list quarantine records")
    except FileNotFoundError:
        return []
    records = []
    for path in paths:
        if not path.endswith(".json"):
            continue
        try:
            record = _retry(lambda: fs.cat_file(path), "read a quarantine record")
            records.append(CheckpointCheck.model_validate_json(record))
        except (FileNotFoundError, ValidationError):
            continue
    return sorted(records, key=lambda record: (record.step, record.attempt), reverse=True)


def _write_quarantine_record(storage_url: str, run_id: str, check: CheckpointCheck) -> None:
    fs, quarantine_dir = url_to_fs(_run_url(storage_url, run_id) + "/quarantine")
    record = check.model_dump(mode="json") | {"quarantined_at": datetime.now(UTC).isoformat()}
    data = json.dumps(record, indent=2).encode()
    _retry(lambda: _write_atomically(fs, f"{quarantine_dir}/{check.name}.json", data), "write a quarantine record")


def _fenced(step: int, attempt: int, fences: dict[int, int]) -> bool:
    return attempt in fences and step > fences[attempt]


def _fence_reason(attempt: int, fences: dict[int, int]) -> str:
    return f"fenced: attempt {attempt} ended at step {fences[attempt]}"


def _stored_checkpoints(fs: fsspec.AbstractFileSystem, checkpoints_dir: str) -> dict[str, dict[str, int]]:
    """Each checkpoint directory's files (relative path -> size), from one recursive listing."""
    fs.invalidate_cache(checkpoints_dir)
    try:
        found = _retry(lambda: fs.find(checkpoints_dir, detail=True), "list checkpoint files")
    except FileNotFoundError:
        return {}
    prefix = checkpoints_dir.rstrip("/") + "/"
    stored: dict[str, dict[str, int]] = {}
    for path, info in found.items():
        name, _, relative = path.removeprefix(prefix).partition("/")
        if path.startswith(prefix) and relative and parse_checkpoint_name(name) is not None:
            stored.setdefault(name, {})[relative] = int(info.get("size") or 0)
    return stored


def _newest_first(names: Iterable[str]) -> list[tuple[str, int, int]]:
    parsed = [(name, *parse_checkpoint_name(name)) for name in names]
    return sorted(parsed, key=lambda item: (item[1], item[2]), reverse=True)


def _remove_checkpoint(fs: fsspec.AbstractFileSystem, remote_dir: str) -> None:
    """Manifest first: a removal cut short leaves a partial upload, never a complete-looking checkpoint."""
    with contextlib.suppress(FileNotFoundError):
        _retry(lambda: fs.rm_file(f"{remote_dir}/{MANIFEST_NAME}"), "remove a manifest")
    with contextlib.suppress(FileNotFoundError):
        _retry(lambda: fs.rm(remote_dir, recursive=True), "remove a checkpoint")
    log.info("checkpoint removed", checkpoint=remote_dir.rsplit("/", 1)[-1])


def _run_url(storage_url: str, run_id: str) -> str:
    """The run's directory under the storage root; a run id that could leave the root is refused."""
    problem = run_id_problem(run_id)
    if problem is not None:
        raise ValueError(problem)
    return f"{storage_url.rstrip('/')}/{run_id}"


def _checkpoint_url(storage_url: str, run_id: str, name: str) -> str:
    return f"{_run_url(storage_url, run_id)}/checkpoints/{name}"


def _local_files(local_dir: Path) -> list[str]:
    """Relative posix paths of every file under `local_dir`, sorted."""
    if not local_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {local_dir} does not exist")
    found = []
    for parent, _, names in os.walk(local_dir):
        for name in names:
            found.append((Path(parent) / name).relative_to(local_dir).as_posix())
    return sorted(found)


def _unsafe_path_reason(path: str) -> str | None:
    """Why a manifest path could land outside its checkpoint directory (or clash with the manifest), if it could."""
    if not path:
        return "is empty"
    if "\\" in path or "\x00" in path:
        return "holds a backslash or NUL byte"
    if path.startswith("/") or re.match(r"[A-Za-z]:", path):
        return "is absolute"
    if any(part in ("", ".", "..") for part in path.split("/")):
        return "has an empty, '.' or '..' component"
    if path == MANIFEST_NAME:
        return f"clashes with the checkpoint's own {MANIFEST_NAME}"
    return None


def _manifest_mismatch(manifest: Manifest, *, run_id: str, step: int, attempt: int) -> str | None:
    if manifest.format_version not in READABLE_FORMAT_VERSIONS:
        return (f"{MANIFEST_NAME} has format_version {manifest.format_version};"
                f" this code reads {', '.join(map(str, READABLE_FORMAT_VERSIONS))}")
    for field, expected in (("run_id", run_id), ("step", step), ("attempt", attempt)):
        actual = getattr(manifest, field)
        if actual != expected:
            return f"{MANIFEST_NAME} says {field} {actual!r}, the directory says {expected!r}"
    paths = [entry.path for entry in manifest.files]
    for path in paths:
        reason = _unsafe_path_reason(path)
        if reason is not None:
            return f"{MANIFEST_NAME} path {path!r} {reason}"
    if len(set(paths)) != len(paths):
        return f"{MANIFEST_NAME} lists a path twice"
    return None


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
        fs.put_file(str(local), remote, chunksize=_PART_BYTES)
        checksum = known.blake3
    else:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vl-hash") as hasher:
            digest = hasher.submit(_local_blake3, local)
            fs.put_file(str(local), remote, chunksize=_PART_BYTES)
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
    """The digests the SDK's writer recorded in vl-save.json; none when it has no valid "files" entry."""
    try:
        files = json.loads((local_dir / "vl-save.json").read_text()).get("files") or {}
        return {path: _RecordedDigest.model_validate(entry) for path, entry in files.items()}
    except (OSError, ValueError, AttributeError, TypeError):  # pydantic's ValidationError is a ValueError
        return {}


def _local_blake3(path: Path) -> str:
    return blake3.blake3(max_threads=blake3.blake3.AUTO).update_mmap(path).hexdigest()


def _fetch_file(fs: fsspec.AbstractFileSystem, remote: str, target: Path, entry: ManifestFile) -> None:
    """Download to a temporary name beside `target` and rename only once size and digest match."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.vl-partial-{uuid.uuid4().hex[:8]}")
    try:
        if _is_local(fs):
            size, digest = _copy_hashing(fs, remote, partial, entry.algorithm)
        else:  # one streamed GET, then hash the local copy: far faster than the network, so nearly free
            fs.get_file(remote, str(partial))
            size, digest = partial.stat().st_size, _local_digest(partial, entry.algorithm)
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
    """Copy a file of a local (or mounted) file system with the kernel's copy while a second thread hashes the
    stored bytes in place: the copy and the check overlap instead of adding up, and neither passes the bytes
    through Python. Stored checkpoint files are never rewritten, so the bytes hashed are the bytes copied."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vl-hash") as hasher:
        digest = hasher.submit(_local_digest, Path(fs._strip_protocol(remote)), algorithm)
        fs.get_file(remote, str(partial))
        checksum = digest.result()
    return partial.stat().st_size, checksum


def _protocols(fs: fsspec.AbstractFileSystem) -> set[str]:
    return {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return bool(_protocols(fs) & {"file", "local"})


def _local_digest(path: Path, algorithm: str) -> str:
    if algorithm == "blake3":
        return _local_blake3(path)
    with open(path, "rb") as source:
        return hashlib.file_digest(source, "sha256").hexdigest()


def _write_atomically(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write so that a reader never sees half a file: object stores do that by themselves (and a rename there
    is a copy), a file system needs a write then a rename."""
    if _protocols(fs) & _ATOMIC_WRITE_PROTOCOLS:
        fs.pipe_file(path, data)
        return
    partial = f"{path}.vl-partial-{uuid.uuid4().hex[:8]}"
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(partial, data)
    fs.mv(partial, path)


def _new_digest(algorithm: str):
    return blake3.blake3() if algorithm == "blake3" else hashlib.sha256()


def _remote_digest(fs: fsspec.AbstractFileSystem, path: str, algorithm: str) -> str:
    digest = _new_digest(algorithm)
    with fs.open(path, "rb") as source:
        while chunk := source.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _first_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where}: {first['msg']}" if where else first["msg"]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _retry(action: Callable[[], T], what: str) -> T:
    """Run `action`, retrying storage errors that may be transient; the last one propagates."""
    for delay in _RETRY_DELAYS_SECONDS:
        try:
            return action()
        except _PERMANENT_ERRORS:
            raise
        except Exception as err:  # noqa: BLE001 - see _PERMANENT_ERRORS
            log.warning("storage error, retrying", action=what, error=repr(err), retry_in_s=delay)
            time.sleep(delay)
    return action()


def _in_threads(work: Callable[[T], object], items: list[T]) -> list:
    if len(items) <= 1:
        return [work(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(_TRANSFER_THREADS, len(items))) as pool:
        return list(pool.map(work, items))
