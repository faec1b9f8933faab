"""Load: the control-plane benchmark's harness path end to end at small scale, and 20 concurrent local runs
of a tiny script on real host agents (issue 9 item 3). The 1,000-run figures come from `bench/load.py`
itself (docs/load.md), not from a test."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import REPO, group_alive, make_spec
from vaultlayer import client as vl_client
from vaultlayer.models import RunState, RunStatus

LOAD_KEYS = {"runs", "runs_completed", "control_cpu_seconds", "control_peak_rss_mb", "history_events_per_run",
             "notice_to_replacement_p50_s", "notice_to_replacement_p99_s", "wall_s", "hosts_leaked"}

# A training script with no torch: it sums the step numbers, checkpointing the sum through the SDK. It starts
# training only once every run of the test has started (the barrier), so the runs are in flight together.
TINY_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import vaultlayer

    steps, out, barrier, runs = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
    (barrier / out.stem).touch()
    deadline = time.monotonic() + 120
    while len(list(barrier.iterdir())) < runs:
        if time.monotonic() > deadline:
            sys.exit(f"only {len(list(barrier.iterdir()))} of {runs} runs started")
        time.sleep(0.1)
    restored = vaultlayer.resume()
    total = json.loads((restored.path / "sum.json").read_text()) if restored else 0
    for step in range(restored.step if restored else 0, steps):
        total += step
        time.sleep(0.02)
        if vaultlayer.should_save(step + 1):
            with vaultlayer.save(step + 1) as directory:
                (directory / "sum.json").write_text(json.dumps(total))
    out.write_text(json.dumps(total))
""")


def test_load_bench_harness_runs_all(tmp_path):
    """`bench/load.py` at 5 runs: its own server, control worker and harness; seed 2 reclaims some attempts."""
    done = subprocess.run(
        [sys.executable, "bench/load.py", "--runs", "5", "--steps", "8", "--step-time", "0.1", "--save-every", "3",
         "--reclaim-prob", "0.5", "--seed", "2", "--timeout", "120", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=200,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert LOAD_KEYS <= result.keys()
    assert result["runs_completed"] == result["runs"] == 5, result["problems"]
    assert result["hosts_leaked"] == 0
    # The harness's notices are the workflow's reclaims, and every replacement resumed from the emergency save.
    assert result["notices"] == result["reclaims"] > 0
    assert result["replacements_resumed_at_emergency_save"] == result["notices"]
    assert result["attempts"] == result["runs"] + result["reclaims"]
    assert result["notice_to_replacement_p50_s"] <= result["notice_to_replacement_p99_s"]
    assert result["history_events_per_run"]["max"] >= result["history_events_per_run"]["mean"] > 0
    assert result["control_cpu_seconds"] > 0 and result["control_peak_rss_mb"] > 0


async def test_twenty_concurrent_local_runs_finish(temporal_env, control, vl_home, tmp_path):
    """20 runs at once through the local provider (a `vl agent` process group each) all succeed, and no host
    outlives its run."""
    runs, steps = 20, 15
    script, barrier = tmp_path / "tiny.py", tmp_path / "barrier"
    script.write_text(TINY_SCRIPT)
    barrier.mkdir()
    specs = [make_spec(tmp_path, steps, tmp_path / f"out-{index}.json", checkpoint_every="5",
                       heartbeat_timeout_seconds=30.0, start_timeout_seconds=120.0,
                       command=[sys.executable, str(script), str(steps), str(tmp_path / f"out-{index}.json"),
                                str(barrier), str(runs)])
             for index in range(runs)]
    client = temporal_env.client
    await asyncio.gather(*(vl_client.submit(client, spec, queue=control) for spec in specs))
    statuses = await asyncio.wait_for(asyncio.gather(
        *(client.get_workflow_handle(spec.run_id, result_type=RunStatus).result() for spec in specs)), 240)

    assert [status.state for status in statuses] == [RunState.SUCCEEDED] * runs
    for index in range(runs):
        assert json.loads((tmp_path / f"out-{index}.json").read_text()) == sum(range(steps))
    assert all(status.durable_step == steps for status in statuses)
    tags = [json.loads(tag.read_text()) for tag in Path(vl_home, "hosts").glob("*/*/host.json")]
    # One host per attempt, none beyond. Attempts may exceed runs: seen once in a full-suite run, a first host's
    # agent started but never began its attempt, and a second host finished the run (cause not found; see the note).
    assert len(tags) == sum(len(status.attempts) for status in statuses) >= runs
    assert not [tag["host_id"] for tag in tags if group_alive(tag["pgid"])]


def test_control_activities_heartbeat_while_they_work(monkeypatch):
    """A sync control activity heartbeats from a side thread until it returns, so a lost task is retried after the
    workflow's heartbeat timeout rather than its whole start-to-close timeout."""
    import threading

    from temporalio.testing import ActivityEnvironment

    from activities import heartbeats

    monkeypatch.setattr(heartbeats, "HEARTBEAT_EVERY_SECONDS", 0.05)
    beats = threading.Event()
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *details: beats.set()

    @heartbeats.heartbeating
    def slow_body(limit: float) -> bool:
        return beats.wait(limit)  # returns once the side thread has heartbeated

    assert env.run(slow_body, 30.0) is True
