"""A run's setup commands (`setup:` in the config, `--setup`), run on the host before its command.

They run in the same process the agent supervises, through a small shell wrapper, so heartbeats and
reclaim notices work during a long `pip install` exactly as during training. Each runs in its own
`/bin/sh -c`, in the run's workdir and environment, its output in the attempt's log. The first that fails
ends the attempt, and the run, with its own reason; the wrapper leaves which one and its exit code in a
marker file. So does a command that is not found once setup is done (setup may be what installs it).
When every setup command succeeded, the wrapper leaves a second marker: its time is when setup ended, and
the agent stores the run's setup cache (vaultlayer/workdir/setup_cache.py) from then on.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from structlog.typing import FilteringBoundLogger

from vaultlayer.models import AttemptInput, FailureCause
from vaultlayer.protocol import SETUP_DONE_FILE, SETUP_FAILED_FILE
from vaultlayer.workdir import WorkdirError, restore_snapshot, setup_cache_env, store_setup_cache, stored_setup_cache

# $1 the failure marker, $2 the done marker, $3 how many setup commands follow, then the commands, then the
# run's command.
_WRAPPER = r"""
marker=$1; done_marker=$2; count=$3; shift 3
i=0
while [ "$i" -lt "$count" ]; do
  i=$((i + 1)); step=$1; shift
  echo "vl: setup $i/$count: $step" >&2
  /bin/sh -c "$step"; code=$?
  if [ "$code" -ne 0 ]; then
    printf '%s\n%s' "$code" "$step" > "$marker"
    echo "vl: setup command failed with exit code $code: $step" >&2
    exit "$code"
  fi
done
: > "$done_marker"
if ! command -v "$1" >/dev/null 2>&1; then
  printf 'command\n%s' "$1" > "$marker"
  echo "vl: command not found on the host: $1" >&2
  exit 127
fi
exec "$@"
"""


def wrap(setup: list[str], command: list[str], control: Path) -> list[str]:
    """The command to start: `command` itself, or the wrapper that runs `setup` first, leaving its markers in
    the attempt's `control` directory."""
    if not setup:
        return command
    return ["/bin/sh", "-c", _WRAPPER, "vl-setup", str(control / SETUP_FAILED_FILE), str(control / SETUP_DONE_FILE),
            str(len(setup)), *setup, *command]


def setup_ended_at(control: Path) -> float | None:
    """When the setup commands all succeeded (seconds since the epoch), or None while they have not."""
    try:
        return (control / SETUP_DONE_FILE).stat().st_mtime
    except FileNotFoundError:
        return None


def failure(control: Path) -> tuple[FailureCause, str] | None:
    """Why the attempt failed in setup, or before its command could start; None when neither happened."""
    try:
        code, _, step = (control / SETUP_FAILED_FILE).read_text().partition("\n")
    except FileNotFoundError:
        return None
    if code == "command":
        return FailureCause.COMMAND, (f"command {step!r} not found on the host after setup; fix: install it in a "
                                      "setup command, or name it by its path")
    return FailureCause.SETUP, f"setup command {step!r} failed with exit code {code}"


@dataclass
class SetupOnHost:
    """One attempt's setup on this host: when it began, the run's setup cache it restored or is to store, and
    how long setup took. The cache only ever speeds setup up: any trouble with it is logged, never fatal."""

    began: float  # time.time() when the host started on setup: restoring the cache counts
    cache_dir: Path | None  # None: the run keeps no setup cache
    restored: bool = False
    store_after: bool = False  # no host has stored the run's cache yet: this one does, once setup succeeded
    storing: asyncio.Task | None = None
    seconds: float | None = None  # set once setup succeeded

    def env(self) -> dict[str, str]:
        return setup_cache_env(self.cache_dir) if self.cache_dir is not None else {}

    def observe(self, control: Path, inp: AttemptInput, log: FilteringBoundLogger, *, store: bool = True) -> bool:
        """Note the end of setup once the wrapper marked it, and start storing the cache if this host is to
        (`store`: the attempt goes on). True the first time the end is seen."""
        if self.seconds is not None or (ended := setup_ended_at(control)) is None:
            return False
        self.seconds = max(0.0, ended - self.began)
        log.info("setup done", seconds=round(self.seconds, 2), cache="restored" if self.restored else "none")
        if store and self.store_after and self.cache_dir is not None and self.cache_dir.is_dir():
            self.storing = asyncio.create_task(_store_cache(self.cache_dir, inp, log))
        return True

    def result_fields(self) -> dict[str, object]:
        """What AttemptResult says of setup."""
        stored = self.storing is not None and self.storing.done() and not self.storing.cancelled() \
            and self.storing.result()
        return {"setup_seconds": self.seconds,
                "setup_cache": "restored" if self.restored else "stored" if stored else ""}


async def prepare(inp: AttemptInput, cache_dir: Path, log: FilteringBoundLogger) -> SetupOnHost | None:
    """Before the attempt's setup runs: the run's setup cache restored into `cache_dir` when one is stored, and
    `cache_dir` left empty, to be stored, when none is. None when the run has no setup commands."""
    if not inp.setup:
        return None
    began = time.time()
    if not inp.setup_cache:
        return SetupOnHost(began=began, cache_dir=None)
    try:
        ref = await asyncio.to_thread(stored_setup_cache, inp.storage_url, inp.run_id)
    except Exception as err:  # noqa: BLE001 - storage of any kind; setup runs as it would without a cache
        log.warning("setup cache not read; setup runs without it", error=repr(err))
        return SetupOnHost(began=began, cache_dir=cache_dir)
    if ref is None:
        return SetupOnHost(began=began, cache_dir=cache_dir, store_after=True)
    if cache_dir.is_dir() and any(cache_dir.iterdir()):  # an earlier attempt on this host restored or filled it
        return SetupOnHost(began=began, cache_dir=cache_dir)
    try:
        await asyncio.to_thread(restore_snapshot, ref, cache_dir)
    except Exception as err:  # noqa: BLE001 - a corrupt or unreadable cache is stored again, never used
        log.warning("setup cache not restored; setup runs without it", snapshot=ref.short, error=repr(err))
        shutil.rmtree(cache_dir, ignore_errors=True)
        return SetupOnHost(began=began, cache_dir=cache_dir, store_after=True)
    log.info("setup cache restored", snapshot=ref.short, files=ref.file_count, bytes=ref.total_bytes)
    return SetupOnHost(began=began, cache_dir=cache_dir, restored=True)


async def _store_cache(cache_dir: Path, inp: AttemptInput, log: FilteringBoundLogger) -> bool:
    """Store the cache setup left, beside the training (the pointer last: a host lost midway stores nothing)."""
    try:
        ref = await asyncio.to_thread(store_setup_cache, cache_dir, inp.storage_url, inp.run_id)
    except Exception as err:  # noqa: BLE001 - storage of any kind, or a cache over the limit
        log.warning("setup cache not stored", error=repr(err) if not isinstance(err, WorkdirError) else str(err))
        return False
    log.info("setup cache stored", snapshot=ref.short, files=ref.file_count, bytes=ref.total_bytes)
    return True
