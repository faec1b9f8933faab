"""How often to checkpoint: pure functions, shared by the SDK (which measures the save cost) and the
workflow (which knows how often the pool takes hosts back).

Young/Daly: with a checkpoint that costs C seconds of training and failures every MTBF seconds on
average, the interval T = sqrt(2 * C * MTBF) minimises the expected time lost to saves plus the work
redone after a failure. Bounded by the user's minimum and maximum.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the SDK imports this module: keep pydantic out of a training process
    from vaultlayer.models import AttemptRecord, RunStatus

# Before a run has seen its pool, assume one reclaim per two hours: the middle of the published spot
# traces (0.1 to 1.4 reclaims per instance-hour). Weighted like two hours of observation, so a run's
# own experience takes over within a few hours.
PRIOR_HOURS = 2.0
PRIOR_RECLAIMS = 1.0
DEFAULT_MIN_SECONDS = 60.0
DEFAULT_MAX_SECONDS = 30 * 60.0
# Once hosts of a run were lost before their first save, saves come at this share of the shortest such
# life (never more often than MIN_EARLY_SECONDS): early enough to land on a host that lives as short.
EARLY_SAVE_SHARE = 0.5
MIN_EARLY_SECONDS = 1.0


def young_daly_seconds(save_cost_seconds: float, mtbf_seconds: float) -> float:
    return math.sqrt(2.0 * max(save_cost_seconds, 0.0) * max(mtbf_seconds, 0.0))


def choose_interval(
    save_cost_seconds: float | None,
    mtbf_seconds: float,
    min_seconds: float = DEFAULT_MIN_SECONDS,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    shortest_life_seconds: float | None = None,
    host_age_seconds: float = 0.0,
) -> tuple[float, str]:
    """The interval in seconds, and why, in words a person reads in `vl status`.

    `shortest_life_seconds` (`shortest_life_without_a_save`) brings saves forward while this host is young:
    the minimum bounds the steady state, not the saves that hosts of this run did not live to make. The
    steady state starts once the host has outlived that life by the minimum (the life is a lower bound:
    a host lost without a notice is found a heartbeat timeout late)."""
    if shortest_life_seconds is not None:
        early = max(EARLY_SAVE_SHARE * shortest_life_seconds, MIN_EARLY_SECONDS)
        if early < min_seconds and host_age_seconds < shortest_life_seconds + min_seconds:
            return early, (f"early saves every {early:.3g} s: a host of this run was lost "
                           f"{shortest_life_seconds:.3g} s in, before its first save")
    if save_cost_seconds is None:
        return min_seconds, f"first save at the minimum interval ({min_seconds:g} s) to measure its cost"
    ideal = young_daly_seconds(save_cost_seconds, mtbf_seconds)
    chosen = min(max(ideal, min_seconds), max_seconds)
    why = (f"Young/Daly sqrt(2 x {save_cost_seconds:.3g} s save x {mtbf_seconds / 3600:.2g} h MTBF) "
           f"= {ideal:.0f} s")
    if chosen != ideal:
        why += f", bounded to [{min_seconds:g}, {max_seconds:g}] s"
    return chosen, why


def estimate_mtbf_seconds(status: RunStatus, pool_key: str, now: datetime) -> float:
    """Mean time between reclaims in this pool, from this run's attempts there plus a prior."""
    hours, reclaims = PRIOR_HOURS, PRIOR_RECLAIMS
    for record in status.attempts:
        if record.pool != pool_key or record.host is None:
            continue
        ended = record.ended_at or now
        hours += max((ended - record.started_at).total_seconds(), 0.0) / 3600
        reclaims += record.outcome == "reclaimed"
    return hours / reclaims * 3600


def stored_a_checkpoint(attempts: list[AttemptRecord], index: int) -> bool:
    """Whether attempt `attempts[index]` left durable progress: it completed, its durable step passed its
    start, or the next attempt, placed once it had ended, resumed further (a host lost without a notice
    takes its freshest heartbeat, and so the durable step it reported last, with it)."""
    record = attempts[index]
    if record.outcome == "completed" or (record.durable_step or 0) > record.start_step:
        return True
    return index + 1 < len(attempts) and attempts[index + 1].start_step > record.start_step


def shortest_life_without_a_save(status: RunStatus, heartbeat_timeout_seconds: float) -> float | None:
    """Seconds the shortest-lived host of this run ran before it was lost without storing a checkpoint
    (reclaimed or faulty); None when none was. A host lost without a notice was found by its silence: it
    died a heartbeat timeout before the attempt ended."""
    lives = []
    for index, record in enumerate(status.attempts):
        if (record.host is None or record.ended_at is None or record.outcome not in ("reclaimed", "host-fault")
                or stored_a_checkpoint(status.attempts, index)):
            continue
        life = (record.ended_at - (record.running_at or record.started_at)).total_seconds()
        lives.append(life - (heartbeat_timeout_seconds if record.emergency_save is None else 0.0))
    return max(min(lives), 0.0) if lives else None
