"""How fast the run trains on each of its pools: pure, like the policy that ranks pools by it.

A pool's speed is its prior (`Pool.speed`: the GPU class's throughput relative to one V100, or the user's),
turned into steps per second by the run's own measurements, and replaced by what the run measured on the pool
itself as that adds up:

- measured: the steps and seconds the agents saw on the pool's attempts, changeover left out
  (`AttemptRecord.trained_steps/_seconds`); an attempt recorded without them counts from its host's handover;
- unit: steps per second per unit of prior, over every measured pool; before any measurement, the work
  estimate (`total_steps` in `work_seconds`) taken on the first pool of the spec;
- a pool's steps per second: its measured steps plus `RunSpec.speed_prior_seconds` (10 min) of the unit's
  guess, over its measured seconds plus those, so one short attempt does not swing the ranking and ten
  minutes do.

Pools of unknown prior (no GPU class in the table, no `speed`) are taken as fast as the first pool with a
prior, so a run of such pools only ever ranks by what it measures.
"""

from __future__ import annotations

from dataclasses import dataclass

from vaultlayer.models import AttemptRecord, Pool, RunSpec, RunStatus

def sample(record: AttemptRecord) -> tuple[float, float] | None:
    """(steps, seconds) an ended attempt trained, or None when it made no measurable progress."""
    if record.trained_steps and record.trained_seconds:
        return float(record.trained_steps), record.trained_seconds
    if record.running_at and record.ended_at and record.end_step is not None and record.end_step > record.start_step:
        seconds = (record.ended_at - record.running_at).total_seconds()
        return (float(record.end_step - record.start_step), seconds) if seconds > 0 else None
    return None


@dataclass(frozen=True)
class Speeds:
    priors: dict[str, float]  # pool key -> prior speed (relative to one V100)
    measured: dict[str, tuple[float, float]]  # pool key -> (steps, seconds) measured there
    unit: float | None  # steps per second per unit of prior; None: no measurement and no work estimate
    prior_seconds: float  # RunSpec.speed_prior_seconds

    def relative(self, pool: Pool) -> float:
        """The pool's speed for ranking: steps per second once the run has a scale, else its prior."""
        rate = self.steps_per_second(pool)
        return rate if rate is not None else self.priors[pool.key]

    def steps_per_second(self, pool: Pool) -> float | None:
        steps, seconds = self.measured.get(pool.key, (0.0, 0.0))
        if self.unit is None:
            return steps / seconds if seconds > 0 else None
        guess = self.unit * self.priors[pool.key]
        if seconds + self.prior_seconds <= 0:
            return guess
        return (steps + guess * self.prior_seconds) / (seconds + self.prior_seconds)

    def measured_steps_per_second(self, pool: Pool) -> float | None:
        steps, seconds = self.measured.get(pool.key, (0.0, 0.0))
        return steps / seconds if seconds > 0 else None


def speeds(spec: RunSpec, status: RunStatus) -> Speeds:
    known = next((p.speed for p in spec.pools if p.speed), 1.0)
    priors = {pool.key: pool.speed or known for pool in spec.pools}
    measured: dict[str, tuple[float, float]] = {}
    for record in status.attempts:
        found = sample(record) if record.pool in priors else None
        if found is not None:
            steps, seconds = measured.get(record.pool, (0.0, 0.0))
            measured[record.pool] = (steps + found[0], seconds + found[1])
    unit = None
    weighted = sum(seconds * priors[key] for key, (_, seconds) in measured.items())
    if weighted > 0:
        unit = sum(steps for steps, _ in measured.values()) / weighted
    elif spec.total_steps and spec.work_seconds and spec.pools:
        unit = spec.total_steps / spec.work_seconds / priors[spec.pools[0].key]
    return Speeds(priors, measured, unit, spec.speed_prior_seconds)
