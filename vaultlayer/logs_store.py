"""The script's output, stored per attempt next to the checkpoints, so it outlives the host.

Layout: `<storage_url>/<run_id>/logs/attempt-<N>/<offset:012d>.log`. The host agent uploads what the
script wrote since the last upload as a new object every few seconds and once more when the attempt
ends; `offset` is where the chunk starts in the host's log file, so names sort in order and a retried
upload rewrites the same object. No backend needs append support (S3 and GCS have none). Each chunk is
written atomically (one PUT on object stores, write-then-rename on a file system), so a reader never sees
half a chunk; the attempt's log is its chunks in name order.

Synchronous on purpose, like vaultlayer/checkpoint/: callers run it in threads.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from fsspec.core import url_to_fs

from vaultlayer.checkpoint.storage import retry, run_url, write_atomically

_ATTEMPT_DIR = re.compile(r"attempt-(?P<attempt>[1-9]\d*)")
_CHUNK = re.compile(r"(?P<offset>\d{12,})\.log")


def logs_url(storage_url: str, run_id: str) -> str:
    return f"{run_url(storage_url, run_id)}/logs"


def write_chunk(storage_url: str, run_id: str, attempt: int, offset: int, data: bytes) -> None:
    """Store `data`, the bytes the attempt's script wrote from `offset` of its log on."""
    fs, root = url_to_fs(logs_url(storage_url, run_id))
    path = f"{root}/attempt-{attempt}/{offset:012d}.log"
    retry(lambda: write_atomically(fs, path, data), "upload a log chunk")


def stored_attempts(storage_url: str, run_id: str) -> list[int]:
    """The attempts that stored any output, in order."""
    fs, root = url_to_fs(logs_url(storage_url, run_id))
    fs.invalidate_cache(root)
    try:
        entries = retry(lambda: fs.ls(root, detail=False), "list log attempts")
    except FileNotFoundError:
        return []
    found = (_ATTEMPT_DIR.fullmatch(PurePosixPath(entry.rstrip("/")).name) for entry in entries)
    return sorted(int(match["attempt"]) for match in found if match)


def _chunks(storage_url: str, run_id: str, attempt: int) -> list[tuple[int, str]]:
    """(offset, path) of the attempt's complete chunks, in order; partial writes never match the name."""
    fs, root = url_to_fs(logs_url(storage_url, run_id))
    directory = f"{root}/attempt-{attempt}"
    fs.invalidate_cache(directory)
    try:
        entries = retry(lambda: fs.ls(directory, detail=False), "list log chunks")
    except FileNotFoundError:
        return []
    found = ((_CHUNK.fullmatch(PurePosixPath(entry).name), entry) for entry in entries)
    return sorted((int(match["offset"]), entry) for match, entry in found if match)


class LogCursor:
    """Reads a run's stored output in order, each chunk once: `read_new()` returns what arrived since the
    last call. With `attempt` None it reads every attempt, each under a `==> attempt N <==` line."""

    def __init__(self, storage_url: str, run_id: str, attempt: int | None = None) -> None:
        self.storage_url = storage_url
        self.run_id = run_id
        self.attempt = attempt
        self.read_up_to: dict[int, int] = {}  # attempt -> offset of the last chunk read
        self.shown_attempt: int | None = None
        # Attempts read in full: an attempt stores its last chunk before it ends, so once a later attempt has
        # stored anything, one more read gets all of it. Following a long run lists only its newest attempts.
        # (A host written off while still alive may store more later: `read_logs` shows it, a follower not.)
        self.done: set[int] = set()

    def read_new(self) -> str:
        attempts = [self.attempt] if self.attempt is not None else stored_attempts(self.storage_url, self.run_id)
        fs, _ = url_to_fs(logs_url(self.storage_url, self.run_id))
        parts = []
        for attempt in (attempt for attempt in attempts if attempt not in self.done):
            last = self.read_up_to.get(attempt, -1)
            new = [(offset, path) for offset, path in _chunks(self.storage_url, self.run_id, attempt) if offset > last]
            if not new:
                continue
            # One call for all of them: object stores fetch them concurrently.
            data = retry(lambda new=new: fs.cat([path for _, path in new]), "read log chunks")
            if self.attempt is None and attempt != self.shown_attempt:
                parts.append(f"==> attempt {attempt} <==\n")
                self.shown_attempt = attempt
            parts += [data[path].decode(errors="replace") for _, path in new]
            self.read_up_to[attempt] = new[-1][0]
        self.done.update(attempt for attempt in attempts if attempt < attempts[-1])
        return "".join(parts)


def read_logs(storage_url: str, run_id: str, attempt: int | None = None) -> str:
    """The stored output of one attempt, or of all of them."""
    return LogCursor(storage_url, run_id, attempt).read_new()
