"""The working-directory snapshot (vaultlayer/workdir/): which files go in (git's view, .gitignore read here,
.vlignore, defaults), the refusals (secrets, links, size), the manifest's content address, storing with
deduplication, and the verified restore. Real files, real `git`, file:// storage, and S3 (moto) where the
storage matters."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.object_storage import storage_fs
from vaultlayer.workdir import (
    ALLOW_SECRET_FLAG,
    MAX_SIZE_FLAG,
    SecretsRefused,
    SnapshotCorrupt,
    SnapshotRef,
    UnsafeLinks,
    WorkdirError,
    WorkdirFile,
    WorkdirLink,
    WorkdirManifest,
    WorkdirTooLarge,
    code_url,
    read_manifest,
    restore_snapshot,
    select_files,
    store_snapshot,
)
from vaultlayer.workdir import snapshot as snapshot_module
from vaultlayer.workdir.selection import SOURCE_GIT

FILE_AND_S3 = pytest.mark.parametrize("storage_url", ["file", "s3"], indirect=True)

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


@pytest.fixture(autouse=True)
def hermetic_git(tmp_path: Path, monkeypatch) -> Path:
    """git sees no repository above tmp_path and no user or system configuration but a global excludes file
    of the test's own."""
    global_ignore = tmp_path / "global-gitignore"
    global_ignore.write_text("*.globally-ignored\n")
    config = tmp_path / "gitconfig"
    config.write_text(f"[user]\n\tname = t\n\temail = t@example.com\n[core]\n\texcludesFile = {global_ignore}\n")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(config))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    for name in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        monkeypatch.delenv(name, raising=False)
    return global_ignore


def write(root: Path, files: dict[str, str | bytes]) -> Path:
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return root


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


def paths(selection) -> set[str]:
    return {entry.path for entry in selection.files} | {link.path for link in selection.links}


# --- What goes in ------------------------------------------------------------------------------------------------

def test_inside_git_its_own_view_decides(tmp_path):
    root = write(tmp_path / "proj", {
        "train.py": "print('train')\n",
        "model/net.py": "net\n",
        "data/big.bin": "x" * 1000,
        ".gitignore": "data/\n*.log\n",
        "model/.gitignore": "scratch.py\n",
        "model/scratch.py": "scratch\n",
        "run.log": "log\n",
        "notes.md": "untracked but not ignored\n",
        "gone.py": "deleted after the commit\n",
        "x.globally-ignored": "core.excludesFile\n",
        "local-only.txt": ".git/info/exclude\n",
        "tracked.log": "tracked despite *.log\n",
    })
    git(root, "init", "-q")
    git(root, "add", "train.py", "model/net.py", ".gitignore", "model/.gitignore", "gone.py")
    git(root, "add", "-f", "tracked.log")
    git(root, "commit", "-qm", "first")
    (root / "gone.py").unlink()
    (root / ".git" / "info" / "exclude").write_text("local-only.txt\n")

    selection = select_files(root)

    assert paths(selection) == {"train.py", "model/net.py", ".gitignore", "model/.gitignore", "notes.md",
                                "tracked.log"}
    assert selection.ignore_sources == (SOURCE_GIT,)
    assert selection.summary().endswith(f"{SOURCE_GIT} applied")


def test_a_project_in_a_subfolder_of_a_repository_sees_its_parents_rules(tmp_path):
    repo = write(tmp_path / "repo", {".gitignore": "*.tmp\n", "proj/a.py": "a\n", "proj/b.tmp": "b\n",
                                      "other/c.py": "c\n"})
    git(repo, "init", "-q")

    assert paths(select_files(repo / "proj")) == {"a.py"}


def test_a_project_inside_an_ignored_folder_of_a_repository_reads_its_own_gitignore(tmp_path):
    repo = write(tmp_path / "home", {".gitignore": "projects/\n", "projects/p/a.py": "a\n",
                                      "projects/p/b.out": "b\n", "projects/p/.gitignore": "*.out\n"})
    git(repo, "init", "-q")

    selection = select_files(repo / "projects" / "p")

    assert paths(selection) == {"a.py", ".gitignore"}
    assert selection.ignore_sources == (".gitignore",)


def test_nested_repositories_are_listed_by_their_own_git(tmp_path):
    root = write(tmp_path / "proj", {"a.py": "a\n", "vendor/lib/.gitignore": "build/\n",
                                      "vendor/lib/src.py": "s\n", "vendor/lib/build/out.bin": "o\n"})
    git(root / "vendor" / "lib", "init", "-q")
    git(root, "init", "-q")

    assert paths(select_files(root)) == {"a.py", "vendor/lib/.gitignore", "vendor/lib/src.py"}


GITIGNORE_LINES = (
    "# a comment, then a blank line",
    "",
    "*.log",
    "!keep.log",
    "build/",
    "!build/keep.txt",  # no use: its folder is excluded
    "/root_only.txt",
    "docs/internal/*",
    "!docs/internal/public.md",
    "foo/**/baz.txt",
    "**/bar/q.txt",
    "a/**",
    "!a/x.txt",
    "tmp[0-9].txt",
    "t?p_.txt",
    r"\#hash.txt",
    r"\!bang.txt",
    r"space\ name.txt",
    "trailing.txt   ",
    "lib/*",
    "!lib/keep/",
    "only_dir/",
)
GITIGNORE_CASES = {
    ".gitignore": "\n".join(GITIGNORE_LINES) + "\n",
    "nested/.gitignore": "*.txt\n!important.txt\n/local\n",
}
GITIGNORE_TREE = [
    "a.log", "keep.log", "sub/b.log", "sub/deep/keep.log", "build/out.o", "build/keep.txt", "src/build/x.py",
    "root_only.txt",
    "sub/root_only.txt", "docs/readme.md", "docs/internal/secret.md", "docs/internal/public.md",
    "foo/baz.txt", "foo/bar/baz.txt", "foo/x/y/baz.txt", "foo/x/bar/q.txt", "bar/q.txt", "a/b/c/d.txt",
    "a/x.txt", "tmp1.txt", "tmpA.txt", "tap_.txt", "#hash.txt", "!bang.txt", "space name.txt",
    "trailing.txt", "lib/keep/me.txt", "lib/other.txt", "only_dir", "nested/a.txt", "nested/important.txt",
    "nested/local/x.py", "nested/deeper/local/y.py", "nested/deeper/z.txt", "plain.py",
]


def gitignore_tree(root: Path) -> Path:
    write(root, GITIGNORE_CASES)
    return write(root, {path: f"{path}\n" for path in GITIGNORE_TREE})


def test_gitignore_outside_git_is_read_as_git_reads_it(tmp_path):
    """The same tree, read by the parser here and by git itself, gives the same selection."""
    ours = select_files(gitignore_tree(tmp_path / "plain"))
    in_git = gitignore_tree(tmp_path / "repo")
    git(in_git, "init", "-q")
    theirs = select_files(in_git)

    assert ours.ignore_sources == (".gitignore",)
    assert theirs.ignore_sources == (SOURCE_GIT,)
    assert paths(ours) == paths(theirs)
    assert paths(ours) == {
        ".gitignore", "nested/.gitignore", "keep.log", "sub/deep/keep.log", "sub/root_only.txt",
        "docs/readme.md", "docs/internal/public.md", "a/x.txt", "tmpA.txt", "lib/keep/me.txt",
        "only_dir", "nested/important.txt", "nested/deeper/local/y.py", "plain.py",
    }


@pytest.mark.parametrize("in_git", [False, True], ids=["plain", "git"])
def test_vlignore_merges_on_top_and_its_negation_takes_files_back(tmp_path, in_git):
    root = write(tmp_path / "proj", {
        ".gitignore": "data/\n*.csv\n",
        # As in git, a line cannot take back a file whose folder an earlier line of the same kind excluded.
        ".vlignore": "notes/\n!notes/keep.md\n!data/labels.csv\n!vendored.pyc\n",
        "data/labels.csv": "l\n", "data/raw.bin": "r\n", "train.py": "t\n", "notes/todo.md": "n\n",
        "notes/keep.md": "k\n",
        "vendored.pyc": b"\x00pyc", "other.pyc": b"\x00pyc",
    })
    if in_git:
        git(root, "init", "-q")

    selection = select_files(root)

    assert paths(selection) == {".gitignore", ".vlignore", "train.py", "data/labels.csv", "vendored.pyc"}
    assert selection.ignore_sources[-1] == ".vlignore"
    assert "and .vlignore applied" in selection.summary()


@pytest.mark.parametrize("in_git", [False, True], ids=["plain", "git"])
def test_defaults_leave_out_git_environments_and_caches_and_the_callers_paths(tmp_path, in_git):
    root = write(tmp_path / "proj", {
        "train.py": "t\n", ".venv/lib/site.py": "v\n", "venv/bin/python": "v\n",
        "envs/torch/pyvenv.cfg": "home = /usr\n", "envs/torch/lib/x.py": "x\n",
        "conda/conda-meta/history": "h\n", "conda/lib/y.py": "y\n",
        "pkg/__pycache__/m.cpython-311.pyc": b"\x00", "pkg/m.py": "m\n", "pkg/old.pyc": b"\x00",
        "ckpt/step-1.pt": "c\n", "vlhome/storage/x": "s\n", "vlhome/secrets/run.json": "{}\n",
        # A `!` line cannot bring back .git or what the caller excludes.
        ".vlignore": "!ckpt/\n!vlhome/\n!.git/\n",
    })
    git(root, "init", "-q")
    git(root, "add", "train.py")
    git(root, "commit", "-qm", "first")
    if not in_git:
        shutil.rmtree(root / ".git")
        (root / ".git").write_text("gitdir: /elsewhere\n")  # a worktree's .git file is left out too

    selection = select_files(root, exclude_paths=[root / "ckpt", "vlhome", tmp_path / "outside"])

    assert paths(selection) == {"train.py", "pkg/m.py", ".vlignore"}


def test_a_vlignore_negation_takes_back_what_the_defaults_leave_out(tmp_path):
    root = write(tmp_path / "proj", {".vlignore": "!.venv/patches/\n", ".venv/patches/fix.py": "f\n",
                                      ".venv/lib/site.py": "s\n", "a.py": "a\n"})

    assert paths(select_files(root)) == {".vlignore", "a.py", ".venv/patches/fix.py"}


def test_special_files_are_skipped_and_reported(tmp_path):
    root = write(tmp_path / "proj", {"a.py": "a\n"})
    os.mkfifo(root / "pipe")

    selection = select_files(root)

    assert paths(selection) == {"a.py"}
    assert selection.skipped == ("pipe (fifo)",)


# --- Refusals ------------------------------------------------------------------------------------------------------

SECRETS = [".env", ".env.production", "config/prod.pem", "id_rsa", "keys/id_rsa.pub", "credentials.json",
           ".netrc", "tls.KEY"]


@pytest.mark.parametrize("in_git", [False, True], ids=["plain", "git"])
def test_likely_secrets_are_refused_with_a_line_that_names_them_and_the_fix(tmp_path, in_git):
    root = write(tmp_path / "proj", {"train.py": "t\n", "keyboard.py": "not a key\n",
                                      ".vlignore": "!.env\n",  # a `!` line is not enough
                                      **{path: "secret\n" for path in SECRETS}})
    if in_git:
        git(root, "init", "-q")

    with pytest.raises(SecretsRefused) as refused:
        select_files(root)

    message = str(refused.value)
    assert "\n" not in message
    assert sorted(refused.value.paths) == sorted(SECRETS)
    for path in SECRETS:
        assert path in message
    assert ".vlignore" in message and ALLOW_SECRET_FLAG in message and "--env-secret" in message


def test_secrets_named_on_purpose_are_shipped_and_ignored_ones_are_no_problem(tmp_path):
    root = write(tmp_path / "proj", {"train.py": "t\n", ".env": "A=1\n", "config/prod.pem": "p\n",
                                      "old/id_rsa": "k\n", ".vlignore": "old/\n"})

    with pytest.raises(SecretsRefused) as refused:
        select_files(root, allow_secret_files=[".env"])
    assert refused.value.paths == ["config/prod.pem"]

    selection = select_files(root, allow_secret_files=[".env", root / "config" / "prod.pem"])
    assert paths(selection) == {"train.py", ".env", "config/prod.pem", ".vlignore"}


def test_a_tree_over_the_limit_lists_its_largest_files_and_folders_with_the_lines_that_drop_them(tmp_path):
    root = write(tmp_path / "proj", {
        "train.py": "t" * 10,
        "data/a.bin": b"a" * 6000, "data/b.bin": b"b" * 3000, "data/c.bin": b"c" * 2500,
        "outputs/run1/model.pt": b"m" * 5000, "big top.bin": b"x" * 4000,
    })

    with pytest.raises(WorkdirTooLarge) as too_large:
        select_files(root, max_bytes=10_000)

    error = too_large.value
    message = str(error)
    assert error.total_bytes == 20_510
    assert error.largest_folders == [("data", 11_500), ("outputs", 5000)]
    assert [path for path, _ in error.largest_files][:3] == ["data/a.bin", "outputs/run1/model.pt", "big top.bin"]
    assert "20.5 KB" in message and "10.0 KB" in message and MAX_SIZE_FLAG in message
    assert "folder data/  11.5 KB  ->  /data/" in message
    assert "file outputs/run1/model.pt  5.0 KB  ->  /outputs/run1/model.pt" in message
    assert r"/big\ top.bin" not in message and "/big top.bin" in message

    # The lines it offers do drop what they name.
    (root / ".vlignore").write_text("/data/\n/outputs/\n")
    assert paths(select_files(root, max_bytes=10_000)) == {"train.py", "big top.bin", ".vlignore"}


def test_links_inside_the_tree_are_kept_as_links_and_others_are_refused(tmp_path):
    root = write(tmp_path / "proj", {"model/net.py": "n\n", "data/ignored.bin": "d\n", ".vlignore": "data/\n"})
    write(tmp_path, {"outside.txt": "o\n"})
    (root / "net.py").symlink_to("model/net.py")
    (root / "model" / "alias").symlink_to(root / "model")  # absolute, inside: recorded relative
    (root / "model" / "up.py").symlink_to("../net.py")  # a link to a link

    selection = select_files(root)
    assert {(link.path, link.target) for link in selection.links} == {
        ("net.py", "model/net.py"), ("model/alias", "."), ("model/up.py", "../net.py")}

    (root / "leak").symlink_to(tmp_path / "outside.txt")
    (root / "escape").symlink_to("../outside.txt")
    (root / "dangling").symlink_to("nowhere.py")
    (root / "to-ignored").symlink_to("data/ignored.bin")
    with pytest.raises(UnsafeLinks) as unsafe:
        select_files(root)
    assert {path for path, _ in unsafe.value.links} == {"leak", "escape", "dangling", "to-ignored"}
    message = str(unsafe.value)
    assert "leak points outside the tree" in message
    assert "dangling points to nowhere.py, which does not exist" in message
    assert "to-ignored points to data/ignored.bin, which is left out" in message
    assert "copy the target into the tree" in message and ".vlignore" in message


def test_a_name_that_cannot_be_unpacked_everywhere_is_refused(tmp_path):
    root = write(tmp_path / "proj", {"a.py": "a\n", "win\\path.py": "w\n"})

    with pytest.raises(WorkdirError, match=r"win\\\\path.py.*backslash"):
        select_files(root)


# --- Manifest, storing, deduplication ----------------------------------------------------------------------------

def test_the_digest_depends_on_content_and_exec_bits_only(tmp_path):
    files = {"b.py": "b\n", "a/x.py": "x\n", "run.sh": "#!/bin/sh\n"}
    first = write(tmp_path / "one", files)
    second = tmp_path / "two"
    for relative in reversed(list(files)):  # created in another order, at other times, other umask bits
        write(second, {relative: files[relative]})
    os.chmod(first / "run.sh", 0o755)
    os.chmod(second / "run.sh", 0o744)
    os.chmod(second / "b.py", 0o600)
    os.utime(second / "b.py", (1, 1))

    one = store_snapshot(select_files(first), (tmp_path / "s1").as_uri())
    two = store_snapshot(select_files(second), (tmp_path / "s2").as_uri())
    assert one.digest == two.digest

    os.chmod(second / "run.sh", 0o655)  # git's rule: the owner's bit
    assert store_snapshot(select_files(second), (tmp_path / "s2").as_uri()).digest != one.digest
    manifest = WorkdirManifest(files=[WorkdirFile(path="b", size=0, mode=0o644, blake3="0" * 64),
                                      WorkdirFile(path="a", size=0, mode=0o644, blake3="1" * 64)])
    reordered = WorkdirManifest(files=list(reversed(manifest.files)))
    assert manifest.digest == reordered.digest


def count_uploads(monkeypatch) -> list[str]:
    uploaded: list[str] = []
    real_put = snapshot_module._put

    def counting_put(fs, local, remote, size):
        uploaded.append(Path(local).name)
        real_put(fs, local, remote, size)

    monkeypatch.setattr(snapshot_module, "_put", counting_put)
    return uploaded


@FILE_AND_S3
def test_the_same_tree_is_stored_once_and_a_changed_one_uploads_only_what_changed(tmp_path, storage_url,
                                                                                   monkeypatch):
    root = write(tmp_path / "proj", {"train.py": "t\n", "model/net.py": "n\n", "model/copy.py": "n\n",
                                      "weights/init.bin": os.urandom(4096)})
    uploaded = count_uploads(monkeypatch)

    first = store_snapshot(select_files(root), storage_url)
    assert sorted(uploaded) == ["init.bin", "net.py", "train.py"]  # copy.py holds what net.py holds
    fs, base = storage_fs(code_url(storage_url))
    manifest_stored = fs.info(f"{base}/snapshots/{first.digest}.json")

    uploaded.clear()
    again = store_snapshot(select_files(root), storage_url)
    assert again == first
    assert uploaded == []
    assert fs.info(f"{base}/snapshots/{first.digest}.json") == manifest_stored

    (root / "train.py").write_text("t, edited\n")
    second = store_snapshot(select_files(root), storage_url)
    assert second.digest != first.digest
    assert uploaded == ["train.py"]
    assert len(fs.find(f"{base}/blobs")) == 4
    assert (first.file_count, first.total_bytes) == (4, 4096 + 6)


def test_a_file_that_changes_while_it_is_read_fails_the_snapshot(tmp_path, monkeypatch):
    root = write(tmp_path / "proj", {"train.py": "t\n"})
    selection = select_files(root)
    real_hash = snapshot_module.local_blake3

    def hash_then_edit(path):
        digest = real_hash(path)
        Path(path).write_text("edited while hashed\n")
        return digest

    monkeypatch.setattr(snapshot_module, "local_blake3", hash_then_edit)
    with pytest.raises(WorkdirError, match="train.py changed while the snapshot was taken"):
        store_snapshot(selection, (tmp_path / "storage").as_uri())
    assert not list((tmp_path / "storage").rglob("*.json"))


# --- Restore -------------------------------------------------------------------------------------------------------

def a_project(root: Path) -> Path:
    write(root, {"train.py": "print('hi')\n", "model/net.py": "n\n", "empty.txt": "",
                 "données/é.csv": "1,2\n", "bin/run.sh": "#!/bin/sh\necho run\n", "blob.bin": os.urandom(70_000)})
    os.chmod(root / "bin" / "run.sh", 0o755)
    (root / "net.py").symlink_to("model/net.py")
    (root / "models").symlink_to("model")
    return root


def tree(root: Path) -> dict[str, tuple]:
    found = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[relative] = ("link", os.readlink(path))
        elif path.is_file():
            found[relative] = ("file", path.read_bytes(), bool(path.stat().st_mode & stat.S_IXUSR))
    return found


@FILE_AND_S3
def test_round_trip_restores_bytes_exec_bits_and_links(tmp_path, storage_url):
    root = a_project(tmp_path / "proj")
    ref = store_snapshot(select_files(root), storage_url)
    ref = SnapshotRef.model_validate_json(ref.model_dump_json())  # as a run spec carries it

    dest = tmp_path / "host" / "attempt-1"
    manifest = restore_snapshot(ref, dest)

    assert tree(dest) == tree(root)
    assert tree(dest)["bin/run.sh"][2] is True and tree(dest)["train.py"][2] is False
    assert (dest / "models" / "net.py").read_text() == "n\n"
    assert manifest.digest == ref.digest
    assert sorted(os.listdir(dest.parent)) == ["attempt-1"]  # nothing left beside it


def test_restore_builds_the_tree_beside_the_destination_and_renames_it_when_complete(tmp_path, monkeypatch):
    ref = store_snapshot(select_files(a_project(tmp_path / "proj")), (tmp_path / "storage").as_uri())
    dest = tmp_path / "host" / "work"
    seen = []
    real_hash = snapshot_module.local_blake3

    def watching_hash(path):
        seen.append((Path(path).is_relative_to(dest), dest.exists()))
        return real_hash(path)

    monkeypatch.setattr(snapshot_module, "local_blake3", watching_hash)
    restore_snapshot(ref, dest)

    assert len(seen) == ref.file_count
    assert set(seen) == {(False, False)}  # every file was checked elsewhere, before `dest` existed
    assert tree(dest) == tree(tmp_path / "proj")


def test_restore_needs_an_absent_or_empty_directory(tmp_path):
    ref = store_snapshot(select_files(a_project(tmp_path / "proj")), (tmp_path / "storage").as_uri())
    (tmp_path / "empty").mkdir()
    restore_snapshot(ref, tmp_path / "empty")
    assert (tmp_path / "empty" / "train.py").exists()

    write(tmp_path / "busy", {"mine.txt": "keep me\n"})
    with pytest.raises(WorkdirError, match="not an empty directory"):
        restore_snapshot(ref, tmp_path / "busy")
    assert os.listdir(tmp_path / "busy") == ["mine.txt"]


def blob_of(ref: SnapshotRef, relative: str) -> str:
    entry = next(entry for entry in read_manifest(ref).files if entry.path == relative)
    _, base = storage_fs(ref.url)
    return f"{base}/blobs/{entry.blake3[:2]}/{entry.blake3}"


def flip_a_byte(fs, path: str, offset: int = 10) -> None:
    data = bytearray(fs.cat_file(path))
    data[offset] ^= 0x01
    fs.pipe_file(path, bytes(data))


@FILE_AND_S3
@pytest.mark.parametrize("damage", ["flip-content", "drop-content", "edit-manifest", "drop-manifest"])
def test_a_tampered_snapshot_is_refused_naming_what_differs_and_nothing_is_unpacked(tmp_path, storage_url, damage):
    ref = store_snapshot(select_files(a_project(tmp_path / "proj")), storage_url)
    fs, _ = storage_fs(ref.url)
    _, manifest_path = storage_fs(ref.manifest_url)
    if damage == "flip-content":
        flip_a_byte(fs, blob_of(ref, "blob.bin"), offset=65_000)
        expected = r"blob.bin: the stored content .* has 70000 bytes with BLAKE3 \w+, the manifest says"
    elif damage == "drop-content":
        fs.rm_file(blob_of(ref, "blob.bin"))
        expected = r"blob.bin: its content .* is missing"
    elif damage == "edit-manifest":
        fs.pipe_file(manifest_path, fs.cat_file(manifest_path).replace(b'"size":70000', b'"size":70001'))
        expected = r"snapshots/\w+\.json does not match the snapshot's digest"
    else:
        fs.rm_file(manifest_path)
        expected = r"snapshot \w+ is not stored"

    dest = tmp_path / "host" / "work"
    with pytest.raises(SnapshotCorrupt, match=expected) as corrupt:
        restore_snapshot(ref, dest)
    if damage.endswith("content"):
        assert corrupt.value.path == "blob.bin"
    assert not (tmp_path / "host").exists() or os.listdir(tmp_path / "host") == []


def store_manifest(storage_url: str, manifest: WorkdirManifest) -> SnapshotRef:
    """A manifest put on storage as it is, as someone with write access to the bucket could."""
    url = code_url(storage_url)
    fs, base = storage_fs(url)
    data = manifest.canonical_json()
    fs.makedirs(f"{base}/snapshots", exist_ok=True)
    fs.pipe_file(f"{base}/snapshots/{manifest.digest}.json", data)
    return SnapshotRef(url=url, digest=manifest.digest, file_count=len(manifest.files),
                       total_bytes=manifest.total_bytes, link_count=len(manifest.links))


@pytest.mark.parametrize(("files", "links", "named"), [
    (["../evil.py"], [], "../evil.py"),
    (["/etc/evil.py"], [], "/etc/evil.py"),
    (["a/../../evil.py"], [], "a/../../evil.py"),
    (["a.py"], [("up", "../../evil.py")], "up"),
    (["a.py"], [("abs", "/etc/passwd")], "abs"),
    (["lib/x.py"], [("lib", "/tmp")], "lib/x.py"),  # a file written through a link
    (["a.py"], [("deep", "."), ("out", "deep/deep/..")], "out"),  # inside on paper, outside once followed
], ids=["dotdot", "absolute", "dotdot-inside", "link-up", "link-absolute", "file-under-link", "link-chain"])
def test_a_manifest_whose_paths_escape_the_destination_is_refused(tmp_path, files, links, named):
    storage_url = (tmp_path / "storage").as_uri()
    write(tmp_path / "src", {"content": "evil\n"})
    good = store_snapshot(select_files(tmp_path / "src"), storage_url)  # so the content itself is stored
    entry = read_manifest(good).files[0]
    manifest = WorkdirManifest(files=[entry.model_copy(update={"path": path}) for path in files],
                               links=[WorkdirLink(path=path, target=target) for path, target in links])
    ref = store_manifest(storage_url, manifest)

    with pytest.raises(SnapshotCorrupt, match="refusing snapshot") as corrupt:
        restore_snapshot(ref, tmp_path / "host" / "work")
    assert corrupt.value.path == named
    assert not (tmp_path / "host").exists() or os.listdir(tmp_path / "host") == []
    assert not (tmp_path / "evil.py").exists() and not (tmp_path / "host" / "evil.py").exists()
