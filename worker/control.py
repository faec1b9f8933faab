"""The control-plane worker: the TrainingRun workflow plus the control activities."""

from __future__ import annotations

import asyncio
import importlib
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import structlog
from temporalio.client import Client
from temporalio.worker import PollerBehaviorAutoscaling, Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.control import ControlActivities
from vaultlayer import client as vl_client
from vaultlayer.logs import configure_logging
from vaultlayer.home import vl_home
from worker.reaper import sweep_at_start
from workflows.training_run import TrainingRun

log = structlog.get_logger(__name__)


def agent_connection_env(client: Client) -> dict[str, str]:
    """How hosts reach this cluster: the same settings the worker uses, never passed through history."""
    env = {"TEMPORAL_ADDRESS": client.service_client.config.target_host, "TEMPORAL_NAMESPACE": client.namespace}
    return env


# Imported once, not again for every workflow instance: `from workflows import policy` inside
# imports_passed_through() still re-imported (and, without .pyc files, recompiled) the policy in each new
# sandbox, which took most of the worker's time at 1,000 runs (docs/load.md). All are free of side effects.
SANDBOX_PASSTHROUGH = ("workflows.policy", "vaultlayer", "activities")


class _BlockingOnTolerantOfReentry(dict):
    """importlib's per-thread "blocked on" table, whose removal tolerates a key already removed."""

    def __delitem__(self, thread_id: int) -> None:
        self.pop(thread_id, None)


def tolerate_reentrant_imports() -> None:
    """Python 3.11 and older: an import run by a finalizer while the same thread acquires a module lock (the GC
    runs a `__del__` that imports, as ResourceWarnings do) removes the outer acquire's entry from importlib's
    `_blocking_on` table, and the outer one then fails with KeyError(<thread id>) (CPython gh-91351, fixed in
    3.12). Every sandboxed workflow imports its modules afresh, so this struck the worker at random: once in a
    test run, as "Failed validating workflow TrainingRun". Only deadlock detection reads the table."""
    if sys.version_info >= (3, 12):
        return
    bootstrap = importlib.import_module("importlib._bootstrap")
    if not isinstance(bootstrap._blocking_on, _BlockingOnTolerantOfReentry):
        bootstrap._blocking_on = _BlockingOnTolerantOfReentry(bootstrap._blocking_on)


def create_worker(client: Client, task_queue: str | None = None, home: Path | None = None) -> Worker:
    tolerate_reentrant_imports()
    activities = ControlActivities(vl_home=home or vl_home(), temporal_env=agent_connection_env(client))
    return Worker(
        client,
        task_queue=task_queue or vl_client.task_queue(),
        workflows=[TrainingRun],
        workflow_runner=SandboxedWorkflowRunner(restrictions=SandboxRestrictions.default.with_passthrough_modules(
            *SANDBOX_PASSTHROUGH)),
        activities=[
            activities.provision,
            activities.release,
            activities.describe_host,
            activities.verify_checkpoint,
            activities.prune_checkpoints,
            activities.reap_run,
            activities.inject_reclaim,
            activities.quote_prices,
        ],
        activity_executor=ThreadPoolExecutor(max_workers=32),
        # The default pollers (5, only one of them for new workflow tasks) cap a worker at a few tasks a
        # second once each poll round trip is slow: 1,000 runs sat in a backlog (docs/load.md). The server's
        # hints scale the polls to the backlog instead.
        workflow_task_poller_behavior=PollerBehaviorAutoscaling(),
        activity_task_poller_behavior=PollerBehaviorAutoscaling(),
        graceful_shutdown_timeout=timedelta(seconds=5),
    )


async def serve() -> None:
    configure_logging()
    client = await vl_client.connect()
    worker = create_worker(client)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("control-plane worker started", task_queue=vl_client.task_queue(), pid=os.getpid())
    async with worker:
        sweeping = asyncio.create_task(sweep_at_start(client, vl_home()))
        await stop.wait()
        sweeping.cancel()
    log.info("control-plane worker stopped")


def main() -> None:
    asyncio.run(serve())


if __name__ == "__main__":
    main()
