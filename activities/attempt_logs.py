"""Ships the script's output from the host's log file to storage while an attempt runs.

The script writes to its log file on the host as before; every few seconds what it added since the last
upload becomes one new chunk in storage (vaultlayer/logs_store.py), and once more when the attempt ends
(completed, failed, reclaimed after a notice, or cancelled). A host that dies without warning loses at most
the last `SHIP_SECONDS` of output. Values of the script's credential-like variables (HF_TOKEN, ...) are
masked before anything leaves the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

import structlog

from activities.masking import mask
from vaultlayer import logs_store
from vaultlayer.secrets import looks_secret

log = structlog.get_logger(__name__)

SHIP_SECONDS = 3.0
MAX_CHUNK_BYTES = 4 << 20
FINAL_SHIP_SECONDS = 20.0  # how long the end of an attempt waits for its last chunk
# Shorter values would mask ordinary words: a guessed credential needs 6 characters, a declared secret 4.
_MIN_GUESSED_CHARS = 6
_MIN_DECLARED_CHARS = 4


def secret_values(env: Mapping[str, str], declared: Iterable[str] = ()) -> list[bytes]:
    """The values to mask, longest first: the run's secret env values (`declared`), and those of variables
    whose names look like credentials."""
    values = {value.encode() for value in declared if len(value) >= _MIN_DECLARED_CHARS}
    values |= {value.encode() for name, value in env.items() if looks_secret(name) and len(value) >= _MIN_GUESSED_CHARS}
    return sorted(values, key=len, reverse=True)


class LogShipper:
    """Uploads the log file from `start` on, in whole lines (so a secret is never split between two chunks
    and escapes the mask) except for its last upload, which takes everything."""

    def __init__(self, storage_url: str, run_id: str, attempt: int, path: Path, start: int) -> None:
        self.storage_url, self.run_id, self.attempt = storage_url, run_id, attempt
        self.path = path
        self.offset = start  # everything before it is stored (or was in the file before this attempt)
        self.secrets: list[bytes] = []
        self.pending: tuple[int, bytes] | None = None  # a chunk whose upload failed: sent again as it was
        self.lock = threading.Lock()  # one `ship` at a time
        self.stop = asyncio.Event()
        self.task: asyncio.Task | None = None

    def start(self, env: Mapping[str, str], secrets: Iterable[str] = ()) -> None:
        """Ship while the script runs. `env` is the script's environment and `secrets` the values of its secret
        env references: both are masked."""
        self.secrets = secret_values(env, secrets)
        self.task = asyncio.create_task(self._run())

    async def finish(self) -> None:
        """Upload the rest now; bounded, so a storage outage cannot hold the attempt's end up for long."""
        if self.task is None:
            return
        self.stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(self.task), FINAL_SHIP_SECONDS)
        except TimeoutError:
            self.task.cancel()
            log.warning("the end of the script's output was not stored in time", attempt=self.attempt,
                        stored_up_to=self.offset)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), SHIP_SECONDS)
            final = self.stop.is_set()
            await asyncio.to_thread(self.ship, final)
            if final:
                return

    def ship(self, final: bool) -> None:
        """Store what was added since the last upload; a failure is retried on the next call."""
        with self.lock:
            self._ship(final)

    def _ship(self, final: bool) -> None:
        while True:
            if self.pending is None:
                self.pending = self._next_chunk(final)
            if self.pending is None:
                return
            offset, data = self.pending
            try:
                logs_store.write_chunk(self.storage_url, self.run_id, self.attempt, offset, mask(data, self.secrets))
            except Exception as err:  # noqa: BLE001 - storage errors, after retries: try again next time
                log.warning("log upload failed; retrying", attempt=self.attempt, error=str(err))
                return
            self.pending = None

    def _next_chunk(self, final: bool) -> tuple[int, bytes] | None:
        try:
            with open(self.path, "rb") as file:
                file.seek(self.offset)
                data = file.read(MAX_CHUNK_BYTES)
        except FileNotFoundError:
            return None
        if not final and len(data) < MAX_CHUNK_BYTES:
            data = data[: data.rfind(b"\n") + 1]  # whole lines only; the rest goes with the next chunk
        if not data:
            return None
        offset, self.offset = self.offset, self.offset + len(data)
        return offset, data
