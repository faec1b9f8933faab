"""The placement policy is pure: these tests drive it directly with hand-built histories."""

from __future__ import annotations

from datetime import UTC, datetime

from vaultlayer.models import AttemptOutcome, AttemptRecord, Limits, Market, Pool, RunSpec, RunState, RunStatus
from workflows.policy import Place, Stop, next_placement

NOW = datetime(2026, 11, 27, tzinfo=UTC)
POOL_A = Pool(provider="local", region="a")
POOL_B = Pool(provider="local", region="b", market=Market.ON_DEMAND)


def spec(**limits) -> RunSpec:
    return RunSpec(run_id="r", command=["python"], workdir="/", storage_url="file:///tmp/s",
                   pools=[POOL_A, POOL_B], limits=Limits(**limits))


def history(*outcomes: AttemptOutcome, pool: Pool = POOL_A, exit_code: int | None = None) -> RunStatus:
    status = RunStatus(run_id="r")
    for number, outcome in enumerate(outcomes, start=1):
        status.attempts.append(AttemptRecord(attempt=number, host=f"h-{number}", pool=pool.key, outcome=outcome,
                                             exit_code=exit_code, started_at=NOW))
        status.reclaims += outcome == AttemptOutcome.RECLAIMED
        status.host_faults += outcome == AttemptOutcome.HOST_FAULT
        status.script_failures += outcome == AttemptOutcome.FAILED
        if outcome == AttemptOutcome.HOST_FAULT:
            status.excluded_hosts.append(f"h-{number}")
    return status


def test_first_attempt_goes_to_the_preferred_pool():
    decision = next_placement(spec(), history(), NOW)
    assert isinstance(decision, Place)
    assert decision.placement.pool == POOL_A and decision.placement.attempt == 1 and decision.delay_seconds == 0


def test_completed_run_stops_as_succeeded():
    decision = next_placement(spec(), history(AttemptOutcome.COMPLETED), NOW)
    assert decision == Stop(RunState.SUCCEEDED, "the script finished", exit_code=0)


def test_script_failure_stops_with_its_exit_code_unless_retries_remain():
    failed = history(AttemptOutcome.FAILED, exit_code=3)
    decision = next_placement(spec(), failed, NOW)
    assert isinstance(decision, Stop) and decision.state == RunState.FAILED and decision.exit_code == 3
    assert "exited with code 3" in decision.reason
    assert isinstance(next_placement(spec(script_retries=1), failed, NOW), Place)


def test_reclaims_do_not_use_up_the_host_fault_budget():
    many_reclaims = history(*[AttemptOutcome.RECLAIMED] * 10)
    assert isinstance(next_placement(spec(max_host_faults=0, max_reclaims=10), many_reclaims, NOW), Place)
    decision = next_placement(spec(max_reclaims=9), many_reclaims, NOW)
    assert isinstance(decision, Stop) and "max_reclaims=9" in decision.reason


def test_host_faults_have_their_own_budget_and_excluded_hosts_are_passed_on():
    faults = history(AttemptOutcome.HOST_FAULT, AttemptOutcome.HOST_FAULT)
    decision = next_placement(spec(max_host_faults=2), faults, NOW)
    assert isinstance(decision, Place) and decision.placement.excluded_hosts == ["h-1", "h-2"]
    decision = next_placement(spec(max_host_faults=1), faults, NOW)
    assert isinstance(decision, Stop) and "max_host_faults=1" in decision.reason


def test_max_attempts_stops():
    decision = next_placement(spec(max_attempts=2), history(AttemptOutcome.RECLAIMED, AttemptOutcome.RECLAIMED), NOW)
    assert isinstance(decision, Stop) and "max_attempts=2" in decision.reason


def test_a_pool_that_just_reclaimed_is_left_for_another():
    decision = next_placement(spec(), history(AttemptOutcome.RECLAIMED, pool=POOL_A), NOW)
    assert decision.placement.pool == POOL_B and POOL_A.key in decision.reason


def test_refusals_everywhere_back_off():
    status = history(AttemptOutcome.REFUSED, pool=POOL_A)
    status.attempts.append(AttemptRecord(attempt=2, pool=POOL_B.key, outcome=AttemptOutcome.REFUSED, started_at=NOW))
    decision = next_placement(spec(), status, NOW)
    assert isinstance(decision, Place) and decision.delay_seconds > 0
    assert next_placement(spec(), history(AttemptOutcome.REFUSED), NOW).delay_seconds == 0
