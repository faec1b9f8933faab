"""A run's setup commands (`setup:` in the config, `--setup`), run on the host before its command.

They run in the same process the agent supervises, through a small shell wrapper, so heartbeats and
reclaim notices work during a long `pip install` exactly as during training. Each runs in its own
`/bin/sh -c`, in the run's workdir and environment, its output in the attempt's log. The first that fails
ends the attempt, and the run, with its own reason; the wrapper leaves which one and its exit code in a
marker file. So does a command that is not found once setup is done (setup may be what installs it).
"""

from __future__ import annotations

from pathlib import Path

from vaultlayer.models import FailureCause

# $1 the marker file, $2 how many setup commands follow, then the commands, then the run's command.
_WRAPPER = r"""
marker=$1; count=$2; shift 2
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
if ! command -v "$1" >/dev/null 2>&1; then
  printf 'command\n%s' "$1" > "$marker"
  echo "vl: command not found on the host: $1" >&2
  exit 127
fi
exec "$@"
"""


def wrap(setup: list[str], command: list[str], marker: Path) -> list[str]:
    """The command to start: `command` itself, or the wrapper that runs `setup` first."""
    if not setup:
        return command
    return ["/bin/sh", "-c", _WRAPPER, "vl-setup", str(marker), str(len(setup)), *setup, *command]


def failure(marker: Path) -> tuple[FailureCause, str] | None:
    """Why the attempt failed in setup, or before its command could start; None when neither happened."""
    try:
        code, _, step = marker.read_text().partition("\n")
    except FileNotFoundError:
        return None
    if code == "command":
        return FailureCause.COMMAND, (f"command {step!r} not found on the host after setup; fix: install it in a "
                                      "setup command, or name it by its path")
    return FailureCause.SETUP, f"setup command {step!r} failed with exit code {code}"
