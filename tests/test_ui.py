"""What a run shows in the Temporal UI: Vl* search attributes kept current by the workflow, its current
details (naming the attempt that runs, after a refused move too), their registration on a server, and a
run on a server without them."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from unittest.mock import ANY

from temporalio import activity
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.common import SearchAttributeKey
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import default as default_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

import activities.control

from tests.conftest import make_counter_spec, make_spec, temporal_binary
from tests.helpers import wait_until
from tests.test_run_e2e import record_histories
from vaultlayer import client as vl_client
from vaultlayer import ui
from vaultlayer.models import (
    AttemptOutcome,
    AttemptRecord,
    AttemptResult,
    Host,
    HostDescription,
    HostState,
    Limits,
    Market,
    Pool,
    ProvisionInput,
    ProvisionResult,
    Refusal,
    RunInput,
    RunSpec,
    RunState,
    RunStatus,
)
from workflows import accounting, policy


async def details_of(client, run_id: str) -> str:
    """The current details the UI shows on the run's page (the SDK's built-in metadata query)."""
    metadata = await client.get_workflow_handle(run_id).query("__temporal_workflow_metadata",
                                                              result_type=WorkflowMetadata)
    return metadata.current_details


async def _past_step(client, run_id: str, step: int) -> bool:
    status = await vl_client.status(client, run_id)
    return status.step is not None and status.step >= step


async def test_search_attributes_and_details_follow_the_run_through_a_reclaim(temporal_env, control, tmp_path):
    client = temporal_env.client
    spec = make_counter_spec(tmp_path, steps=160, out=tmp_path / "out.json", search_attributes=True)
    handle = await vl_client.submit(client, spec, queue=control)

    async def running():
        attributes = (await handle.describe()).typed_search_attributes
        return attributes.get(ui.VL_STATE) == "running" and attributes.get(ui.VL_ATTEMPT) == 1

    await wait_until(running, 60, "VlState running on attempt 1")
    assert "attempt 1 on host h-1" in await details_of(client, spec.run_id)
    await wait_until(lambda: _past_step(client, spec.run_id, 10), 60, "step 10")
    await vl_client.reclaim(client, spec.run_id)
    await asyncio.wait_for(handle.result(), 90)
    await record_histories(client, spec.run_id)  # VL_RECORD_HISTORIES: the replay guard covers this patch

    attributes = (await handle.describe()).typed_search_attributes
    final = await vl_client.status(client, spec.run_id)
    # The host's last report: the final save may coalesce into the one before it, progress is throttled.
    step = max(final.durable_step, final.attempts[-1].end_step)
    assert [a.outcome for a in final.attempts] == [AttemptOutcome.RECLAIMED, AttemptOutcome.COMPLETED]
    assert step >= 150
    assert attributes.get(ui.VL_STATE) == "succeeded"
    assert attributes.get(ui.VL_STEP) == step
    assert attributes.get(ui.VL_ATTEMPT) == 2
    assert (attributes.get(ui.VL_PROVIDER), attributes.get(ui.VL_GPU)) == ("local", "cpu")
    details = await details_of(client, spec.run_id)
    assert details.startswith(f"**succeeded** · step {step} · durable step {final.durable_step}")
    assert "attempt 2 on host h-2" in details and "reclaims 1" in details and "cost $0.00" in details
    found = [run.id async for run in client.list_workflows(f'VlState = "succeeded" AND VlStep = {step} '
                                                            f'AND WorkflowId = "{spec.run_id}"')]
    assert found == [spec.run_id]


def test_after_a_refused_move_the_ui_names_the_attempt_that_runs_on():
    """The policy moves the run from on-demand back to spot; the spot host is refused, so the move is
    recorded after attempt 1, which runs on: the details and VlAttempt name attempt 1, not the refusal."""
    t0 = datetime(2026, 11, 27, tzinfo=UTC)
    spot = Pool(provider="aws", region="us-east-1", zone="us-east-1a", gpu="A10G", gpu_count=1, price_per_hour=1.0)
    on_demand = Pool(provider="aws", region="us-east-1", gpu="A10G", gpu_count=1, market=Market.ON_DEMAND,
                     price_per_hour=3.0)
    # Half of a 24 h job stored 18 h into a 36 h deadline: on-demand bridges at the slack line, and spot is
    # safe again at once (docs/policy.md).
    spec = RunSpec(run_id="r", command=["python"], workdir="/", storage_url="file:///tmp/s", pools=[spot, on_demand],
                   limits=Limits(deadline=t0 + timedelta(hours=36)), submitted_at=t0, total_steps=1000,
                   work_seconds=24 * 3600, checkpoint_every="5m", search_attributes=True)
    now = t0 + timedelta(hours=18)
    running = AttemptRecord(attempt=1, pool=on_demand.key, host="h-1", start_step=500, started_at=now,
                            running_at=now, price_per_hour=3.0)
    status = RunStatus(run_id="r", state=RunState.RUNNING, attempts=[running], durable_step=500, started_at=t0)
    now += timedelta(minutes=1)
    move = policy.review(spec, status, now)
    assert isinstance(move, policy.Vacate) and move.to == spot
    # What the workflow's _move_to does when the provider refuses the new host.
    status.attempts.append(AttemptRecord(attempt=2, pool=spot.key, started_at=now, placement_reason=move.reason))
    status = accounting.close_attempt(status, 2, AttemptResult(
        outcome=AttemptOutcome.REFUSED, refusal="no-capacity", reason="no-capacity: none left"), now)

    assert status.current_attempt is status.attempts[0]
    details = ui.current_details(status)
    assert "attempt 1 on host h-1" in details and "attempt 2" not in details
    attributes = {update.key.name: update.value for update in ui.search_attribute_updates(spec, status)}
    assert (attributes["VlAttempt"], attributes["VlStep"], attributes["VlGpu"]) == (1, 500, "A10G")


class RefusingSpot:
    """A provider whose spot pool has no capacity and whose on-demand hosts are served by `FakeHost`."""

    name = "fake"

    def __init__(self, host_queue: str) -> None:
        self.host_queue = host_queue

    def provision(self, request: ProvisionInput) -> ProvisionResult:
        pool = request.placement.pool
        if pool.market == Market.SPOT:
            return ProvisionResult(refusal=Refusal.NO_CAPACITY, message="no spot capacity left")
        return ProvisionResult(host=Host(host_id=f"h-{request.placement.attempt}", provider=self.name, pool=pool,
                                         task_queue=self.host_queue, price_per_hour=pool.price_per_hour))

    def release(self, host: Host) -> None:
        pass

    def describe(self, host: Host) -> HostDescription:
        return HostDescription(state=HostState.RUNNING)

    def reap(self, run_id: str) -> list[str]:
        return []


class FakeHost:
    """Plays the on-demand host: trains (heartbeats) until `finish` is set, then completes."""

    def __init__(self) -> None:
        self.finish = asyncio.Event()

    @activity.defn(name="run_attempt")
    async def run_attempt(self, inp: dict) -> dict:
        while not self.finish.is_set():
            activity.heartbeat({"phase": "training", "step": 600, "durable_step": 500, "start_step": 0})
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.finish.wait(), 0.5)
        return {"outcome": "completed", "start_step": 0, "end_step": 1000, "durable_step": 1000}


async def test_after_a_refused_move_the_workflow_shows_the_attempt_that_runs_on(temporal_env, control, tmp_path,
                                                                               monkeypatch):
    """Through the real workflow: the run bridges on on-demand at its slack line, the policy moves it back to
    spot at once, the spot host is refused and attempt 2 runs on. The details and VlAttempt name attempt 2,
    not the refused attempt 3 recorded after it."""
    client, host_queue = temporal_env.client, f"vl-test-host-{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(activities.control, "make_provider", lambda name, home, env: RefusingSpot(host_queue))
    spot = Pool(provider="fake", zone="a", price_per_hour=0.3)
    on_demand = Pool(provider="fake", zone="a", market=Market.ON_DEMAND, price_per_hour=1.0)
    # Half of a 2 h job stored, 330 s below the slack line (less than the 360 s changeover a return to spot is
    # not held to), and the spot pool refused 5 min ago, after the slack reached the line.
    now = datetime.now(UTC)
    submitted = now - timedelta(seconds=7260)
    spec = make_counter_spec(tmp_path, steps=0, out=tmp_path / "out.json", pools=[spot, on_demand], total_steps=1000,
                             work_seconds=7200, submitted_at=submitted, search_attributes=True,
                             limits=Limits(deadline=submitted + timedelta(seconds=13860)))
    refused = AttemptRecord(attempt=1, pool=spot.key, outcome=AttemptOutcome.REFUSED, refusal=Refusal.NO_CAPACITY,
                            started_at=now - timedelta(seconds=320), ended_at=now - timedelta(seconds=310))
    carried = RunStatus(run_id=spec.run_id, started_at=submitted, durable_step=500, attempts=[refused])
    placed = policy.next_placement(spec, carried, now)
    assert isinstance(placed, policy.Place) and placed.placement.pool == on_demand, placed
    bridging = carried.model_copy(update={"attempts": [refused, AttemptRecord(
        attempt=2, pool=on_demand.key, host="h-2", started_at=now, running_at=now)]})
    assert policy.review(spec, bridging, now + timedelta(seconds=20)) == policy.Vacate(ANY, to=spot)

    host = FakeHost()
    async with Worker(client, task_queue=host_queue, activities=[host.run_attempt]):
        handle = await client.start_workflow("TrainingRun", RunInput(spec=spec, carried=carried), id=spec.run_id,
                                             task_queue=control)

        async def move_refused() -> bool:
            status = await vl_client.status(client, spec.run_id)
            return [a.outcome for a in status.attempts] == [AttemptOutcome.REFUSED, None, AttemptOutcome.REFUSED]

        await wait_until(move_refused, 60, "the move to spot refused while attempt 2 runs")
        assert "attempt 2 on host h-2" in await details_of(client, spec.run_id)
        assert await last_upserted(handle, ui.VL_ATTEMPT) == 2
        host.finish.set()
        await asyncio.wait_for(handle.result(), 60)
    await record_histories(client, spec.run_id)  # VL_RECORD_HISTORIES: a refused move, for the replay guard
    final = await vl_client.status(client, spec.run_id)
    assert [a.outcome for a in final.attempts] == [AttemptOutcome.REFUSED, AttemptOutcome.COMPLETED,
                                                   AttemptOutcome.REFUSED]
    assert final.attempts[2].placement_reason.startswith("spot is safe again")
    assert "attempt 2 on host h-2" in await details_of(client, spec.run_id)
    assert await last_upserted(handle, ui.VL_ATTEMPT) == 2


async def last_upserted(handle, key: SearchAttributeKey):
    """The value the workflow's last search-attribute upsert gave `key` (from history: no visibility lag)."""
    history = await handle.fetch_history()
    upserts = [event.upsert_workflow_search_attributes_event_attributes.search_attributes.indexed_fields
               for event in history.events if event.HasField("upsert_workflow_search_attributes_event_attributes")]
    payload = next(fields[key.name] for fields in reversed(upserts) if key.name in fields)
    return default_converter().payload_converter.from_payload(payload, key.origin_value_type)


async def test_a_server_without_the_attributes_runs_and_vl_registers_them(tmp_path, vl_home):
    """A run not told the attributes exist sets none (an unknown one would fail its workflow task); then
    `ensure_search_attributes` registers them, and the `temporal` commands it prints for clusters work."""
    from worker.control import create_worker

    bare = await WorkflowEnvironment.start_local(dev_server_existing_path=temporal_binary(),
                                                 data_converter=pydantic_data_converter, ui=False)
    try:
        client, queue = bare.client, f"vl-test-{uuid.uuid4().hex[:8]}"
        spec = make_spec(tmp_path, steps=0, out=tmp_path / "w.pt", command=[sys.executable, "-c", "pass"])
        async with create_worker(client, task_queue=queue, home=vl_home):
            handle = await vl_client.submit(client, spec, queue=queue)
            await asyncio.wait_for(handle.result(), 60)
            assert (await details_of(client, spec.run_id)).startswith("**succeeded** · step 0")
        assert (await handle.describe()).typed_search_attributes.get(ui.VL_STATE) is None

        async def registered() -> set[str]:
            listed = await client.operator_service.list_search_attributes(
                ListSearchAttributesRequest(namespace=client.namespace))
            return set(ui.SEARCH_ATTRIBUTES) & set(listed.custom_attributes)

        assert await registered() == set()
        address = client.service_client.config.target_host
        for command in ui.create_commands(client.namespace):
            args = command.split()[1:]
            done = subprocess.run([temporal_binary(), *args, "--address", address], capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
        assert await registered() == {"VlState", "VlProvider", "VlGpu", "VlStep", "VlAttempt"}
        assert await ui.ensure_search_attributes(client) is None
    finally:
        await bare.shutdown()


async def test_ensure_search_attributes_adds_the_missing_ones():
    bare = await WorkflowEnvironment.start_local(dev_server_existing_path=temporal_binary(), ui=False)
    try:
        assert await ui.ensure_search_attributes(bare.client) is None
        listed = await bare.client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=bare.client.namespace))
        assert {name: listed.custom_attributes[name] for name in ui.SEARCH_ATTRIBUTES} == \
            {name: ui._INDEXED[kind] for name, kind in ui.SEARCH_ATTRIBUTES.items()}
    finally:
        await bare.shutdown()
