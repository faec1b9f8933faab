"""What a checkpoint is on storage: its directory name, its manifest and the digests that check its bytes.

A checkpoint is `<step:012d>-a<attempt>/{files..., MANIFEST.json}`; the manifest is written last, so a checkpoint
is complete exactly when its manifest exists (docs/checkpoint-format.md). No I/O here but hashing local files.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

import blake3
from pydantic import Field, ValidationError, model_validator

from vaultlayer.models import VLModel

FORMAT_VERSION = 2  # 2: files are hashed with BLAKE3; 1 (sha256) is still read
READABLE_FORMAT_VERSIONS = (1, 2)
MANIFEST_NAME = "MANIFEST.json"
# A gang's checkpoint (vl run --nodes N): each host uploads the files its ranks wrote, then its node manifest; node 0
# writes MANIFEST.json, listing every node's files, once every node manifest is in. Never read as the manifest.
NODE_MANIFEST_PREFIX = "MANIFEST.node-"
# Attempt 0 holds the checkpoint a run was resumed from (vl resume, vaultlayer/seed.py): attempts count from 1,
# so no attempt of the new run can fence it or write over it.
_NAME = re.compile(r"(?P<step>\d{12,})-a(?P<attempt>0|[1-9]\d*)")


class CheckpointError(Exception):
    """A checkpoint cannot be written or restored as asked; the message says what is wrong."""


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
    world_size: int = Field(default=1, ge=1)  # how many ranks wrote it (torchrun); a restore checks it
    copied_from: str | None = None  # attempt 0: the URL of the other run's checkpoint these files were copied from


def checkpoint_name(step: int, attempt: int) -> str:
    return f"{step:012d}-a{attempt}"


def parse_checkpoint_name(name: str) -> tuple[int, int] | None:
    """(step, attempt) of a checkpoint directory name, or None for anything else in the directory."""
    match = _NAME.fullmatch(name)
    if match is None:
        return None
    return int(match["step"]), int(match["attempt"])


def newest_first(names: Iterable[str]) -> list[tuple[str, int, int]]:
    """(name, step, attempt) of checkpoint names, the newest (highest step, then attempt) first."""
    parsed = [(name, *parse_checkpoint_name(name)) for name in names]
    return sorted(parsed, key=lambda item: (item[1], item[2]), reverse=True)


def unsafe_path_reason(path: str) -> str | None:
    """Why a manifest path could land outside its checkpoint directory (or clash with the manifest), if it could."""
    if not path:
        return "is empty"
    if "\\" in path or "\x00" in path:
        return "holds a backslash or NUL byte"
    if path.startswith("/") or re.match(r"[A-Za-z]:", path):
        return "is absolute"
    if any(part in ("", ".", "..") for part in path.split("/")):
        return "has an empty, '.' or '..' component"
    if path == MANIFEST_NAME or path.startswith(NODE_MANIFEST_PREFIX):
        return f"clashes with the checkpoint's own {MANIFEST_NAME} or a node manifest"
    return None


def node_manifest_name(node_rank: int) -> str:
    return f"{NODE_MANIFEST_PREFIX}{node_rank:05d}.json"


def manifest_mismatch(manifest: Manifest, *, run_id: str, step: int, attempt: int) -> str | None:
    """Why `manifest` is not a readable manifest of this run's checkpoint (step, attempt), if it is not."""
    if manifest.format_version not in READABLE_FORMAT_VERSIONS:
        return (f"{MANIFEST_NAME} has format_version {manifest.format_version};"
                f" this code reads {', '.join(map(str, READABLE_FORMAT_VERSIONS))}")
    for field, expected in (("run_id", run_id), ("step", step), ("attempt", attempt)):
        actual = getattr(manifest, field)
        if actual != expected:
            return f"{MANIFEST_NAME} says {field} {actual!r}, the directory says {expected!r}"
    paths = [entry.path for entry in manifest.files]
    for path in paths:
        reason = unsafe_path_reason(path)
        if reason is not None:
            return f"{MANIFEST_NAME} path {path!r} {reason}"
    if len(set(paths)) != len(paths):
        return f"{MANIFEST_NAME} lists a path twice"
    return None


def first_error(err: ValidationError) -> str:
    """The first problem of a manifest that does not parse, in one line."""
    first = err.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where}: {first['msg']}" if where else first["msg"]


def local_blake3(path: Path) -> str:
    return blake3.blake3(max_threads=blake3.blake3.AUTO).update_mmap(path).hexdigest()


def local_digest(path: Path, algorithm: str) -> str:
    if algorithm == "blake3":
        return local_blake3(path)
    with open(path, "rb") as source:
        return hashlib.file_digest(source, "sha256").hexdigest()


def new_digest(algorithm: str):
    return blake3.blake3() if algorithm == "blake3" else hashlib.sha256()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
