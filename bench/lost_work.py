"""Steps lost per reclaim, with and without a notice, measured on real `vl run`s of the tiny example.

With a notice the SDK saves at once and the host is released at that step: the target is 0. Without
one (SIGKILL, found through the heartbeat timeout) the work since the last periodic checkpoint is
redone: the target is at most one checkpoint interval. "Lost" is measured from the host's own last
progress record (written every 0.2 s by the SDK), not from heartbeats, so it is not undercounted.

    python bench/lost_work.py [--json] [--reclaims 3] [--interval-steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vaultlayer import protocol

REPO = Path(__file__).resolve().parent.parent
TRAIN_TINY = REPO / "examples" / "train_tiny.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def vl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def status(env: dict[str, str], run_id: str) -> dict:
    return json.loads(vl(env, "status", run_id, "--json").stdout)


def last_step_on_host(home: Path, run_id: str, host: str, attempt: int) -> int | None:
    progress = protocol.read_progress(home / "hosts" / run_id / host / f"a{attempt}" / "control")
    return progress.step if progress is not None else None


def run_with_reclaims(env: dict[str, str], home: Path, with_notice: bool, reclaims: int,
                      interval_steps: int) -> list[int]:
    """Start a run, reclaim its host `reclaims` times once it has a checkpoint, return steps lost each time."""
    out = home / f"w-{with_notice}.pt"
    started = vl(env, "run", "--detach", "--heartbeat-timeout", "3s", "--notice-seconds", "10",
                 "--checkpoint-every", str(interval_steps), "--", "python", str(TRAIN_TINY),
                 "--steps", "100000", "--step-time", "0.05", "--out", str(out))
    assert started.returncode == 0, started.stderr
    run_id = started.stdout.splitlines()[0].removeprefix("run ")
    done = 0
    while done < reclaims:
        current = status(env, run_id)
        attempt = current["attempts"][-1] if current["attempts"] else None
        durable = current.get("durable_step") or 0
        # Reclaim mid-interval, once this attempt has stored a checkpoint of its own.
        if attempt and attempt["outcome"] is None and current["host"] and durable > attempt["start_step"]:
            step = current.get("step") or 0
            if (step - durable) >= interval_steps // 2:
                result = vl(env, "reclaim", run_id, *([] if with_notice else ["--no-notice"]))
                if result.returncode == 0:
                    done += 1
                    while status(env, run_id)["attempts"][-1]["attempt"] == attempt["attempt"]:
                        time.sleep(0.5)
        time.sleep(0.3)
    while len(status(env, run_id)["attempts"]) <= reclaims or status(env, run_id)["attempts"][-1]["host"] is None:
        time.sleep(0.5)
    vl(env, "cancel", run_id)
    final = status(env, run_id)
    lost = []
    for record, following in zip(final["attempts"], final["attempts"][1:]):
        if record["outcome"] != "reclaimed":
            continue
        reached = last_step_on_host(home, run_id, record["host"], record["attempt"]) or record["end_step"]
        lost.append(max(0, reached - following["start_step"]))
    return lost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--reclaims", type=int, default=3)
    parser.add_argument("--interval-steps", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vl-bench-") as scratch:
        home = Path(scratch)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VL_", "TEMPORAL_"))}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.update(VL_HOME=str(home), VL_TEMPORAL_PORT=str(free_port()), VL_UI_PORT=str(free_port()))
        try:
            with_notice = run_with_reclaims(env, home, True, args.reclaims, args.interval_steps)
            without_notice = run_with_reclaims(env, home, False, args.reclaims, args.interval_steps)
        finally:
            vl(env, "down")
    result = {
        "interval_steps": args.interval_steps,
        "lost_steps_with_notice": with_notice,
        "lost_steps_without_notice": without_notice,
        "lost_steps_with_notice_max": max(with_notice),
        "lost_steps_without_notice_max": max(without_notice),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"checkpoint interval: {args.interval_steps} steps")
    print(f"steps lost per reclaim with notice:    {with_notice} (max {max(with_notice)}, target 0)")
    print(f"steps lost per reclaim without notice: {without_notice} (max {max(without_notice)}, "
          f"target <= {args.interval_steps})")


if __name__ == "__main__":
    main()
