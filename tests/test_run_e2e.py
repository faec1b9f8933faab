"""A real PyTorch run through reclaims, on a real Temporal dev server, with real host agent processes.

Each run's --out must equal, tensor for tensor, that of a plain uninterrupted run of the same script.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest
from temporalio.client import WorkflowFailureError

from tests.conftest import assert_same_weights, group_alive, host_pgids, make_counter_spec, make_spec
from tests.helpers import agent_events, freeze, wait_for_progress, wait_for_uploads_settled, wait_until
from vaultlayer import checkpoint
from vaultlayer import client as vl_client
from vaultlayer.models import AttemptOutcome, RunState, RunStatus


async def result_of(client, run_id: str, timeout: float = 240) -> RunStatus:
    handle = client.get_workflow_handle(run_id)
    await asyncio.wait_for(handle.result(), timeout)
    await record_histories(client, run_id)
    return await vl_client.status(client, run_id)


async def record_histories(client, run_id: str) -> None:
    """With VL_RECORD_HISTORIES=DIR, keep every run of this workflow for tests/test_replay.py."""
    target = os.environ.get("VL_RECORD_HISTORIES")
    if not target:
        return
    async for execution in client.list_workflows(f'WorkflowId = "{run_id}"'):
        history = await client.get_workflow_handle(run_id, run_id=execution.run_id).fetch_history()
        Path(target, f"{run_id}-{execution.run_id[:8]}.json").write_text(history.to_json())


async def live_status(client, run_id: str) -> RunStatus:
    return await vl_client.status(client, run_id)


# Each reclaim comes once the attempt has made this many steps of 300, so the run needs RECLAIMS + 1 attempts.
STEPS_BEFORE_RECLAIM = 30
RECLAIMS = 2


@pytest.mark.parametrize("storage_url", ["file", "s3", "gs"], indirect=True)
async def test_reclaims_with_notice_finish_identically(temporal_env, control, vl_home, tmp_path, counter_reference,
                                                       storage_url):
    out = tmp_path / "out.json"
    # The test reclaims each attempt once it has trained a while, rather than on a wall-clock schedule
    # (reclaim_every_seconds), which a loaded machine may spend starting the host.
    # A notice as long as AWS's two minutes: the attempt ends as soon as its emergency save is stored, so the
    # deadline is a bound, not a window a busy machine's save must fit in (a short notice has its own test below).
    spec = make_counter_spec(tmp_path, steps=300, out=out, checkpoint_every=None, storage_url=storage_url,
                             notice_seconds=120.0)
    client = temporal_env.client
    await vl_client.submit(client, spec, queue=control)

    async def interval_reported():
        return (await live_status(client, spec.run_id)).checkpoint_interval

    # No --checkpoint-every: the SDK picks the interval (Young/Daly) and says why, live.
    assert "measure its cost" in await wait_until(interval_reported, 120, "the checkpoint interval")
    for attempt in range(1, RECLAIMS + 1):
        await wait_for_progress(client, spec.run_id, steps=STEPS_BEFORE_RECLAIM, attempt=attempt)
        await vl_client.reclaim(client, spec.run_id)  # with a notice
    status = await result_of(client, spec.run_id)

    assert status.state == RunState.SUCCEEDED
    assert status.reclaims == RECLAIMS, status.attempts
    reclaimed = [a for a in status.attempts if a.outcome == AttemptOutcome.RECLAIMED]
    for record, following in zip(status.attempts, status.attempts[1:]):
        if record.outcome == AttemptOutcome.RECLAIMED:
            # The notice path: an emergency save at the step reached, and the next attempt resumes there.
            assert record.durable_step == record.end_step, record
            assert following.start_step == record.durable_step
    assert status.steps_lost == 0
    assert len(reclaimed) == status.reclaims
    assert status.attempts[-1].outcome == AttemptOutcome.COMPLETED
    assert status.continued_as_new >= 1  # the test server suggests continue-as-new early
    assert out.read_text() == counter_reference(300)
    assert not any(group_alive(pgid) for pgid in host_pgids(vl_home)), "a host outlived its run"
    # Every host opened its storage client before its script started, so no save paid the client's start-up
    # after a notice (over a second of a busy machine's CPU for S3, ten times the upload itself).
    hosts = agent_events(vl_home, spec.run_id)
    assert len(hosts) == RECLAIMS + 1, hosts
    for events in hosts.values():
        assert events.index("storage connected") < events.index("script started"), events


async def test_host_killed_without_notice_is_detected(temporal_env, control, vl_home, tmp_path, reference_weights):
    out = tmp_path / "w.pt"
    spec = make_spec(tmp_path, steps=150, out=out, heartbeat_timeout_seconds=3.0)
    client = temporal_env.client
    await vl_client.submit(client, spec, queue=control)

    async def progressed():
        status = await live_status(client, spec.run_id)
        return status if (status.durable_step or 0) >= 20 and status.current_host else None

    status = await wait_until(progressed, 90, "steps and a checkpoint")
    os.killpg(int(status.current_host.handle["pgid"]), signal.SIGKILL)

    status = await result_of(client, spec.run_id)
    first, second = status.attempts[0], status.attempts[1]
    assert first.outcome == AttemptOutcome.RECLAIMED
    assert "heartbeats stopped" in first.reason
    assert second.start_step >= 20
    assert status.state == RunState.SUCCEEDED
    assert_same_weights(out, reference_weights(150))


async def test_corrupt_newest_checkpoint_is_skipped(temporal_env, control, vl_home, tmp_path, counter_reference):
    out = tmp_path / "out.json"
    spec = make_counter_spec(tmp_path, steps=150, out=out, heartbeat_timeout_seconds=3.0)
    client = temporal_env.client
    await vl_client.submit(client, spec, queue=control)

    async def progressed():
        status = await live_status(client, spec.run_id)
        return status if (status.durable_step or 0) >= 30 and status.current_host else None

    status = await wait_until(progressed, 90, "three checkpoints")
    pgid = int(status.current_host.handle["pgid"])
    freeze(pgid)  # freeze training; the agent keeps heartbeating what is stored
    staging = vl_home / "hosts" / spec.run_id / status.current_host.host_id / "a1" / "staging"
    await wait_for_uploads_settled(client, spec.run_id, spec.storage_url, staging)
    newest_name, newest_step, _ = checkpoint.list_checkpoints(spec.storage_url, spec.run_id)[0]

    storage = Path(spec.storage_url.removeprefix("file://")) / spec.run_id / "checkpoints" / newest_name
    victim = next(p for p in sorted(storage.iterdir()) if p.name != "MANIFEST.json")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    os.killpg(pgid, signal.SIGKILL)

    status = await result_of(client, spec.run_id)
    assert status.state == RunState.SUCCEEDED
    assert [bad.name for bad in status.bad_checkpoints] == [newest_name]
    assert "blake3" in status.bad_checkpoints[0].reason
    assert status.attempts[1].start_step == newest_step - 10
    assert out.read_text() == counter_reference(150)


async def test_cancel_releases_hosts_and_keeps_checkpoints(temporal_env, control, vl_home, tmp_path):
    spec = make_counter_spec(tmp_path, steps=2000, out=tmp_path / "out.json")
    client = temporal_env.client
    await vl_client.submit(client, spec, queue=control)

    async def checkpointed():
        status = await live_status(client, spec.run_id)
        return status if (status.durable_step or 0) >= 10 and status.current_host else None

    status = await wait_until(checkpointed, 90, "a checkpoint")
    pgid = int(status.current_host.handle["pgid"])
    await vl_client.cancel(client, spec.run_id)
    with pytest.raises(WorkflowFailureError):
        await asyncio.wait_for(client.get_workflow_handle(spec.run_id).result(), 60)
    status = await live_status(client, spec.run_id)
    assert status.state == RunState.CANCELLED
    assert not group_alive(pgid)
    assert checkpoint.list_checkpoints(spec.storage_url, spec.run_id), "cancel must keep checkpoints"


async def test_script_failure_fails_the_run_with_its_exit_code(temporal_env, control, vl_home, tmp_path):
    spec = make_counter_spec(tmp_path, steps=10, out=tmp_path / "out.json")
    spec.command = [sys.executable, "-c", "import sys; sys.exit(7)"]
    client = temporal_env.client
    await vl_client.submit(client, spec, queue=control)
    with pytest.raises(WorkflowFailureError):
        await asyncio.wait_for(client.get_workflow_handle(spec.run_id).result(), 60)
    status = await live_status(client, spec.run_id)
    assert status.state == RunState.FAILED
    assert status.exit_code == 7
    assert [a.outcome for a in status.attempts] == [AttemptOutcome.FAILED]
    assert "exited with code 7" in status.stop_reason


@pytest.mark.parametrize("with_notice", [True, False], ids=["notice", "no-notice"])
async def test_operator_reclaim(temporal_env, control, vl_home, tmp_path, counter_reference, with_notice):
    """`vl reclaim RUN` (the `reclaim` update): the host is taken now; the run resumes and finishes."""
    out = tmp_path / "out.json"
    spec = make_counter_spec(tmp_path, steps=150, out=out, heartbeat_timeout_seconds=3.0)
    client = temporal_env.client
    await vl_client.submit(client, spec, queue=control)

    async def progressed():
        status = await live_status(client, spec.run_id)
        return status if (status.durable_step or 0) >= 10 and status.current_host else None

    status = await wait_until(progressed, 90, "a checkpoint")
    ack = await vl_client.reclaim(client, spec.run_id, with_notice=with_notice)
    assert ack.host == status.current_host.host_id == "h-1"

    status = await result_of(client, spec.run_id)
    first = status.attempts[0]
    assert first.outcome == AttemptOutcome.RECLAIMED
    if with_notice:
        assert first.reason == "reclaim notice" and first.durable_step == first.end_step
    else:
        assert "heartbeats stopped; host gone (reclaimed by the provider)" in first.reason
    assert status.attempts[1].host == "h-2"
    assert status.state == RunState.SUCCEEDED
    assert out.read_text() == counter_reference(150)


async def test_a_notice_shorter_than_the_old_margin_is_saved_on_every_reclaim(
        temporal_env, control, vl_home, tmp_path, counter_reference):
    """A 3 s margin declared a notice of 3 s or less missed the moment it came; the margin now scales with
    the notice (the missed path: tests/faults/test_notices.py, a notice seen after its deadline)."""
    out = tmp_path / "out.json"
    # Only emergency saves store checkpoints (the automatic interval's first save comes after 60 s), so the
    # run loses no step only if every reclaim saved. Each reclaim comes with the run's 2 s notice once the
    # attempt has trained: a schedule (reclaim_every_seconds) would take hosts that a loaded machine spends
    # starting, which is the no-progress limit's case (tests/test_no_progress_e2e.py), not this one.
    spec = make_counter_spec(tmp_path, steps=150, out=out, step_time=0.1, notice_seconds=2.0, checkpoint_every=None)
    client = temporal_env.client
    await vl_client.submit(client, spec, queue=control)
    for attempt in (1, 2):
        await wait_for_progress(client, spec.run_id, steps=20, attempt=attempt)
        await vl_client.reclaim(client, spec.run_id)  # with the spec's notice: 2 s
    status = await result_of(client, spec.run_id)
    assert status.state == RunState.SUCCEEDED
    reclaimed = [a for a in status.attempts if a.outcome == AttemptOutcome.RECLAIMED]
    assert len(reclaimed) == 2 and all(a.emergency_save == "saved" for a in reclaimed), status.attempts
    assert status.steps_lost == 0
    assert out.read_text() == counter_reference(150)
