"""The host agent: a Temporal worker on the host's own task queue that serves `run_attempt` (and a gang's roll call).

One agent per host; it runs one attempt at a time, and only attempts of the run and host it was started
for (activities/host.py refuses the rest). The provider started it with the cluster's connection
settings in its environment, or (cloud hosts) with a reference to where it reads them with the host's
role; the provider registry answers both that and where the host learns of reclaims.
"""

from __future__ import annotations

import asyncio
import os
import signal
from datetime import timedelta
from pathlib import Path

import structlog
from temporalio.worker import Worker

from activities import providers
from activities.host import HostAgentActivities
from vaultlayer import client as vl_client
from vaultlayer import failpoints
from vaultlayer.logs import configure_logging

log = structlog.get_logger(__name__)


async def serve(task_queue: str, host_id: str, host_dir: Path, run_id: str) -> None:
    configure_logging()
    structlog.contextvars.bind_contextvars(host=host_id, run_id=run_id)
    settings = await asyncio.to_thread(providers.temporal_settings)
    client = await vl_client.connect(env=settings)
    activities = HostAgentActivities(host_id=host_id, host_dir=host_dir, notices=providers.notice_source(),
                                     run_id=run_id, task_queue=task_queue)
    worker = Worker(
        client,
        task_queue=task_queue,
        activities=[activities.agent_ready, activities.run_attempt],
        max_concurrent_activities=1,
        # Heartbeats carry the live step to `vl run`; the SDK would otherwise send them only every
        # 0.8 x heartbeat timeout. Every 2 s keeps the view live at one small RPC per host.
        max_heartbeat_throttle_interval=timedelta(seconds=2),
        default_heartbeat_throttle_interval=timedelta(seconds=2),
        graceful_shutdown_timeout=timedelta(seconds=2),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("host agent started", task_queue=task_queue, pid=os.getpid())
    await failpoints.reach(failpoints.before_poll(host_id))
    async with worker:
        await stop.wait()


def main(task_queue: str, host_id: str, host_dir: Path, run_id: str) -> None:
    asyncio.run(serve(task_queue, host_id, host_dir, run_id))
