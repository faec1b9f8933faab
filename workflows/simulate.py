"""Replay spot availability traces through the placement policy the workflow runs.

One trace per pool (the format of ../shared/traces: `{"metadata": {"gap_seconds": G}, "data": [n, ...]}`,
n = how many hosts the zone had at that tick, 0 = none). A run of `nodes` hosts (a gang; 1 by default)
holds a zone while its count is at least `nodes` and is reclaimed at the first tick it drops below; the
zone refuses it until the count is back. `vaultlayer` is `workflows.policy` itself, called with the same
`RunSpec`/`RunStatus` the workflow builds, and each attempt is closed into that status by the workflow's
own accounting (`workflows/accounting.py`); the baselines (`workflows/baselines.py`) answer the same two
questions. The model (provisioning and restore time, notice, checkpoint cost, prices) and its defaults
are documented in docs/policy.md. Pure Python: `vl simulate` works without numpy.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

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
from workflows import accounting, policy

EPOCH = datetime(2000, 1, 1, tzinfo=UTC)  # simulated time starts here; only differences matter
PROVIDER = "trace"
GOLDEN_FRACTION = (math.sqrt(5) - 1) / 2  # start phases within a tick: `start_offsets`


@dataclass(frozen=True)
class Trace:
    zone: str
    gap_seconds: float
    counts: tuple[int, ...]  # hosts the zone had at each tick
    # The zone's GPU class (the mixed-class scenario, `with_classes`): how fast it trains relative to the
    # model's work (which is measured at speed 1), and its prices as a multiple of the model's.
    gpu: str | None = None
    speed: float = 1.0
    price_scale: float = 1.0
    # Its spot price at each tick (a fraction of its on-demand price; `with_prices`), repeating like `counts`;
    # None: the model's fixed spot price.
    prices: tuple[float, ...] | None = None
    price_gap_seconds: float = 3600.0

    def spot_price_ratio(self, at: float, default: float) -> float:
        """The zone's spot price at `at` seconds, as a fraction of its on-demand price."""
        if not self.prices:
            return default
        return self.prices[int(at // self.price_gap_seconds) % len(self.prices)]

    @property
    def seconds(self) -> float:
        return self.gap_seconds * len(self.counts)


def load_traces(directory: Path, nodes: int = 1) -> list[Trace]:
    """Every `*.json` trace under `directory` (its subfolders too), one pool each, named by file, for runs of
    `nodes` hosts (`check_gang_size`)."""
    files = sorted(Path(directory).rglob("*.json"))
    if not files:
        raise ValueError(f"no trace files (*.json) under {directory}")
    traces = []
    for path in files:
        document = json.loads(path.read_text())
        try:
            gap, data = float(document["metadata"]["gap_seconds"]), document["data"]
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a trace file ({{'metadata': {{'gap_seconds': ...}}, 'data': [...]}})") \
                from err
        traces.append(Trace(zone=path.stem.split("_")[0], gap_seconds=gap, counts=tuple(int(n) for n in data)))
    names = [t.zone for t in traces]
    if len(set(names)) != len(names):  # two files for one zone: keep them apart by their full names
        traces = [replace(t, zone=p.stem) for t, p in zip(traces, files)]
    check_gang_size(traces, nodes, directory)
    return traces


def check_gang_size(traces: list[Trace], nodes: int, source: Path | str) -> None:
    """Refuse traces recorded on clusters smaller than the gang: a zone whose count reaches some hosts but
    never `nodes` would only ever refuse the gang, a world without capacity that looks like a result. (A
    zone that never has any host says nothing about its cluster's size, and stays.)"""
    short = {t.zone: max(t.counts) for t in traces if 0 < max(t.counts, default=0) < nodes}
    if short:
        zones = ", ".join(f"{zone} (at most {most})" for zone, most in sorted(short.items()))
        raise ValueError(
            f"--nodes {nodes}: the traces under {source} never have {nodes} hosts up in {zones}: they were recorded "
            f"on smaller clusters and cannot say when a gang of {nodes} would hold. Use traces of clusters of "
            f"{nodes} or more hosts (such as ../shared/traces/aws-4node-v100-2023-08), or --nodes "
            f"{min(short.values())}")


# Synthetic markets: (availability range, median uptime range in hours, hours between region-wide shortages,
# hours between market-wide ones). "mixed" is the one every earlier figure used.
MARKETS: dict[str, tuple[tuple[float, float], tuple[float, float], float, float]] = {
    "mixed": ((0.15, 0.95), (0.2, 1.5), 36, 96),
    "calm": ((0.6, 0.98), (2.0, 12.0), 96, 240),  # capacity that mostly stays: long uptimes, rare shortages
    "choppy": ((0.3, 0.8), (0.05, 0.3), 24, 72),  # capacity that comes and goes within minutes
}


def synthetic_traces(seed: int, regions: int = 3, zones_per_region: int = 3, days: float = 45.0,
                     gap_seconds: float = 300.0, nodes: int = 1, market: str = "mixed") -> list[Trace]:
    """Traces no constant was ever chosen on. Each zone alternates up and down periods drawn from
    heavy-tailed (lognormal) laws, as spot capacity is: most uptimes are short, a few last for days
    (availability 15-95%, median uptime 0.2-1.5 h, spread drawn per zone). Shortages take most zones
    down together, region-wide (about one a day and a half per region, 0.5-8 h) and market-wide (about
    one in four days, 0.5-5 h).

    With `nodes` > 1 each zone counts `nodes` hosts, each going up and down on its own with the zone's
    laws, and the shortages take them all: the drawn availability is the whole gang's (each host is up
    a share availability ** (1 / nodes) of the time), and the gang breaks whenever any host goes down.
    `nodes` = 1 draws exactly the single-host traces. `market` picks the laws' ranges (MARKETS): "calm" and
    "choppy" markets are drawn the same way from other ranges."""
    (lowest, highest), (shortest_up, longest_up), region_every, market_every = MARKETS[market]
    rng = random.Random(seed)
    ticks = int(days * 86400 / gap_seconds)

    def shortages(every_hours: float, shortest: float, longest: float) -> list[bool]:
        marks, tick = [False] * ticks, 0
        while tick < ticks:
            tick += int(rng.expovariate(1 / (every_hours * 3600)) / gap_seconds) + 1
            length = int(rng.uniform(shortest, longest) * 3600 / gap_seconds)
            marks[tick:tick + length] = [True] * len(marks[tick:tick + length])
        return marks

    market_wide = shortages(market_every, 0.5, 5)
    traces = []
    for region in range(regions):
        regional = shortages(region_every, 0.5, 8)
        for zone in range(zones_per_region):
            availability = rng.uniform(lowest, highest) ** (1 / nodes)  # of one host
            up_spread, down_spread = rng.uniform(1.0, 2.0), rng.uniform(0.8, 1.5)
            median_up = math.exp(rng.uniform(math.log(shortest_up), math.log(longest_up))) * 3600
            mean_up = median_up * math.exp(up_spread ** 2 / 2)
            median_down = mean_up * (1 - availability) / availability / math.exp(down_spread ** 2 / 2)
            in_region, in_market = rng.random() < 0.8, rng.random() < 0.7
            hosts = []
            for _ in range(nodes):
                up, data = rng.random() < availability, []
                while len(data) < ticks:
                    median, spread = (median_up, up_spread) if up else (median_down, down_spread)
                    data += [up] * max(1, round(rng.lognormvariate(math.log(median), spread) / gap_seconds))
                    up = not up
                hosts.append(data[:ticks])
            counts = [0 if (in_region and r) or (in_market and m) else sum(ups)
                      for r, m, ups in zip(regional, market_wide, zip(*hosts))]
            name = f"s{seed}-r{region}-{'abcdefgh'[zone]}" if market == "mixed" else f"{market}{seed}-r{region}-{'abcdefgh'[zone]}"
            traces.append(Trace(zone=name, gap_seconds=gap_seconds,
                                counts=tuple(counts)))
    return traces


def with_classes(traces: list[Trace], fast_speed: float, fast_price: float) -> list[Trace]:
    """The mixed-class scenario: every other zone (in the order given) holds a second GPU class, `fast_speed`
    times as fast as the first at `fast_price` times its prices, spot and on-demand."""
    return [replace(t, gpu="fast", speed=fast_speed, price_scale=fast_price) if i % 2 else replace(t, gpu="slow")
            for i, t in enumerate(traces)]


def load_prices(traces: list[Trace], directory: Path) -> list[Trace]:
    """Spot price series from `directory`: one file per zone, named like its trace (`<zone>_*.json`), in the
    traces' format, `{"metadata": {"gap_seconds": G}, "data": [p, ...]}`, p = the spot price as a fraction of
    on-demand. A zone without a file keeps the model's fixed price."""
    found = {}
    for path in sorted(Path(directory).rglob("*.json")):
        document = json.loads(path.read_text())
        try:
            gap, data = float(document["metadata"]["gap_seconds"]), [float(p) for p in document["data"]]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: not a price file ({{'metadata': {{'gap_seconds': ...}}, 'data': [...]}})") \
                from err
        if not data or min(data) <= 0:
            raise ValueError(f"{path}: prices must be more than zero (fractions of the on-demand price)")
        found[path.stem.split("_")[0]] = (gap, tuple(data))
    unknown = set(found) - {t.zone for t in traces}
    if unknown:
        raise ValueError(f"price files for zones with no availability trace: {', '.join(sorted(unknown))}")
    return [replace(t, price_gap_seconds=found[t.zone][0], prices=found[t.zone][1]) if t.zone in found else t
            for t in traces]


def synthetic_prices(traces: list[Trace], seed: int, mean: float, days: float = 45.0) -> list[Trace]:
    """A price walk per zone, hourly: mean-reverting (half-life about a day) around a level drawn per zone
    (0.7-1.4 x `mean`), with steps of about 4% of it, and kept within 0.1-0.9 of on-demand. AWS spot prices
    have moved this way since 2017: slowly, and by zone."""
    rng = random.Random(seed)
    walked = []
    for trace in traces:
        level = mean * rng.uniform(0.7, 1.4)
        price, series = level, []
        for _ in range(int(days * 24)):
            price += 0.03 * (level - price) + rng.gauss(0, 0.04 * level)
            price = min(0.9, max(0.1, price))
            series.append(round(price, 4))
        walked.append(replace(trace, prices=tuple(series), price_gap_seconds=3600.0))
    return walked


def region_of(zone: str) -> str:
    """A zone named the cloud way (us-east-1a, us-central1-a) belongs to its region; else it is its own."""
    trimmed = zone[:-1].rstrip("-")
    return trimmed if len(zone) > 2 and zone[-1].isalpha() and zone[-2] in "0123456789-" else zone


class World:
    """Spot capacity at any second, each trace repeating past its end. A zone has room for a run of `nodes`
    hosts while its count is at least `nodes`."""

    def __init__(self, traces: list[Trace]) -> None:
        self.traces = {t.zone: t for t in traces}
        self._distances: dict[tuple[str, int, bool], list[float]] = {}  # (zone, nodes, room): `_distance_to`

    @property
    def seconds(self) -> float:
        return min(t.seconds for t in self.traces.values())

    @property
    def tick_seconds(self) -> float:
        """The shortest trace tick: no capacity changes between two of them."""
        return min(t.gap_seconds for t in self.traces.values())

    def price(self, pool: Pool, at: float, model: Model) -> float | None:
        """What a host of `pool` costs at `at`: its zone's price series, else the pool's price."""
        trace = self.traces.get(pool.zone or "")
        if pool.market != Market.SPOT or trace is None or not trace.prices:
            return pool.price_per_hour
        return pool.on_demand_price_per_hour * trace.spot_price_ratio(at, model.spot_price_ratio)

    def quotes(self, spec: RunSpec, at: float, model: Model) -> dict[str, float]:
        """Every priced pool's price now, as the workflow's price read gives them before a placement."""
        return {pool.key: price for pool in spec.pools if (price := self.price(pool, at, model)) is not None}

    def available(self, zone: str, at: float, nodes: int) -> bool:
        trace = self.traces[zone]
        return trace.counts[int(at // trace.gap_seconds) % len(trace.counts)] >= nodes

    def lost_at(self, zone: str, at: float, nodes: int) -> float:
        """When a run of `nodes` hosts held in `zone` since `at` is taken: the start of the zone's next tick
        with fewer than `nodes` (a gang is lost with any of its hosts)."""
        return self._next(zone, at, nodes, False)

    def back_at(self, zone: str, at: float, nodes: int) -> float:
        return at if self.available(zone, at, nodes) else self._next(zone, at, nodes, True)

    def _next(self, zone: str, at: float, nodes: int, room: bool) -> float:
        trace = self.traces[zone]
        key = (zone, nodes, room)
        if key not in self._distances:
            self._distances[key] = _distance_to(tuple(n >= nodes for n in trace.counts), room)
        tick = int(at // trace.gap_seconds)
        return (tick + self._distances[key][tick % len(trace.counts)]) * trace.gap_seconds


def _distance_to(values: tuple[bool, ...], wanted: bool) -> list[float]:
    """For each tick, how many ticks until `values` is `wanted` (wrapping round; inf when never)."""
    n = len(values)
    distance = [math.inf] * n
    following = math.inf
    for i in reversed(range(2 * n)):
        following = 0 if values[i % n] == wanted else following + 1
        if i < n:
            distance[i] = following
    return distance


@dataclass(frozen=True)
class Model:
    """What the simulator assumes; each is a flag of `vl simulate` and `bench/goodput.py`."""

    work_hours: float = 24.0
    deadline_hours: float = 36.0
    on_demand_price: float = 1.0  # USD per hour of an on-demand host (of the first GPU class); costs are also relative
    spot_price_ratio: float = 0.30  # SkyPilot's BERT run: $18.4 on spot against $61.2 on demand
    changeover_seconds: float = 360.0  # placement decision -> training again (provisioning + restore)
    notice_seconds: float = 120.0  # AWS spot interruption notice
    checkpoint_seconds: float = 6.0  # training blocked per save (PyTorch async DCP: 6.3 s for a 7B model)
    checkpoint_every_seconds: float = 1800.0
    refusal_seconds: float = 15.0  # a refused request (EC2 answers InsufficientInstanceCapacity at once)
    horizon_factor: float = 3.0  # a run still going at factor x deadline counts as never finished
    nodes: int = 1  # hosts per attempt (a gang): each pays the price, so costs compare with `nodes` on-demand hosts

    @property
    def work_seconds(self) -> float:
        return self.work_hours * 3600

    @property
    def on_demand_cost(self) -> float:
        """The work done on on-demand hosts, without interruption: the unit of every relative cost."""
        return self.work_hours * self.on_demand_price * self.nodes

    def wall_seconds(self, work: float, checkpoints: bool) -> float:
        """Wall time for `work` seconds of training, periodic saves included."""
        if not checkpoints or work <= 0:
            return work
        return work + self.checkpoint_seconds * math.floor((work - 1e-9) / self.checkpoint_every_seconds)

    def spec(self, traces: list[Trace], checkpoints: bool) -> RunSpec:
        """A spot pool per trace, and an on-demand pool per GPU class (one, unless the traces were given
        classes), the first trace's class first."""
        od = self.on_demand_price
        pools = [Pool(provider=PROVIDER, region=region_of(t.zone), zone=t.zone, gpu=t.gpu, market=Market.SPOT,
                      price_per_hour=od * t.price_scale * self.spot_price_ratio,
                      on_demand_price_per_hour=od * t.price_scale, speed=t.speed) for t in traces]
        classes = list(dict.fromkeys((t.gpu, t.speed, t.price_scale) for t in traces))
        pools += [Pool(provider=PROVIDER, region="on-demand", gpu=gpu, market=Market.ON_DEMAND,
                       price_per_hour=od * scale, on_demand_price_per_hour=od * scale, speed=speed)
                  for gpu, speed, scale in classes]
        return RunSpec(
            run_id="simulated", command=["train"], workdir="/", storage_url="file:///simulated", pools=pools,
            notice_seconds=self.notice_seconds, changeover_seconds=self.changeover_seconds,
            checkpoint_every=f"{self.checkpoint_every_seconds:g}s" if checkpoints else None,
            total_steps=int(self.work_seconds), work_seconds=self.wall_seconds(self.work_seconds, checkpoints),
            limits=Limits(deadline=EPOCH + timedelta(hours=self.deadline_hours), max_reclaims=10_000),
            submitted_at=EPOCH, nodes=self.nodes,
        )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model's flags, shared by `vl simulate` and bench/goodput.py; defaults in docs/policy.md."""
    default = Model()
    parser.add_argument("--on-demand-usd", type=float, default=3.06,
                        help="USD per hour of an on-demand host, for the mean cost in dollars (default 3.06: "
                             "p3.2xlarge, 1 V100, us-east-1, the traces' instance type)")
    parser.add_argument("--spot-price", type=float, default=default.spot_price_ratio,
                        help="spot price as a fraction of on-demand (default 0.30: SkyPilot's BERT run, "
                             "$18.4 spot against $61.2 on demand)")
    parser.add_argument("--changeover-minutes", type=float, default=default.changeover_seconds / 60,
                        help="from a placement decision to training again: provisioning plus restore (default 6)")
    parser.add_argument("--notice-seconds", type=float, default=default.notice_seconds,
                        help="reclaim notice (default 120, AWS); 0: hosts vanish without one")
    parser.add_argument("--checkpoint-seconds", type=float, default=default.checkpoint_seconds,
                        help="training blocked per save (default 6: PyTorch async DCP, 7B model)")
    parser.add_argument("--checkpoint-minutes", type=float, default=default.checkpoint_every_seconds / 60,
                        help="periodic checkpoint interval of the policies that checkpoint (default 30)")
    parser.add_argument("--refusal-seconds", type=float, default=default.refusal_seconds,
                        help="what a refused spot request costs (default 15)")
    parser.add_argument("--starts", type=int, default=200, help="start offsets spread over the traces (default 200)")
    parser.add_argument("--nodes", type=int, default=default.nodes,
                        help="hosts per attempt, a gang held in one zone while its count is at least this many "
                             "(default 1); the traces must count that many hosts")


def model_from_args(args: argparse.Namespace, work_hours: float, deadline_hours: float) -> Model:
    for flag, value in (("--spot-price", args.spot_price), ("--changeover-minutes", args.changeover_minutes),
                        ("--on-demand-usd", args.on_demand_usd),
                        ("--checkpoint-seconds", args.checkpoint_seconds),
                        ("--checkpoint-minutes", args.checkpoint_minutes), ("--starts", args.starts),
                        ("--nodes", args.nodes)):
        if value <= 0:
            raise ValueError(f"{flag} {value:g}: must be more than zero")
    for flag, value in (("--notice-seconds", args.notice_seconds), ("--refusal-seconds", args.refusal_seconds)):
        if value < 0:
            raise ValueError(f"{flag} {value:g}: must be zero or more")
    if work_hours <= 0 or deadline_hours < work_hours:
        raise ValueError(f"the deadline ({deadline_hours:g} h) must be at least the work ({work_hours:g} h)")
    return Model(work_hours=work_hours, deadline_hours=deadline_hours, spot_price_ratio=args.spot_price,
                 on_demand_price=args.on_demand_usd,
                 changeover_seconds=args.changeover_minutes * 60, notice_seconds=args.notice_seconds,
                 checkpoint_seconds=args.checkpoint_seconds, checkpoint_every_seconds=args.checkpoint_minutes * 60,
                 refusal_seconds=args.refusal_seconds, nodes=args.nodes)


class Strategy(Protocol):
    """What the simulator asks; `workflows.policy` answers it, and so does each baseline."""

    checkpoints: bool  # periodic saves every `Model.checkpoint_every_seconds`
    saves_on_notice: bool  # an emergency save at the notice (the VaultLayer SDK)

    def next_placement(self, spec: RunSpec, status: RunStatus,
                       now: datetime) -> policy.Place | policy.Wait | policy.Stop: ...

    def review(self, spec: RunSpec, status: RunStatus, now: datetime) -> policy.Keep | policy.Vacate: ...


class VaultLayer:
    """The policy the workflow runs, unchanged."""

    checkpoints = True
    saves_on_notice = True
    next_placement = staticmethod(policy.next_placement)
    review = staticmethod(policy.review)


class PriceOnly(VaultLayer):
    """The same policy ranking pools by price per hour, with one speed for the whole run: what it did before
    it told GPU classes apart (`by_work=False`)."""

    @staticmethod
    def next_placement(spec: RunSpec, status: RunStatus, now: datetime) -> policy.Place | policy.Wait | policy.Stop:
        return policy.next_placement(spec, status, now, by_work=False)

    @staticmethod
    def review(spec: RunSpec, status: RunStatus, now: datetime) -> policy.Keep | policy.Vacate:
        return policy.review(spec, status, now, by_work=False)


StrategyFactory = Callable[[World, Model, float, int], Strategy]  # (world, model, start, run index): a fresh one


@dataclass
class RunResult:
    finished_hours: float | None  # None: not finished within the horizon, or stopped by a limit
    cost: float
    reclaims: int
    on_demand_hours: float
    stop_reason: str


@dataclass
class _Attempt:
    """Where one attempt's training stands, in seconds since the run started. Work is counted at speed 1 (the
    model's `work_hours`); a host of speed `speed` does that much work per second of training."""

    model: Model
    strategy: Strategy
    kept_before: float  # work stored when the attempt began
    train_from: float  # training starts here (after the changeover)
    speed: float = 1.0

    def _trained(self, at: float) -> float:
        """Seconds spent training (saves' stalls left out) by `at`."""
        elapsed = max(0.0, at - self.train_from)
        if not self.strategy.checkpoints:
            return elapsed
        cycle = self.model.checkpoint_every_seconds + self.model.checkpoint_seconds
        full, within = divmod(elapsed, cycle)
        return full * self.model.checkpoint_every_seconds + min(within, self.model.checkpoint_every_seconds)

    def progress(self, at: float) -> float:
        return min(self.model.work_seconds, self.kept_before + self._trained(at) * self.speed)

    def stored(self, at: float) -> float:
        """Work a periodic save has stored by `at` (nothing, without checkpoints)."""
        if not self.strategy.checkpoints:
            return 0.0
        cycle = self.model.checkpoint_every_seconds + self.model.checkpoint_seconds
        saves = math.floor(max(0.0, at - self.train_from) / cycle)
        return min(self.model.work_seconds, self.kept_before + saves * self.model.checkpoint_every_seconds * self.speed)

    def finishes_at(self) -> float:
        left = (self.model.work_seconds - self.kept_before) / self.speed
        return self.train_from + self.model.wall_seconds(left, self.strategy.checkpoints)


def _provision(pool: Pool, reason: str, status: RunStatus, world: World, model: Model, start: float,
               now: float, nodes: int) -> tuple[RunStatus, AttemptRecord]:
    """The status with a new attempt of `nodes` hosts for `pool` at `now`, and that attempt: refused (and
    closed) when the trace has no room for them there, else holding them."""
    at = EPOCH + timedelta(seconds=now)
    record = AttemptRecord(attempt=len(status.attempts) + 1, pool=pool.key, started_at=at, placement_reason=reason,
                           nodes=nodes)
    status = status.model_copy(update={"attempts": [*status.attempts, record]})
    if pool.market == Market.SPOT and not world.available(pool.zone, start + now, nodes):
        room = f"room for {nodes} hosts" if nodes > 1 else "capacity"
        refused = AttemptResult(outcome=AttemptOutcome.REFUSED, refusal=Refusal.NO_CAPACITY,
                                reason=f"{Refusal.NO_CAPACITY}: the trace has no {room} in {pool.zone}")
        answered = at + timedelta(seconds=model.refusal_seconds)
        status = accounting.close_attempt(status, record.attempt, refused, answered)
        return status, status.attempts[-1]
    record.running_at, record.price_per_hour = at, world.price(pool, start + now, model)
    record.on_demand_price_per_hour = pool.on_demand_price_per_hour
    return status, record


def simulate_run(strategy: Strategy, world: World, model: Model, start: float,
                 spec: RunSpec | None = None) -> RunResult:
    """One run started at `start` seconds into the traces."""
    return simulate(strategy, world, model, start, spec)[0]


def simulate(strategy: Strategy, world: World, model: Model, start: float,
             spec: RunSpec | None = None) -> tuple[RunResult, RunStatus]:
    """One run started at `start` seconds into the traces: its result, and its status as the workflow
    would hold it (attempts, costs, fences, counters)."""
    spec = spec or model.spec(list(world.traces.values()), strategy.checkpoints)
    pools = {p.key: p for p in spec.pools}
    status = RunStatus(run_id=spec.run_id, started_at=EPOCH)
    horizon = model.horizon_factor * model.deadline_hours * 3600
    kept, now, finished, reason, on_demand_hours = 0.0, 0.0, None, "", 0.0

    def at(seconds: float) -> datetime:
        return EPOCH + timedelta(seconds=seconds)

    moved_to: AttemptRecord | None = None  # a host a move provisioned: the next attempt runs there
    while now < horizon and finished is None:
        if moved_to is None:
            if any(t.prices for t in world.traces.values()):
                status.price_quotes = world.quotes(spec, start + now, model)
            decision = strategy.next_placement(spec, status, at(now))
            if isinstance(decision, policy.Stop):
                reason = decision.reason
                status.state, status.stop_reason, status.exit_code = decision.state, decision.reason, decision.exit_code
                break
            if isinstance(decision, policy.Wait):
                now += max(decision.seconds, 1.0)
                continue
            status, record = _provision(decision.placement.pool, decision.reason, status, world, model, start, now,
                                        spec.nodes)
            if record.outcome == AttemptOutcome.REFUSED:
                now += model.refusal_seconds
                continue
        else:
            record, moved_to = moved_to, None
        record.start_step = int(kept)
        status = accounting.charge_lost_steps(status, record.start_step)
        pool = pools[record.pool]
        spot = pool.market == Market.SPOT
        attempt = _Attempt(model, strategy, kept, now + model.changeover_seconds, pool.speed or 1.0)
        lost = world.lost_at(pool.zone, start + now, spec.nodes) - start if spot else math.inf
        taken = max(now, lost - model.notice_seconds) if strategy.saves_on_notice else lost
        finish = attempt.finishes_at()
        ended = min(finish, taken, horizon)
        outcome, why = None, ""
        review_at = now
        while review_at < ended:  # the policy's reviews, until the attempt ends on its own
            verdict = strategy.review(spec, status, at(review_at))
            if isinstance(verdict, policy.Keep):
                if verdict.until is None or (verdict.until - EPOCH).total_seconds() >= ended:
                    break
                review_at = max((verdict.until - EPOCH).total_seconds(), review_at + 1.0)
                continue
            if verdict.to is not None:  # a move: the new host first, as the workflow does
                status, moved_to = _provision(verdict.to, verdict.reason, status, world, model, start, review_at,
                                              spec.nodes)
                if moved_to.outcome == AttemptOutcome.REFUSED:
                    moved_to, review_at = None, review_at + model.refusal_seconds
                    continue
            outcome, ended, why = AttemptOutcome.VACATED, review_at, verdict.reason
        if outcome is None:
            outcome = (AttemptOutcome.COMPLETED if ended == finish
                       else AttemptOutcome.RECLAIMED if ended == taken else None)
        saved_at_notice = strategy.saves_on_notice and model.checkpoint_seconds <= model.notice_seconds
        if outcome == AttemptOutcome.COMPLETED:
            kept, released = model.work_seconds, ended
            finished = ended
        elif outcome in (AttemptOutcome.RECLAIMED, AttemptOutcome.VACATED):
            kept = attempt.progress(ended) if saved_at_notice else attempt.stored(ended)
            released = ended + model.checkpoint_seconds if saved_at_notice else ended
            if outcome == AttemptOutcome.RECLAIMED:
                why = "reclaim notice" if strategy.saves_on_notice else "reclaimed"
        else:  # the horizon: the run is cut short here
            kept, released = attempt.progress(ended), ended
            outcome, why = AttemptOutcome.CANCELLED, "the simulation's horizon"
        trained = max(0.0, ended - attempt.train_from)  # the agent's measure: the changeover left out
        noticed = "saved" if outcome == AttemptOutcome.RECLAIMED and saved_at_notice else None
        result = AttemptResult(outcome=outcome, reason=why, start_step=record.start_step, emergency_save=noticed,
                               end_step=int(attempt.progress(ended)), durable_step=int(kept),
                               trained_steps=int(attempt.progress(ended)) - record.start_step or None,
                               trained_seconds=trained or None)
        status = accounting.close_attempt(status, record.attempt, result, at(released))
        if not spot:
            on_demand_hours += (released - now) / 3600
        now = ended if moved_to is not None else released
    if finished is not None:
        status.state = RunState.SUCCEEDED
    finished_hours = finished / 3600 if finished is not None else None
    result = RunResult(finished_hours, status.cost_usd, status.reclaims, on_demand_hours,
                       reason or ("finished" if finished is not None else "horizon reached"))
    return result, status


# ---------------------------------------------------------------- comparison


@dataclass
class Summary:
    policy: str
    deadline_h: float
    runs: int
    attainment: float
    mean_completion_h: float | None
    p95_completion_h: float | None  # None: more than 5% of runs never finished
    cost_vs_ondemand: float
    mean_cost: float  # per run, in the model's currency (USD at `Model.on_demand_price` an hour)
    mean_reclaims: float
    horizon_h: float  # a run not finished by then never finished
    results: list[RunResult] = field(repr=False, default_factory=list)

    def as_dict(self) -> dict:
        return {"policy": self.policy, "deadline_h": self.deadline_h, "attainment": round(self.attainment, 4),
                "cost_vs_ondemand": round(self.cost_vs_ondemand, 4), "mean_cost_usd": round(self.mean_cost, 2),
                "p95_completion_h": None if self.p95_completion_h is None else round(self.p95_completion_h, 2),
                "mean_completion_h": None if self.mean_completion_h is None else round(self.mean_completion_h, 2),
                "mean_reclaims": round(self.mean_reclaims, 2), "runs": self.runs}


def start_offsets(world: World, count: int) -> list[float]:
    """`count` start times spread evenly over the traces, each at its own point within a tick.

    A trace changes only at its tick boundaries. Were every start on one, a policy that asks once a tick from its
    start (Uniform Progress) would ask at the very moment each change happens, which no real policy can: real
    capacity comes and goes at any second. The phase within the tick runs through the golden ratio's multiples, so
    the starts cover it evenly whatever their number."""
    return [world.seconds * i / count + (i * GOLDEN_FRACTION) % 1.0 * world.tick_seconds for i in range(count)]


def compare(strategies: dict[str, StrategyFactory], traces: list[Trace], model: Model, starts: int) -> list[Summary]:
    """Every strategy from the same start offsets; each factory builds a fresh strategy per run."""
    world = World(traces)
    summaries = []
    for name, make in strategies.items():
        results = []
        for index, start in enumerate(start_offsets(world, starts)):
            strategy = make(world, model, start, index)
            results.append(simulate_run(strategy, world, model, start))
        summaries.append(summarize(name, model, results))
    return summaries


def summarize(name: str, model: Model, results: list[RunResult]) -> Summary:
    completions = sorted(r.finished_hours if r.finished_hours is not None else math.inf for r in results)
    finite = [c for c in completions if c != math.inf]
    p95 = completions[min(len(completions) - 1, math.ceil(0.95 * len(completions)) - 1)]
    return Summary(
        policy=name, deadline_h=model.deadline_hours, runs=len(results),
        attainment=sum(c <= model.deadline_hours for c in completions) / len(results),
        mean_completion_h=sum(finite) / len(finite) if finite else None,
        p95_completion_h=None if p95 == math.inf else p95,
        cost_vs_ondemand=sum(r.cost for r in results) / len(results) / model.on_demand_cost,
        mean_cost=sum(r.cost for r in results) / len(results),
        mean_reclaims=sum(r.reclaims for r in results) / len(results),
        horizon_h=model.horizon_factor * model.deadline_hours,
        results=results,
    )


def format_table(summaries: list[Summary]) -> str:
    """>N h: more than 5% of the runs (p95), or all of them (mean), had not finished by the horizon."""
    def hours_text(value: float | None, summary: Summary) -> str:
        return f">{summary.horizon_h:.0f}h" if value is None else f"{value:.1f}h"

    header = ("policy", "deadline", "mean completion", "p95 completion", "attainment", "cost vs on-demand",
              "mean cost", "reclaims")
    rows = [(s.policy, f"{s.deadline_h:g}h", hours_text(s.mean_completion_h, s), hours_text(s.p95_completion_h, s),
             f"{s.attainment:.1%}", f"{s.cost_vs_ondemand:.2%}", f"${s.mean_cost:,.2f}", f"{s.mean_reclaims:.1f}")
            for s in summaries]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if any(r.finished_hours is None for s in summaries for r in s.results):
        lines.append("Runs not finished by the horizon (3x the deadline) count in the cost for what they paid until "
                     "then, and not in the mean completion.")
    return "\n".join(lines)
