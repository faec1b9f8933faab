"""Hosts whose agent runs inside the test process: for a run with hundreds of attempts, where starting a `vl agent`
process per host (seconds each on a busy 2-core machine) would take many minutes.

Everything but the process boundary is real: each host is a Temporal worker on its own task queue serving the
real `run_attempt` (activities/host.py) with a real metadata-directory notice source; it starts the real script
as a subprocess and uploads real checkpoints. Its pool is in a capacity crunch: every host gets a reclaim notice
(AWS `spot/instance-action` shape, the run's notice period) the moment it starts, so the agent forwards it before
the script's first step. Release kills the host and its scripts. Registered as provider `inproc` for one test
(`monkeypatch.setitem(PROVIDERS, ...)`); the workflow and the control activities cannot tell it from another.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from datetime import timedelta
from pathlib import Path

from temporalio.client import Client
from temporalio.worker import Worker

from activities.host import HostAgentActivities
from activities.providers.local import MetadataDirNoticeSource
from tests.faults.conftest import scripts_alive, write_instance_action
from vaultlayer.models import Host, HostDescription, HostState, ProvisionInput, ProvisionResult

NAME = "inproc"


class InProcessHosts:
    """The hosts alive now, each a worker task on the test's event loop."""

    def __init__(self, client: Client, loop: asyncio.AbstractEventLoop, root: Path) -> None:
        self.client, self.loop, self.root = client, loop, root
        self.alive: dict[str, tuple[Worker, asyncio.Task]] = {}
        self.started = 0

    async def start(self, run_id: str, host_id: str, task_queue: str, notice_seconds: float) -> Path:
        directory = self.root / run_id / host_id
        write_instance_action(directory / "metadata", notice_seconds)
        activities = HostAgentActivities(host_id=host_id, host_dir=directory, run_id=run_id, task_queue=task_queue,
                                         notices=MetadataDirNoticeSource(directory / "metadata"))
        worker = Worker(self.client, task_queue=task_queue, activities=[activities.run_attempt],
                        max_concurrent_activities=1, graceful_shutdown_timeout=timedelta(0),
                        max_heartbeat_throttle_interval=timedelta(seconds=2),
                        default_heartbeat_throttle_interval=timedelta(seconds=2))
        self.alive[task_queue] = (worker, asyncio.create_task(worker.run()))
        self.started += 1
        return directory

    async def kill(self, task_queue: str) -> None:
        """The host is gone: its agent stops at once and its scripts are SIGKILLed, as with a whole machine."""
        if (entry := self.alive.pop(task_queue, None)) is None:
            return
        worker, running = entry
        await worker.shutdown()
        with contextlib.suppress(Exception):
            await running
        kill_scripts_of(self.root / task_queue_dir(task_queue))

    def call(self, coroutine):
        """Run on the test's loop from a control activity's thread."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()


def task_queue_dir(task_queue: str) -> Path:
    run_id, host_id = task_queue.removeprefix(f"vl-{NAME}-").rsplit("-h-", 1)
    return Path(run_id) / f"h-{host_id}"


def kill_scripts_of(directory: Path) -> None:
    for pid in scripts_alive(directory):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class InProcessProvider:
    """The provider interface over `InProcessHosts`; `hosts` is set by the test that registers it."""

    name = NAME
    hosts: InProcessHosts | None = None

    def __init__(self, vl_home: Path, temporal_env: dict[str, str]) -> None:
        assert self.hosts is not None, "register the hosts first (tests/faults/test_many_reclaims.py)"

    def provision(self, request: ProvisionInput) -> ProvisionResult:
        host_id = f"h-{request.placement.attempt}"
        task_queue = f"vl-{NAME}-{request.run_id}-{host_id}"
        if task_queue not in self.hosts.alive:
            self.hosts.call(self.hosts.start(request.run_id, host_id, task_queue, request.notice_seconds))
        directory = self.hosts.root / task_queue_dir(task_queue)
        return ProvisionResult(host=Host(host_id=host_id, provider=NAME, pool=request.placement.pool,
                                         task_queue=task_queue, handle={"dir": str(directory)}, price_per_hour=0.0))

    def release(self, host: Host) -> None:
        self.hosts.call(self.hosts.kill(host.task_queue))

    def describe(self, host: Host) -> HostDescription:
        if host.task_queue in self.hosts.alive:
            return HostDescription(state=HostState.RUNNING, reason="worker running")
        return HostDescription(state=HostState.GONE, reason="worker stopped")

    def reap(self, run_id: str) -> list[str]:
        mine = [queue for queue in self.hosts.alive if queue.startswith(f"vl-{NAME}-{run_id}-")]
        for queue in mine:
            self.hosts.call(self.hosts.kill(queue))
        return mine

    def live_runs(self) -> set[str]:
        return {str(task_queue_dir(queue).parent) for queue in self.hosts.alive}
