"""Reclaim notices at awkward moments: twice for one host, too late to act on, and while the next host restores.

The notices come the way the local provider gives them: `vl reclaim` (the workflow's own injection), or the AWS
`spot/instance-action` document written into the host's metadata directory, as the metadata service would serve
it. Each run must end identical to an uninterrupted one (tests/faults/counter_train.py), with no host left.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from tests.conftest import make_counter_spec
from tests.faults.conftest import assert_no_host_left, status_of, write_instance_action
from tests.helpers import (Failpoints, control_dir, freeze, hold_second_restore, reclaim_after_checkpoint,
                           wait_for_script_step, wait_until)
from vaultlayer import checkpoint
from vaultlayer import client as vl_client
from vaultlayer.models import AttemptOutcome, RunState, RunStatus

STEPS = 100


def counter_spec(tmp_path: Path, **overrides):
    out = tmp_path / "out.json"
    return out, make_counter_spec(tmp_path, steps=STEPS, out=out, step_time=0.05,
                                  checkpoint_every="10", **overrides)


async def on_host(client, run_id: str, host_id: str, durable: int = 0) -> RunStatus:
    async def check():
        status = await status_of(client, run_id)
        host = status.current_host
        return status if host and host.host_id == host_id and (status.durable_step or 0) >= durable else None

    return await wait_until(check, 90, f"host {host_id} with a checkpoint at step {durable} or later")


async def finished(client, run_id: str) -> RunStatus:
    await asyncio.wait_for(client.get_workflow_handle(run_id).result(), 120)
    return await status_of(client, run_id)


async def test_a_notice_twice_is_one_reclaim_and_one_emergency_save(temporal_env, control, vl_home, tmp_path,
                                                                    counter_reference, figure):
    out, spec = counter_spec(tmp_path)
    client = temporal_env.client
    await vl_client.submit(client, spec, queue=control)
    # Two notices for the same host, the second with a later deadline while the first is being acted on.
    await reclaim_after_checkpoint(client, vl_home, spec.run_id, durable=10, reclaims=2)

    status = await finished(client, spec.run_id)
    assert status.state == RunState.SUCCEEDED
    first, second = status.attempts[0], status.attempts[1]
    assert first.outcome == AttemptOutcome.RECLAIMED and first.emergency_save == "saved"
    assert first.durable_step == first.end_step == second.start_step
    assert status.reclaims == 1 and len(status.attempts) == 2
    emergency = [name for name, step, attempt in checkpoint.list_checkpoints(spec.storage_url, spec.run_id)
                 if attempt == 1 and step % 10]
    assert len(emergency) <= 1, f"one notice, one emergency save: {emergency}"
    assert status.steps_lost == 0
    assert out.read_text() == counter_reference(STEPS)
    assert_no_host_left(vl_home)
    figure(reclaims=status.reclaims, emergency_step=first.durable_step, steps_lost=status.steps_lost)


async def test_a_notice_seen_after_its_deadline_resumes_from_the_last_periodic_checkpoint(
        temporal_env, control, vl_home, tmp_path, counter_reference, figure):
    out, spec = counter_spec(tmp_path)
    client = temporal_env.client
    await vl_client.submit(client, spec, queue=control)
    # The script is held past its second checkpoint, so its 5 s of steps cannot end before the notice comes.
    control_directory = control_dir(vl_home, spec.run_id, "h-1", 1)
    await wait_for_script_step(control_directory, 25)
    freeze(json.loads((control_directory.parent.parent / "host.json").read_text())["pgid"])
    status = await on_host(client, spec.run_id, "h-1", durable=20)
    # The metadata service says the host was due five seconds ago: no save can make it. The host is taken with
    # its script still frozen.
    write_instance_action(Path(status.current_host.handle["dir"]) / "metadata", seconds_left=-5)

    status = await finished(client, spec.run_id)
    assert status.state == RunState.SUCCEEDED
    first, second = status.attempts[0], status.attempts[1]
    assert first.outcome == AttemptOutcome.RECLAIMED and first.emergency_save == "missed"
    assert first.durable_step % 10 == 0 and second.start_step == first.durable_step
    assert out.read_text() == counter_reference(STEPS)
    assert_no_host_left(vl_home)
    figure(steps_lost=status.steps_lost, resumed_from=second.start_step)


async def test_a_notice_during_restore_saves_after_the_first_step(temporal_env, control, vl_home, tmp_path,
                                                                  counter_reference, monkeypatch, figure):
    out, spec = counter_spec(tmp_path)
    client = temporal_env.client
    points = Failpoints(tmp_path / "failpoints").install(monkeypatch)
    # The second host's agent holds before its restore: the notice is there before the script takes a step.
    before_second_restore = await hold_second_restore(client, spec, control, vl_home, points, durable=10)
    host_dir = vl_home / "hosts" / spec.run_id / "h-2"
    write_instance_action(host_dir / "metadata", seconds_left=10)
    points.release(before_second_restore)

    status = await finished(client, spec.run_id)
    assert status.state == RunState.SUCCEEDED
    second, third = status.attempts[1], status.attempts[2]
    assert second.outcome == AttemptOutcome.RECLAIMED and second.emergency_save == "saved"
    # The script saved at its first chance, the end of its first step, and the next host resumed there.
    assert second.durable_step == second.start_step + 1 == third.start_step
    assert status.steps_lost == 0
    assert out.read_text() == counter_reference(STEPS)
    assert_no_host_left(vl_home)
    figure(restored_step=second.start_step, emergency_step=second.durable_step, steps_lost=status.steps_lost)
