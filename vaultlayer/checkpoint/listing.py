"""What a run's storage holds: listing, the one classification of a checkpoint directory, verification, and
the choice of the checkpoint to resume from.

Listing manifests is the only truth; there is no "latest" pointer a crash could leave wrong. Bad checkpoints
are not moved (a move is a copy on object stores); a small record under `<run>/quarantine/<name>.json` says
why they are skipped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import PurePosixPath

import fsspec
from fsspec.core import url_to_fs
from pydantic import ValidationError

from vaultlayer.checkpoint import storage
from vaultlayer.checkpoint.format import (
    MANIFEST_NAME,
    Manifest,
    ManifestFile,
    first_error,
    manifest_mismatch,
    newest_first,
    parse_checkpoint_name,
    sha256,
)
from vaultlayer.models import CheckpointCheck, CheckpointRef, VerifyResult, VLModel


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


class Standing(StrEnum):
    """Where a checkpoint directory stands before its bytes are read; the first that applies wins."""

    FENCED = "fenced"  # newer than its attempt's fence: a written-off host (a zombie) wrote it
    QUARANTINED = "quarantined"  # found bad before: skipped without being read again
    PARTIAL = "partial"  # no manifest: still being uploaded, or an upload that never finished
    COMPLETE = "complete"  # a manifest: resumable once its bytes are verified


@dataclass(frozen=True)
class Classified:
    """One checkpoint directory of a run and its standing."""

    name: str
    step: int
    attempt: int
    standing: Standing
    reason: str  # why it is fenced, quarantined or partial; empty when complete
    has_manifest: bool
    size: int  # bytes in storage
    quarantine_record: CheckpointCheck | None = None  # when quarantined: the record that says why

    def rejection(self) -> CheckpointCheck:
        """How a choice reports passing over this checkpoint without reading it (fenced or quarantined)."""
        return self.quarantine_record or CheckpointCheck(name=self.name, step=self.step, attempt=self.attempt,
                                                         ok=False, reason=self.reason)


def classify(
    stored: Mapping[str, Mapping[str, int]], fences: Mapping[int, int], quarantined: Mapping[str, CheckpointCheck]
) -> list[Classified]:
    """The one classification of every checkpoint directory, newest first. Pure.

    `stored`: each directory's files (relative path -> size); `fences`: attempt -> the highest step accepted
    from it; `quarantined`: the quarantine records by checkpoint name.
    """
    classified = []
    for name, step, attempt in newest_first(stored):
        has_manifest = MANIFEST_NAME in stored[name]
        record = quarantined.get(name)
        if attempt in fences and step > fences[attempt]:
            standing, reason = Standing.FENCED, f"fenced: attempt {attempt} ended at step {fences[attempt]}"
        elif record is not None:
            standing, reason = Standing.QUARANTINED, record.reason
        elif not has_manifest:
            standing, reason = Standing.PARTIAL, f"no {MANIFEST_NAME}: the upload never finished"
        else:
            standing, reason = Standing.COMPLETE, ""
        classified.append(Classified(name=name, step=step, attempt=attempt, standing=standing, reason=reason,
                                     has_manifest=has_manifest, size=sum(stored[name].values()),
                                     quarantine_record=record if standing is Standing.QUARANTINED else None))
    return classified


def classify_checkpoints(storage_url: str, run_id: str, fences: Mapping[int, int]) -> list[Classified]:
    """Every checkpoint directory of the run, newest first, classified from one listing. Reads no manifest."""
    fs, checkpoints_dir = url_to_fs(storage.checkpoints_url(storage_url, run_id))
    return classify(stored_checkpoints(fs, checkpoints_dir), fences, _quarantined_by_name(storage_url, run_id))


def list_checkpoints(storage_url: str, run_id: str) -> list[tuple[str, int, int]]:
    """(name, step, attempt) of every checkpoint directory, complete or not, newest first."""
    fs, checkpoints_dir = url_to_fs(storage.checkpoints_url(storage_url, run_id))
    fs.invalidate_cache(checkpoints_dir)  # another host may have written since this fs listed
    try:
        entries = storage.retry(lambda: fs.ls(checkpoints_dir, detail=True), "list checkpoints")
    except FileNotFoundError:
        return []
    names = [PurePosixPath(entry["name"].rstrip("/")).name for entry in entries if entry["type"] == "directory"]
    return newest_first(name for name in names if parse_checkpoint_name(name) is not None)


def stored_checkpoints(fs: fsspec.AbstractFileSystem, checkpoints_dir: str) -> dict[str, dict[str, int]]:
    """Each checkpoint directory's files (relative path -> size), from one recursive listing."""
    fs.invalidate_cache(checkpoints_dir)
    try:
        found = storage.retry(lambda: fs.find(checkpoints_dir, detail=True), "list checkpoint files")
    except FileNotFoundError:
        return {}
    prefix = checkpoints_dir.rstrip("/") + "/"
    stored: dict[str, dict[str, int]] = {}
    for path, info in found.items():
        name, _, relative = path.removeprefix(prefix).partition("/")
        if path.startswith(prefix) and relative and parse_checkpoint_name(name) is not None:
            stored.setdefault(name, {})[relative] = int(info.get("size") or 0)
    return stored


def verify_checkpoint(storage_url: str, run_id: str, name: str) -> tuple[CheckpointCheck, CheckpointRef | None]:
    """Check a checkpoint against its manifest, re-reading every byte from storage.

    A bad checkpoint comes back as ok=False with the reason. Storage that stays unreachable through
    the retries raises instead: an outage must not get a good checkpoint quarantined.
    """
    parsed = parse_checkpoint_name(name)
    if parsed is None:
        raise ValueError(f"{name!r} is not a checkpoint name (<step:012d>-a<attempt>)")
    step, attempt = parsed
    url = storage.checkpoint_url(storage_url, run_id, name)
    fs, remote_dir = url_to_fs(url)

    def bad(reason: str) -> tuple[CheckpointCheck, None]:
        return CheckpointCheck(name=name, step=step, attempt=attempt, ok=False, reason=reason), None

    read = read_manifest(fs, remote_dir, run_id=run_id, step=step, attempt=attempt)
    if isinstance(read, str):
        return bad(read)
    manifest, manifest_bytes = read
    problem = _stored_files_problem(fs, remote_dir, manifest)
    if problem is not None:
        return bad(problem)
    ref = CheckpointRef(name=name, step=step, attempt=attempt, url=url, manifest_sha256=sha256(manifest_bytes))
    return CheckpointCheck(name=name, step=step, attempt=attempt, ok=True), ref


def choose_checkpoint(storage_url: str, run_id: str, fences: dict[int, int]) -> VerifyResult:
    """The newest checkpoint that is neither fenced, nor quarantined, nor bad; and why the newer ones were not.

    `fences` maps an attempt to the highest step accepted from it: anything newer came from a host
    that was already written off (a zombie) and must not win. A checkpoint found bad is quarantined.
    """
    result = VerifyResult()
    for entry in classify_checkpoints(storage_url, run_id, fences):
        if entry.standing in (Standing.FENCED, Standing.QUARANTINED):
            result.rejected.append(entry.rejection())
            continue
        check, ref = verify_checkpoint(storage_url, run_id, entry.name)  # a partial one reads as bad
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
    fs, checkpoints_dir = url_to_fs(storage.checkpoints_url(storage_url, run_id))
    listings = []
    for entry in classify_checkpoints(storage_url, run_id, fences):
        listing = CheckpointListing(name=entry.name, step=entry.step, attempt=entry.attempt,
                                    url=storage.checkpoint_url(storage_url, run_id, entry.name),
                                    state=CheckpointState.BAD, size=entry.size)
        listings.append(listing)
        if entry.standing in (Standing.FENCED, Standing.QUARANTINED):
            listing.reason = entry.reason
            continue
        remote_dir = f"{checkpoints_dir}/{entry.name}"
        read = read_manifest(fs, remote_dir, run_id=run_id, step=entry.step, attempt=entry.attempt)
        if isinstance(read, str):
            if entry.standing is Standing.PARTIAL and entry.attempt not in ended:
                listing.state, listing.reason = CheckpointState.UPLOADING, f"attempt {entry.attempt} is still running"
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


def read_manifest(
    fs: fsspec.AbstractFileSystem, remote_dir: str, *, run_id: str, step: int, attempt: int
) -> tuple[Manifest, bytes] | str:
    """The checkpoint's manifest and its bytes, or why it is not a usable manifest of this checkpoint."""
    try:
        manifest_bytes = storage.retry(lambda: fs.cat_file(f"{remote_dir}/{MANIFEST_NAME}"), "read the manifest")
    except FileNotFoundError:
        return f"no {MANIFEST_NAME}: the upload never finished"
    try:
        manifest = Manifest.model_validate_json(manifest_bytes)
    except ValidationError as err:
        return f"unparsable {MANIFEST_NAME}: {first_error(err)}"
    reason = manifest_mismatch(manifest, run_id=run_id, step=step, attempt=attempt)
    return reason if reason is not None else (manifest, manifest_bytes)


def quarantine_records(storage_url: str, run_id: str) -> list[CheckpointCheck]:
    """Every checkpoint found bad so far, newest first. An unreadable record is ignored: its checkpoint is
    simply verified (and quarantined) again."""
    fs, quarantine_dir = url_to_fs(storage.quarantine_url(storage_url, run_id))
    fs.invalidate_cache(quarantine_dir)
    try:
        paths = storage.retry(lambda: fs.ls(quarantine_dir, detail=False), "list quarantine records")
    except FileNotFoundError:
        return []
    records = []
    for path in paths:
        if not path.endswith(".json"):
            continue
        try:
            record = storage.retry(lambda: fs.cat_file(path), "read a quarantine record")
            records.append(CheckpointCheck.model_validate_json(record))
        except (FileNotFoundError, ValidationError):
            continue
    return sorted(records, key=lambda record: (record.step, record.attempt), reverse=True)


def _quarantined_by_name(storage_url: str, run_id: str) -> dict[str, CheckpointCheck]:
    return {record.name: record for record in quarantine_records(storage_url, run_id)}


def _write_quarantine_record(storage_url: str, run_id: str, check: CheckpointCheck) -> None:
    fs, quarantine_dir = url_to_fs(storage.quarantine_url(storage_url, run_id))
    record = check.model_dump(mode="json") | {"quarantined_at": datetime.now(UTC).isoformat()}
    data = json.dumps(record, indent=2).encode()
    storage.retry(lambda: storage.write_atomically(fs, f"{quarantine_dir}/{check.name}.json", data),
                  "write a quarantine record")


def _stored_files_problem(fs: fsspec.AbstractFileSystem, remote_dir: str, manifest: Manifest) -> str | None:
    """The first file whose stored bytes differ from the manifest (size, then the digest of every byte), if any."""

    def check(entry: ManifestFile) -> str | None:
        remote = f"{remote_dir}/{entry.path}"
        try:
            size = storage.retry(lambda: fs.size(remote), f"stat {entry.path}")
        except FileNotFoundError:
            return f"{entry.path}: missing"
        if size != entry.size:
            return f"{entry.path}: size {size} bytes, manifest says {entry.size}"
        digest = storage.retry(lambda: storage.remote_digest(fs, remote, entry.algorithm), f"read {entry.path}")
        if digest != entry.digest:
            return f"{entry.path}: {entry.algorithm} {digest}, manifest says {entry.digest}"
        return None

    # s3fs opens a file with the ETag its cached listing holds (If-Match), so a file rewritten since can fail
    # every read with FileExpired: the worker's long-lived filesystem failed a verification so until the run
    # failed (chaos soak seed 4). Listed afresh, the bytes stored now are read and judged.
    fs.invalidate_cache(remote_dir)
    problems = [problem for problem in storage.in_threads(check, manifest.files) if problem is not None]
    return problems[0] if problems else None
