"""Snapshots of a working directory on storage: the manifest and its content address, storing, and a
verified restore (docs/code-and-outputs.md).

Layout, under any fsspec storage URL (file://, s3://, gs://), shared by every run of that storage:
```
<storage_url>/_code/blobs/<b3[:2]>/<b3>         one object per distinct file content, named by its BLAKE3
<storage_url>/_code/snapshots/<digest>.json     the manifest, written last; <digest> is the BLAKE3 of its bytes
```
A file's content is stored once whatever run, snapshot or path holds it, and a snapshot is complete exactly
when its manifest exists, so a tree stored before costs one existence check. `_code` can never be a run's
directory: run ids start with a letter or a digit.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from pathlib import Path, PurePosixPath

import blake3
import fsspec
from fsspec.core import url_to_fs
from pydantic import Field, ValidationError, field_validator

from vaultlayer.checkpoint import storage
from vaultlayer.checkpoint.format import first_error, local_blake3
from vaultlayer.checkpoint.transfer import part_bytes
from vaultlayer.models import HEX_DIGEST, SnapshotRef, VLModel
from vaultlayer.workdir.errors import SnapshotCorrupt, WorkdirError
from vaultlayer.workdir.selection import SelectedFile, Selection, unsafe_path

CODE_DIR = "_code"
MANIFEST_FORMAT_VERSION = 1
READABLE_MANIFEST_FORMATS = (1,)
EXECUTABLE_MODE = 0o755
REGULAR_MODE = 0o644


class WorkdirFile(VLModel):
    path: str  # relative posix path inside the tree
    size: int = Field(ge=0)
    # Only the executable bit travels, as in git: 0o755 or 0o644 whatever the packing machine's umask was,
    # so the same tree has the same digest everywhere.
    mode: int
    blake3: str = Field(pattern=HEX_DIGEST)

    @field_validator("mode")
    @classmethod
    def _git_modes(cls, mode: int) -> int:
        if mode not in (EXECUTABLE_MODE, REGULAR_MODE):
            raise ValueError(f"mode {mode:o} is neither 755 nor 644")
        return mode


class WorkdirLink(VLModel):
    path: str
    target: str  # relative to the link's directory, posix; resolves inside the tree


class WorkdirManifest(VLModel):
    """Every file and link of a snapshot. Nothing else (no times, no host, no order): the same tree gives
    the same manifest, so the same digest."""

    format_version: int = MANIFEST_FORMAT_VERSION
    files: list[WorkdirFile] = Field(default_factory=list)
    links: list[WorkdirLink] = Field(default_factory=list)

    def canonical_json(self) -> bytes:
        """The bytes stored and hashed: entries sorted by path, keys sorted, no spaces, UTF-8."""
        data = self.model_dump(mode="json")
        data["files"].sort(key=lambda entry: entry["path"])
        data["links"].sort(key=lambda entry: entry["path"])
        return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    @property
    def digest(self) -> str:
        """The snapshot's content address: the BLAKE3 of `canonical_json()`."""
        return blake3.blake3(self.canonical_json()).hexdigest()

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.files)


def code_url(storage_url: str) -> str:
    return f"{storage_url.rstrip('/')}/{CODE_DIR}"


def blob_path(code_path: str, digest: str) -> str:
    return f"{code_path}/blobs/{digest[:2]}/{digest}"


def store_snapshot(selection: Selection, storage_url: str) -> SnapshotRef:
    """Hash every selected file, upload the contents storage does not hold yet, then the manifest, last.
    A snapshot already stored complete is not uploaded again. Raises WorkdirError when a file changed
    while it was read (the snapshot would not be one state of the tree)."""
    storage.validate_storage_url(storage_url)
    url = code_url(storage_url)
    fs, code_path = url_to_fs(url)
    fs.invalidate_cache()
    hashed = storage.in_threads(lambda entry: _hash(selection.root, entry), list(selection.files))
    manifest = WorkdirManifest(files=[entry for entry, _ in hashed],
                               links=[WorkdirLink(path=link.path, target=link.target) for link in selection.links])
    manifest_bytes = manifest.canonical_json()
    ref = SnapshotRef(url=url, digest=blake3.blake3(manifest_bytes).hexdigest(), file_count=len(manifest.files),
                      total_bytes=manifest.total_bytes, link_count=len(manifest.links))
    manifest_path = f"{code_path}/snapshots/{ref.digest}.json"
    if storage.retry(lambda: fs.exists(manifest_path), "look for the snapshot"):
        _check_unchanged(selection.root, hashed)
        return ref
    distinct = list({entry.blake3: entry for entry in manifest.files}.values())

    def send(entry: WorkdirFile) -> None:
        remote = blob_path(code_path, entry.blake3)
        if not storage.retry(lambda: _holds(fs, remote, entry.size), f"look for {entry.path}"):
            storage.retry(lambda: _put(fs, selection.root / entry.path, remote, entry.size), f"upload {entry.path}")

    storage.in_threads(send, distinct)
    _check_unchanged(selection.root, hashed)
    storage.retry(lambda: storage.write_atomically(fs, manifest_path, manifest_bytes), "write the snapshot manifest")
    return ref


def _hash(root: Path, entry: SelectedFile) -> tuple[WorkdirFile, os.stat_result]:
    local = root / entry.path
    try:
        before = os.lstat(local)
        if not stat.S_ISREG(before.st_mode):
            raise FileNotFoundError(local)
        digest = local_blake3(local)
    except FileNotFoundError:
        raise WorkdirError(f"{local} changed since it was selected (it is gone or no longer a file);"
                           f" take the snapshot again") from None
    mode = EXECUTABLE_MODE if before.st_mode & stat.S_IXUSR else REGULAR_MODE  # git's rule
    return WorkdirFile(path=entry.path, size=before.st_size, mode=mode, blake3=digest), before


def _check_unchanged(root: Path, hashed: list[tuple[WorkdirFile, os.stat_result]]) -> None:
    changed = []
    for entry, before in hashed:
        try:
            after = os.lstat(root / entry.path)
        except FileNotFoundError:
            changed.append(entry.path)
            continue
        if (after.st_size, after.st_mtime_ns, after.st_ino) != (before.st_size, before.st_mtime_ns, before.st_ino):
            changed.append(entry.path)
    if changed:
        raise WorkdirError(f"workdir {root}: {', '.join(changed[:10])} changed while the snapshot was taken;"
                           f" take it again when nothing writes to them (nothing refers to what was uploaded)")


def _holds(fs: fsspec.AbstractFileSystem, remote: str, size: int) -> bool:
    """Whether storage holds this content already (a blob is written whole under its name, or not at all)."""
    try:
        return fs.info(remote).get("size") == size
    except FileNotFoundError:
        return False


def _put(fs: fsspec.AbstractFileSystem, local: Path, remote: str, size: int) -> None:
    """Upload so that a blob appears whole: object stores do that by themselves, a file system needs a
    write under another name and a rename (as storage.write_atomically, from a file)."""
    fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
    if not storage.is_local(fs):
        fs.put_file(str(local), remote, chunksize=part_bytes(size))
        return
    partial = f"{remote}.vl-partial-{os.urandom(4).hex()}"
    fs.put_file(str(local), partial)
    fs.mv(partial, remote)


def write_pointer(url: str, ref: SnapshotRef, what: str) -> None:
    """Name a stored snapshot from a run's own storage (its outputs, its setup cache): written whole, after
    the snapshot is complete, so a reader finds the old pointer, none, or this one."""
    fs, path = url_to_fs(url)
    storage.retry(lambda: storage.write_atomically(fs, path, ref.model_dump_json(indent=1).encode()),
                  f"write {what}")


def read_pointer(url: str, what: str) -> SnapshotRef | None:
    """The snapshot a pointer names, or None when there is no pointer."""
    fs, path = url_to_fs(url)
    fs.invalidate_cache()
    try:
        data = storage.retry(lambda: fs.cat_file(path), f"read {what}")
    except FileNotFoundError:
        return None
    return SnapshotRef.model_validate_json(data)


def read_manifest(ref: SnapshotRef) -> WorkdirManifest:
    """The snapshot's manifest, checked against the ref's digest and for paths that could not be unpacked
    safely. Raises SnapshotCorrupt."""
    fs, path = url_to_fs(ref.manifest_url)
    try:
        data = storage.retry(lambda: fs.cat_file(path), "read the snapshot manifest")
    except FileNotFoundError:
        raise SnapshotCorrupt(f"snapshot {ref.short} is not stored: {ref.manifest_url} is missing") from None
    actual = blake3.blake3(data).hexdigest()
    if actual != ref.digest:
        raise SnapshotCorrupt(f"{ref.manifest_url} does not match the snapshot's digest (its BLAKE3 is {actual}):"
                              f" the manifest was changed or damaged")
    try:
        manifest = WorkdirManifest.model_validate_json(data)
    except ValidationError as err:
        raise SnapshotCorrupt(f"unparsable {ref.manifest_url}: {first_error(err)}") from None
    problem, where = _manifest_problem(manifest, ref)
    if problem is not None:
        raise SnapshotCorrupt(f"refusing snapshot {ref.short} ({ref.manifest_url}): {problem}", where)
    return manifest


def _manifest_problem(manifest: WorkdirManifest, ref: SnapshotRef) -> tuple[str | None, str | None]:
    """(why this manifest cannot be unpacked as it is, the path concerned), or (None, None)."""
    if manifest.format_version not in READABLE_MANIFEST_FORMATS:
        return (f"format_version {manifest.format_version}; this code reads"
                f" {', '.join(map(str, READABLE_MANIFEST_FORMATS))}"), None
    kinds = {}
    for entry in [*manifest.files, *manifest.links]:
        reason = unsafe_path(entry.path)
        if reason is not None:
            return f"path {entry.path!r} {reason}", entry.path
        if entry.path in kinds:
            return f"path {entry.path!r} is listed twice", entry.path
        kinds[entry.path] = "link" if isinstance(entry, WorkdirLink) else "file"
    for path in kinds:
        parts = path.split("/")
        for depth in range(1, len(parts)):
            above = "/".join(parts[:depth])
            if above in kinds:
                return f"{path!r} lies under {above!r}, which is a {kinds[above]}", path
    for link in manifest.links:
        lands = os.path.normpath(os.path.join(os.path.dirname(link.path), link.target))
        if (not link.target or "\x00" in link.target or "\\" in link.target or link.target.startswith("/")
                or lands == ".." or lands.startswith("../")):
            return f"link {link.path!r} -> {link.target!r} leads outside the tree", link.path
    if (len(manifest.files), manifest.total_bytes, len(manifest.links)) != (
            ref.file_count, ref.total_bytes, ref.link_count):
        return (f"it lists {len(manifest.files)} files ({manifest.total_bytes} bytes) and {len(manifest.links)}"
                f" links; the ref says {ref.file_count} ({ref.total_bytes} bytes) and {ref.link_count}"), None
    return None, None


def restore_snapshot(ref: SnapshotRef, dest_dir: str | os.PathLike[str]) -> WorkdirManifest:
    """Unpack the snapshot into `dest_dir` (absent, or an empty directory), checking every file against the
    manifest and the manifest against `ref.digest`. The tree is built beside `dest_dir` and renamed into
    place once complete, so `dest_dir` never holds part of a snapshot. Raises SnapshotCorrupt naming the
    file that does not match, WorkdirError when `dest_dir` is not empty."""
    dest = Path(os.path.abspath(dest_dir))
    if dest.exists() and (not dest.is_dir() or dest.is_symlink() or any(dest.iterdir())):
        raise WorkdirError(f"cannot restore snapshot {ref.short} into {dest}: it exists and is not an empty"
                           f" directory; name a new one")
    manifest = read_manifest(ref)
    fs, code_path = url_to_fs(ref.url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.vl-partial-", dir=dest.parent))
    try:
        os.chmod(staging, 0o755)

        def fetch(entry: WorkdirFile) -> None:
            target = staging.joinpath(*PurePosixPath(entry.path).parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            remote = blob_path(code_path, entry.blake3)
            try:
                storage.retry(lambda: fs.get_file(remote, str(target)), f"download {entry.path}")
            except FileNotFoundError:
                raise SnapshotCorrupt(f"{entry.path}: its content ({remote}) is missing from storage",
                                      entry.path) from None
            size, digest = target.stat().st_size, local_blake3(target)
            if (size, digest) != (entry.size, entry.blake3):
                raise SnapshotCorrupt(
                    f"{entry.path}: the stored content ({remote}) has {size} bytes with BLAKE3 {digest},"
                    f" the manifest says {entry.size} bytes with BLAKE3 {entry.blake3}", entry.path)
            os.chmod(target, entry.mode)

        storage.in_threads(fetch, manifest.files)
        for link in manifest.links:  # last: no file is written through a link
            target = staging.joinpath(*PurePosixPath(link.path).parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(link.target, target)
        inside = Path(os.path.realpath(staging))
        for link in manifest.links:  # links through links can leave a tree that each stays in on paper
            lands = Path(os.path.realpath(staging.joinpath(*PurePosixPath(link.path).parts)))
            if not lands.is_relative_to(inside):
                raise SnapshotCorrupt(f"refusing snapshot {ref.short} ({ref.manifest_url}): link {link.path!r}"
                                      f" -> {link.target!r} leads outside the tree through other links", link.path)
        if dest.exists():
            dest.rmdir()
        os.rename(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest
