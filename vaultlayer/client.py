"""The Python client: what the CLI is built on and what a notebook imports.

It starts `TrainingRun` by its registered name with the shared models, so it needs no workflow code.
Connection settings come from Temporal's environment configuration (TEMPORAL_ADDRESS,
TEMPORAL_NAMESPACE, TEMPORAL_API_KEY, TLS, profiles); every client is made by `connect`, which sets
the pydantic data converter, with payload encryption when a key is configured (vaultlayer/codec.py).
"""

from __future__ import annotations

import asyncio

import os
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from pydantic import ValidationError
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle, WorkflowQueryFailedError
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.envconfig import ClientConfig
from temporalio.service import RPCError

from vaultlayer.codec import data_converter
from vaultlayer.models import AttemptProgress, ReclaimAck, ReclaimRequest, RunInput, RunSpec, RunState, RunStatus
from vaultlayer.secrets import hand_over

WORKFLOW_NAME = "TrainingRun"
DEFAULT_TASK_QUEUE = "vaultlayer"

# The Python SDK's code for a workflow thread that did not yield within its fixed 2 s. A query that a worker
# starved of CPU answers too late fails with it, although the run and its worker are sound: ask again.
_WORKER_STALLED = "TMPRL1101"
QUERY_STALL_RETRIES = 3


def task_queue() -> str:
    return os.environ.get("VL_TASK_QUEUE", DEFAULT_TASK_QUEUE)


def configured_address() -> str | None:
    """The cluster the user configured (env or Temporal config profile), or None for the embedded one."""
    return ClientConfig.load_client_connect_config().get("target_host")


def connect_config(address: str | None = None, namespace: str | None = None,
                   env: Mapping[str, str] | None = None) -> dict:
    """The `Client.connect` arguments: target, namespace, API key, TLS (mTLS certificates) and gRPC metadata
    from Temporal's environment configuration (TEMPORAL_* variables, TOML profiles), and the data converter.
    `env`: variables to use instead of this process's environment."""
    config = dict(ClientConfig.load_client_connect_config(override_env_vars=env))
    if address:
        config["target_host"] = address
    if namespace:
        config["namespace"] = namespace
    config.setdefault("target_host", "localhost:7233")
    return {**config, "data_converter": data_converter(env)}


# A server that has just opened its port answers "Frontend is not healthy yet" for a moment.
_STARTING_SERVER_WAIT_SECONDS = 30.0


async def connect(address: str | None = None, namespace: str | None = None,
                  env: Mapping[str, str] | None = None) -> Client:
    """A client for the configured cluster; waits out a server that is still starting (the embedded one `vl`
    just started, a worker started with it), and fails at once for anything else, such as a refused port."""
    config = connect_config(address, namespace, env)
    deadline = asyncio.get_running_loop().time() + _STARTING_SERVER_WAIT_SECONDS
    while True:
        try:
            return await Client.connect(**config)
        except RuntimeError as err:
            if "not healthy yet" not in str(err) or asyncio.get_running_loop().time() > deadline:
                raise
        await asyncio.sleep(0.2)


async def submit(client: Client, spec: RunSpec, queue: str | None = None,
                 environ: Mapping[str, str] | None = None) -> WorkflowHandle:
    """Start the run. On the local provider its `env:` secrets are read from `environ` (this process's
    environment by default) and handed to its hosts outside Temporal (vaultlayer/secrets.py `hand_over`)."""
    handed = hand_over(spec.run_id, spec.env_secrets, {pool.provider for pool in spec.pools},
                       os.environ if environ is None else environ)
    try:
        return await client.start_workflow(
            WORKFLOW_NAME,
            RunInput(spec=spec),
            id=spec.run_id,
            task_queue=queue or task_queue(),
            static_summary=f"vl run: `{' '.join(spec.command)[:200]}`",  # markdown: code keeps `--flags` intact
        )
    except WorkflowAlreadyStartedError:
        raise  # the id is another run's: the file is that run's
    except BaseException:
        if handed is not None:  # nothing started: nothing will read it
            handed.unlink(missing_ok=True)
        raise


_CLOSED_STATES = {
    WorkflowExecutionStatus.COMPLETED: RunState.SUCCEEDED,
    WorkflowExecutionStatus.FAILED: RunState.FAILED,
    WorkflowExecutionStatus.CANCELED: RunState.CANCELLED,
    WorkflowExecutionStatus.TERMINATED: RunState.CANCELLED,
    WorkflowExecutionStatus.TIMED_OUT: RunState.FAILED,
}


async def query(handle: WorkflowHandle, name: str, result_type: type, rpc_timeout: timedelta | None = None):
    """`handle.query`, asked again (a few times) when the worker answered late because it was starved of CPU.

    Any other failure is the caller's: a query that no worker answers is an RPCError as before.
    """
    for attempt in range(QUERY_STALL_RETRIES + 1):
        try:
            return await handle.query(name, result_type=result_type, rpc_timeout=rpc_timeout)
        except WorkflowQueryFailedError as failure:
            if _WORKER_STALLED not in str(failure) or attempt == QUERY_STALL_RETRIES:
                raise
            await asyncio.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


async def status(client: Client, run_id: str, query_timeout: float = 10.0) -> RunStatus:
    """The run's state, with the live step and durable step read from the attempt's heartbeats.

    The state comes from a query, which needs a worker for the run's task queue; without one the query
    gives up after `query_timeout` and the run's state is taken from the server's own record.
    """
    handle = client.get_workflow_handle(run_id)
    description = await handle.describe()
    try:
        current = await query(handle, "status", RunStatus, rpc_timeout=timedelta(seconds=query_timeout))
    except RPCError:
        current = None
    if current is None:
        current = RunStatus(run_id=run_id, started_at=description.start_time,
                            state=_CLOSED_STATES.get(description.status, RunState.RUNNING))
    closed = _CLOSED_STATES.get(description.status)
    if closed is not None and not current.state.finished:
        current.state = closed  # e.g. terminated from the Temporal UI
    for pending in description.raw_description.pending_activities:
        if pending.activity_type.name != "run_attempt" or not pending.heartbeat_details.payloads:
            continue
        try:
            [progress] = await client.data_converter.decode(pending.heartbeat_details.payloads, [AttemptProgress])
        except ValidationError:  # a host that sends malformed progress shows none, it does not break `vl status`
            continue
        if progress.node_rank != 0:  # a gang's other hosts store parts; node 0 commits, and speaks for the gang
            continue
        current.step = progress.step
        current.checkpoint_interval = progress.checkpoint_interval
        current.waiting_on = progress.waiting_on
        if progress.durable_step is not None:
            current.durable_step = max(current.durable_step or 0, progress.durable_step)
    return current


async def spec(client: Client, run_id: str) -> RunSpec:
    """What the run was submitted with (its storage URL, command, limits)."""
    return await query(client.get_workflow_handle(run_id), "spec", RunSpec)


async def list_runs(client: Client, limit: int = 100) -> list[RunStatus]:
    """Runs, newest first; one entry per run however often it continued as new."""
    latest = {}
    async for execution in client.list_workflows(f'WorkflowType = "{WORKFLOW_NAME}"', limit=limit * 4):
        latest.setdefault(execution.id, execution)
        if len(latest) >= limit:
            break

    async def one(execution) -> RunStatus:
        try:
            return await status(client, execution.id, query_timeout=3.0)
        except RPCError:
            return RunStatus(run_id=execution.id, started_at=execution.start_time,
                             state=_CLOSED_STATES.get(execution.status, RunState.RUNNING))

    runs = await asyncio.gather(*(one(execution) for execution in latest.values()))
    oldest = datetime.min.replace(tzinfo=UTC)
    return sorted(runs, key=lambda s: s.started_at or oldest, reverse=True)


async def cancel(client: Client, run_id: str) -> None:
    await client.get_workflow_handle(run_id).cancel()


async def reclaim(client: Client, run_id: str, with_notice: bool = True, node: int = 0) -> ReclaimAck:
    handle = client.get_workflow_handle(run_id)
    return await handle.execute_update("reclaim", ReclaimRequest(with_notice=with_notice, node=node),
                                       result_type=ReclaimAck)
