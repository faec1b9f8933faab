"""Faults of the control plane, mid-run: the control-plane worker SIGKILLed and restarted; the Temporal server
SIGKILLed and restarted on the same database.

Hosts stay up through either; the run must carry on (agents and worker reconnect by themselves) and finish
bit-identical to an uninterrupted run, with no host left behind.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid

from temporalio.service import RPCError

from tests.conftest import REPO, make_counter_spec
from tests.faults.conftest import DevServer, assert_no_host_left, status_of
from tests.helpers import control_dir, hold_script, thaw, wait_for_script_step, wait_until
from vaultlayer import client as vl_client
from vaultlayer.models import AttemptOutcome, RunState
from worker.control import create_worker

OUTAGE_STEPS = 40  # the server stays down while the host trains this many steps (2 s of 0.05 s steps)


async def test_control_worker_killed_and_restarted(temporal_env, temporal_address, vl_home, tmp_path,
                                                   counter_reference, figure):
    queue = f"vl-test-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "TEMPORAL_ADDRESS": temporal_address, "VL_TASK_QUEUE": queue, "VL_HOME": str(vl_home)}

    def start_worker() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "worker.control"], env=env, cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=open(tmp_path / "worker.log", "ab"))

    worker = start_worker()
    try:
        out = tmp_path / "out.json"
        spec = make_counter_spec(tmp_path, steps=400, out=out)
        client = temporal_env.client
        await vl_client.submit(client, spec, queue=queue)

        async def progressed():
            status = await status_of(client, spec.run_id)
            return status if (status.step or 0) >= 20 else None

        before = await wait_until(progressed, 90, "training to start")
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        # The host trains on, heartbeating to the server, with no control plane.
        await wait_for_script_step(control_dir(vl_home, spec.run_id, "h-1", 1), before.step + 20)
        worker = start_worker()
        restarted_at = time.monotonic()
        # Only a live control plane can take this update and drive the reclaim and the next attempt.
        ack = await vl_client.reclaim(client, spec.run_id)
        seconds_to_take_commands = time.monotonic() - restarted_at
        assert ack.host == "h-1"
        await asyncio.wait_for(client.get_workflow_handle(spec.run_id).result(), 240)
        status = await status_of(client, spec.run_id)
        assert status.state == RunState.SUCCEEDED
        assert [a.outcome for a in status.attempts] == [AttemptOutcome.RECLAIMED, AttemptOutcome.COMPLETED]
        assert out.read_text() == counter_reference(400)
        assert_no_host_left(vl_home)
        figure(seconds_to_take_commands=round(seconds_to_take_commands, 1), steps_lost=status.steps_lost)
    finally:
        worker.kill()
        worker.wait()


async def test_dev_server_killed_and_restarted_on_the_same_database(vl_home, tmp_path, counter_reference, figure):
    """The script is held (SIGSTOP) at the two moments the test must act before it moves on: once trained and
    checkpointed, until the control plane has heard so; and once trained through the outage, until it hears
    again after the restart. So a fast script cannot finish unheard, and a slow host cannot miss the outage."""
    server = DevServer(tmp_path)
    server.start()
    try:
        client = await server.connect()
        queue = f"vl-test-{uuid.uuid4().hex[:8]}"
        out = tmp_path / "out.json"
        spec = make_counter_spec(tmp_path, steps=200, out=out, heartbeat_timeout_seconds=10.0)
        control = control_dir(vl_home, spec.run_id, "h-1", 1)
        async with create_worker(client, task_queue=queue, home=vl_home):
            handle = await vl_client.submit(client, spec, queue=queue)

            async def heard_at(step: int):
                try:
                    status = await status_of(client, spec.run_id)
                except RPCError:  # the server is still coming back
                    return None
                return status if (status.step or 0) >= step and (status.durable_step or 0) >= 10 else None

            held = await hold_script(control, 30)
            try:
                before = await wait_until(lambda: heard_at(held.step), 90, "training and a checkpoint, heard")
            finally:
                thaw(held.pids)
            server.kill()
            killed_at = time.monotonic()
            # The outage itself: the host trains on, unheard, and holds once it has trained OUTAGE_STEPS more.
            held = await hold_script(control, before.step + OUTAGE_STEPS)
            try:
                server.start()
                restarted_at = time.monotonic()
                after = await wait_until(lambda: heard_at(held.step), 90, "the host heard again after the restart")
                resumed_at = time.monotonic()
            finally:
                thaw(held.pids)
            await asyncio.wait_for(handle.result(), 180)
            status = await status_of(client, spec.run_id)
    finally:
        server.kill()
    assert status.state == RunState.SUCCEEDED, status.stop_reason
    assert after.step >= before.step + OUTAGE_STEPS
    assert out.read_text() == counter_reference(200)
    assert_no_host_left(vl_home)
    figure(outage_seconds=round(restarted_at - killed_at, 1), seconds_to_resume=round(resumed_at - restarted_at, 1),
           attempts=len(status.attempts), steps_lost=status.steps_lost)
