"""A host partitioned from Temporal while its processes live on, then reconnected.

The host agent reaches the server through a TCP proxy that the test cuts. While the partition lasts, the
control-plane worker is down too, so that nothing can release the host: whatever stops the zombie is the
agent itself. The server times the attempt out; the zombie trains on and publishes checkpoints nobody asked
for; once reconnected it must stop its script by itself, and when the control plane is back, the workflow
fences the attempt at the last step it heard of, so none of the zombie's later checkpoints is ever resumed from.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

import worker.control
from tests.conftest import group_members, make_counter_spec
from tests.faults.conftest import CuttableProxy, assert_no_host_left, status_of
from tests.helpers import wait_until
from vaultlayer import checkpoint
from vaultlayer import client as vl_client
from vaultlayer.models import AttemptOutcome, RunState


@pytest.fixture
def proxy(temporal_env, monkeypatch):
    """Hosts reach the server through the proxy; the control-plane worker and the test reach it directly."""
    target = temporal_env.client.service_client.config.target_host
    proxy = CuttableProxy(int(target.rsplit(":", 1)[1]))
    proxy.start()
    connection_env = worker.control.agent_connection_env
    monkeypatch.setattr(worker.control, "agent_connection_env",
                        lambda client: connection_env(client) | {"TEMPORAL_ADDRESS": proxy.address})
    yield proxy
    proxy.stop()


async def test_partitioned_host_stops_itself_on_reconnect_and_its_checkpoints_are_fenced(
        temporal_env, proxy, vl_home, tmp_path, counter_reference, figure):
    client = temporal_env.client
    queue = f"vl-test-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "out.json"
    spec = make_counter_spec(tmp_path, steps=200, out=out, heartbeat_timeout_seconds=3.0)

    async def stored_some():
        status = await status_of(client, spec.run_id)
        return status if (status.durable_step or 0) >= 20 and status.current_host else None

    async with worker.control.create_worker(client, task_queue=queue, home=vl_home):
        handle = await vl_client.submit(client, spec, queue=queue)
        status = await wait_until(stored_some, 90, "checkpoints on the first host")
    pgid = int(status.current_host.handle["pgid"])
    proxy.cut()

    async def timed_out():
        history = await handle.fetch_history()
        return any(event.HasField("activity_task_timed_out_event_attributes") for event in history.events)

    await wait_until(timed_out, 60, "the server to time the attempt out")
    timed_out_step = max(step for _, step, attempt in checkpoint.list_checkpoints(spec.storage_url, spec.run_id))

    def newest_of_attempt_1() -> int:
        return max(item.step for item in checkpoint.describe_checkpoints(spec.storage_url, spec.run_id, {})
                   if item.attempt == 1 and item.state == checkpoint.CheckpointState.COMPLETE)

    async def zombie_published():
        return newest_of_attempt_1() > timed_out_step

    await wait_until(zombie_published, 60, "the partitioned host to publish a checkpoint after its time-out")
    assert len(group_members(pgid)) >= 2, "the agent and its script live on through the partition"

    proxy.heal()
    healed_at = time.monotonic()

    async def script_stopped():
        return [pid for pid, state in group_members(pgid) if state != "Z"] == [pgid]

    await wait_until(script_stopped, 60, "the reconnected agent to stop its script")
    stopped_seconds = time.monotonic() - healed_at
    last_zombie_step = newest_of_attempt_1()

    async with worker.control.create_worker(client, task_queue=queue, home=vl_home):
        await asyncio.wait_for(handle.result(), 240)
        status = await status_of(client, spec.run_id)

    first, second = status.attempts[0], status.attempts[1]
    assert first.outcome == AttemptOutcome.HOST_FAULT and "heartbeats stopped while the host is running" in first.reason
    fence = status.fences[1]
    assert fence < last_zombie_step
    assert second.start_step <= fence and second.resumed_from.endswith("-a1")
    fenced = [bad.name for bad in status.bad_checkpoints if bad.reason == f"fenced: attempt 1 ended at step {fence}"]
    assert checkpoint.checkpoint_name(last_zombie_step, 1) in fenced
    assert status.state == RunState.SUCCEEDED
    assert out.read_text() == counter_reference(200)
    assert_no_host_left(vl_home)
    figure(fence=fence, zombie_checkpoints_fenced=len(fenced), newest_zombie_step=last_zombie_step,
           seconds_to_stop_after_reconnect=round(stopped_seconds, 1), steps_lost=status.steps_lost)
