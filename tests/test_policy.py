"""The placement policy is pure: these tests drive it directly with hand-built histories and clocks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from vaultlayer.models import (
    AttemptOutcome,
    AttemptRecord,
    AttemptResult,
    Limits,
    Market,
    Pool,
    Refusal,
    RunSpec,
    RunState,
    RunStatus,
)
from workflows import accounting, policy, speed
from workflows.policy import Keep, Place, Stop, Vacate, Wait, next_placement, review

T0 = datetime(2026, 11, 27, tzinfo=UTC)
EAST_A = Pool(provider="aws", region="us-east-1", zone="us-east-1a", market=Market.SPOT, price_per_hour=1.0)
EAST_B = Pool(provider="aws", region="us-east-1", zone="us-east-1b", market=Market.SPOT, price_per_hour=1.0)
WEST_A = Pool(provider="aws", region="us-west-2", zone="us-west-2a", market=Market.SPOT, price_per_hour=1.0)
ON_DEMAND = Pool(provider="aws", region="us-east-1", market=Market.ON_DEMAND, price_per_hour=3.0)


def minutes(n: float) -> timedelta:
    return timedelta(minutes=n)


def spec(*pools: Pool, **limits) -> RunSpec:
    return RunSpec(run_id="r", command=["python"], workdir="/", storage_url="file:///tmp/s",
                   pools=list(pools) or [EAST_A, WEST_A], limits=Limits(**limits), submitted_at=T0)


class History:
    """A run's attempts, one after another on a clock, closed by the workflow's own accounting."""

    def __init__(self, nodes: int = 1) -> None:
        self.status = RunStatus(run_id="r", started_at=T0)
        self.now = T0
        self.nodes = nodes  # hosts per attempt, as the workflow records a gang's (RunSpec.nodes)

    def add(self, pool: Pool, outcome: AttemptOutcome | None, held: timedelta = minutes(30), *,
            exit_code: int | None = None, refusal: Refusal | None = None, durable_step: int | None = None,
            log_tail: str = "") -> History:
        number = len(self.status.attempts) + 1
        refused = outcome == AttemptOutcome.REFUSED
        record = AttemptRecord(attempt=number, pool=pool.key, host=None if refused else f"h-{number}",
                               started_at=self.now, running_at=None if refused else self.now,
                               price_per_hour=None if refused else pool.price_per_hour, refusal=refusal,
                               nodes=self.nodes)
        self.status.attempts.append(record)
        if outcome is None:  # still running
            return self
        self.now += minutes(0.5) if refused else held
        result = AttemptResult(outcome=outcome, exit_code=exit_code, log_tail=log_tail, durable_step=durable_step,
                               refusal=refusal)
        self.status = accounting.close_attempt(self.status, number, result, self.now)
        return self

    def later(self, delta: timedelta) -> History:
        self.now += delta
        return self


def placed(decision) -> Pool:
    assert isinstance(decision, Place), decision
    return decision.placement.pool


# ---------------------------------------------------------------- choice and hot-pool cooldown


def test_first_attempt_goes_to_the_cheapest_pool():
    cheap = WEST_A.model_copy(update={"price_per_hour": 0.5})
    decision = next_placement(spec(EAST_A, cheap), History().status, T0)
    assert placed(decision) == cheap and decision.placement.attempt == 1 and "cheapest healthy" in decision.reason


def test_a_pool_that_just_reclaimed_is_left_for_another():
    history = History().add(EAST_A, AttemptOutcome.RECLAIMED)
    decision = next_placement(spec(EAST_A, WEST_A), history.status, history.now)
    assert placed(decision) == WEST_A and f"{EAST_A.key} reclaimed" in decision.reason


def test_a_hot_pool_cools_down_longer_for_each_reclaim():
    history = History()
    for cooldown in (5, 10, 20, 30, 30):  # doubled for each reclaim in the window, never above 30 min
        history.add(EAST_A, AttemptOutcome.RECLAIMED)
        east = policy.pool_health(spec(EAST_A, WEST_A), history.status, history.now)[0]
        assert east.reclaim_until == history.now + minutes(cooldown), cooldown
        history.later(minutes(cooldown))


def test_a_cooling_pool_sends_the_run_elsewhere_and_alone_it_is_asked_again_at_once():
    history = History().add(EAST_A, AttemptOutcome.RECLAIMED)
    assert placed(next_placement(spec(EAST_A, WEST_A), history.status, history.now)) == WEST_A
    assert placed(next_placement(spec(EAST_A), history.status, history.now)) == EAST_A  # a refusal is cheap
    history.add(EAST_A, AttemptOutcome.REFUSED)  # and only a refusal says there is no capacity
    decision = next_placement(spec(EAST_A), history.status, history.now)
    assert isinstance(decision, Wait) and decision.seconds == policy.REASK_SECONDS


def test_a_pool_that_reclaimed_is_asked_again_once_every_other_pool_has_been_asked():
    history = History().add(EAST_A, AttemptOutcome.RECLAIMED).add(WEST_A, AttemptOutcome.REFUSED)
    assert placed(next_placement(spec(EAST_A, WEST_A), history.status, history.now)) == EAST_A  # cooling 5 min


def test_a_region_that_reclaimed_comes_after_calm_regions_for_a_while():
    history = History().add(EAST_A, AttemptOutcome.RECLAIMED)
    pools = spec(EAST_A, EAST_B, WEST_A)
    assert placed(next_placement(pools, history.status, history.now)) == WEST_A  # not EAST_B, same region
    history.later(policy.RECENT_TROUBLE + minutes(1))
    # Calm again: its other zone is first in spec order; the zone that reclaimed still has its record.
    assert placed(next_placement(pools, history.status, history.now)) == EAST_B


def test_pools_that_reclaim_often_rank_after_steady_ones():
    history = History().add(EAST_A, AttemptOutcome.RECLAIMED, held=minutes(20)).add(
        WEST_A, AttemptOutcome.VACATED, held=timedelta(hours=10))
    history.later(policy.RECENT_TROUBLE)
    health = {h.pool.key: h for h in policy.pool_health(spec(), history.status, history.now)}
    assert health[WEST_A.key].reclaim_rate < health[EAST_A.key].reclaim_rate
    assert placed(next_placement(spec(EAST_A, WEST_A), history.status, history.now)) == WEST_A


# ---------------------------------------------------------------- capacity refusals


def test_a_capacity_refusal_moves_on_to_the_next_pool():
    history = History().add(EAST_A, AttemptOutcome.REFUSED, refusal=Refusal.NO_CAPACITY)
    assert placed(next_placement(spec(EAST_A, WEST_A), history.status, history.now)) == WEST_A


def test_refusals_everywhere_are_asked_again_in_turn_without_doubling():
    pools = spec(EAST_A, EAST_B, WEST_A)
    history = History()
    asked = []
    for _ in range(6):  # a refusal is cheap: no doubling, and each pool waits for the others' turn
        decision = next_placement(pools, history.status, history.now)
        if isinstance(decision, Wait):
            assert "cooling" in decision.reason and decision.seconds <= policy.REASK_SECONDS
            history.later(timedelta(seconds=decision.seconds))
            decision = next_placement(pools, history.status, history.now)
        asked.append(placed(decision))
        history.add(placed(decision), AttemptOutcome.REFUSED)
    assert asked[:3] == [EAST_A, EAST_B, WEST_A] and asked[3:] == asked[:3]


def test_a_refused_pool_is_not_asked_again_before_the_others():
    history = History().add(EAST_A, AttemptOutcome.REFUSED).later(minutes(2))
    assert placed(next_placement(spec(EAST_A, WEST_A), history.status, history.now)) == WEST_A
    history = History().add(EAST_A, AttemptOutcome.REFUSED).later(timedelta(seconds=policy.MAX_COOLDOWN_SECONDS))
    health = policy.pool_health(spec(EAST_A, WEST_A), history.status, history.now)
    assert health[0].usable_at(health, history.now) == history.now  # a turn never waits more than 30 min


def test_a_quota_refusal_holds_for_the_whole_region_and_an_unsupported_zone_for_the_run():
    history = History().add(EAST_A, AttemptOutcome.REFUSED, refusal=Refusal.QUOTA)
    assert placed(next_placement(spec(EAST_A, EAST_B, WEST_A), history.status, history.now)) == WEST_A
    history = History().add(EAST_A, AttemptOutcome.REFUSED, refusal=Refusal.UNSUPPORTED).later(timedelta(days=1))
    assert placed(next_placement(spec(EAST_A, WEST_A), history.status, history.now)) == WEST_A
    decision = next_placement(spec(EAST_A), history.status, history.now)
    assert isinstance(decision, Stop) and "does not offer the type" in decision.reason


# ---------------------------------------------------------------- hosts and budgets


def test_hosts_that_failed_are_excluded_for_the_run_or_the_configured_time():
    history = History().add(EAST_A, AttemptOutcome.HOST_FAULT).add(EAST_A, AttemptOutcome.RECLAIMED)
    decision = next_placement(spec(max_host_faults=3), history.status, history.now)
    assert decision.placement.excluded_hosts == ["h-1"]
    timed = spec(max_host_faults=3, host_exclusion_seconds=3600)
    assert next_placement(timed, history.status, history.now).placement.excluded_hosts == ["h-1"]
    history.later(timedelta(hours=1))
    assert next_placement(timed, history.status, history.now).placement.excluded_hosts == []


@pytest.mark.parametrize("line", ["RuntimeError: CUDA error: uncorrectable ECC error encountered",
                                  "RuntimeError: No CUDA GPUs are available; no CUDA-capable device is detected",
                                  "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver"])
def test_a_gpu_or_driver_fault_in_the_output_is_a_host_fault(line):
    history = History().add(EAST_A, AttemptOutcome.FAILED, exit_code=1, log_tail=f"Traceback ...\n{line}\n")
    record = history.status.attempts[0]
    assert record.outcome == AttemptOutcome.HOST_FAULT and line in record.reason
    assert next_placement(spec(max_host_faults=1), history.status, history.now).placement.excluded_hosts == ["h-1"]


@pytest.mark.parametrize("line", ["RuntimeError: CUDA error: device-side assert triggered",
                                  "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
                                  "ValueError: bad batch"])
def test_a_script_error_stays_a_script_failure_with_its_exit_code(line):
    history = History().add(EAST_A, AttemptOutcome.FAILED, exit_code=3, log_tail=f"Traceback ...\n{line}\n")
    decision = next_placement(spec(max_host_faults=5), history.status, history.now)
    assert decision == Stop(RunState.FAILED, decision.reason, exit_code=3, limit="script_retries")
    assert "exited with code 3" in decision.reason and history.status.host_faults == 0
    assert isinstance(next_placement(spec(script_retries=1), history.status, history.now), Place)


def test_reclaims_faults_and_script_failures_have_separate_budgets():
    many_reclaims = History()
    for _ in range(10):
        many_reclaims.add(EAST_A, AttemptOutcome.RECLAIMED).later(timedelta(hours=1))
    assert isinstance(next_placement(spec(max_host_faults=0, max_reclaims=10), many_reclaims.status,
                                     many_reclaims.now), Place)
    faults = History().add(EAST_A, AttemptOutcome.HOST_FAULT).add(EAST_A, AttemptOutcome.HOST_FAULT)
    assert isinstance(next_placement(spec(max_host_faults=2, max_reclaims=0), faults.status, faults.now), Place)
    failed = History().add(EAST_A, AttemptOutcome.FAILED, exit_code=1)
    assert isinstance(next_placement(spec(script_retries=1, max_reclaims=0, max_host_faults=0), failed.status,
                                     failed.now), Place)


# ---------------------------------------------------------------- every stop names its reason


def stop_of(history: History, **limits) -> Stop:
    decision = next_placement(spec(**limits), history.status, history.now)
    assert isinstance(decision, Stop), decision
    return decision


def test_each_stop_names_its_limit():
    done = stop_of(History().add(EAST_A, AttemptOutcome.COMPLETED))
    assert done == Stop(RunState.SUCCEEDED, "the script finished", exit_code=0)
    reclaims = History().add(EAST_A, AttemptOutcome.RECLAIMED).add(WEST_A, AttemptOutcome.RECLAIMED)
    assert stop_of(reclaims, max_reclaims=1).limit == "max_reclaims"
    assert "max_reclaims=1" in stop_of(reclaims, max_reclaims=1).reason
    faults = History().add(EAST_A, AttemptOutcome.HOST_FAULT)
    assert stop_of(faults, max_host_faults=0).reason.startswith("limit max_host_faults=0 reached")
    assert stop_of(reclaims, max_attempts=2).reason == "limit max_attempts=2 reached"
    paid = History().add(EAST_A, AttemptOutcome.RECLAIMED, held=timedelta(hours=2))  # $1/h for 2 h
    assert stop_of(paid, max_cost=1.5) == Stop(RunState.FAILED, "limit max_cost=1.5 reached (spent 2.00)",
                                               limit="max_cost")
    late = History().add(EAST_A, AttemptOutcome.RECLAIMED, held=timedelta(hours=2))
    deadline = stop_of(late, deadline=T0 + timedelta(hours=1))
    assert deadline.limit == "deadline" and deadline.reason.startswith("limit deadline=")


def test_a_running_attempt_is_moved_off_at_the_deadline_or_the_cost_limit():
    running = History().add(EAST_A, None)  # $1/h since T0
    with_limits = spec(deadline=T0 + timedelta(hours=5), max_cost=2.0)
    assert review(with_limits, running.status, T0) == Keep(until=T0 + timedelta(hours=2))
    assert review(with_limits, running.status, T0 + timedelta(hours=2)).reason.startswith("limit max_cost=2")
    only_deadline = spec(deadline=T0 + timedelta(hours=5))
    assert review(only_deadline, running.status, T0) == Keep(until=T0 + timedelta(hours=5))
    assert review(only_deadline, running.status, T0 + timedelta(hours=5)).reason.startswith("limit deadline=")
    assert review(spec(), running.status, T0) == Keep(until=None)


def test_a_gang_is_placed_whole_and_reaches_its_budget_as_many_times_sooner_as_it_has_hosts():
    gang = spec(max_cost=2.0).model_copy(update={"nodes": 4})
    decision = next_placement(gang, History(nodes=4).status, T0)
    assert placed(decision) == EAST_A and decision.placement.nodes == 4
    assert next_placement(spec(), History().status, T0).placement.nodes == 1
    running = History(nodes=4).add(EAST_A, None)  # 4 hosts at $1/h each since T0: $4/h
    assert review(gang, running.status, T0) == Keep(until=T0 + minutes(30))  # not T0 + 2 h
    assert review(gang, running.status, T0 + minutes(30)).reason == "limit max_cost=2 reached (spent 2.00)"
    held_an_hour = History(nodes=4).add(EAST_A, AttemptOutcome.RECLAIMED, held=timedelta(hours=1))
    assert next_placement(gang, held_an_hour.status, held_an_hour.now) == Stop(
        RunState.FAILED, "limit max_cost=2 reached (spent 4.00)", limit="max_cost")
    one_host = History().add(EAST_A, AttemptOutcome.RECLAIMED, held=timedelta(hours=1))
    assert isinstance(next_placement(spec(max_cost=2.0), one_host.status, one_host.now), Place)


def test_a_gang_ranks_pools_as_one_host_does_and_any_hosts_reclaim_cools_its_pool():
    cheap = WEST_A.model_copy(update={"price_per_hour": 0.5})
    gang = spec(EAST_A, cheap).model_copy(update={"nodes": 4})
    assert placed(next_placement(gang, History(nodes=4).status, T0)) == cheap
    history = History(nodes=4).add(cheap, AttemptOutcome.RECLAIMED)  # one of its 4 hosts was taken
    health = {h.pool.key: h for h in policy.pool_health(gang, history.status, history.now)}
    assert health[cheap.key].reclaims == 1 and health[cheap.key].reclaim_until == history.now + minutes(5)
    assert placed(next_placement(gang, history.status, history.now)) == EAST_A


# ---------------------------------------------------------------- on-demand only when spot cannot make it


def planned(work_hours: float, deadline_hours: float, *pools: Pool) -> RunSpec:
    planned_spec = spec(*(pools or (EAST_A, WEST_A, ON_DEMAND)), deadline=T0 + timedelta(hours=deadline_hours))
    return planned_spec.model_copy(update={"total_steps": 1000, "work_seconds": work_hours * 3600,
                                           "checkpoint_every": "5m"})


def test_spot_while_the_deadline_allows_it_on_demand_when_it_is_at_risk():
    assert placed(next_placement(planned(24, 36), History().status, T0)).market == Market.SPOT
    decision = next_placement(planned(24, 24.5), History().status, T0)
    assert placed(decision) == ON_DEMAND and decision.reason.startswith("deadline at risk: slack 0.50h")
    # The same tight deadline with no on-demand pool: spot is all there is.
    assert placed(next_placement(planned(24, 24.5, EAST_A), History().status, T0)) == EAST_A


def half_done_at(hours: float) -> History:
    """Half of a 24 h job stored at T0 + `hours` (deadline 36 h): slack 24 - hours, its line 6 h."""
    history = History().later(timedelta(hours=hours))
    history.status.durable_step = 500
    return history


def test_while_the_slack_is_above_its_line_the_run_waits_for_spot():
    history = half_done_at(10).add(EAST_A, AttemptOutcome.REFUSED)
    decision = next_placement(planned(24, 36, EAST_A, ON_DEMAND), history.status, history.now)
    assert isinstance(decision, Wait) and decision.seconds == policy.REASK_SECONDS


def test_at_its_line_the_run_asks_every_spot_pool_once_more_then_on_demand_bridges():
    run = planned(24, 36, EAST_A, ON_DEMAND)
    history = half_done_at(18 - 0.5 / 60).add(EAST_A, AttemptOutcome.REFUSED).later(timedelta(seconds=15))
    again = next_placement(run, history.status, history.now)  # asked just before the slack reached its line
    assert placed(again) == EAST_A and "before paying for on-demand" in again.reason
    history.add(EAST_A, AttemptOutcome.REFUSED)
    bridge = next_placement(run, history.status, history.now)  # asked since: no need to wait for a minute
    assert placed(bridge) == ON_DEMAND and bridge.reason.startswith("every spot pool is cooling and the slack is at")


def test_below_its_line_a_lost_host_gets_a_fresh_round_before_on_demand():
    run = planned(24, 36, EAST_A, WEST_A, ON_DEMAND)
    history = half_done_at(18.5).add(WEST_A, AttemptOutcome.REFUSED).add(
        EAST_A, AttemptOutcome.RECLAIMED, held=minutes(20))  # WEST_A refused before the host was lost
    assert placed(next_placement(run, history.status, history.now)) == WEST_A
    history.add(WEST_A, AttemptOutcome.REFUSED)
    assert placed(next_placement(run, history.status, history.now)) == EAST_A  # WEST_A has been asked since
    history.add(EAST_A, AttemptOutcome.REFUSED)
    assert placed(next_placement(run, history.status, history.now)) == ON_DEMAND


def test_without_on_demand_only_the_safety_net_cuts_a_cooldown_short():
    at_line = half_done_at(18.5).add(EAST_A, AttemptOutcome.REFUSED)
    decision = next_placement(planned(24, 36, EAST_A), at_line.status, at_line.now)
    assert isinstance(decision, Wait) and decision.seconds == policy.REASK_SECONDS
    at_risk = half_done_at(24.1).add(EAST_A, AttemptOutcome.REFUSED)
    decision = next_placement(planned(24, 36, EAST_A), at_risk.status, at_risk.now)
    assert placed(decision) == EAST_A and "no on-demand pool usable" in decision.reason


def test_on_demand_returns_to_spot_once_the_slack_is_back_at_its_line_but_for_the_bridge_changeover():
    run = planned(24, 36, EAST_A, ON_DEMAND)
    # Slack 5.5 h, 30 min below its line of 6 h. On-demand's 6 min changeover is not held against the return;
    # the rest comes back as the line falls, half a second per second of work: after 1 h of training.
    history = half_done_at(18.5).add(ON_DEMAND, None)
    started, now = history.now, history.now + minutes(10)
    while isinstance(decision := review(run, history.status, now), Keep):
        assert decision.until is not None and decision.until > now  # looked at again, not left there
        now = decision.until
    assert decision == Vacate(decision.reason, to=EAST_A) and decision.reason.startswith("spot is safe again")
    assert now - started == minutes(66)  # 6 min changeover, 60 min of work
    at_bridge = half_done_at(18).add(ON_DEMAND, None)  # bridged at the line: spot again as soon as it is there
    assert isinstance(review(run, at_bridge.status, at_bridge.now + minutes(1)), Vacate)


def test_no_return_to_spot_when_a_failed_return_would_break_the_deadline():
    history = History().add(ON_DEMAND, None)
    assert isinstance(review(planned(24, 24.6), history.status, T0 + timedelta(hours=1)), Keep)
    assert isinstance(review(planned(24, 36), history.status, T0 + timedelta(hours=1)), Vacate)


# ---------------------------------------------------------------- work left and costs


def test_work_left_comes_from_the_estimate_or_the_measured_speed():
    history = History().add(EAST_A, AttemptOutcome.RECLAIMED, held=timedelta(hours=1), durable_step=250)
    history.status.attempts[0].end_step = 250
    estimated = spec().model_copy(update={"total_steps": 1000, "work_seconds": 4 * 3600})
    assert policy.remaining_work_seconds(estimated, history.status, history.now) == 3 * 3600
    measured = spec().model_copy(update={"total_steps": 1000})
    assert policy.remaining_work_seconds(measured, history.status, history.now) == 3 * 3600
    assert policy.remaining_work_seconds(spec(), history.status, history.now) is None
    assert policy.deadline_plan(measured, history.status, history.now) is None  # no deadline, no plan


@pytest.mark.parametrize("module", [policy, accounting, speed], ids=["policy", "accounting", "speed"])
def test_the_policy_and_the_accounting_are_pure(module):
    import ast
    from pathlib import Path

    source = Path(module.__file__).read_text()
    imported = {alias.name for node in ast.walk(ast.parse(source))
                if isinstance(node, ast.Import | ast.ImportFrom)
                for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])}
    allowed = {"__future__", "math", "dataclasses", "datetime", "workflows.accounting", "workflows.speed"}
    assert {name for name in imported if not name.startswith("vaultlayer.")} <= allowed, imported
    assert "datetime.now" not in source and "time.time" not in source


# ---------------------------------------------------------------- attempts without durable progress


def test_attempts_in_a_row_that_store_no_checkpoint_stop_the_run_with_what_to_change():
    history = History().add(EAST_A, AttemptOutcome.RECLAIMED, durable_step=40)
    for _ in range(3):
        history.add(EAST_A, AttemptOutcome.RECLAIMED, minutes(0.1))
        history.add(EAST_A, AttemptOutcome.REFUSED)  # neither adds to the streak nor ends it
    assert policy.attempts_without_progress(history.status) == 3
    assert policy.no_progress_stop(spec(max_attempts_without_progress=4), history.status) is None
    history.add(EAST_A, AttemptOutcome.HOST_FAULT, minutes(0.1))
    stop = policy.no_progress_stop(spec(max_attempts_without_progress=4), history.status)
    assert isinstance(stop, Stop) and stop.state == RunState.FAILED
    assert stop.limit == "max_attempts_without_progress"
    assert stop.reason.startswith("no durable progress over 4 attempts in a row")
    assert "longer notice" in stop.reason and "--max-attempts-without-progress" in stop.reason
    assert policy.no_progress_stop(spec(), history.status) is None  # the default is 10


def test_an_attempt_that_stores_a_checkpoint_ends_the_streak():
    history = History()
    for _ in range(10):
        history.add(EAST_A, AttemptOutcome.RECLAIMED, minutes(0.1))
    assert isinstance(policy.no_progress_stop(spec(), history.status), Stop)
    history.add(EAST_A, AttemptOutcome.RECLAIMED, minutes(0.1), durable_step=5)
    assert policy.attempts_without_progress(history.status) == 0
    assert policy.no_progress_stop(spec(), history.status) is None


def test_the_reserve_for_a_host_lost_without_notice_follows_how_the_run_loses_its_hosts():
    run = spec(checkpoint_every="30m")
    worst = policy.unnoticed_loss_seconds(run)
    assert worst == pytest.approx(run.heartbeat_timeout_seconds + 1800 - run.notice_seconds)
    history = History()
    assert policy.unnoticed_loss_seconds(run, history.status) == pytest.approx(worst / 2)  # one in two, before any
    for _ in range(10):
        history.add(EAST_A, AttemptOutcome.RECLAIMED)
        history.status.attempts[-1].emergency_save = "saved"  # the agent saw the notice
    noticed = policy.unnoticed_loss_seconds(run, history.status)
    assert noticed == pytest.approx(worst / 12)
    history.add(EAST_A, AttemptOutcome.RECLAIMED)  # heartbeats stopped, no notice seen
    silent = policy.unnoticed_loss_seconds(run, history.status)
    assert silent == pytest.approx(worst * 2 / 13) and silent > noticed
