"""What a run shows in the Temporal UI: custom search attributes, current details, and its link.

Search attributes make runs findable and sortable in the UI's list (`VlState = "running"`,
`VlGpu = "A10G"`); the current details are the run's one-line state on its own page. The server must
know the attributes before a workflow sets them (setting an unknown one fails the workflow task), so
`vl` registers them, and a run sets them only when its spec says the server has them.

VlStep is the newest step the control plane knows is safe: the step an attempt resumed from when it
starts, its durable step when it ends, the last step when the run finishes. The live step is in the
attempt's heartbeats (`vl status`, `vl run`), which the workflow does not see.

The attempt shown (in the details and VlAttempt) is the one in progress, `RunStatus.current_attempt`,
else the one that ended last: after a refused move, the attempt that runs on, not the refused record.
"""

from __future__ import annotations

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest, ListSearchAttributesRequest
from temporalio.client import Client
from temporalio.common import SearchAttributeKey, SearchAttributeUpdate
from temporalio.service import RPCError, RPCStatusCode

from vaultlayer.models import AttemptOutcome, AttemptRecord, RunSpec, RunStatus

VL_STATE = SearchAttributeKey.for_keyword("VlState")
VL_PROVIDER = SearchAttributeKey.for_keyword("VlProvider")
VL_GPU = SearchAttributeKey.for_keyword("VlGpu")
VL_STEP = SearchAttributeKey.for_int("VlStep")
VL_ATTEMPT = SearchAttributeKey.for_int("VlAttempt")
SEARCH_ATTRIBUTES = {VL_STATE.name: "Keyword", VL_PROVIDER.name: "Keyword", VL_GPU.name: "Keyword",
                     VL_STEP.name: "Int", VL_ATTEMPT.name: "Int"}
_INDEXED = {"Keyword": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD, "Int": IndexedValueType.INDEXED_VALUE_TYPE_INT}


def dev_server_args() -> list[str]:
    """`temporal server start-dev` flags that register the attributes when the server starts."""
    return [arg for name, kind in SEARCH_ATTRIBUTES.items() for arg in ("--search-attribute", f"{name}={kind}")]


def create_commands(namespace: str) -> list[str]:
    """The `temporal` commands that register the attributes on a cluster: one each, since the CLI (1.9)
    registers only the first of several `--name`s."""
    return [f"temporal operator search-attribute create --namespace {namespace} --name {name} --type {kind}"
            for name, kind in SEARCH_ATTRIBUTES.items()]


async def ensure_search_attributes(client: Client) -> str | None:
    """Register the attributes the namespace lacks. None when all are there; else why not, and the commands
    that register them (Temporal Cloud and locked-down clusters refuse the operator call)."""
    namespace = client.namespace
    try:
        listed = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=namespace))
        missing = {name: kind for name, kind in SEARCH_ATTRIBUTES.items() if name not in listed.custom_attributes}
        if missing:
            await client.operator_service.add_search_attributes(AddSearchAttributesRequest(
                namespace=namespace, search_attributes={name: _INDEXED[kind] for name, kind in missing.items()}))
    except RPCError as err:
        if err.status not in (RPCStatusCode.PERMISSION_DENIED, RPCStatusCode.UNIMPLEMENTED,
                              RPCStatusCode.UNAUTHENTICATED, RPCStatusCode.NOT_FOUND):
            raise
        return (f"cannot register the VaultLayer search attributes in namespace {namespace!r} ({err.message}); "
                "runs go on without them. To see runs' state and step in the Temporal UI, run once:\n  "
                + "\n  ".join(create_commands(namespace)))
    return None


def shown_attempt(status: RunStatus) -> AttemptRecord | None:
    """The attempt the UI names: the one in progress, else the one that ended last."""
    return status.current_attempt or status.last_ended_attempt


def search_attribute_updates(spec: RunSpec, status: RunStatus) -> list[SearchAttributeUpdate]:
    """The attributes for the run as it is now (the workflow upserts them on state changes)."""
    current = shown_attempt(status)
    pool = next((p for p in spec.pools if current and p.key == current.pool), spec.pools[0] if spec.pools else None)
    updates = [VL_STATE.value_set(status.state.value), VL_STEP.value_set(known_step(status)),
               VL_ATTEMPT.value_set(current.attempt if current else 0)]
    if pool is not None:
        updates += [VL_PROVIDER.value_set(pool.provider), VL_GPU.value_set(pool.gpu or "cpu")]
    return updates


def known_step(status: RunStatus) -> int:
    """VlStep: the newest step known safe (see the module docstring)."""
    current = shown_attempt(status)
    steps = [status.durable_step or 0]
    if current is not None:
        steps.append(current.start_step)
        if current.outcome == AttemptOutcome.COMPLETED and current.end_step is not None:
            steps.append(current.end_step)
    return max(steps)


def current_details(status: RunStatus) -> str:
    """The run's page in the UI (Temporal markdown): state, attempt, host, step, durable step, reclaims, cost."""
    current = shown_attempt(status)
    durable = status.durable_step if status.durable_step is not None else "none yet"
    lines = [f"**{status.state.value}** · step {known_step(status)} · durable step {durable}"]
    if current is not None:
        host = f" on host {current.host}" if current.host else ""
        lines.append(f"attempt {current.attempt}{host} ({current.pool})")
    lines.append(f"reclaims {status.reclaims} · steps lost {status.steps_lost} · cost ${status.cost_usd:.2f}")
    if status.stop_reason:
        lines.append(f"reason: {status.stop_reason}")
    if not status.state.finished:
        lines.append("step: the newest step known safe; the live step, and what the run waits on (storage that "
                     "cannot be written), are in the run_attempt heartbeat (Pending Activities) and in `vl status`")
    return "\n\n".join(lines)


def attempt_summary(record: AttemptRecord) -> str:
    """The label of the attempt's bar in the UI's timeline, on the page the run's link opens."""
    return f"attempt {record.attempt} on host {record.host} from step {record.start_step}"


def run_link(ui_url: str, namespace: str, run_id: str) -> str:
    return f"{ui_url.rstrip('/')}/namespaces/{namespace}/workflows/{run_id}"
