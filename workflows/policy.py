"""Placement policy: pure and deterministic (no I/O, no clock but the one passed in, no temporalio).

The workflow and the trace simulator (`workflows/simulate.py`) run this same code. Given the run spec
and its history, `next_placement` returns a placement, a wait, or a stop that names its reason; while
an attempt runs, `review` says when to look again and whether to move the run off its host. The rules
and why each constant has its value: docs/policy.md.

- Health: a pool that reclaimed a host cools down, longer for each repeat; one that refused is asked
  again after the others, in turn; a pool with trouble in the last hours, or in a region that just
  reclaimed, comes after calm ones (over 90% of spot reclaims hit the same type and zone again within
  minutes).
- Choice: the cheapest healthy pool, its price raised by what its reclaims cost in moves.
- On-demand: only when spot cannot meet the deadline (`DeadlinePlan`); back to spot when it can again.
- Budgets: reclaims, host faults and script failures each have their own; reclaims never use up retries.
- Gangs (`spec.nodes` > 1): placed whole in one pool, and one attempt, so a reclaim of any host is the
  gang's. Money is the gang's (`nodes` x a host's price, `workflows.accounting`); pools rank by one host's
  price, which orders them the same for any number of hosts.

What an ended attempt leaves in the status the policy reads (outcome, cost, fences, counters) is
`workflows.accounting`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from vaultlayer.durations import parse_interval
from vaultlayer.interval import stored_a_checkpoint
from vaultlayer.models import (
    AttemptOutcome,
    AttemptRecord,
    FailureCause,
    Market,
    Placement,
    Pool,
    Refusal,
    RunSpec,
    RunState,
    RunStatus,
)
from workflows.accounting import hourly_cost, running_cost
from workflows.speed import Speeds, speeds

# A pool that reclaimed is left for others for 5 min, doubled for each reclaim in the health window, up to
# 30 min: over 90% of reclaims hit the same zone again within minutes. Once every other pool has been
# asked since, it is asked again at once.
COOLDOWN_SECONDS = 5 * 60
MAX_COOLDOWN_SECONDS = 30 * 60
# A pool that refused is asked again after the others have had their turn (30 min at most), and not within
# 5 min: a refusal costs seconds and no money, so no doubling, but each ask is a provisioning call and an
# attempt in the run's history, so a long shortage costs a few asks per pool an hour, not one a minute.
REASK_SECONDS = 5 * 60
HEALTH_WINDOW = timedelta(hours=12)
# Trouble this recent in a pool, or a reclaim this recent in its region, puts it after calm pools:
# capacity that just came back is the likeliest to go again, and zones of a region run short together.
RECENT_TROUBLE = timedelta(hours=3)
# A pool never held reclaims once every two hours; two hours of real use weigh as much as this guess.
PRIOR_RECLAIMS_PER_HOUR = 0.5
PRIOR_HOURS = 2.0
# What must be left when on-demand takes over, beyond its changeover and what a host lost without notice
# costs: enough for a work estimate 2% short.
DEADLINE_MARGIN_FRACTION = 0.02
# Before a run has lost a host, one loss in two is assumed to come without notice (`unnoticed_loss_seconds`).
NOTICE_PRIOR_SILENT = 1.0
NOTICE_PRIOR_LOSSES = 2.0
ON_DEMAND_REVIEW_SECONDS = 30 * 60
MIN_REVIEW_SECONDS = 60
# A move off a running spot host for a cheaper pool (cost per unit of work) must save this share of what the
# work left costs where it is, and at least MOVE_PAYBACK times what the move itself costs (the changeover and
# notice, paid without progress): a measured speed is noisy, and a move that only breaks even is a reclaim risk.
MOVE_SAVING_FRACTION = 0.2
MOVE_PAYBACK = 2.0
SPEED_REVIEW_SECONDS = 10 * 60


@dataclass(frozen=True)
class Place:
    placement: Placement
    reason: str = ""


@dataclass(frozen=True)
class Wait:
    """Place nothing now; ask again after `seconds`."""

    seconds: float
    reason: str


@dataclass(frozen=True)
class Stop:
    state: RunState
    reason: str
    exit_code: int | None = None
    limit: str | None = None  # the Limits field that stopped the run


@dataclass(frozen=True)
class Keep:
    """Leave the running attempt alone; review it again at `until` (None: not before it ends)."""

    until: datetime | None = None


@dataclass(frozen=True)
class Vacate:
    """Move the run off its host: it saves at a notice, is released, and `next_placement` decides again.

    With `to`, a move: a host of `to` is provisioned first and the run leaves only once it has one; a
    refusal is recorded and the attempt runs on, so a move never trades a host for nothing.
    """

    reason: str
    to: Pool | None = None


@dataclass(frozen=True)
class PoolHealth:
    pool: Pool
    index: int  # its place in the spec's preference order
    reclaims: int  # in the window; a gang's attempt is one record, so a reclaim of any of its hosts counts
    exposure_hours: float  # hours the run held the pool (a gang: held whole) in the window
    last_asked: datetime | None  # when the run last asked the pool for a host
    refused_at: datetime | None  # when it last refused, unless it has handed over a host since
    refused_until: datetime | None  # not asked again before (REASK_SECONDS after the refusal)
    reclaimed_at: datetime | None  # its last reclaim in the window
    reclaim_until: datetime | None  # that reclaim's cooldown, doubled for repeats
    troubled: bool  # a reclaim or refusal of its own within RECENT_TROUBLE
    region_troubled: bool  # a reclaim in its region (provider and region) within RECENT_TROUBLE
    blocked: str  # why the pool is out for the whole run, or ""

    @property
    def reclaim_rate(self) -> float:
        """Reclaims per host-hour: the window's record with the prior added in."""
        return (self.reclaims + PRIOR_RECLAIMS_PER_HOUR * PRIOR_HOURS) / (self.exposure_hours + PRIOR_HOURS)

    def usable_at(self, others: list[PoolHealth], now: datetime) -> datetime:
        """When the pool may be asked. After a refusal: once every other pool has been asked since (or
        MAX_COOLDOWN_SECONDS on), and not within REASK_SECONDS. After a reclaim: once its cooldown is over
        or every other pool has been asked since."""
        def others_asked_since(moment: datetime) -> bool:
            return all(o is self or (o.last_asked is not None and o.last_asked >= moment) for o in others)

        at = now
        if self.refused_at is not None:
            turn = (self.refused_at if others_asked_since(self.refused_at)
                    else self.refused_at + timedelta(seconds=MAX_COOLDOWN_SECONDS))
            at = max(at, turn, self.refused_until)
        if self.reclaim_until is not None and not others_asked_since(self.reclaimed_at):
            at = max(at, self.reclaim_until)
        return at


@dataclass(frozen=True)
class DeadlinePlan:
    """The deadline rule, in seconds. Slack is the time to the deadline minus the work left.

    - Safety net: spot only while slack - spot_try >= reserve, so that a spot attempt lost at once still
      leaves on-demand the time to finish.
    - Slack line: the work left is entitled to slack in proportion to it (the run's initial slack per
      second of work, times the work left). Waiting for spot may spend slack down to the line, not
      below: there, on-demand bridges the shortage. The line falls while on-demand makes progress, and
      spot is safe again once the slack is back at the line but for the bridge's own changeover (if the
      net also covers the move and one failed spot attempt).
    """

    slack: float
    reserve: float  # what on-demand needs in hand: its changeover, a host lost without notice, the margin
    spot_try: float  # what a spot attempt lost at once costs: a changeover plus the notice
    entitled: float  # the slack line for the work left
    rate: float  # slack per second of work: how fast the line falls while the run trains
    bridge: float  # the changeover a bridge to on-demand spends: not held against the return

    def spot_allowed(self) -> bool:
        return self.slack - self.spot_try >= self.reserve

    def room(self) -> float:
        """How long the run may wait for spot: until the slack reaches its line or the safety net."""
        return min(self.slack - self.entitled, self.slack - self.spot_try - self.reserve)

    def spot_safe_again(self) -> bool:
        return self.slack + self.bridge >= self.entitled and self.slack - 2 * self.spot_try >= self.reserve

    def seconds_until_safe(self) -> float:
        """On-demand keeps the slack and lowers the line: when the line will be reached."""
        if self.rate <= 0 or self.slack - 2 * self.spot_try < self.reserve:
            return math.inf
        return max(0.0, (self.entitled - self.slack - self.bridge) / self.rate)

    def describe(self) -> str:
        return (f"slack {hours(self.slack)}, slack line {hours(self.entitled)}, "
                f"on-demand needs {hours(self.reserve)}")


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f}h"


# ---------------------------------------------------------------- decisions


def next_placement(spec: RunSpec, status: RunStatus, now: datetime, by_work: bool = True,
                   restore_retry: bool = True) -> Place | Wait | Stop:
    """`by_work=False`: the ranking by price per hour and one speed for the whole run, as before pools were told
    apart by speed; kept for bench/goodput.py to compare against. `restore_retry`: see `limit_reached`."""
    stop = limit_reached(spec, status, now, restore_retry)
    if stop is not None:
        return stop
    health = pool_health(spec, status, now)
    spot = [h for h in health if h.pool.market == Market.SPOT and not h.blocked]
    on_demand = [h for h in health if h.pool.market == Market.ON_DEMAND and not h.blocked]
    if not spot and not on_demand:
        return Stop(RunState.FAILED, "no pool can take the run: "
                    + "; ".join(f"{h.pool.key} {h.blocked}" for h in health))
    if not spot:
        return place_or_wait(spec, status, now, on_demand, by_work=by_work)
    best, wait = choose(spot, spec, status, now, by_work=by_work)
    bridge = choose(on_demand, spec, status, now, by_work=by_work) if on_demand else None
    plan = deadline_plan(spec, status, now, (bridge[0] if bridge else best).pool if by_work else None)
    if by_work and bridge is not None and wait == 0 and bridge[1] == 0:
        rates = speeds(spec, status)
        if cost_per_work(bridge[0], status, spec, rates) < cost_per_work(best, status, spec, rates):
            return place(spec, status, now, bridge[0].pool,
                         f"{bridge[0].pool.key} costs less per unit of work than any spot pool")
    if plan is not None:
        at_risk = not plan.spot_allowed()
        if on_demand and (at_risk or plan.room() <= 0):
            since = round_start(status, now, plan)
            unasked = [h for h in spot if h.last_asked is None or h.last_asked < since]
            if not at_risk and unasked:
                again = choose(unasked, spec, status, now, ignore_cooldowns=True, by_work=by_work)[0]
                if wait == 0 and again is best:
                    return place(spec, status, now, best.pool, why_chosen(best, len(spot), status))
                return place(spec, status, now, again.pool,
                             f"the slack is at its line: asking {again.pool.key} again before paying for on-demand")
            if choose(on_demand, spec, status, now, by_work=by_work)[1] == 0:
                why = "deadline at risk" if at_risk else "every spot pool is cooling and the slack is at its line"
                return place_or_wait(spec, status, now, on_demand, f"{why}: {plan.describe()}", by_work=by_work)
        if at_risk and wait > 0:
            return place(spec, status, now, best.pool,
                         f"deadline at risk and no on-demand pool usable: trying {best.pool.key} now")
        if wait > 0 and on_demand:
            wait = max(MIN_REVIEW_SECONDS, min(wait, plan.room()))
    if wait > 0:
        return Wait(wait, f"every spot pool is cooling down; {best.pool.key} is usable in {hours(wait)}")
    return place(spec, status, now, best.pool, why_chosen(best, len(spot), status))


def review(spec: RunSpec, status: RunStatus, now: datetime, by_work: bool = True) -> Keep | Vacate:
    """For the running attempt: a limit reached, spot safe again (from on-demand), a slower spot pool about to
    miss the deadline, a pool much cheaper per unit of work (from spot), or keep it."""
    running = status.current_attempt
    limits = spec.limits
    if limits.deadline is not None and now >= limits.deadline:
        return Vacate(f"limit deadline={limits.deadline.isoformat()} reached")
    spent = status.cost_usd + running_cost(running, now)
    if limits.max_cost is not None and spent >= limits.max_cost:
        return Vacate(f"limit max_cost={limits.max_cost:g} reached (spent {spent:.2f})")
    checks = [limits.deadline] if limits.deadline is not None else []
    if limits.max_cost is not None and hourly_cost(running):  # a gang spends its hosts' prices together
        checks.append(now + timedelta(hours=(limits.max_cost - spent) / hourly_cost(running)))
    pool = next((p for p in spec.pools if p.key == running.pool), None)
    health = pool_health(spec, status, now)
    spot = [h for h in health if h.pool.market == Market.SPOT and not h.blocked]
    on_demand = [h for h in health if h.pool.market == Market.ON_DEMAND and not h.blocked]
    if pool is not None and pool.market == Market.ON_DEMAND and spot:
        plan = deadline_plan(spec, status, now, pool if by_work else None)
        if plan is not None:
            best, wait = choose(spot, spec, status, now, by_work=by_work)  # asking costs nothing: the run stays
            here = next((h for h in health if h.pool.key == pool.key), None)
            rates = speeds(spec, status) if by_work else None
            cheaper = (here is None or rates is None
                       or cost_per_work(best, status, spec, rates) < cost_per_work(here, status, spec, rates))
            if wait == 0 and cheaper and plan.spot_safe_again():
                return Vacate(f"spot is safe again: {plan.describe()}", to=best.pool)
            later = max(wait, min(plan.seconds_until_safe(), ON_DEMAND_REVIEW_SECONDS), MIN_REVIEW_SECONDS)
            checks.append(now + timedelta(seconds=later))
    elif by_work and pool is not None and pool.market == Market.SPOT:
        verdict = review_spot(spec, status, now, pool, spot, on_demand)
        if isinstance(verdict, Vacate):
            return verdict
        checks += [verdict] if verdict is not None else []
    return Keep(min(checks) if checks else None)


def review_spot(spec: RunSpec, status: RunStatus, now: datetime, pool: Pool, spot: list[PoolHealth],
                on_demand: list[PoolHealth]) -> Vacate | datetime | None:
    """A spot attempt: off to on-demand when this pool trains too slowly for on-demand to still make the deadline
    after it; to another spot pool that costs much less per unit of work, once this one's speed is measured.
    Else when to look again (None: not before the attempt ends)."""
    rates = speeds(spec, status)
    when: list[datetime] = []
    if on_demand:
        bridge, ready = choose(on_demand, spec, status, now)
        plan = deadline_plan(spec, status, now, bridge.pool)
        speed_here, speed_there = rates.steps_per_second(pool), rates.steps_per_second(bridge.pool)
        if plan is not None and speed_here and speed_there and speed_here < speed_there:
            if not plan.spot_allowed() and ready == 0:
                return Vacate(f"{pool.key} trains too slowly to leave on-demand the time it needs: "
                              f"{plan.describe()}", to=bridge.pool)
            erosion = 1 - speed_here / speed_there  # slack lost per second trained here, in on-demand's terms
            seconds = (plan.slack - plan.spot_try - plan.reserve) / erosion
            if now + timedelta(seconds=min(seconds, 1e9)) < spec.limits.deadline:
                when.append(now + timedelta(seconds=max(MIN_REVIEW_SECONDS, seconds)))
    here = next((h for h in spot if h.pool.key == pool.key), None)
    others = [h for h in spot if h.pool.key != pool.key]
    if here is None or not others:
        return min(when, default=None)
    # The running attempt asked its pool too: a pool cooling since before it was in the round's turn.
    asked = replace(here, last_asked=max(here.last_asked or status.current_attempt.started_at,
                                         status.current_attempt.started_at))
    spot = [asked if h is here else h for h in spot]
    usable = [h for h in others if h.usable_at(spot, now) <= now]  # cooldowns as the whole round sees them
    if usable:
        move = cheaper_elsewhere(spec, status, now, here, choose(usable, spec, status, now, ignore_cooldowns=True)[0],
                                 rates)
        if move is not None:
            return move
    if max(rates.relative(h.pool) for h in spot) > (1 + MOVE_SAVING_FRACTION / 2) * min(
            rates.relative(h.pool) for h in spot):  # speeds differ: what is measured may yet make a move pay
        soonest = min(h.usable_at(spot, now) for h in others)
        when.append(max(soonest, now + timedelta(seconds=SPEED_REVIEW_SECONDS)))
    return min(when, default=None)


def cheaper_elsewhere(spec: RunSpec, status: RunStatus, now: datetime, here: PoolHealth, best: PoolHealth,
                      rates: Speeds) -> Vacate | None:
    """A move to `best` when this pool's measured speed makes it dearer per unit of work by MOVE_SAVING_FRACTION
    and the saving over the work left pays MOVE_PAYBACK times for the move."""
    if rates.measured_steps_per_second(here.pool) is None or not spec.total_steps:
        return None
    cost_here, cost_there = (cost_per_work(h, status, spec, rates) for h in (here, best))
    if cost_here is None or cost_there is None or cost_there > (1 - MOVE_SAVING_FRACTION) * cost_here:
        return None
    plan = deadline_plan(spec, status, now, best.pool)
    if plan is not None and not plan.spot_allowed():
        return None
    step = status.durable_step or 0
    running = status.current_attempt
    if running is not None and running.running_at is not None:
        trained = max(0.0, (now - running.started_at).total_seconds() - spec.changeover_seconds)
        step = max(step, running.start_step + int(trained * (rates.steps_per_second(here.pool) or 0.0)))
    left = max(0, spec.total_steps - step)
    saving = (cost_here - cost_there) * left / 3600  # USD per host: cost per work is USD/h per step/s
    move_hours = (spec.changeover_seconds + spec.notice_seconds) / 3600
    move = ((pool_price(here.pool, status) or 0.0) + (pool_price(best.pool, status) or 0.0)) * move_hours
    if saving < MOVE_PAYBACK * move:
        return None
    return Vacate(f"{best.pool.key} costs {1 - cost_there / cost_here:.0%} less per unit of work than "
                  f"{here.pool.key} at the speeds measured ({speed_text(rates, here.pool)} here)", to=best.pool)


def speed_text(rates: Speeds, pool: Pool) -> str:
    rate = rates.steps_per_second(pool)
    return f"{rate:.3g} steps/s" if rate is not None else f"speed {rates.relative(pool):.3g}"


def round_start(status: RunStatus, now: datetime, plan: DeadlinePlan) -> datetime:
    """Below the slack line every spot pool is asked once more, cooling or not, before on-demand is paid
    for: once since the slack reached the line, and once more after each host lost since."""
    reached = now + timedelta(seconds=min(0.0, plan.room()))
    return max([reached, *(r.ended_at for r in status.attempts if r.running_at is not None and r.ended_at)])


def place(spec: RunSpec, status: RunStatus, now: datetime, pool: Pool, reason: str) -> Place:
    """A gang is placed whole: the provider hands over all `spec.nodes` hosts of the pool, or none."""
    placement = Placement(pool=pool, attempt=len(status.attempts) + 1,
                          excluded_hosts=excluded_hosts(spec, status, now), nodes=spec.nodes)
    return Place(placement, reason=reason)


def place_or_wait(spec: RunSpec, status: RunStatus, now: datetime, candidates: list[PoolHealth],
                  reason: str = "", by_work: bool = True) -> Place | Wait:
    best, wait = choose(candidates, spec, status, now, by_work=by_work)
    if wait > 0:
        return Wait(wait, f"every pool is cooling down; {best.pool.key} is usable in {hours(wait)}")
    return place(spec, status, now, best.pool, reason or why_chosen(best, len(candidates), status))


def why_chosen(best: PoolHealth, candidates: int, status: RunStatus) -> str:
    last = status.last_ended_attempt
    moving = ""
    if last is not None and last.pool != best.pool.key and last.outcome in (AttemptOutcome.RECLAIMED,
                                                                              AttemptOutcome.REFUSED):
        moving = f"{last.pool} {last.outcome.value}; "
    return (f"{moving}{best.pool.key} is the cheapest healthy pool of {candidates} "
            f"({best.reclaim_rate:.2f} reclaims/h)")


# ---------------------------------------------------------------- limits and budgets


def restore_may_be_retried(status: RunStatus) -> bool:
    """Whether the last attempt failed its restore, and that checkpoint has not failed one before. Verification
    runs again before the next attempt, so a checkpoint whose bytes changed after it was verified (bit rot, an
    overwrite) is rejected then and an older one restored (chaos soak seed 4: a bit flipped between the choice
    and the restore failed the run). The same checkpoint failing twice is a cause no retry fixes."""
    last = status.last_ended_attempt
    if last is None or last.cause != FailureCause.RESTORE:
        return False
    return not any(record is not last and record.cause == FailureCause.RESTORE
                   and record.resumed_from == last.resumed_from for record in status.attempts)


def limit_reached(spec: RunSpec, status: RunStatus, now: datetime, restore_retry: bool = True) -> Stop | None:
    """`restore_retry=False`: a failed restore ends the run at once, as before `restore_may_be_retried` (the
    workflow passes False while replaying a history recorded then)."""
    limits = spec.limits
    last = status.last_ended_attempt
    if last is not None and last.outcome == AttemptOutcome.COMPLETED:
        return Stop(RunState.SUCCEEDED, "the script finished", exit_code=0)
    if (last is not None and last.outcome == AttemptOutcome.FAILED and last.cause not in (None, FailureCause.SCRIPT)
            and not (restore_retry and restore_may_be_retried(status))):
        # Not the script's exit: a missing secret, a failing setup command, a missing command or a broken
        # restore fail the same way on every host; retrying only hides the reason.
        return Stop(RunState.FAILED, last.reason, exit_code=1)  # the script's own code only when it failed
    if last is not None and last.outcome == AttemptOutcome.FAILED and status.script_failures > limits.script_retries:
        return Stop(RunState.FAILED,
                    f"the script exited with code {last.exit_code} "
                    f"(script retries: {limits.script_retries}; raise limits.script_retries to retry)",
                    exit_code=last.exit_code, limit="script_retries")
    if status.reclaims > limits.max_reclaims:
        return Stop(RunState.FAILED, f"limit max_reclaims={limits.max_reclaims} reached", limit="max_reclaims")
    if status.host_faults > limits.max_host_faults:
        return Stop(RunState.FAILED, f"limit max_host_faults={limits.max_host_faults} reached "
                                     f"(last: {last.reason if last else ''})", limit="max_host_faults")
    if limits.max_attempts is not None and len(status.attempts) >= limits.max_attempts:
        return Stop(RunState.FAILED, f"limit max_attempts={limits.max_attempts} reached", limit="max_attempts")
    if limits.max_cost is not None and status.cost_usd >= limits.max_cost:
        return Stop(RunState.FAILED, f"limit max_cost={limits.max_cost:g} reached (spent {status.cost_usd:.2f})",
                    limit="max_cost")
    if limits.deadline is not None and now >= limits.deadline:
        return Stop(RunState.FAILED, f"limit deadline={limits.deadline.isoformat()} reached", limit="deadline")
    return None


def attempts_without_progress(status: RunStatus) -> int:
    """Ended attempts in a row, the latest last, whose host stored no checkpoint past where it started
    (`stored_a_checkpoint`). Attempts that never got a host (refused) neither add to the streak nor end it."""
    streak = 0
    for index in reversed(range(len(status.attempts))):
        record = status.attempts[index]
        if record.host is None or record.ended_at is None:
            continue
        if stored_a_checkpoint(status.attempts, index):
            break
        streak += 1
    return streak


def no_progress_stop(spec: RunSpec, status: RunStatus) -> Stop | None:
    """Stop a run whose hosts keep being lost before any save instead of burning the reclaim budget."""
    limit = spec.limits.max_attempts_without_progress
    if attempts_without_progress(status) < limit:
        return None
    return Stop(RunState.FAILED,
                f"no durable progress over {limit} attempts in a row (limit max_attempts_without_progress="
                f"{limit}): each host was lost before a checkpoint was stored; give the script a longer notice, "
                "checkpoint sooner (--checkpoint-min, --checkpoint-every), or raise --max-attempts-without-progress",
                limit="max_attempts_without_progress")


def excluded_hosts(spec: RunSpec, status: RunStatus, now: datetime) -> list[str]:
    """Hosts that failed for a host reason: out for the run, or for `limits.host_exclusion_seconds`."""
    span = spec.limits.host_exclusion_seconds
    excluded = []
    for record in status.attempts:
        faulty = record.faulty_host or record.host  # a gang's: the host that failed, not node 0
        if record.outcome != AttemptOutcome.HOST_FAULT or not faulty or faulty in excluded:
            continue
        if span is None or record.ended_at is None or now < record.ended_at + timedelta(seconds=span):
            excluded.append(faulty)
    return excluded


# ---------------------------------------------------------------- pool health


def pool_health(spec: RunSpec, status: RunStatus, now: datetime) -> list[PoolHealth]:
    """Each pool's reclaims, exposure, cooldown and recent trouble, in spec order."""
    since, recent = now - HEALTH_WINDOW, now - RECENT_TROUBLE
    by_key = {pool.key: pool for pool in spec.pools}
    reclaims = dict.fromkeys(by_key, 0)
    exposure = dict.fromkeys(by_key, 0.0)
    last_asked: dict[str, datetime | None] = dict.fromkeys(by_key)
    refused_at: dict[str, datetime | None] = dict.fromkeys(by_key)
    refused_until: dict[str, datetime | None] = dict.fromkeys(by_key)
    reclaimed_at: dict[str, datetime | None] = dict.fromkeys(by_key)
    reclaim_until: dict[str, datetime | None] = dict.fromkeys(by_key)
    troubled: set[str] = set()
    troubled_regions: set[tuple[str, str]] = set()
    blocked = dict.fromkeys(by_key, "")
    for record in status.attempts:
        if record.pool not in by_key or record.ended_at is None:
            continue
        pool = by_key[record.pool]
        last_asked[record.pool] = max(last_asked[record.pool] or record.started_at, record.started_at)
        if record.running_at is not None:
            refused_at[record.pool] = None
            held = min(record.ended_at, now) - max(record.running_at, since)
            exposure[record.pool] += max(0.0, held.total_seconds() / 3600)
        if record.outcome == AttemptOutcome.RECLAIMED and record.ended_at >= since:
            reclaims[record.pool] += 1
            cooldown = min(COOLDOWN_SECONDS * 2 ** (reclaims[record.pool] - 1), MAX_COOLDOWN_SECONDS)
            reclaim_until[record.pool] = record.ended_at + timedelta(seconds=cooldown)
            reclaimed_at[record.pool] = record.ended_at
            if record.ended_at >= recent:
                troubled.add(record.pool)
                troubled_regions.add((pool.provider, pool.region))
        elif record.outcome == AttemptOutcome.REFUSED:
            if record.refusal == Refusal.UNSUPPORTED:
                blocked[record.pool] = f"does not offer the type ({record.reason})"
            for key in refused_together(pool, record, spec.pools):
                refused_at[key] = max(refused_at[key] or record.started_at, record.started_at)
                ends = record.ended_at + timedelta(seconds=REASK_SECONDS)
                refused_until[key] = max(refused_until[key] or ends, ends)
                if record.ended_at >= recent:
                    troubled.add(key)
    return [PoolHealth(pool, index, reclaims[pool.key], exposure[pool.key], last_asked[pool.key],
                       refused_at[pool.key], refused_until[pool.key], reclaimed_at[pool.key],
                       reclaim_until[pool.key], pool.key in troubled,
                       (pool.provider, pool.region) in troubled_regions, blocked[pool.key])
            for index, pool in enumerate(spec.pools)]


def refused_together(pool: Pool, record: AttemptRecord, pools: list[Pool]) -> list[str]:
    """A quota refusal holds for every zone of the region and market; any other, for the pool alone."""
    if record.refusal != Refusal.QUOTA or not pool.region:
        return [pool.key]
    return [p.key for p in pools if (p.provider, p.region, p.market) == (pool.provider, pool.region, pool.market)]


def pool_price(pool: Pool, status: RunStatus) -> float | None:
    """What a host of the pool costs: its price quoted last before a placement (`RunStatus.price_quotes`: the
    provider's price now, or the user's), else what the last host it handed over cost, else its list price."""
    if pool.key in status.price_quotes:
        return status.price_quotes[pool.key]
    for record in reversed(status.attempts):
        if record.pool == pool.key and record.price_per_hour is not None:
            return record.price_per_hour
    return pool.price_per_hour


def cost_per_work(h: PoolHealth, status: RunStatus, spec: RunSpec, rates: Speeds | None) -> float | None:
    """Expected USD per unit of work on the pool: its price over its speed (`workflows.speed`), raised by what
    its reclaims cost (each a changeover and a notice of paid time, and a slower pool holds the work longer, so
    it meets more of them). `rates` None: every pool taken as equally fast (price per hour). None: no price."""
    price = pool_price(h.pool, status)
    if price is None:
        return None
    speed = rates.relative(h.pool) if rates is not None else 1.0
    move_hours = (spec.changeover_seconds + spec.notice_seconds) / 3600
    return price / speed * (1 + h.reclaim_rate * move_hours)


def choose(candidates: list[PoolHealth], spec: RunSpec, status: RunStatus, now: datetime,
           ignore_cooldowns: bool = False, by_work: bool = True) -> tuple[PoolHealth, float]:
    """The best pool usable now (wait 0), else the one usable first and how long until it is.

    Cooldowns (`PoolHealth.usable_at`) take the pools in turn: a reclaim steers the run to the others, a
    refusal sends it round them before the same pool is asked again. Best: calm before troubled (no
    reclaim in its region, then no trouble of its own, in the last RECENT_TROUBLE), then the lowest expected
    cost per unit of work (`cost_per_work`; per hour with `by_work=False`), then fewer reclaims, then the spec's
    order. Pools of unknown price come after priced ones.
    `ignore_cooldowns`: for when the alternative is paying for on-demand.
    """
    rates = speeds(spec, status) if by_work else None

    def rank(h: PoolHealth) -> tuple:
        cost = cost_per_work(h, status, spec, rates)
        return (cost is None, h.region_troubled, h.troubled, cost or 0.0, h.reclaim_rate, h.index)

    ready = {h.pool.key: now if ignore_cooldowns else h.usable_at(candidates, now) for h in candidates}
    first = min(candidates, key=lambda h: (ready[h.pool.key], rank(h)))
    return first, (ready[first.pool.key] - now).total_seconds()


# ---------------------------------------------------------------- deadline rule


def remaining_work_seconds(spec: RunSpec, status: RunStatus, now: datetime, pool: Pool | None = None) -> float | None:
    """Uninterrupted seconds of work left on `pool` (`workflows.speed`: a slower pool has more of them), or with
    no pool, at the one speed of the whole run (`work_seconds`, else measured over every attempt).

    A running attempt is taken to train at its pool's speed once its changeover is over.
    """
    if not spec.total_steps:
        return None
    left_steps = max(0, spec.total_steps - (status.durable_step or 0))
    running = status.current_attempt
    trained = 0.0
    if running is not None and running.running_at is not None:
        trained = max(0.0, (now - running.started_at).total_seconds() - spec.changeover_seconds)
    if pool is not None:
        rates = speeds(spec, status)
        there = rates.steps_per_second(pool)
        if there is None:
            return None
        if trained:
            on = next((p for p in spec.pools if p.key == running.pool), pool)
            left_steps = max(0.0, left_steps - trained * (rates.steps_per_second(on) or there))
        return left_steps / there
    if spec.work_seconds:
        left = spec.work_seconds * left_steps / spec.total_steps
    else:
        speed = measured_steps_per_second(status)
        if speed is None:
            return None
        left = left_steps / speed
    return max(0.0, left - trained)


def measured_steps_per_second(status: RunStatus) -> float | None:
    steps = seconds = 0.0
    for record in status.attempts:
        if record.running_at and record.ended_at and record.end_step is not None:
            steps += record.end_step - record.start_step
            seconds += (record.ended_at - record.running_at).total_seconds()
    return steps / seconds if steps > 0 and seconds > 0 else None


def unnoticed_loss_seconds(spec: RunSpec, status: RunStatus | None = None) -> float:
    """What a host lost without notice costs beyond a reclaim with one (the heartbeat timeout and the work since
    the last checkpoint, at most one interval), weighed by how often the run's hosts went without one: losses
    with a notice (the agent saw it: an emergency save made or missed) against those without, one of each assumed
    before any. Spot providers give notice of nearly every reclaim; a run that has seen twenty noticed reclaims
    keeps a twentieth of this in hand, not all of it, and one whose hosts vanish keeps nearly all."""
    unit, every = parse_interval(spec.checkpoint_every or spec.checkpoint_max)
    if unit == "steps":
        every = every * spec.work_seconds / spec.total_steps if spec.work_seconds and spec.total_steps else 0.0
    worst = max(0.0, spec.heartbeat_timeout_seconds + every - spec.notice_seconds)
    if status is None:
        return worst
    lost = [r for r in status.attempts if r.outcome == AttemptOutcome.RECLAIMED]
    silent = sum(r.emergency_save is None for r in lost)
    return worst * (silent + NOTICE_PRIOR_SILENT) / (len(lost) + NOTICE_PRIOR_LOSSES)


def deadline_plan(spec: RunSpec, status: RunStatus, now: datetime, pool: Pool | None = None) -> DeadlinePlan | None:
    """The deadline rule's numbers for finishing on `pool` (the on-demand pool that would bridge, when the run
    has one), or None without a deadline or a way to tell how much work is left. No pool: one speed for the run."""
    if spec.limits.deadline is None:
        return None
    left = remaining_work_seconds(spec, status, now, pool)
    if left is None:
        return None
    if pool is not None:
        work = spec.total_steps / speeds(spec, status).steps_per_second(pool)
    else:
        work = spec.work_seconds or spec.total_steps / measured_steps_per_second(status)
    start = spec.submitted_at or status.started_at or now
    initial_slack = max(0.0, (spec.limits.deadline - start).total_seconds() - work)
    return DeadlinePlan(
        slack=(spec.limits.deadline - now).total_seconds() - left,
        reserve=spec.changeover_seconds + unnoticed_loss_seconds(spec, status) + DEADLINE_MARGIN_FRACTION * left,
        spot_try=spec.changeover_seconds + spec.notice_seconds,
        entitled=initial_slack * left / work,
        rate=initial_slack / work,
        bridge=spec.changeover_seconds,
    )
