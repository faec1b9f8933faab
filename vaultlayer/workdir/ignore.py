"""Ignore files in gitignore syntax (`.gitignore` outside a git repository, `.vlignore` always): parsing,
matching, and the verdict on one path. Pure: no I/O.

The subset of gitignore(5) implemented: blank lines and `#` comments, `\\` escapes, trailing spaces, `!`
negation, a leading or middle `/` anchoring a pattern to the directory of its file, a trailing `/` matching
directories only, `*`, `?`, `[...]`, `**/`, `/**` and `/**/`, and files in subdirectories applying to
that subdirectory with precedence over their parents. As in git, the last matching line decides, and a
path inside an excluded directory stays excluded whatever a later `!` line says about the path itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class IgnoreRule:
    """One pattern line of an ignore file."""

    pattern: str  # the line as written, for messages
    source: str  # where it comes from, e.g. "data/.vlignore:3" or "defaults"
    base: str  # the directory of its file, relative posix ("" for the root): the rule applies below it
    negate: bool
    dir_only: bool
    anchored: bool  # matched against the path below `base`; otherwise against the last component
    regex: re.Pattern[str] = field(compare=False)

    def matches(self, path: str, is_dir: bool) -> bool:
        """Whether this line matches `path` (relative posix, from the root) itself, not counting its parents."""
        if self.dir_only and not is_dir:
            return False
        if self.base:
            if not path.startswith(self.base + "/"):
                return False
            path = path[len(self.base) + 1:]
        target = path if self.anchored else path.rpartition("/")[2]
        return self.regex.fullmatch(target) is not None

    def could_match_below(self, directory: str) -> bool:
        """Whether this line could match something inside `directory` (relative posix). Errs on yes: it
        only compares the literal leading components of an anchored pattern."""
        if self.base and not (directory + "/").startswith(self.base + "/"):
            return (self.base + "/").startswith(directory + "/")  # a file further down, not read yet
        if not self.anchored:
            return True
        relative = directory[len(self.base) + 1:] if self.base else directory
        if not relative:
            return True
        body = self.pattern.lstrip("!").lstrip("/").rstrip("/")
        for wanted, have in zip(body.split("/"), relative.split("/"), strict=False):
            if any(char in wanted for char in "*?[\\"):
                return True
            if wanted != have:
                return False
        return True


@dataclass(frozen=True)
class Verdict:
    """What an ignore layer says about a path: excluded or taken back, and by which line."""

    excluded: bool
    rule: IgnoreRule


def parse_lines(lines: Iterable[str], *, base: str, source: str) -> list[IgnoreRule]:
    """The rules of an ignore file whose directory is `base`; `source` names the file in messages."""
    rules = []
    for number, line in enumerate(lines, start=1):
        rule = parse_line(line, base=base, source=f"{source}:{number}")
        if rule is not None:
            rules.append(rule)
    return rules


def parse_line(line: str, *, base: str, source: str) -> IgnoreRule | None:
    """One line of an ignore file as a rule; None for a blank line or a comment."""
    written = line.rstrip("\r\n")
    text = written
    while text.endswith(" ") and not text.endswith("\\ "):
        text = text[:-1]
    if not text or text.startswith("#"):
        return None
    negate = text.startswith("!")
    if negate:
        text = text[1:]
    dir_only = text.endswith("/") and not text.endswith("\\/")
    if dir_only:
        text = text[:-1]
    anchored = "/" in text
    text = text.removeprefix("/")
    if not text:
        return None
    return IgnoreRule(pattern=written.strip(), source=source, base=base, negate=negate, dir_only=dir_only,
                      anchored=anchored, regex=re.compile(translate(text)))


def translate(pattern: str) -> str:
    """A gitignore pattern (without `!`, leading and trailing `/`) as a regular expression over a relative
    posix path."""
    parts = pattern.split("/")
    out = []
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        if part == "**":
            out.append(".+" if last else "(?:.+/)?")
        else:
            out.append(_translate_component(part) + ("" if last else "/"))
    return "".join(out)


def _translate_component(text: str) -> str:
    out = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text):
            out.append(re.escape(text[i + 1]))
            i += 2
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end, regex = _translate_class(text, i)
            if regex is not None:
                out.append(regex)
                i = end
                continue
            out.append(re.escape(char))
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out)


def _translate_class(text: str, start: int) -> tuple[int, str | None]:
    """`[...]` starting at `start`: (index after it, its regex), or (start, None) when it is not closed."""
    i = start + 1
    negate = i < len(text) and text[i] in "!^"
    if negate:
        i += 1
    out = []
    first = True
    while i < len(text):
        char = text[i]
        if char == "]" and not first:
            return i + 1, f"(?!/)[{'^' if negate else ''}{''.join(out)}]"
        if char == "\\" and i + 1 < len(text):
            out.append(re.escape(text[i + 1]))
            i += 2
        else:
            out.append("\\" + char if char in "[]^\\" else char)  # a leading ] is a literal
            i += 1
        first = False
    return start, None


class IgnoreLayer:
    """The rules of one kind of ignore file (all `.gitignore`s, all `.vlignore`s, the defaults), ordered
    so that a file in a deeper directory comes after its parents' and wins over them. Directory verdicts
    are remembered: add a directory's own file before asking about its entries."""

    def __init__(self, rules: Iterable[IgnoreRule] = ()) -> None:
        self.rules: list[IgnoreRule] = list(rules)
        self.sources: list[str] = []  # the ignore files read, relative posix
        self._dirs: dict[str, Verdict | None] = {}

    def add(self, rules: list[IgnoreRule], source: str) -> None:
        self.rules.extend(rules)
        self.sources.append(source)
        self._dirs.clear()

    def sort(self) -> None:
        """Order files found in any order (a git listing) parents first."""
        self.rules.sort(key=lambda rule: (rule.base.count("/") + bool(rule.base), rule.base))
        self._dirs.clear()

    @property
    def negations(self) -> list[IgnoreRule]:
        return [rule for rule in self.rules if rule.negate]

    def verdict(self, path: str, is_dir: bool) -> Verdict | None:
        """Excluded (by the line that excluded it or a parent), taken back (by the last `!` line matching it
        or a parent), or None when no line speaks of it."""
        parent = path.rpartition("/")[0]
        inherited = self._dir_verdict(parent) if parent else None
        if inherited is not None and inherited.excluded:
            return inherited
        own = None
        for rule in self.rules:
            if rule.matches(path, is_dir):
                own = rule
        if own is None:
            return inherited
        return Verdict(excluded=not own.negate, rule=own)

    def _dir_verdict(self, directory: str) -> Verdict | None:
        if directory not in self._dirs:
            self._dirs[directory] = self.verdict(directory, True)
        return self._dirs[directory]


def escape(path: str) -> str:
    """`path` as a gitignore pattern matching exactly it (wildcards and a leading `#`/`!` escaped)."""
    escaped = re.sub(r"([*?\[\]\\])", r"\\\1", path)
    return "\\" + escaped if escaped[:1] in ("#", "!") else escaped
