"""Closing an attempt into the run's status (workflows/accounting.py): pure, so these tests call it directly.
The workflow and the simulator both go through it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from vaultlayer.models import AttemptOutcome, AttemptRecord, AttemptResult, Refusal, RunStatus
from workflows import accounting

T0 = datetime(2026, 11, 27, tzinfo=UTC)
SPOT = "aws/us-east-1a/A10G:1/spot"
ON_DEMAND = "aws/us-east-1/A10G:1/on-demand"


def hours(n: float) -> datetime:
    return T0 + timedelta(hours=n)


def running(attempt: int = 1, pool: str = SPOT, price: float | None = 1.0, **fields) -> AttemptRecord:
    return AttemptRecord(attempt=attempt, pool=pool, host=f"h-{attempt}", started_at=T0, running_at=T0,
                         price_per_hour=price, **fields)


def status_of(*records: AttemptRecord, **fields) -> RunStatus:
    return RunStatus(run_id="r", started_at=T0, attempts=list(records), **fields)


def test_closing_leaves_its_input_alone_and_replaces_only_the_closed_record():
    moved = AttemptRecord(attempt=2, pool=ON_DEMAND, started_at=T0)
    before = status_of(running(), moved)
    snapshot = before.model_dump()
    after = accounting.close_attempt(before, 1, AttemptResult(outcome=AttemptOutcome.RECLAIMED, end_step=90,
                                                              durable_step=80), hours(1))
    assert before.model_dump() == snapshot
    closed = after.attempts[0]
    assert (closed.outcome, closed.end_step, closed.durable_step, closed.ended_at) == (
        AttemptOutcome.RECLAIMED, 90, 80, hours(1))
    assert after.attempts[1] is moved  # the workflow holds it: the next attempt runs there
    assert (after.reclaims, after.durable_step, after.fences) == (1, 80, {1: 80})


def test_a_gpu_fault_is_the_hosts_it_is_excluded_counted_and_fenced():
    result = AttemptResult(outcome=AttemptOutcome.FAILED, exit_code=1, durable_step=40,
                           log_tail="Traceback ...\nRuntimeError: CUDA error: uncorrectable ECC error encountered\n")
    after = accounting.close_attempt(status_of(running()), 1, result, hours(1))
    [closed] = after.attempts
    assert closed.outcome == AttemptOutcome.HOST_FAULT and "uncorrectable ECC error" in closed.reason
    assert closed.exit_code == 1 and closed.log_tail == result.log_tail
    assert (after.host_faults, after.script_failures, after.excluded_hosts) == (1, 0, ["h-1"])
    assert after.fences == {1: 40}


def test_a_script_error_is_a_script_failure_and_nothing_is_excluded():
    result = AttemptResult(outcome=AttemptOutcome.FAILED, exit_code=3, log_tail="ValueError: bad batch\n")
    after = accounting.close_attempt(status_of(running()), 1, result, hours(1))
    assert (after.attempts[0].outcome, after.script_failures, after.host_faults) == (AttemptOutcome.FAILED, 1, 0)
    assert after.excluded_hosts == [] and after.fences == {1: -1}  # nothing durable: nothing accepted from it


def test_a_host_the_provider_confirmed_gone_is_not_fenced_what_it_stored_counts():
    result = AttemptResult(outcome=AttemptOutcome.RECLAIMED, end_step=50, durable_step=30, host_gone=True)
    after = accounting.close_attempt(status_of(running(), durable_step=35), 1, result, hours(1))
    assert after.fences == {} and after.durable_step == 35  # the run's durable step never goes back


def test_a_refusal_is_recorded_with_its_kind_and_costs_nothing():
    refused = AttemptRecord(attempt=1, pool=SPOT, started_at=T0)
    result = AttemptResult(outcome=AttemptOutcome.REFUSED, refusal=Refusal.QUOTA, reason="quota: no more")
    after = accounting.close_attempt(status_of(refused), 1, result, T0 + timedelta(seconds=15))
    [closed] = after.attempts
    assert (closed.outcome, closed.refusal, closed.reason) == (AttemptOutcome.REFUSED, "quota", "quota: no more")
    assert closed.cost_usd is None and after.cost_usd == 0.0 and after.fences == {1: -1}


def test_costs_are_billed_per_attempt_with_the_on_demand_equivalent():
    spot = running(price=0.9, on_demand_price_per_hour=3.0)
    on_demand = AttemptRecord(attempt=2, pool=ON_DEMAND, started_at=T0, running_at=hours(2), price_per_hour=3.0)
    done = AttemptResult(outcome=AttemptOutcome.RECLAIMED)
    status = accounting.close_attempt(status_of(spot, on_demand), 1, done, hours(2))
    status = accounting.close_attempt(status, 2, done, hours(3))
    spot, on_demand = status.attempts
    assert spot.cost_usd == pytest.approx(1.8) and spot.on_demand_cost_usd == pytest.approx(6.0)
    assert on_demand.on_demand_cost_usd == pytest.approx(3.0)  # an on-demand host's own price
    assert status.cost_usd == pytest.approx(4.8) and status.on_demand_cost_usd == pytest.approx(9.0)
    assert accounting.running_cost(running(price=2.0), T0 + timedelta(minutes=30)) == pytest.approx(1.0)


def test_a_cancelled_attempt_is_billed_for_its_host_and_stays_open():
    after = accounting.bill(status_of(running(price=2.0)), 1, hours(1.5))
    assert after.attempts[0].outcome is None and after.attempts[0].cost_usd == pytest.approx(3.0)
    assert after.cost_usd == pytest.approx(3.0)


def test_a_gang_pays_each_hosts_price_for_every_hour_and_so_would_on_demand():
    gang = running(price=0.9, on_demand_price_per_hour=3.0, nodes=4)
    closed = accounting.close_attempt(status_of(gang), 1, AttemptResult(outcome=AttemptOutcome.RECLAIMED), hours(2))
    assert closed.attempts[0].price_per_hour == 0.9  # one host's: the record says how many it held
    assert closed.attempts[0].cost_usd == pytest.approx(4 * 0.9 * 2) == closed.cost_usd
    assert closed.attempts[0].on_demand_cost_usd == pytest.approx(4 * 3.0 * 2) == closed.on_demand_cost_usd
    on_demand = AttemptRecord(attempt=1, pool=ON_DEMAND, started_at=T0, running_at=T0, price_per_hour=3.0, nodes=2)
    billed = accounting.bill(status_of(on_demand), 1, hours(1))
    assert (billed.cost_usd, billed.on_demand_cost_usd) == (pytest.approx(6.0), pytest.approx(6.0))
    assert accounting.running_cost(gang, T0 + timedelta(minutes=30)) == pytest.approx(4 * 0.9 / 2)
    assert accounting.hourly_cost(gang) == pytest.approx(3.6) and accounting.hourly_cost(running()) == 1.0


def test_steps_lost_are_charged_when_the_next_attempt_resumes():
    lost = accounting.close_attempt(status_of(running()), 1, AttemptResult(
        outcome=AttemptOutcome.RECLAIMED, end_step=100, durable_step=80), hours(1))
    assert lost.steps_lost == 0  # not known until the next attempt's checkpoint is verified
    assert accounting.charge_lost_steps(lost, 80).steps_lost == 20
    corrupt = accounting.charge_lost_steps(lost, 60)  # the newest checkpoint was corrupt: back to an older one
    assert corrupt.steps_lost == 40 and corrupt.attempts[0].steps_lost == 40 and lost.steps_lost == 0
    done = accounting.close_attempt(status_of(running()), 1, AttemptResult(
        outcome=AttemptOutcome.COMPLETED, end_step=100, durable_step=100), hours(1))
    assert accounting.charge_lost_steps(done, 0) is done
