"""Faults of a host: its agent SIGKILLed while the script it started lives on, a reclaim without notice during
the very first step, before any checkpoint exists, and a reclaim before the host's agent started at all. Each run
ends identical to an uninterrupted one, with no host left (an orphaned script included: it is in the host's
process group).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal

from tests.conftest import group_members, make_counter_spec
from tests.faults.conftest import assert_no_host_left, status_of
from tests.helpers import Failpoints, freeze, wait_until
from tests.test_run_e2e import record_histories
from vaultlayer import checkpoint, failpoints, protocol
from vaultlayer import client as vl_client
from vaultlayer.models import AttemptOutcome, RunState


async def test_host_agent_killed_while_its_script_lives_on(temporal_env, control, vl_home, tmp_path,
                                                           counter_reference, figure):
    out = tmp_path / "out.json"
    spec = make_counter_spec(tmp_path, steps=150, out=out, heartbeat_timeout_seconds=3.0)
    client = temporal_env.client
    await vl_client.submit(client, spec, queue=control)

    async def stored_some():
        status = await status_of(client, spec.run_id)
        return status if (status.durable_step or 0) >= 20 and status.current_host else None

    status = await wait_until(stored_some, 90, "training and two checkpoints")
    pgid = int(status.current_host.handle["pgid"])  # the agent leads its host's process group
    os.kill(pgid, signal.SIGKILL)

    await asyncio.wait_for(client.get_workflow_handle(spec.run_id).result(), 180)
    status = await status_of(client, spec.run_id)
    first, second = status.attempts[0], status.attempts[1]
    # The orphaned script keeps the host alive: a host fault, not a reclaim, and the host is released.
    assert first.outcome == AttemptOutcome.HOST_FAULT and "heartbeats stopped while the host is running" in first.reason
    assert second.start_step == first.durable_step >= 20
    assert status.state == RunState.SUCCEEDED
    assert out.read_text() == counter_reference(150)
    assert not group_members(pgid) or all(state == "Z" for _, state in group_members(pgid))
    assert_no_host_left(vl_home)
    figure(steps_lost=status.steps_lost, resumed_from=second.start_step)


async def test_reclaim_during_the_very_first_step_resumes_from_scratch(temporal_env, control, vl_home, tmp_path,
                                                                      counter_reference, figure):
    out = tmp_path / "out.json"
    steps = 20  # the first checkpoint comes after 10 steps, 5 s: long after the reclaim
    spec = make_counter_spec(tmp_path, steps=steps, out=out, step_time=0.5,
                             heartbeat_timeout_seconds=2.0)
    client = temporal_env.client
    await vl_client.submit(client, spec, queue=control)
    host_dir = vl_home / "hosts" / spec.run_id / "h-1"

    async def first_step_running():
        """The script has started and not yet finished a step (the SDK reports progress after each)."""
        tag = host_dir / "host.json"
        if not tag.exists():
            return False
        started = "script started" in (host_dir / "agent.log").read_text(errors="replace")
        return started and not (host_dir / "a1" / "control" / "progress.json").exists()

    await wait_until(first_step_running, 60, "the script's first step")
    # Held in its first step however slow the reclaim is to come: the host is taken with the script frozen.
    freeze(json.loads((host_dir / "host.json").read_text())["pgid"])
    progress = protocol.read_progress(host_dir / "a1" / "control")
    assert progress is None or progress.step <= 1, "frozen in its first step, or as that step ended"
    await vl_client.reclaim(client, spec.run_id, with_notice=False)

    await asyncio.wait_for(client.get_workflow_handle(spec.run_id).result(), 120)
    status = await status_of(client, spec.run_id)
    first, second = status.attempts[0], status.attempts[1]
    assert first.outcome == AttemptOutcome.RECLAIMED and "host gone" in first.reason
    assert first.durable_step is None and first.end_step in (0, 1, None)
    assert second.start_step == 0 and second.resumed_from is None
    assert [attempt for _, _, attempt in checkpoint.list_checkpoints(spec.storage_url, spec.run_id)
            if attempt == 1] == [], "the first host stored nothing"
    assert status.state == RunState.SUCCEEDED
    assert out.read_text() == counter_reference(steps)
    assert_no_host_left(vl_home)
    figure(steps_lost=status.steps_lost, first_attempt_end_step=first.end_step)


async def test_a_host_reclaimed_before_its_agent_started_is_a_reclaim_not_a_fault(temporal_env, control, vl_home,
                                                                                 tmp_path, monkeypatch,
                                                                                 counter_reference, figure):
    """The first host's agent is held before it polls (a failpoint), and the host is taken there: no agent sees a
    notice or misses a heartbeat. The workflow's start watch asks the provider, hears the host is gone, waits a
    heartbeat timeout for an agent that might have started, then gives the attempt up rather than waiting out its
    5-minute start timeout; a host gone is a reclaim: no host fault, no host excluded, and the run finishes on the
    next host."""
    points = Failpoints(tmp_path / "failpoints").install(monkeypatch)
    held = failpoints.before_poll("h-1")
    points.arm(held)
    out = tmp_path / "out.json"
    steps = 20
    spec = make_counter_spec(tmp_path, steps=steps, out=out, step_time=0.0,
                             start_timeout_seconds=300.0)  # the product's: waited out, the run would outlast the guard
    client = temporal_env.client
    handle = client.get_workflow_handle(spec.run_id)
    await vl_client.submit(client, spec, queue=control)
    try:
        await points.wait_reached(held)
        await vl_client.reclaim(client, spec.run_id, with_notice=False)
        await asyncio.wait_for(handle.result(), 200)
    finally:
        points.release(held)
    await record_histories(client, spec.run_id)  # VL_RECORD_HISTORIES: the replay guard covers the start watch
    status = await status_of(client, spec.run_id)
    first = status.attempts[0]
    assert first.outcome == AttemptOutcome.RECLAIMED, first
    assert "host gone before its agent started" in first.reason, first
    assert status.host_faults == 0 and status.excluded_hosts == [], status
    assert [record.outcome for record in status.attempts[1:]] == [AttemptOutcome.COMPLETED], status.attempts
    # Given up on by the watch, not ended by the start timeout.
    events = []  # of every run of the chain: the status carried on continue-as-new
    async for execution in client.list_workflows(f'WorkflowId = "{spec.run_id}"'):
        run = client.get_workflow_handle(spec.run_id, run_id=execution.run_id)
        events += [event async for event in run.fetch_history_events()]
    assert not any(event.HasField("activity_task_timed_out_event_attributes") for event in events)
    assert any(event.HasField("activity_task_canceled_event_attributes") for event in events)
    assert status.state == RunState.SUCCEEDED
    assert out.read_text() == counter_reference(steps)
    assert "script started" not in (vl_home / "hosts" / spec.run_id / "h-1" / "agent.log").read_text()
    assert_no_host_left(vl_home)
    figure(attempts=len(status.attempts), steps_lost=status.steps_lost)
