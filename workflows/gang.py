"""What a gang attempt (one attempt on N hosts) ended as, from how each host's part of it ended.

Pure: the workflow calls it once every host's `run_attempt` is over. The first host to end for a reason of its
own stops the others (they end `cancelled`, "stopped with its gang"), so the gang's outcome is the cause, not the
echo: a node that was reclaimed or lost explains the script errors its peers then hit in their collectives, a
broken host explains a crash, and the first script failure explains the ones after it. Checkpoints are node 0's
to commit, so the gang's durable step is the one node 0 reported.
"""

from __future__ import annotations

from vaultlayer.models import AttemptOutcome, AttemptResult, Host

# Which ending explains the others, most telling first.
_PRECEDENCE = (AttemptOutcome.RECLAIMED, AttemptOutcome.HOST_FAULT, AttemptOutcome.FAILED)


def first_ending_stops_the_gang(result: AttemptResult) -> bool:
    """Whether the others must be stopped once one host's part ended so: anything but success, since no rank of a
    collective job can go on without the others (a success waits for the others' own success)."""
    return result.outcome != AttemptOutcome.COMPLETED


def combine(hosts: list[Host], ended: list[tuple[int, AttemptResult]], start_step: int) -> AttemptResult:
    """The gang's result. `ended`: (node rank, that host's result) in the order they ended; every host is there."""
    by_rank = dict(ended)
    node_zero = by_rank.get(0)
    durable = {"durable_step": node_zero.durable_step if node_zero else None,
               "end_step": node_zero.end_step if node_zero and node_zero.end_step is not None
               else max((r.end_step for _, r in ended if r.end_step is not None), default=None),
               "start_step": start_step}
    if len(ended) == len(hosts) and all(r.outcome == AttemptOutcome.COMPLETED for _, r in ended):
        return node_zero.model_copy(update=durable)
    for outcome in _PRECEDENCE:
        cause = next(((rank, r) for rank, r in ended if r.outcome == outcome), None)
        if cause is not None:
            break
    else:  # every host was stopped (a cancel) or completed while another was stopped
        cause = next(((rank, r) for rank, r in ended if r.outcome != AttemptOutcome.COMPLETED), ended[0])
    rank, result = cause
    update = durable | {"reason": f"node {rank} ({hosts[rank].host_id}): {result.reason}".rstrip(": "),
                        "host_gone": False, "outputs": None}
    if result.outcome == AttemptOutcome.HOST_FAULT:
        update["faulty_host"] = hosts[rank].host_id
    return result.model_copy(update=update)
