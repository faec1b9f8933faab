"""Baseline policies for the trace simulator, answering the same questions as `workflows.policy`.

They stand for what people do without VaultLayer. The one-zone and next-zone baselines wait for
capacity the way a queued spot request does: they see when a zone has capacity again (the traces),
without paying refused requests to find out. Uniform Progress asks, as VaultLayer does. None of them
runs in the workflow.

- `on_demand`: on-demand only.
- `restart_from_zero`: one zone, no checkpoints; a reclaim restarts the script from step 0.
- `same_zone`: one zone, a checkpoint every 30 min (no save at the notice), re-queued in the same zone.
- `next_zone`: a checkpoint every 30 min (no save at the notice); after each reclaim, the next zone in
  order that has capacity (SkyPilot-style failover).
- `uniform_progress`: "Can't Be Late" (NSDI 2024), given every zone and the same notice save as
  VaultLayer, so that only the spot/on-demand and zone decisions differ.

One-zone baselines take the zones in turn across start offsets, so each zone is "the user's zone" for an
equal share of the runs. A gang run (`spec.nodes` > 1) is placed whole, as VaultLayer places it, and a zone
has capacity for it only while its trace counts at least `spec.nodes` hosts.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from vaultlayer.models import AttemptOutcome, Market, Placement, Pool, RunSpec, RunState, RunStatus
from workflows import policy
from workflows.simulate import EPOCH, VaultLayer, World


def _place(spec: RunSpec, status: RunStatus, pool: Pool, reason: str) -> policy.Place:
    return policy.Place(Placement(pool=pool, attempt=len(status.attempts) + 1, nodes=spec.nodes), reason=reason)


def _finished(status: RunStatus) -> policy.Stop | None:
    last = status.last_ended_attempt
    if last is not None and last.outcome == AttemptOutcome.COMPLETED:
        return policy.Stop(RunState.SUCCEEDED, "the script finished", exit_code=0)
    return None


def _spot_pools(spec: RunSpec) -> list[Pool]:
    return [p for p in spec.pools if p.market == Market.SPOT]


def _on_demand_pool(spec: RunSpec) -> Pool:
    return next(p for p in spec.pools if p.market == Market.ON_DEMAND)


class _Baseline:
    """Sees capacity through the traces: `world` at `start` seconds in."""

    checkpoints = True
    saves_on_notice = False

    def __init__(self, world: World, start: float) -> None:
        self.world = world
        self.start = start

    def seconds(self, now: datetime) -> float:
        return self.start + (now - EPOCH).total_seconds()

    def has_capacity(self, spec: RunSpec, pool: Pool, now: datetime) -> bool:
        """Room for the whole run: `spec.nodes` hosts."""
        return self.world.available(pool.zone, self.seconds(now), spec.nodes)

    def seconds_until_capacity(self, spec: RunSpec, pool: Pool, now: datetime) -> float:
        return self.world.back_at(pool.zone, self.seconds(now), spec.nodes) - self.seconds(now)

    def review(self, spec: RunSpec, status: RunStatus, now: datetime) -> policy.Keep | policy.Vacate:
        return policy.Keep()


class OnDemand(_Baseline):
    checkpoints = False

    def next_placement(self, spec: RunSpec, status: RunStatus, now: datetime):
        return _finished(status) or _place(spec, status, _on_demand_pool(spec), "on-demand only")


class OneZone(_Baseline):
    """Spot in one zone only, waiting for its capacity whenever it has none."""

    def __init__(self, world: World, start: float, zone_index: int, checkpoints: bool) -> None:
        super().__init__(world, start)
        self.zone_index = zone_index
        self.checkpoints = checkpoints

    def next_placement(self, spec: RunSpec, status: RunStatus, now: datetime):
        pools = _spot_pools(spec)
        pool = pools[self.zone_index % len(pools)]
        if (stop := _finished(status)) is not None:
            return stop
        if not self.has_capacity(spec, pool, now):
            return policy.Wait(self.seconds_until_capacity(spec, pool, now), f"queued for {pool.zone}")
        return _place(spec, status, pool, "the one zone")


class NextZone(_Baseline):
    """After each reclaim, the next zone (in order) that has capacity; wait when none has."""

    def next_placement(self, spec: RunSpec, status: RunStatus, now: datetime):
        if (stop := _finished(status)) is not None:
            return stop
        pools = _spot_pools(spec)
        last = next((i for i, p in enumerate(pools) if status.attempts and p.key == status.attempts[-1].pool), -1)
        order = [pools[(last + 1 + i) % len(pools)] for i in range(len(pools))]
        for pool in order:
            if self.has_capacity(spec, pool, now):
                return _place(spec, status, pool, "next zone with capacity")
        return policy.Wait(min(self.seconds_until_capacity(spec, p, now) for p in pools), "no zone has capacity")


class UniformProgress(_Baseline):
    """The paper's rules, with C the work, D the deadline, d the changeover, cp/ep the done and expected
    (C * t / D) progress: take spot whenever a zone has capacity and stay until reclaimed; when idle and
    behind (cp < ep(t)), use on-demand and stay until cp >= ep(t + 2d); when the time left is under the
    work left plus 2d, on-demand to the end (the safety net).

    "A zone has capacity" is learnt as VaultLayer learns it, by asking: each trace tick, the zones in
    turn (starting after the one just lost) until one gives a host, each refusal costing its time; off
    on-demand it moves the same way VaultLayer does, with the spot host provisioned before it leaves.
    """

    saves_on_notice = True

    def __init__(self, world: World, start: float) -> None:
        super().__init__(world, start)
        self.safety_net = False
        self.tick = world.tick_seconds

    def progress(self, spec: RunSpec, status: RunStatus, now: datetime) -> tuple[float, float, float]:
        """(done, elapsed, time left) in seconds of uninterrupted work."""
        left = policy.remaining_work_seconds(spec, status, now)
        elapsed = (now - EPOCH).total_seconds()
        return spec.work_seconds - left, elapsed, (spec.limits.deadline - EPOCH).total_seconds() - elapsed

    def expected(self, spec: RunSpec, at: float) -> float:
        return spec.work_seconds * at / (spec.limits.deadline - EPOCH).total_seconds()

    def zone_to_ask(self, spec: RunSpec, status: RunStatus, now: datetime) -> Pool | None:
        """The next zone in turn that has not refused during this tick."""
        pools = _spot_pools(spec)
        held = [r for r in status.attempts if r.running_at is not None and r.pool != _on_demand_pool(spec).key]
        index = next((i for i, p in enumerate(pools) if held and p.key == held[-1].pool), -1)
        shift = max(0, index + (bool(held) and held[-1].outcome == AttemptOutcome.RECLAIMED))
        tick_start = EPOCH + timedelta(seconds=(now - EPOCH).total_seconds() // self.tick * self.tick)
        refused = {r.pool for r in status.attempts
                   if r.outcome == AttemptOutcome.REFUSED and r.started_at >= tick_start}
        return next((p for p in pools[shift:] + pools[:shift] if p.key not in refused), None)

    def next_placement(self, spec: RunSpec, status: RunStatus, now: datetime):
        if (stop := _finished(status)) is not None:
            return stop
        done, elapsed, time_left = self.progress(spec, status, now)
        if self.safety_net or time_left < spec.work_seconds - done + 2 * spec.changeover_seconds:
            self.safety_net = True
            return _place(spec, status, _on_demand_pool(spec), "safety net")
        if (pool := self.zone_to_ask(spec, status, now)) is not None:
            return _place(spec, status, pool, "asking for spot")
        if done < self.expected(spec, elapsed):
            return _place(spec, status, _on_demand_pool(spec), "behind uniform progress")
        next_tick = self.tick - elapsed % self.tick
        behind_in = done * (spec.limits.deadline - EPOCH).total_seconds() / spec.work_seconds - elapsed
        return policy.Wait(max(1.0, min(next_tick, behind_in)), "ahead; no spot this tick")

    def review(self, spec: RunSpec, status: RunStatus, now: datetime) -> policy.Keep | policy.Vacate:
        running = status.current_attempt
        if self.safety_net or running.pool != _on_demand_pool(spec).key:
            return policy.Keep()
        done, elapsed, _ = self.progress(spec, status, now)
        if done >= self.expected(spec, elapsed + 2 * spec.changeover_seconds):
            if (pool := self.zone_to_ask(spec, status, now)) is not None:
                return policy.Vacate("ahead of uniform progress; asking for spot", to=pool)
        return policy.Keep(until=now + timedelta(seconds=self.tick - elapsed % self.tick))


STRATEGIES = {
    "vaultlayer": lambda world, model, start, index: VaultLayer(),
    "on_demand": lambda world, model, start, index: OnDemand(world, start),
    "restart_from_zero": lambda world, model, start, index: OneZone(world, start, index, checkpoints=False),
    "same_zone": lambda world, model, start, index: OneZone(world, start, index, checkpoints=True),
    "next_zone": lambda world, model, start, index: NextZone(world, start),
    "uniform_progress": lambda world, model, start, index: UniformProgress(world, start),
}
POLICY_NAMES = tuple(STRATEGIES)
