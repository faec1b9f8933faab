"""What can go wrong when a working directory is snapshotted or restored. Every error is a ValueError whose
message says what is wrong and how to fix it; the subclasses carry the details for a caller to show."""

from __future__ import annotations


class WorkdirError(ValueError):
    """The working directory cannot be snapshotted, or a snapshot restored, as asked."""


class SecretsRefused(WorkdirError):
    """The selection holds files that look like secrets and were not allowed by name."""

    def __init__(self, message: str, paths: list[str]) -> None:
        super().__init__(message)
        self.paths = paths


class UnsafeLinks(WorkdirError):
    """Symbolic links that point outside the tree, nowhere, or at something that is left out."""

    def __init__(self, message: str, links: list[tuple[str, str]]) -> None:
        super().__init__(message)
        self.links = links  # (path, why)


class WorkdirTooLarge(WorkdirError):
    """The selection is bigger than the limit; nothing was written anywhere."""

    def __init__(self, message: str, total_bytes: int, max_bytes: int,
                 largest_files: list[tuple[str, int]], largest_folders: list[tuple[str, int]]) -> None:
        super().__init__(message)
        self.total_bytes = total_bytes
        self.max_bytes = max_bytes
        self.largest_files = largest_files  # (relative path, bytes), biggest first
        self.largest_folders = largest_folders  # (top-level folder, bytes of what is selected in it)


class SnapshotCorrupt(WorkdirError):
    """A stored snapshot does not match its address: its manifest or a file's content differs, or is
    missing. `path` names the file of the tree (None for the manifest itself)."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path
