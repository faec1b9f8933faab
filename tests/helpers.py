"""What the end-to-end and fault tests share to wait on events rather than on time: polling a condition with a
deadline, a free port, the script's progress, uploads settled, a frozen script, and the agent's failpoints
(vaultlayer/failpoints.py). No fixtures here; tests/conftest.py holds those. See docs/testing.md for the rule.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from activities.providers.local import free_port, group_members  # free_port: the local provider's, for tests too
from vaultlayer import checkpoint, failpoints, protocol
from vaultlayer import client as vl_client
from vaultlayer.models import RunStatus

# `vl` as a terminal starts it in the foreground: SIGINT at its default disposition. A runner started in the
# background by a non-interactive shell inherits SIGINT *ignored*, passes that on to its children, and Python
# then keeps ignoring it (it installs its KeyboardInterrupt handler only over the default), so a test's
# Ctrl-C would never land. The shim resets it, then execs `python -m cli.main ARGS`.
FOREGROUND_VL = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                                       "os.execv(sys.executable, [sys.executable, '-m', 'cli.main', *sys.argv[1:]])"]

POLL_SECONDS = 0.3  # each look may be a workflow query: a faster poll loads the control plane under test


def made_once(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """The file `make(path)` writes, made once per test session and shared by every xdist worker: the plain
    reference runs are whole torch processes (seconds of CPU each), and each worker used to make its own."""
    session_dir = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        session_dir = session_dir.parent  # each worker's basetemp is popen-gwN inside the session's
    place = session_dir / "references"
    place.mkdir(exist_ok=True)
    made = place / name
    with open(place / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second worker waits for the first one's file instead of making its own
        if not made.exists():
            partial = place / f"{name}.partial"
            make(partial)
            partial.rename(made)
    return made


async def wait_until(check: Callable[[], Awaitable[object]], timeout: float, what: str):
    """The first truthy value of `check()`. The timeout only bounds a broken run; nothing is asserted on it."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(POLL_SECONDS)


async def cancel_taken(handle) -> bool:
    """A workflow task ran after the run's cancel was recorded: the workflow has seen the cancel."""
    events = (await handle.fetch_history()).events
    cancelled_at = next((index for index, event in enumerate(events)
                         if event.HasField("workflow_execution_cancel_requested_event_attributes")), None)
    return cancelled_at is not None and any(event.HasField("workflow_task_completed_event_attributes")
                                            for event in events[cancelled_at:])


async def wait_for_progress(client, run_id: str, steps: int, timeout: float = 120, durable: int = 0,
                            attempt: int | None = None) -> RunStatus:
    """The run's status once its running attempt (the `attempt`-th, if given) has made `steps` steps past where
    it started and stored a checkpoint at or past `durable` steps, with its host known."""

    async def progressed():
        status = await vl_client.status(client, run_id)
        current = status.current_attempt
        if current is None or status.current_host is None or (attempt is not None and current.attempt != attempt):
            return None
        if (status.step or 0) - current.start_step >= steps and (status.durable_step or 0) >= durable:
            return status
        return None

    what = f"{steps} steps of attempt {attempt or 'running'}" + (f" and a checkpoint at {durable}" if durable else "")
    return await wait_until(progressed, timeout, what)


async def wait_for_uploads_settled(client, run_id: str, storage_url: str, staging: Path,
                                   timeout: float = 60) -> RunStatus:
    """Once the script is frozen: every save it committed is stored and reported (the newest stored step is the
    heartbeat's durable step, and nothing committed waits in the staging directory)."""

    async def settled():
        waiting = [entry for entry in staging.iterdir() if not protocol.is_being_written(entry.name)]
        listed = await asyncio.to_thread(checkpoint.list_checkpoints, storage_url, run_id)
        status = await vl_client.status(client, run_id)
        return status if not waiting and listed and status.durable_step == listed[0][1] else None

    return await wait_until(settled, timeout, "the uploads to settle")


def agent_events(vl_home: Path, run_id: str) -> dict[str, list[str]]:
    """What each local host's agent logged (its JSON lines' events, in order), by host id."""
    return {log.parent.name: [json.loads(line)["event"] for line in log.read_text(errors="replace").splitlines()
                              if line.startswith("{")]
            for log in sorted((vl_home / "hosts" / run_id).glob("*/agent.log"))}


def control_dir(vl_home: Path, run_id: str, host_id: str, attempt: int) -> Path:
    """Where a local host's agent and script exchange progress and notices (protocol.py)."""
    return vl_home / "hosts" / run_id / host_id / f"a{attempt}" / "control"


async def wait_for_script_step(control: Path, step: int, timeout: float = 120) -> int:
    """The script's own step (its progress file, read on the host) once it reached `step`: progress that needs
    neither Temporal nor the control plane, for while they are down."""

    async def reached():
        progress = protocol.read_progress(control)
        return progress.step if progress is not None and progress.step >= step else None

    return await wait_until(reached, timeout, f"the script to reach step {step}")


def script_pids(pgid: int) -> list[int]:
    """The processes of a local host's group other than its agent (the group leader): the script."""
    return [pid for pid, _ in group_members(pgid) if pid != pgid]


def freeze(pgid: int) -> list[int]:
    """Stop the script of a local host (SIGSTOP); its agent goes on. Returns the pids, for `thaw`."""
    pids = script_pids(pgid)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    return pids


def thaw(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


@dataclass(frozen=True)
class HeldScript:
    step: int  # the step its progress file shows, frozen
    pids: list[int]  # for `thaw`


async def hold_script(control: Path, step: int, timeout: float = 120) -> HeldScript:
    """Freeze a local host's script once it reached `step` (it may be a few steps past), so the test can act
    before it moves on or ends; `thaw(held.pids)` in a `finally` lets it go."""
    await wait_for_script_step(control, step, timeout)
    pids = freeze(json.loads((control.parent.parent / "host.json").read_text())["pgid"])
    progress = protocol.read_progress(control)
    return HeldScript(step=progress.step if progress is not None else step, pids=pids)


async def reclaim_after_checkpoint(client, vl_home: Path, run_id: str, durable: int, host_id: str = "h-1",
                                   attempt: int = 1, reclaims: int = 1) -> None:
    """Reclaim an attempt, with a notice, once a checkpoint at `durable` or later is stored and reported, however
    short its script: the script is frozen from a few steps past `durable` until the notice has reached it (the
    agent forwarded it), so the run cannot end first and the emergency save still comes. `reclaims` at once."""
    control = control_dir(vl_home, run_id, host_id, attempt)
    held = await hold_script(control, durable + 5)  # the save at `durable` is committed by then
    try:
        await wait_for_progress(client, run_id, steps=0, durable=durable, attempt=attempt)
        await asyncio.gather(*(vl_client.reclaim(client, run_id) for _ in range(reclaims)))

        async def notice_forwarded():
            return (control / protocol.NOTICE_FILE).exists()

        await wait_until(notice_forwarded, 60, "the notice to reach the script")
    finally:
        thaw(held.pids)


class Failpoints:
    """The test's side of vaultlayer/failpoints.py: arm a point, wait until an agent holds there, release it.
    Agents started after `install` (they inherit the environment) honour the points armed in `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def install(self, monkeypatch) -> Failpoints:
        monkeypatch.setenv(protocol.ENV_FAILPOINTS, str(self.directory))
        return self

    def arm(self, name: str) -> None:
        (self.directory / f"{name}{failpoints.HOLD}").touch()

    def reached(self, name: str) -> bool:
        return (self.directory / f"{name}{failpoints.REACHED}").exists()

    async def wait_reached(self, name: str, timeout: float = 120) -> None:
        async def held():
            return self.reached(name)

        await wait_until(held, timeout, f"an agent to reach failpoint {name}")

    def release(self, name: str) -> None:
        (self.directory / f"{name}{failpoints.RELEASE}").touch()


async def hold_second_restore(client, spec, queue: str, vl_home: Path, points: Failpoints, durable: int) -> str:
    """Submit the run, reclaim its first attempt once a checkpoint at `durable` is stored, and return once the
    second attempt's agent holds between "attempt accepted" and "restore begins": the point to release."""
    point = failpoints.before_restore(2)
    points.arm(point)
    await vl_client.submit(client, spec, queue=queue)
    await reclaim_after_checkpoint(client, vl_home, spec.run_id, durable=durable)
    await points.wait_reached(point, 90)
    return point
