"""A run's setup commands (`setup:` in the config, `--setup`), run on the host before its command.

They run in the same process the agent supervises, through a small shell wrapper, so heartbeats and
reclaim notices work during a long `pip install` exactly as during training. Each runs in its own
`/bin/sh -c`, in the run's workdir and environment, its output in the attempt's log. The first that fails
ends the attempt as a script failure; the wrapper leaves which one and its exit code in a marker file.
"""

from __future__ import annotations

from pathlib import Path

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
exec "$@"
"""


def wrap(setup: list[str], command: list[str], marker: Path) -> list[str]:
    """The command to start: `command` itself, or the wrapper that runs `setup` first."""
    if not setup:
        return command
    return ["/bin/sh", "-c", _WRAPPER, "vl-setup", str(marker), str(len(setup)), *setup, *command]


def failure(marker: Path) -> str | None:
    """Why the attempt failed in setup, or None when every setup command succeeded."""
    try:
        code, _, step = marker.read_text().partition("\n")
    except FileNotFoundError:
        return None
    return f"setup command {step!r} failed with exit code {code}"
