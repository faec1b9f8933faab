"""What a run shows in the Temporal UI: Vl* search attributes kept current by the workflow, its current
details (naming the attempt that runs, after a refused move too), their registration on a server, and a
run on a server without them."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta

from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from tests.conftest import make_spec, temporal_binary, wait_until
from tests.test_run_e2e import record_histories
from vaultlayer import client as vl_client
from vaultlayer import ui
from vaultlayer.models import (
    AttemptOutcome,
    AttemptRecord,
    AttemptResult,
    Limits,
    Market,
    Pool,
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
    spec = make_spec(tmp_path, steps=160, out=tmp_path / "w.pt", search_attributes=True)
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
