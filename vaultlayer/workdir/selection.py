"""Which files of a working directory go into its snapshot (docs/code-and-outputs.md).

In order: what git shows (inside a git work tree: tracked files and untracked ones it does not ignore) or,
outside one, the `.gitignore` files read here; the defaults (`.venv/`, `venv/`, any directory holding
`pyvenv.cfg` or `conda-meta/`, `__pycache__/`, `*.pyc`) on top; then `.vlignore` files, whose last matching
line wins over both, so a `!` line there takes back what git or the defaults left out. `.git` and the
caller's `exclude_paths` (the checkpoint directory, VL_HOME) are never shipped, whatever a `!` line says.
Then the checks, before anything is written anywhere: likely secrets, symbolic links, size.
Reads the tree and runs `git`; writes nothing.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import stat
import subprocess
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from vaultlayer.checkpoint.format import MANIFEST_NAME, unsafe_path_reason
from vaultlayer.workdir.errors import (
    SecretsRefused,
    UnsafeLinks,
    WorkdirError,
    WorkdirTooLarge,
)
from vaultlayer.workdir.ignore import IgnoreLayer, escape, parse_lines

DEFAULT_MAX_BYTES = 100 * 10**6  # 100 MB, in the decimal units `vl` prints
GITIGNORE = ".gitignore"
VLIGNORE = ".vlignore"
NEVER_SHIPPED_NAME = ".git"  # a directory, or a file in a worktree or submodule
DEFAULT_EXCLUDES = (".venv/", "venv/", "__pycache__/", "*.pyc")
VENV_MARKERS = ("pyvenv.cfg", "conda-meta")  # a directory holding one of these is an environment
SECRET_NAMES = (".env*", "*.pem", "id_rsa*", "credentials*", ".netrc", "*.key")  # matched on the name
# ... except templates, committed on purpose to show which values exist (.env.example, credentials.sample)
TEMPLATE_SUFFIXES = (".example", ".sample", ".template", ".dist")
# How `vl run` names these choices; the messages say them so that a person knows what to type.
ALLOW_SECRET_FLAG = "--allow-secret-file"
MAX_SIZE_FLAG = "--workdir-max-size"
SOURCE_GIT = "gitignore (git)"
LISTED_IN_ERRORS = 5  # largest files and folders named by the size error
_GIT_ENV_DROPPED = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_COMMON_DIR", "GIT_OBJECT_DIRECTORY")


@dataclass(frozen=True)
class SelectedFile:
    path: str  # relative posix
    size: int
    executable: bool


@dataclass(frozen=True)
class SelectedLink:
    path: str
    target: str  # relative to the link's directory, posix; stays inside the tree


@dataclass(frozen=True)
class Selection:
    """What a snapshot of `root` will hold; `store_snapshot` hashes and uploads it."""

    root: Path
    files: tuple[SelectedFile, ...]
    links: tuple[SelectedLink, ...]
    ignore_sources: tuple[str, ...]  # of SOURCE_GIT, ".gitignore", ".vlignore": the rules that applied
    skipped: tuple[str, ...] = ()  # special files left out, as "path (fifo)"

    @property
    def file_count(self) -> int:
        return len(self.files)

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.files)

    def summary(self, snapshot: str | None = None) -> str:
        """"38 files, 412.0 KB (snapshot 1f3a9c0d2e4b), .gitignore and .vlignore applied": what `vl run` prints
        before anything is provisioned."""
        count = f"{self.file_count} file{'s' if self.file_count != 1 else ''}"
        links = f", {len(self.links)} link{'s' if len(self.links) != 1 else ''}" if self.links else ""
        stored = f" (snapshot {snapshot})" if snapshot else ""
        sources = f", {_and(list(self.ignore_sources))} applied" if self.ignore_sources else ""
        return f"{count}{links}, {human_bytes(self.total_bytes)}{stored}{sources}"


def select_files(
    root: str | os.PathLike[str],
    *,
    exclude_paths: Iterable[str | os.PathLike[str]] = (),
    allow_secret_files: Iterable[str | os.PathLike[str]] = (),
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Selection:
    """The files of `root` a snapshot holds, checked. `exclude_paths` (absolute, or relative to `root`;
    ones outside the tree are ignored) are never shipped; `allow_secret_files` (the same) name files that
    look like secrets and are shipped on purpose. Raises SecretsRefused, UnsafeLinks, WorkdirTooLarge or
    WorkdirError, with the fix in the message."""
    root_path = Path(root)
    if not root_path.is_dir():
        raise WorkdirError(f"workdir {root} is not a directory")
    root_path = root_path.resolve()
    rules = _Rules(root_path, _relative_paths(root_path, exclude_paths))
    in_git = _inside_git_work_tree(root_path)
    kept = _git_candidates(root_path, rules) if in_git else _walk(root_path, "", rules, ignored_by_git=False)

    files, link_paths, skipped = _by_kind(root_path, sorted(set(kept)))
    _check_names(root_path, [entry.path for entry in files] + link_paths)
    _check_readable(root_path, files)
    _check_secrets(root_path, [entry.path for entry in files] + link_paths,
                   set(_relative_paths(root_path, allow_secret_files)))
    links = _check_links(root_path, link_paths, files)
    _check_size(root_path, files, max_bytes)
    sources = ([SOURCE_GIT] if in_git else [GITIGNORE] if rules.gitignore.sources else []) + (
        [VLIGNORE] if rules.vlignore.sources else [])
    return Selection(root=root_path, files=tuple(files), links=tuple(links), ignore_sources=tuple(sources),
                     skipped=tuple(skipped))


def select_outputs(root: str | os.PathLike[str]) -> Selection:
    """Every file of an output directory, for `vl pull`: no ignore rules, no refusals (the script wrote them on
    purpose, and they stay in the run's own storage). A link is kept when it stays inside the directory and
    points at something kept; any other link, and special files, are skipped and listed in `skipped`."""
    root_path = Path(root).resolve()
    if not root_path.is_dir():
        raise WorkdirError(f"output directory {root} is not a directory")
    found = [(Path(folder) / name).relative_to(root_path).as_posix()
             for folder, dirnames, filenames in os.walk(root_path) for name in [*dirnames, *filenames]]
    files, link_paths, skipped = _by_kind(root_path, sorted(found))
    _check_names(root_path, [entry.path for entry in files] + link_paths)
    while True:  # a link to a dropped link is dropped in turn
        try:
            links = _check_links(root_path, link_paths, files)
            break
        except UnsafeLinks as err:
            dropped = {path for path, _ in err.links}
            skipped += [f"{path} (link {why})" for path, why in err.links]
            link_paths = [path for path in link_paths if path not in dropped]
    return Selection(root=root_path, files=tuple(files), links=tuple(links), ignore_sources=(), skipped=tuple(skipped))


def _by_kind(root: Path, paths: list[str]) -> tuple[list[SelectedFile], list[str], list[str]]:
    """(regular files, links, special files as "path (kind)") among `paths`; directories and paths gone since
    they were listed are neither."""
    files: list[SelectedFile] = []
    link_paths: list[str] = []
    skipped: list[str] = []
    for path in paths:
        try:
            info = os.lstat(root / path)
        except FileNotFoundError:  # deleted since it was listed
            continue
        if stat.S_ISLNK(info.st_mode):
            link_paths.append(path)
        elif stat.S_ISREG(info.st_mode):
            files.append(SelectedFile(path=path, size=info.st_size, executable=bool(info.st_mode & stat.S_IXUSR)))
        elif not stat.S_ISDIR(info.st_mode):
            skipped.append(f"{path} ({_special_kind(info.st_mode)})")
    return files, link_paths, skipped


class _Rules:
    """Every rule that decides whether a path is shipped, and the decision."""

    def __init__(self, root: Path, never: list[str]) -> None:
        self.root = root
        self.never = never
        self.defaults = IgnoreLayer(parse_lines(DEFAULT_EXCLUDES, base="", source="defaults"))
        self.gitignore = IgnoreLayer()  # outside git only
        self.vlignore = IgnoreLayer()
        self._environments: dict[str, bool] = {}

    def read(self, layer: IgnoreLayer, relative_file: str) -> None:
        if relative_file in layer.sources:  # a nested repository's, met again in its parent's listing
            return
        try:
            text = (self.root / relative_file).read_text(encoding="utf-8", errors="surrogateescape")
        except OSError as err:
            raise WorkdirError(f"cannot read {self.root / relative_file}: {err}") from None
        layer.add(parse_lines(text.splitlines(), base=relative_file.rpartition("/")[0], source=relative_file),
                  relative_file)

    def never_shipped(self, path: str) -> bool:
        return NEVER_SHIPPED_NAME in path.split("/") or any(
            path == other or path.startswith(other + "/") for other in self.never)

    def gitignore_excludes(self, path: str, is_dir: bool) -> bool:
        verdict = self.gitignore.verdict(path, is_dir)
        return verdict is not None and verdict.excluded

    def default_excludes(self, path: str, is_dir: bool) -> bool:
        verdict = self.defaults.verdict(path, is_dir)
        if verdict is not None and verdict.excluded:
            return True
        parts = path.split("/")
        directories = parts if is_dir else parts[:-1]
        return any(self._is_environment("/".join(directories[:depth])) for depth in range(1, len(directories) + 1))

    def _is_environment(self, directory: str) -> bool:
        if directory not in self._environments:
            self._environments[directory] = any(
                os.path.lexists(self.root / directory / marker) for marker in VENV_MARKERS)
        return self._environments[directory]

    def ships(self, path: str, is_dir: bool, base_excludes: bool) -> bool:
        """Whether `path` is shipped, given whether git or the `.gitignore` files exclude it."""
        if self.never_shipped(path):
            return False
        verdict = self.vlignore.verdict(path, is_dir)
        if verdict is not None:
            return not verdict.excluded
        return not (base_excludes or self.default_excludes(path, is_dir))

    def may_take_back_below(self, directory: str) -> bool:
        """Whether a `!` line of a `.vlignore` could take back something inside a directory left out."""
        if self.never_shipped(directory):
            return False
        verdict = self.vlignore.verdict(directory, True)
        if verdict is not None and verdict.excluded:
            return False
        return any(rule.could_match_below(directory) for rule in self.vlignore.negations)


def _walk(root: Path, start: str, rules: _Rules, *, ignored_by_git: bool) -> list[str]:
    """Relative paths of what is shipped below `start` (a directory, "" for the root), reading the ignore
    files on the way; a directory left out is entered only when a `!` line could take something back in it.
    Outside git, the `.gitignore` files met decide what is ignored; `ignored_by_git`: `start` is a folder
    git ignores, so everything in it is. Symbolic links are never followed."""
    found: list[str] = []
    pending = [start]
    while pending:
        directory = pending.pop()
        try:
            with os.scandir(root / directory) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as err:
            raise WorkdirError(
                f"cannot read the folder {root / directory}: {err}; fix: make it readable, or add the line"
                f" /{escape(directory)}/ to {root / VLIGNORE}") from None
        for entry in entries:
            relative = f"{directory}/{entry.name}" if directory else entry.name
            if entry.name in (GITIGNORE, VLIGNORE) and entry.is_file() and not rules.never_shipped(relative):
                if entry.name == VLIGNORE:
                    rules.read(rules.vlignore, relative)
                elif not ignored_by_git:
                    rules.read(rules.gitignore, relative)
        for entry in entries:
            relative = f"{directory}/{entry.name}" if directory else entry.name
            is_dir = entry.is_dir(follow_symlinks=False)
            base_excludes = ignored_by_git or rules.gitignore_excludes(relative, is_dir)
            if rules.ships(relative, is_dir, base_excludes):
                (pending if is_dir else found).append(relative)
            elif is_dir and rules.may_take_back_below(relative):
                pending.append(relative)
    return found


def _inside_git_work_tree(root: Path) -> bool:
    """Inside a git work tree whose rules do not ignore `root` itself (a project kept in an ignored folder of
    another repository is read with its own `.gitignore` files instead: git would show nothing)."""
    if shutil.which("git") is None:
        return False
    inside = _git(root, "rev-parse", "--is-inside-work-tree", check=False)
    if inside is None or inside.strip() != b"true":
        return False
    return _git(root, "check-ignore", "-q", ".", check=False) is None


def _git(root: Path, *args: str, check: bool = True) -> bytes | None:
    """git's output, run in `root` with the environment's own repository choice removed; None when git
    fails and `check` is false."""
    env = {name: value for name, value in os.environ.items() if name not in _GIT_ENV_DROPPED}
    done = subprocess.run(["git", *args], cwd=root, env=env, capture_output=True, check=False)
    if done.returncode == 0:
        return done.stdout
    if check:
        raise WorkdirError(f"git {' '.join(args)} failed in {root}: {done.stderr.decode(errors='replace').strip()}")
    return None


def _git_list(root: Path, *args: str) -> list[str]:
    output = _git(root, "ls-files", "-z", *args) or b""
    return [os.fsdecode(item) for item in output.split(b"\0") if item]


def _git_candidates(root: Path, rules: _Rules, prefix: str = "") -> list[str]:
    """What is shipped of the git work tree at `root / prefix`: git's own listing, with nested repositories
    (submodules, untracked clones) listed by their own git, and `.vlignore` lines applied on top."""
    here = root / prefix if prefix else root
    visible: list[str] = []
    for listed in _git_list(here, "--cached", "--others", "--exclude-standard"):
        relative = f"{prefix}/{listed.rstrip('/')}" if prefix else listed.rstrip("/")
        path = root / relative
        if path.is_dir() and not path.is_symlink():
            if os.path.lexists(path / NEVER_SHIPPED_NAME) and not rules.never_shipped(relative):
                visible.extend(_git_candidates(root, rules, relative))
            continue  # a tracked file replaced by a folder: git lists what is in it on its own
        visible.append(relative)
    for relative in visible:
        if relative.rpartition("/")[2] == VLIGNORE and not rules.never_shipped(relative):
            rules.read(rules.vlignore, relative)
    rules.vlignore.sort()
    kept = [relative for relative in visible if rules.ships(relative, False, base_excludes=False)]
    if rules.vlignore.negations:  # take back what git ignores, entering only folders a `!` line could reach
        for listed in _git_list(here, "--others", "--ignored", "--exclude-standard", "--directory"):
            relative = f"{prefix}/{listed}" if prefix else listed
            if relative.endswith("/"):
                folder = relative.rstrip("/")
                if rules.may_take_back_below(folder):
                    kept.extend(_walk(root, folder, rules, ignored_by_git=True))
            elif rules.ships(relative, False, base_excludes=True):
                kept.append(relative)
    return kept


def _relative_paths(root: Path, paths: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Paths (absolute, or relative to `root`) as relative posix paths inside `root`; others dropped."""
    found = []
    for given in paths:
        path = Path(given)
        candidates = [path, Path(os.path.realpath(path))] if path.is_absolute() else [root / path]
        for candidate in candidates:
            normal = Path(os.path.normpath(candidate))
            if normal != root and normal.is_relative_to(root):
                found.append(normal.relative_to(root).as_posix())
    return found


def _special_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def _check_names(root: Path, paths: list[str]) -> None:
    """Refuse names a snapshot cannot hold faithfully (not UTF-8, or unsafe to unpack anywhere)."""
    bad = []
    for path in paths:
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            bad.append(f"{path.encode('utf-8', 'surrogateescape')!r} (not UTF-8)")
            continue
        reason = unsafe_path(path)
        if reason is not None:
            bad.append(f"{path!r} ({reason})")
    if bad:
        raise WorkdirError(f"workdir {root}: cannot ship {_listed(bad)}; fix: rename them, or add them to"
                           f" {VLIGNORE}")


def unsafe_path(path: str) -> str | None:
    """Why a relative path could not be unpacked safely anywhere, if it could not: the checkpoint format's
    rule, less its one reserved name (a snapshot's manifest is not stored in the tree)."""
    return None if path == MANIFEST_NAME else unsafe_path_reason(path)


def _check_readable(root: Path, files: list[SelectedFile]) -> None:
    unreadable = [entry.path for entry in files if not os.access(root / entry.path, os.R_OK)]
    if unreadable:
        raise WorkdirError(f"workdir {root}: cannot read {_listed(unreadable)}; fix: make them readable,"
                           f" or add them to {VLIGNORE}")


def is_likely_secret(path: str) -> bool:
    name = PurePosixPath(path).name.lower()
    return not name.endswith(TEMPLATE_SUFFIXES) and any(fnmatch.fnmatchcase(name, pattern) for pattern in SECRET_NAMES)


def _check_secrets(root: Path, paths: list[str], allowed: set[str]) -> None:
    refused = [path for path in paths if is_likely_secret(path) and path not in allowed]
    if refused:
        raise SecretsRefused(
            f"workdir {root} holds likely secrets, not shipped by default: {_listed(refused)}; add them to"
            f" {VLIGNORE} to leave them out, or pass {ALLOW_SECRET_FLAG} PATH for each to ship it on purpose;"
            f" for a value the script needs, use --env-secret NAME=env:VAR instead",
            refused,
        )


def _check_links(root: Path, link_paths: list[str], files: list[SelectedFile]) -> list[SelectedLink]:
    """Links that stay inside the tree and point at something shipped are kept as links (target relative);
    any other is refused, never followed."""
    shipped = {entry.path for entry in files} | set(link_paths)
    folders = {"/".join(path.split("/")[:depth]) for path in shipped for depth in range(1, path.count("/") + 1)}
    kept, refused = [], []
    for path in link_paths:
        link = root / path
        written = os.readlink(link)
        lexical = Path(os.path.normpath(link.parent / written))
        final = Path(os.path.realpath(link))
        why = None
        if not (lexical.is_relative_to(root) and final.is_relative_to(root)):
            why = f"points outside the tree, to {final}"
        elif not final.exists():
            why = f"points to {written}, which does not exist"
        elif final != root:
            target = final.relative_to(root).as_posix()
            if final.is_dir() and target not in folders:
                why = f"points to the folder {target}/, which holds nothing that is shipped"
            elif not final.is_dir() and target not in shipped:
                why = f"points to {target}, which is left out"
        if why is None:
            kept.append(SelectedLink(path=path, target=Path(os.path.relpath(lexical, link.parent)).as_posix()))
        else:
            refused.append((path, why))
    if refused:
        listing = "; ".join(f"{path} {why}" for path, why in refused)
        raise UnsafeLinks(
            f"workdir {root}: symbolic links that cannot be shipped as links: {listing}; fix: copy the target"
            f" into the tree in place of the link, or add the link to {VLIGNORE}",
            refused,
        )
    return kept


def _check_size(root: Path, files: list[SelectedFile], max_bytes: int) -> None:
    total = sum(entry.size for entry in files)
    if total <= max_bytes:
        return
    largest_files = [(entry.path, entry.size) for entry in sorted(files, key=lambda e: (-e.size, e.path))]
    by_folder: Counter[str] = Counter()
    for entry in files:
        if "/" in entry.path:
            by_folder[entry.path.split("/", 1)[0]] += entry.size
    largest_folders = sorted(by_folder.items(), key=lambda item: (-item[1], item[0]))[:LISTED_IN_ERRORS]
    largest_files = largest_files[:LISTED_IN_ERRORS]
    lines = [f"  folder {name}/  {human_bytes(size)}  ->  /{escape(name)}/" for name, size in largest_folders]
    lines += [f"  file {path}  {human_bytes(size)}  ->  /{escape(path)}" for path, size in largest_files]
    raise WorkdirTooLarge(
        f"workdir {root} holds {human_bytes(total)} in {len(files)} files, over the {human_bytes(max_bytes)}"
        f" limit; nothing was uploaded. Leave the biggest out with a line in {root / VLIGNORE}, or raise the"
        f" limit ({MAX_SIZE_FLAG}):\n" + "\n".join(lines),
        total, max_bytes, largest_files, largest_folders,
    )


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes from "500MB", "1.5 GB", "200MiB" or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if match is None or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError("not a size; write a number with a unit, such as 500MB or 2GB")
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    if size <= 0:
        raise ValueError("must be more than zero, such as 500MB")
    return size


def human_bytes(size: float) -> str:
    """Sizes as `vl` prints them everywhere (decimal units)."""
    for unit in ("B", "KB", "MB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def _listed(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
