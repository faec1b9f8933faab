"""Process groups on this machine (a local host is one), and the throttle that makes one slower.

The throttle is a process of its own, in a session of its own, that duty-cycles a host's whole process group
with SIGSTOP/SIGCONT: in each period (100 ms) the group runs period/factor and is stopped for the rest, so a
factor of 4 leaves it about a quarter of the CPU time it would have, whatever the script does. The local
provider starts one for each host of a zone with a `[slowdown]` in `VL_HOME/local.toml`: slow pools for tests
and demos of speed-aware placement.

It never leaves the group stopped for good: it sends SIGCONT before it ends, for any reason it can see (the
group gone, SIGTERM, SIGINT, SIGHUP, an error), and it ends by itself once the group is gone (or holds only
zombies), so releasing a host stays what it was: SIGKILL of the group, which a stopped process obeys too.

Standard library only, and run by its path (`start`), not with `-m`: importing the provider package would
cost each slowed host half a second of CPU before its first stop.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PERIOD_SECONDS = 0.1  # one run-then-stop cycle: short enough that the agent's 2 s heartbeats never notice
LIVENESS_EVERY_SECONDS = 1.0  # how often the group is looked for zombies-only (a scan of /proc)
EXIT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def group_members(pgid: int) -> list[tuple[int, str]]:
    """(pid, state) of every process in the group, read from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            members.append((int(stat.parent.name), fields[0]))
    return members


def group_alive(pgid: int) -> bool:
    """True while any process of the group runs; zombies waiting for a reaper do not count."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return any(state != "Z" for _, state in group_members(pgid))


def _signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to the group; False once the group is gone."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def throttle(pgid: int, factor: float, period: float = PERIOD_SECONDS) -> None:
    """Duty-cycle the group until it is gone (or a signal ends this process); the group is left running."""
    running_for = period / factor
    stopped_for = period - running_for
    look_at = time.monotonic() + LIVENESS_EVERY_SECONDS
    try:
        while True:
            time.sleep(running_for)
            if not _signal_group(pgid, signal.SIGSTOP):
                return
            time.sleep(stopped_for)
            if not _signal_group(pgid, signal.SIGCONT):
                return
            if time.monotonic() >= look_at:  # only zombies left: signals still reach them, nothing else would
                if not group_alive(pgid):
                    return
                look_at = time.monotonic() + LIVENESS_EVERY_SECONDS
    finally:
        # No second signal may cut this short: whatever ended the loop, the group goes on running.
        signal.pthread_sigmask(signal.SIG_BLOCK, EXIT_SIGNALS)
        _signal_group(pgid, signal.SIGCONT)


def start(pgid: int, factor: float, log_path: Path, period: float = PERIOD_SECONDS) -> subprocess.Popen:
    """The throttle of group `pgid`, started detached like a host (a session of its own, so that it never stops
    itself) with its output appended to `log_path`. The caller reaps it."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-I", str(Path(__file__).resolve()), "--pgid", str(pgid), "--factor", repr(factor),
             "--period", repr(period)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Slow a process group down by duty-cycling it.")
    parser.add_argument("--pgid", type=int, required=True)
    parser.add_argument("--factor", type=float, required=True, help="above 1: the group runs 1/factor of the time")
    parser.add_argument("--period", type=float, default=PERIOD_SECONDS)
    args = parser.parse_args(argv)
    if not args.factor > 1 or not args.period > 0:
        parser.error("--factor must be above 1 and --period above 0")
    for signum in EXIT_SIGNALS:
        signal.signal(signum, _exit_on_signal)
    print(f"throttle: group {args.pgid} runs 1/{args.factor:g} of every {args.period:g} s", file=sys.stderr,
          flush=True)
    throttle(args.pgid, args.factor, args.period)
    print(f"throttle: group {args.pgid} is gone or released; it was left running", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
