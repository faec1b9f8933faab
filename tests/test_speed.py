"""Placement by cost per unit of work: pools that differ in speed (the prior of their GPU class, then what the run
measures), the deadline rule at the speed of the pool it decides about, and the moves speed makes worth it. Pure:
hand-built histories, as in tests/test_policy.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from vaultlayer.catalog.throughput import prior_speed
from vaultlayer.models import AttemptOutcome, AttemptRecord, AttemptResult, Limits, Market, Pool, RunSpec, RunStatus
from workflows import accounting, policy, simulate, speed
from workflows.policy import Keep, Place, Vacate, next_placement, review

T0 = datetime(2026, 12, 1, tzinfo=UTC)
# Per hour the T4 pool is cheaper; per unit of work the A100 pool is (0.8 / 2.5 < 0.2 / 0.52).
T4 = Pool(provider="aws", region="us-east-1", zone="us-east-1a", gpu="T4", gpu_count=1, market=Market.SPOT,
          price_per_hour=0.2, speed=0.52)
A100 = Pool(provider="aws", region="us-west-2", zone="us-west-2a", gpu="A100", gpu_count=1, market=Market.SPOT,
            price_per_hour=0.8, speed=2.5)
# Two pools of one class (no prior tells them apart): only what the run measures can.
EAST = Pool(provider="aws", region="us-east-1", zone="us-east-1a", market=Market.SPOT, price_per_hour=1.0)
WEST = Pool(provider="aws", region="us-west-2", zone="us-west-2a", market=Market.SPOT, price_per_hour=1.5)


def spec(*pools: Pool, total_steps: int | None = 100_000, work_seconds: float | None = None, **limits) -> RunSpec:
    return RunSpec(run_id="r", command=["python"], workdir="/", storage_url="file:///tmp/s", pools=list(pools),
                   total_steps=total_steps, work_seconds=work_seconds, limits=Limits(**limits), submitted_at=T0)


class History:
    """Attempts one after another, each training `steps_per_second` for `held` after a one-minute start."""

    def __init__(self) -> None:
        self.status = RunStatus(run_id="r", started_at=T0)
        self.now = T0
        self.step = 0

    def add(self, pool: Pool, steps_per_second: float, held: timedelta, outcome=AttemptOutcome.RECLAIMED,
            running: bool = False) -> History:
        number = len(self.status.attempts) + 1
        self.status.attempts.append(AttemptRecord(attempt=number, pool=pool.key, host=f"h-{number}",
                                                  started_at=self.now, running_at=self.now, start_step=self.step,
                                                  price_per_hour=pool.price_per_hour))
        if running:
            return self
        trained = (held - timedelta(minutes=1)).total_seconds()
        steps = int(trained * steps_per_second)
        self.now += held
        result = AttemptResult(outcome=outcome, start_step=self.step, end_step=self.step + steps,
                               durable_step=self.step + steps, trained_steps=steps, trained_seconds=trained)
        self.status = accounting.close_attempt(self.status, number, result, self.now)
        self.step += steps
        return self


def test_the_prior_is_the_gpu_class_times_the_count_and_unknown_classes_have_none():
    assert prior_speed("A100", 8) == pytest.approx(8 * prior_speed("A100", 1))
    assert prior_speed("H100", 1) > prior_speed("A100", 1) > prior_speed("V100", 1) == 1.0 > prior_speed("T4", 1)
    assert prior_speed(None, 0) == 1.0 and prior_speed("TPU-v9", 1) is None


def test_pools_rank_by_cost_per_unit_of_work_and_by_price_per_hour_only_when_asked():
    run = spec(T4, A100)
    decision = next_placement(run, RunStatus(run_id="r", started_at=T0), T0)
    assert isinstance(decision, Place) and decision.placement.pool == A100
    by_hour = next_placement(run, RunStatus(run_id="r", started_at=T0), T0, by_work=False)
    assert by_hour.placement.pool == T4


def test_measured_speed_replaces_the_prior_as_it_adds_up():
    history = History().add(EAST, 10.0, timedelta(minutes=2))  # one minute of training: the prior still counts
    rates = speed.speeds(spec(EAST, WEST), history.status)
    assert rates.measured_steps_per_second(EAST) == pytest.approx(10.0)
    assert rates.steps_per_second(EAST) == pytest.approx(10.0)  # the unit comes from EAST itself
    history.add(WEST, 40.0, timedelta(minutes=3))
    rates = speed.speeds(spec(EAST, WEST), history.status)
    # The run's unit is every measured step over every measured second (30 steps/s); WEST's two minutes at 40
    # weigh against ten minutes of that prior: between the two, nearer the prior.
    assert rates.unit == pytest.approx(30.0)
    assert 30.0 < rates.steps_per_second(WEST) < 35.0 < rates.measured_steps_per_second(WEST) == pytest.approx(40.0)
    history.add(WEST, 40.0, timedelta(hours=2))
    assert speed.speeds(spec(EAST, WEST), history.status).steps_per_second(WEST) > 35.0


def test_a_pool_the_run_measured_slow_loses_to_a_dearer_one_it_measured_fast():
    history = History().add(EAST, 2.0, timedelta(hours=1)).add(WEST, 20.0, timedelta(hours=1))
    history.now += timedelta(hours=4)  # no cooldown or recent trouble left to decide it
    decision = next_placement(spec(EAST, WEST), history.status, history.now)
    assert decision.placement.pool == WEST  # 1.5 per hour at 20 steps/s beats 1.0 at 2
    assert next_placement(spec(EAST, WEST), history.status, history.now, by_work=False).placement.pool == EAST


def test_work_left_is_longer_on_a_slower_pool():
    run = spec(T4, A100, total_steps=1000, work_seconds=1000.0)  # the estimate is on the first pool, the T4
    status = RunStatus(run_id="r", started_at=T0)
    on_t4 = policy.remaining_work_seconds(run, status, T0, T4)
    on_a100 = policy.remaining_work_seconds(run, status, T0, A100)
    assert on_t4 == pytest.approx(1000.0) and on_a100 == pytest.approx(1000.0 * 0.52 / 2.5)
    assert policy.remaining_work_seconds(run, status, T0) == pytest.approx(1000.0)  # one speed for the run


def test_a_run_moves_off_a_spot_pool_it_measured_slow_to_one_much_cheaper_per_step():
    history = History().add(EAST, 2.0, timedelta(hours=1)).add(WEST, 20.0, timedelta(hours=1))
    history.add(EAST, 2.0, timedelta(0), running=True)  # back on EAST while WEST cooled
    verdict = review(spec(EAST, WEST), history.status, history.now)
    assert isinstance(verdict, Vacate) and verdict.to == WEST and "less per unit of work" in verdict.reason
    # Not when the saving is small: at 10 steps/s on EAST, WEST (1.5x the price, 2x the speed) saves 25%... of
    # almost nothing when the run is nearly done.
    assert isinstance(review(spec(EAST, WEST, total_steps=history.step + 50), history.status, history.now), Keep)
    assert isinstance(review(spec(EAST, WEST), history.status, history.now, by_work=False), Keep)


def test_a_move_for_speed_needs_a_measured_pool_and_a_saving_beyond_noise():
    history = History().add(EAST, 10.0, timedelta(hours=1)).add(WEST, 13.0, timedelta(hours=1))
    history.add(EAST, 10.0, timedelta(0), running=True)
    assert isinstance(review(spec(EAST, WEST), history.status, history.now), Keep)  # 1.5/13 vs 1/10: 13% off


def test_a_spot_pool_too_slow_for_the_deadline_hands_over_to_on_demand_in_time():
    slow = T4.model_copy(update={"speed": 0.25})
    on_demand = A100.model_copy(update={"zone": None, "market": Market.ON_DEMAND, "price_per_hour": 3.0, "speed": 1.0})
    # 10 h of work on the on-demand class, 4x that on the slow spot pool, and 14 h to the deadline.
    run = spec(slow, on_demand, total_steps=36_000, work_seconds=36_000.0 * 4, deadline=T0 + timedelta(hours=14))
    history = History()
    history.add(slow, 0.25, timedelta(0), running=True)
    first = review(run, history.status, T0)
    assert isinstance(first, Keep) and first.until < run.limits.deadline  # a look before the slack runs out
    verdict = review(run, history.status, first.until)
    assert isinstance(verdict, Vacate) and verdict.to == on_demand and "too slowly" in verdict.reason


def test_on_demand_is_taken_when_it_costs_less_per_unit_of_work_than_any_spot_pool():
    on_demand = A100.model_copy(update={"zone": None, "market": Market.ON_DEMAND, "price_per_hour": 1.0})
    run = spec(T4.model_copy(update={"price_per_hour": 0.5}), on_demand)  # 0.96 against 0.4 per unit of work
    decision = next_placement(run, RunStatus(run_id="r", started_at=T0), T0)
    assert decision.placement.pool == on_demand and "less per unit of work" in decision.reason


# ---------------------------------------------------------------- the simulator


def test_the_mixed_class_scenario_is_cheaper_ranked_by_work_than_by_price():
    traces = simulate.with_classes(simulate.synthetic_traces(3, days=10), fast_speed=2.5, fast_price=2.0)
    model = simulate.Model(deadline_hours=36)
    ours, by_price = simulate.compare({"vaultlayer": lambda *_: simulate.VaultLayer(),
                                       "price_only": lambda *_: simulate.PriceOnly()}, traces, model, starts=12)
    assert ours.attainment == by_price.attainment == 1.0
    assert ours.cost_vs_ondemand < by_price.cost_vs_ondemand and ours.mean_completion_h < by_price.mean_completion_h


def test_prices_that_move_steer_the_run_and_bill_the_price_of_the_moment():
    calm = [simulate.Trace(zone=zone, gap_seconds=300.0, counts=(1,) * 2000) for zone in ("za", "zb")]
    priced = [simulate.replace(calm[0], prices=(0.5,) * 10 + (0.1,) * 90, price_gap_seconds=3600.0),
              simulate.replace(calm[1], prices=(0.2,) * 100, price_gap_seconds=3600.0)]
    model = simulate.Model(work_hours=2, deadline_hours=4, checkpoint_every_seconds=600)
    world = simulate.World(priced)
    early, status = simulate.simulate(simulate.VaultLayer(), world, model, start=0.0)
    assert status.attempts[0].pool.endswith("/zb/cpu/spot") and status.attempts[0].price_per_hour == pytest.approx(0.2)
    late, status = simulate.simulate(simulate.VaultLayer(), world, model, start=20 * 3600.0)
    assert status.attempts[0].pool.endswith("/za/cpu/spot") and status.attempts[0].price_per_hour == pytest.approx(0.1)
    assert late.cost < early.cost


def test_price_walks_are_seeded_and_stay_within_bounds():
    traces = simulate.synthetic_traces(5, days=3)
    walked = simulate.synthetic_prices(traces, seed=9, mean=0.3, days=3)
    assert walked == simulate.synthetic_prices(traces, seed=9, mean=0.3, days=3)
    assert all(0.1 <= p <= 0.9 for t in walked for p in t.prices) and len({t.prices for t in walked}) == len(traces)


def test_vl_status_shows_the_speed_measured_on_each_pool():
    from cli.render import pool_speed_lines, pool_speeds

    history = History().add(EAST, 2.0, timedelta(minutes=31))
    run = spec(EAST, A100)
    lines = pool_speed_lines(run, history.status)
    assert lines[0] == f"  {EAST.key}: 2 steps/s measured over 30m00s (no prior)"
    # Unmeasured: the run's unit (EAST, of unknown class, taken as fast as the first pool with a prior) times its prior.
    assert lines[1] == f"  {A100.key}: not measured (about 2 steps/s, prior 2.5x a V100)"
    speeds_json = pool_speeds(run, history.status)
    assert speeds_json[EAST.key]["measured_steps_per_second"] == pytest.approx(2.0)
    assert speeds_json[A100.key]["measured_steps_per_second"] is None and speeds_json[A100.key]["prior_speed"] == 2.5
