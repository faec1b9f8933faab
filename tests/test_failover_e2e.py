"""Placement through the real workflow, on a real Temporal dev server with real host agents: failover
between two local pools, a limit reached mid-attempt, and a host fault that excludes its host."""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime, timedelta

import pytest
from temporalio.client import WorkflowFailureError

from tests.conftest import make_counter_spec
from tests.helpers import control_dir, wait_until
from vaultlayer import checkpoint, protocol
from vaultlayer import client as vl_client
from vaultlayer.models import AttemptOutcome, Limits, Pool, RunState, RunStatus

FLAKY = Pool(zone="flaky", price_per_hour=0.5)  # the cheaper pool: the policy tries it first
STEADY = Pool(zone="steady", price_per_hour=1.0, on_demand_price_per_hour=2.0)


async def outcome_of(client, run_id: str, fails: bool = False, timeout: float = 240) -> RunStatus:
    handle = client.get_workflow_handle(run_id)
    if fails:
        with pytest.raises(WorkflowFailureError):
            await asyncio.wait_for(handle.result(), timeout)
    else:
        await asyncio.wait_for(handle.result(), timeout)
    return await vl_client.status(client, run_id)


async def test_two_pools_one_reclaimed_on_every_attempt_fails_over_and_finishes(
        temporal_env, control, vl_home, tmp_path, counter_reference):
    out = tmp_path / "out.json"
    # Every attempt in the flaky pool is reclaimed 3 s in; 150 padded steps need more than that.
    spec = make_counter_spec(tmp_path, steps=150, out=out, pools=[FLAKY, STEADY], reclaim_every_seconds=3.0,
                             reclaim_only_in=["flaky"], limits=Limits(max_reclaims=3, max_host_faults=0))
    await vl_client.submit(temporal_env.client, spec, queue=control)
    status = await outcome_of(temporal_env.client, spec.run_id)

    assert status.state == RunState.SUCCEEDED
    assert [(a.pool, a.outcome) for a in status.attempts] == [
        (FLAKY.key, AttemptOutcome.RECLAIMED), (STEADY.key, AttemptOutcome.COMPLETED)]
    assert f"{FLAKY.key} reclaimed" in status.attempts[1].placement_reason
    assert out.read_text() == counter_reference(150)
    # Cost: each attempt's host price for the time it was held; the run's total is their sum.
    for record in status.attempts:
        held_hours = (record.ended_at - record.running_at).total_seconds() / 3600
        price = FLAKY.price_per_hour if record.pool == FLAKY.key else STEADY.price_per_hour
        assert record.cost_usd == pytest.approx(price * held_hours) and record.cost_usd > 0
    assert status.cost_usd == pytest.approx(sum(a.cost_usd for a in status.attempts))
    assert status.attempts[1].on_demand_cost_usd == pytest.approx(2 * status.attempts[1].cost_usd)


async def test_a_deadline_reached_mid_attempt_saves_and_stops_naming_the_limit(temporal_env, control, vl_home,
                                                                              tmp_path):
    # The deadline is a wall-clock limit: 2000 steps of 0.05 s cannot end before it. The host need not have
    # trained by then: a notice the script finds at its first step is saved there (tests/faults/test_notices.py).
    deadline = datetime.now(UTC) + timedelta(seconds=30)
    spec = make_counter_spec(tmp_path, steps=2000, out=tmp_path / "out.json", checkpoint_every="1000",
                             limits=Limits(deadline=deadline))
    await vl_client.submit(temporal_env.client, spec, queue=control)
    control_files = control_dir(vl_home, spec.run_id, "h-1", 1)

    async def notice_forwarded():
        return (control_files / protocol.NOTICE_FILE).exists()

    await wait_until(notice_forwarded, 120, "the deadline's notice to reach the script")
    status = await outcome_of(temporal_env.client, spec.run_id, fails=True)

    assert status.state == RunState.FAILED and status.stop_reason == f"limit deadline={deadline.isoformat()} reached"
    [attempt] = status.attempts
    assert attempt.outcome == AttemptOutcome.VACATED and attempt.reason.startswith("limit deadline=")
    assert attempt.durable_step == attempt.end_step > 0  # it saved at the notice the move gave it
    assert checkpoint.list_checkpoints(spec.storage_url, spec.run_id)[0][1] == attempt.durable_step


async def test_a_gpu_fault_excludes_its_host_and_has_its_own_budget(temporal_env, control, vl_home, tmp_path):
    spec = make_counter_spec(tmp_path, steps=10, out=tmp_path / "out.json",
                             limits=Limits(max_host_faults=1, max_reclaims=0))
    spec.command = [sys.executable, "-c",
                    "import sys; print('RuntimeError: CUDA error: uncorrectable ECC error encountered'); sys.exit(1)"]
    await vl_client.submit(temporal_env.client, spec, queue=control)
    status = await outcome_of(temporal_env.client, spec.run_id, fails=True)

    assert [a.outcome for a in status.attempts] == [AttemptOutcome.HOST_FAULT, AttemptOutcome.HOST_FAULT]
    assert status.excluded_hosts == ["h-1", "h-2"] and status.script_failures == 0
    assert status.stop_reason.startswith("limit max_host_faults=1 reached (last: GPU or driver fault on the host")
    assert status.exit_code is None  # the host's fault, not the script's
