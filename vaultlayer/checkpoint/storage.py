"""Durable storage as checkpoints (and the run's logs and seeds) reach it: URLs, retries, atomic writes.

Storage is configured the way each backend is usually configured: s3:// (s3fs) takes credentials and an
S3-compatible endpoint from the AWS chain (AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_S3, ~/.aws/config), gs://
(gcsfs) from Google's default credentials or STORAGE_EMULATOR_HOST, and any protocol takes fsspec's own
config (FSSPEC_S3_ENDPOINT_URL, ~/.config/fsspec/*.json).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import fsspec
import fsspec.core
import structlog
from fsspec.registry import known_implementations

from vaultlayer.checkpoint.format import CheckpointError, new_digest
from vaultlayer.run_ids import run_id_problem

if os.environ.get("STORAGE_EMULATOR_HOST"):
    # gcsfs otherwise first tries gRPC to the emulator, which only speaks JSON over HTTP, for about a minute.
    # It reads this once, when it is first imported (by fsspec, on the first gs:// URL).
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

T = TypeVar("T")
log = structlog.get_logger(__name__)

RETRY_DELAYS_SECONDS = (0.5, 2.0, 5.0)
TRANSFER_THREADS = 8
_CHUNK_BYTES = 1 << 20
# Protocols whose objects appear whole or not at all, so a plain write is already atomic.
_ATOMIC_WRITE_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "memory"}
# Errors about the request itself, not about the storage being briefly unavailable. Everything else is retried:
# storage clients raise their own connection errors (botocore's EndpointConnectionError is no OSError).
_PERMANENT_ERRORS = (
    FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError,
    CheckpointError, ValueError, TypeError, KeyError, AttributeError, NotImplementedError,
)


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


class StorageUnusable(ValueError):
    """A storage URL a run cannot write to; the message names the cause and the fix on one line."""


def check_writable(url: str) -> None:
    """Prove, before anything is provisioned, that a run can use this storage: its URL is well formed,
    credentials are found, the bucket exists, and a small object can be written under the prefix and deleted.
    Once, without retries: a person is waiting, and a later outage during the run is retried as ever."""
    validate_storage_url(url)
    fs, path = fsspec.core.url_to_fs(url, skip_instance_cache=True)  # the credentials as they are now
    probe = f"{path.rstrip('/')}/.vl-write-check-{uuid.uuid4().hex}"
    try:
        if is_local(fs):
            fs.makedirs(path, exist_ok=True)
        fs.pipe_file(probe, b"vaultlayer write check\n")
        fs.rm_file(probe)
    except Exception as err:  # noqa: BLE001 - every backend has its own errors: each is named to the person
        raise StorageUnusable(f"storage {url} cannot be written: {_unusable_because(url, err)}") from None


def connect(url: str) -> None:
    """Open the storage client with one round trip (a listing of the URL). The first use in a process pays the
    backend's imports, its client and its connection: about a second of CPU for S3 on a busy machine, ten times
    an emergency save's upload, so the agent pays it before the script starts rather than after a notice."""
    fs, path = fsspec.core.url_to_fs(url)
    fs.exists(path)


def _unusable_because(url: str, err: Exception) -> str:
    """The cause and its fix, from a backend's error."""
    scheme, _, rest = url.partition("://")
    bucket = rest.split("/", 1)[0]
    if "Credentials" in type(err).__name__:
        fix = ("export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE (aws configure)" if scheme == "s3"
               else "run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS")
        return f"no credentials found ({err}); fix: {fix}"
    if isinstance(err, FileNotFoundError) and scheme not in ("file", "local"):
        return f"bucket {bucket!r} does not exist ({err}); fix: create it, or name one that exists"
    if scheme in ("file", "local") and isinstance(err, OSError):
        return f"cannot write the directory ({err}); fix: name a directory this user can create and write"
    if isinstance(err, PermissionError):
        return f"permission denied ({err}); fix: allow this user to write and delete under the prefix"
    return f"{type(err).__name__}: {err}; fix: check the URL, the credentials and that the storage is reachable"


def run_url(storage_url: str, run_id: str) -> str:
    """The run's directory under the storage root; a run id that could leave the root is refused."""
    problem = run_id_problem(run_id)
    if problem is not None:
        raise ValueError(problem)
    return f"{storage_url.rstrip('/')}/{run_id}"


def checkpoints_url(storage_url: str, run_id: str) -> str:
    return f"{run_url(storage_url, run_id)}/checkpoints"


def checkpoint_url(storage_url: str, run_id: str, name: str) -> str:
    return f"{checkpoints_url(storage_url, run_id)}/{name}"


def quarantine_url(storage_url: str, run_id: str) -> str:
    return f"{run_url(storage_url, run_id)}/quarantine"


def retry(action: Callable[[], T], what: str) -> T:
    """Run `action`, retrying storage errors that may be transient; the last one propagates."""
    for delay in RETRY_DELAYS_SECONDS:
        try:
            return action()
        except _PERMANENT_ERRORS:
            raise
        except Exception as err:  # noqa: BLE001 - see _PERMANENT_ERRORS
            log.warning("storage error, retrying", action=what, error=repr(err), retry_in_s=delay)
            time.sleep(delay)
    return action()


def in_threads(work: Callable[[T], object], items: list[T]) -> list:
    """`work` on every item, several at a time (storage round trips overlap); results in order."""
    if len(items) <= 1:
        return [work(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(TRANSFER_THREADS, len(items))) as pool:
        return list(pool.map(work, items))


def protocols(fs: fsspec.AbstractFileSystem) -> set[str]:
    return {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return bool(protocols(fs) & {"file", "local"})


def write_atomically(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write so that a reader never sees half a file: object stores do that by themselves (and a rename there
    is a copy), a file system needs a write then a rename."""
    if protocols(fs) & _ATOMIC_WRITE_PROTOCOLS:
        fs.pipe_file(path, data)
        return
    partial = f"{path}.vl-partial-{uuid.uuid4().hex[:8]}"
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(partial, data)
    fs.mv(partial, path)


def remote_digest(fs: fsspec.AbstractFileSystem, path: str, algorithm: str) -> str:
    """The digest of a stored file, read back in chunks."""
    digest = new_digest(algorithm)
    with fs.open(path, "rb") as source:
        while chunk := source.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
