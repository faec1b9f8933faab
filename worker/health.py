"""Container probe for `vl worker`: a worker process without a listening port has no other health signal.

`python -m worker.health` exits 0 when the cluster in the worker's own connection settings (Temporal's
environment configuration) answers and a worker on this host has polled the control-plane task queue
lately, else 1 with the reason on one line. The deploy/ manifests use it for readiness and liveness.
An idle worker re-polls about every minute; the server lists a stopped one for minutes, hence the age.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from datetime import UTC, datetime, timedelta

from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client

from vaultlayer import client as vl_client

RPC_TIMEOUT = timedelta(seconds=5)
MAX_POLL_AGE = timedelta(minutes=3)


async def problem(client: Client, task_queue: str, hostname: str, max_poll_age: timedelta = MAX_POLL_AGE) -> str | None:
    """None when healthy, else what is wrong. A worker's identity is `pid@hostname` (temporalio's default)."""
    if not await client.service_client.check_health(timeout=RPC_TIMEOUT):
        return f"Temporal at {client.service_client.config.target_host} is not serving"
    described = await client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(namespace=client.namespace, task_queue=TaskQueue(name=task_queue),
                                 task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW),
        timeout=RPC_TIMEOUT,
    )
    polled = [poller.last_access_time.ToDatetime(UTC) for poller in described.pollers
              if poller.identity.endswith(f"@{hostname}")]
    if not polled:
        return f"no worker on {hostname} polls task queue {task_queue!r} in namespace {client.namespace!r}"
    age = datetime.now(UTC) - max(polled)
    if age > max_poll_age:
        return f"the worker on {hostname} last polled task queue {task_queue!r} {age.total_seconds():.0f}s ago"
    return None


async def check(task_queue: str, timeout: float) -> str | None:
    async def run() -> str | None:
        return await problem(await vl_client.connect(), task_queue, socket.gethostname())

    try:
        return await asyncio.wait_for(run(), timeout)
    except TimeoutError:
        return f"no answer from Temporal within {timeout:g}s"
    except Exception as error:  # noqa: BLE001 - a probe reports any failure as unhealthy, on one line
        return f"{type(error).__name__}: {error}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.health", description=__doc__.splitlines()[0])
    parser.add_argument("--task-queue", default=vl_client.task_queue(), help="default: VL_TASK_QUEUE or vaultlayer")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds for the whole check")
    args = parser.parse_args(argv)
    reason = asyncio.run(check(args.task_queue, args.timeout))
    print(f"unhealthy: {reason}" if reason else "healthy", file=sys.stderr if reason else sys.stdout)
    return 1 if reason else 0


if __name__ == "__main__":
    code = main()
    # Skip the interpreter's finalization, where the Temporal client's Rust threads abort it now and then
    # (exit 134 after a check that passed: temporalio/sdk-python#300); cli/context.py exit_now does the same.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
