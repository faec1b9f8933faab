"""What an attempt leaves in the run's status: pure (no I/O, no clock but the one passed in, no temporalio).

The workflow and the trace simulator account through these same functions, so a simulated run's
outcomes, costs, fences and counters are the real run's, and so is the pool health that
`workflows.policy` reads back from the closed records. Each returns a new `RunStatus` and leaves its
input alone; the closed record replaces the open one (the other records are shared, not copied).

- `close_attempt`: the attempt ended (or was refused): its outcome, cost, fence, and the run's totals.
- `charge_lost_steps`: the next attempt resumes: the steps the previous one computed beyond that are lost.
  This cannot be part of closing: the step resumed from is known only once the next attempt's checkpoint
  is verified, and it may be older than the durable step reported (a corrupt or fenced checkpoint).
- `bill`: a host released without closing its attempt (the run was cancelled) is paid for all the same.

An attempt of a gang run holds `nodes` hosts of one pool and its record carries one host's price: every
charge is that price times `nodes`.
"""

from __future__ import annotations

from datetime import datetime

from vaultlayer.models import AttemptOutcome, AttemptRecord, AttemptResult, FailureCause, Market, RunStatus

# Failures that are the host's, not the script's. A bug that shows on the GPU (device-side assert,
# illegal memory access, out of memory) stays a script error.
HOST_ERROR_SIGNATURES = (
    "uncorrectable ecc error",
    "no cuda-capable device is detected",
    "cuda driver version is insufficient",
    "found no nvidia driver",
    "couldn't communicate with the nvidia driver",
    "cuda-capable device(s) is/are busy or unavailable",
    "cuda driver initialization failed",
    "cuda unknown error",
    "cuda error: unknown error",
    "gpu has fallen off the bus",
)


def close_attempt(status: RunStatus, attempt: int, result: AttemptResult, now: datetime) -> RunStatus:
    """The status once attempt number `attempt` has ended at `now` as `result` says.

    The outcome is classified first (a script killed by its GPU is a host fault); a host it held is billed
    up to `now`; the run's durable step, its reclaim, host-fault and script-failure counts and its excluded
    hosts follow. The attempt is fenced at its durable step (-1 without one): nothing it publishes later can
    look newer. A host the provider confirmed gone can publish nothing more, so it is not fenced.
    """
    result = classify(result)
    index, record = next((i, r) for i, r in enumerate(status.attempts) if r.attempt == attempt)
    closed = record.model_copy(update={
        "outcome": result.outcome, "reason": result.reason, "refusal": result.refusal or record.refusal,
        "end_step": result.end_step, "durable_step": result.durable_step, "exit_code": result.exit_code,
        "ended_at": now, "log_tail": result.log_tail, "emergency_save": result.emergency_save,
        "cause": result.cause, "setup_seconds": result.setup_seconds, "setup_cache": result.setup_cache,
        "faulty_host": result.faulty_host, "trained_steps": result.trained_steps,
        "trained_seconds": result.trained_seconds,
    })
    update: dict = {}
    if record.running_at is not None:
        closed, (cost, on_demand_cost) = _billed(closed, now)
        update |= {"cost_usd": status.cost_usd + cost, "on_demand_cost_usd": status.on_demand_cost_usd + on_demand_cost}
    update["attempts"] = [*status.attempts[:index], closed, *status.attempts[index + 1:]]
    if result.durable_step is not None:
        update["durable_step"] = max(status.durable_step or 0, result.durable_step)
    if not result.host_gone:
        update["fences"] = {**status.fences,
                            attempt: result.durable_step if result.durable_step is not None else -1}
    if result.outputs is not None:
        update["outputs"] = result.outputs
    if result.outcome == AttemptOutcome.RECLAIMED:
        update["reclaims"] = status.reclaims + 1
    elif result.outcome == AttemptOutcome.HOST_FAULT:
        update["host_faults"] = status.host_faults + 1
        if faulty := result.faulty_host or record.host:  # a gang's: the host that failed, not node 0
            update["excluded_hosts"] = [*status.excluded_hosts, faulty]
    elif result.outcome == AttemptOutcome.FAILED and result.cause in (None, FailureCause.SCRIPT):
        # The script's own failures, which limits.script_retries bounds; a restore tried again is not one.
        update["script_failures"] = status.script_failures + 1
    return status.model_copy(update=update)


def charge(status: RunStatus, attempt: int, usd: float) -> RunStatus:
    """The status once attempt number `attempt` is charged `usd` more: the part of a gang a pool could give, held
    while the rest could not be had, is paid for though the attempt was refused."""
    index, record = next((i, r) for i, r in enumerate(status.attempts) if r.attempt == attempt)
    charged = record.model_copy(update={"cost_usd": (record.cost_usd or 0.0) + usd})
    return status.model_copy(update={"cost_usd": status.cost_usd + usd,
                                     "attempts": [*status.attempts[:index], charged, *status.attempts[index + 1:]]})


def charge_lost_steps(status: RunStatus, resume_step: int) -> RunStatus:
    """The status once the next attempt resumes from `resume_step`: the attempt that ended last without
    finishing lost the steps it computed beyond it."""
    index = next((i for i in reversed(range(len(status.attempts))) if status.attempts[i].end_step is not None), None)
    if index is None or status.attempts[index].outcome == AttemptOutcome.COMPLETED:
        return status
    previous = status.attempts[index]
    charged = previous.model_copy(update={"steps_lost": max(0, previous.end_step - resume_step)})
    attempts = [*status.attempts[:index], charged, *status.attempts[index + 1:]]
    return status.model_copy(update={"attempts": attempts, "steps_lost": sum(a.steps_lost for a in attempts)})


def bill(status: RunStatus, attempt: int, released_at: datetime) -> RunStatus:
    """The status once attempt number `attempt`'s host was released at `released_at`, the attempt left open."""
    index, record = next((i, r) for i, r in enumerate(status.attempts) if r.attempt == attempt)
    billed, (cost, on_demand_cost) = _billed(record, released_at)
    return status.model_copy(update={"attempts": [*status.attempts[:index], billed, *status.attempts[index + 1:]],
                                     "cost_usd": status.cost_usd + cost,
                                     "on_demand_cost_usd": status.on_demand_cost_usd + on_demand_cost})


def _billed(record: AttemptRecord, released_at: datetime) -> tuple[AttemptRecord, tuple[float, float]]:
    """The record charged for its hosts from hand-over to release, and the two charges.

    The on-demand figure is what the same host-hours cost on demand: the host's own price for an
    on-demand host, else the provider's (or the pool's) on-demand price; 0 when nobody knows it. Both
    are per host: a gang's attempt pays them for each of its `nodes` hosts.
    """
    held_hours = 0.0
    if record.running_at is not None:
        held_hours = max(0.0, (released_at - record.running_at).total_seconds()) / 3600
    on_demand_price = record.on_demand_price_per_hour
    if on_demand_price is None and record.pool.endswith(f"/{Market.ON_DEMAND.value}"):
        on_demand_price = record.price_per_hour
    host_hours = record.nodes * held_hours
    cost, on_demand_cost = (record.price_per_hour or 0.0) * host_hours, (on_demand_price or 0.0) * host_hours
    return record.model_copy(update={"cost_usd": cost, "on_demand_cost_usd": on_demand_cost}), (cost, on_demand_cost)


def hourly_cost(record: AttemptRecord) -> float:
    """What the attempt pays per hour while it holds its hosts: one host's price for each of them."""
    return (record.price_per_hour or 0.0) * record.nodes


def running_cost(record: AttemptRecord | None, now: datetime) -> float:
    """What the attempt's hosts have cost so far, while it runs."""
    if record is None or record.running_at is None:
        return 0.0
    return hourly_cost(record) * max(0.0, (now - record.running_at).total_seconds()) / 3600


def host_fault_in(log_tail: str) -> str | None:
    """The output line that shows a host fault (driver, ECC, lost GPU), if the script's output has one."""
    for line in reversed(log_tail.splitlines()):
        lowered = line.lower()
        if any(signature in lowered for signature in HOST_ERROR_SIGNATURES):
            return line.strip()
    return None


def classify(result: AttemptResult) -> AttemptResult:
    """A script that died of a GPU or driver fault failed because of its host: exclude the host, retry."""
    if result.outcome != AttemptOutcome.FAILED:
        return result
    line = host_fault_in(result.log_tail)
    if line is None:
        return result
    return result.model_copy(update={"outcome": AttemptOutcome.HOST_FAULT,
                                     "reason": f"GPU or driver fault on the host: {line[:200]}"})
