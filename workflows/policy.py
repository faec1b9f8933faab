"""Placement policy: pure and deterministic (no I/O, no clock but the one passed in, no temporalio).

Given the run spec and its history, return the next placement or a stop with a reason. Reclaims,
host faults and script failures each have their own budget, so an expected reclaim never uses up the
retries meant for errors. A pool that just reclaimed or refused a host is skipped while another pool
is available: over 90% of spot reclaims hit the same type and zone again within minutes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from vaultlayer.models import AttemptOutcome, Placement, Pool, RunSpec, RunState, RunStatus

# Back off when every pool refused capacity, so a shortage is not hammered.
REFUSAL_BACKOFF_SECONDS = (5.0, 15.0, 30.0, 60.0)


@dataclass(frozen=True)
class Place:
    placement: Placement
    delay_seconds: float = 0.0
    reason: str = ""


@dataclass(frozen=True)
class Stop:
    state: RunState
    reason: str
    exit_code: int | None = None


def next_placement(spec: RunSpec, status: RunStatus, now: datetime) -> Place | Stop:
    limits = spec.limits
    attempts = status.attempts
    last = attempts[-1] if attempts else None

    if last is not None and last.outcome == AttemptOutcome.COMPLETED:
        return Stop(RunState.SUCCEEDED, "the script finished", exit_code=0)
    if last is not None and last.outcome == AttemptOutcome.FAILED:
        if status.script_failures > limits.script_retries:
            return Stop(
                RunState.FAILED,
                f"the script exited with code {last.exit_code} "
                f"(script retries: {limits.script_retries}; raise limits.script_retries to retry)",
                exit_code=last.exit_code,
            )
    if status.reclaims > limits.max_reclaims:
        return Stop(RunState.FAILED, f"limit max_reclaims={limits.max_reclaims} reached")
    if status.host_faults > limits.max_host_faults:
        return Stop(RunState.FAILED, f"limit max_host_faults={limits.max_host_faults} reached "
                                     f"(last: {last.reason if last else ''})")
    if limits.max_attempts is not None and len(attempts) >= limits.max_attempts:
        return Stop(RunState.FAILED, f"limit max_attempts={limits.max_attempts} reached")

    pool, why = choose_pool(spec.pools, status)
    refusals = trailing_refusals(status)
    delay = 0.0
    if refusals >= len(spec.pools):
        delay = REFUSAL_BACKOFF_SECONDS[min(refusals // len(spec.pools), len(REFUSAL_BACKOFF_SECONDS)) - 1]
    placement = Placement(pool=pool, attempt=len(attempts) + 1, excluded_hosts=list(status.excluded_hosts))
    return Place(placement, delay_seconds=delay, reason=why)


def trailing_refusals(status: RunStatus) -> int:
    count = 0
    for record in reversed(status.attempts):
        if record.outcome != AttemptOutcome.REFUSED:
            break
        count += 1
    return count


def choose_pool(pools: list[Pool], status: RunStatus) -> tuple[Pool, str]:
    """The first pool in preference order that did not just take a host back or refuse one."""
    last = status.attempts[-1] if status.attempts else None
    unhealthy = {AttemptOutcome.RECLAIMED, AttemptOutcome.REFUSED, AttemptOutcome.HOST_FAULT}
    if last is None or last.outcome not in unhealthy or len(pools) == 1:
        return pools[0], "preferred pool"
    for pool in pools:
        if pool.key != last.pool:
            return pool, f"pool {last.pool} just {last.outcome.value}; moving on"
    return pools[0], "no other pool"
