"""Cancel during provisioning: nothing may leak.

Provisioning on the gcp provider (the real google-cloud-compute client against the local Compute fake,
tests/fakes/gce.py) is slow in two ways Compute Engine is: the create call itself can be answered 503 and retried
with backoff, and the zone operation that creates the VM takes a while. The run is cancelled in either window, and
the fake holds provisioning there until the workflow has taken the cancel, so the cancel always lands in it:
before the VM exists (the 4th create, after three 503s, is held unanswered; released, it makes the VM after the
cancel) or while it is being created (the insert operation is held RUNNING, the VM PROVISIONING). The run ends
cancelled, and no VM and no agent of it is left (the `gce` fixture also checks no labelled VM is left).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime

import pytest
from temporalio.client import WorkflowFailureError

from tests.conftest import make_counter_spec
from tests.fakes.gce import error_body
from tests.faults.conftest import status_of
from tests.helpers import cancel_taken, wait_until
from tests.test_run_e2e import record_histories
from vaultlayer import client as vl_client
from vaultlayer import protocol
from vaultlayer.models import Pool, RunInput, RunState, RunStatus
from vaultlayer.secrets import hand_over
from workflows.training_run import WORKFLOW_NAME

FAILED_CREATES = 3
CREATE = r"/zones/[^/]+/instances$"


@pytest.mark.parametrize("window", ["before the VM exists", "while the VM is created"])
async def test_cancel_during_provisioning_leaves_nothing(temporal_env, control, gce, gce_hosts, tmp_path, figure,
                                                        window):
    if window == "before the VM exists":  # the create call is answered 503 several times; the provider retries it
        gce.fail_next("POST", CREATE, 503, error_body(503, "backend error", "backendError"), FAILED_CREATES)
        hold = gce.hold_next("POST", CREATE)  # the retry that would go through waits, unanswered
    else:
        hold = gce.hold_operations("insert")  # the VM stays PROVISIONING
    spec = make_counter_spec(tmp_path, steps=20, out=tmp_path / "out.json",
                             pools=[Pool(provider="gcp", region="", zone="us-central1-a", gpu="L4", gpu_count=1)])
    client = temporal_env.client
    handle = client.get_workflow_handle(spec.run_id)

    def creates() -> int:
        return sum(method == "POST" and path.endswith("/instances") for method, path in gce.requests)

    async def provisioning():
        return (await status_of(client, spec.run_id)).state == RunState.PROVISIONING

    try:
        await vl_client.submit(client, spec, queue=control)
        assert await asyncio.to_thread(hold.wait_held, 1, 60), f"provisioning never got held, {window}"
        await wait_until(provisioning, 60, "the run to show it is provisioning")
        in_window = [] if window == "before the VM exists" else ["PROVISIONING"]
        assert [vm["status"] for vm in gce.labelled()] == in_window
        await vl_client.cancel(client, spec.run_id)
        # The workflow lets the provision it cancels return before it reaps, so it ends only after the release.
        await wait_until(lambda: cancel_taken(handle), 60, "the workflow to take the cancel")
    finally:
        hold.release()  # the create goes through (the VM is made after the cancel), or the operation finishes
    released_at = time.monotonic()
    with pytest.raises(WorkflowFailureError):
        await asyncio.wait_for(handle.result(), 60)
    assert creates() == (FAILED_CREATES + 1 if window == "before the VM exists" else 1)
    assert any(method == "DELETE" for method, _ in gce.requests), "the reap deleted no VM"

    async def nothing_left():
        return not gce.labelled()

    await wait_until(nothing_left, 30, "every VM of the run to be deleted")
    cleaned_seconds = time.monotonic() - released_at
    status = await status_of(client, spec.run_id)
    assert status.state == RunState.CANCELLED
    assert status.current_host is None and all(record.host is None for record in status.attempts)
    await asyncio.to_thread(gce.settle)  # the creation's operation ends: it must not bring the VM back
    assert not gce.labelled(), "a VM of the cancelled run came back"

    async def no_agent_left():  # a VM that came up before the reap deleted it may have started its agent
        return all(vm.process.poll() is not None for vm in gce_hosts.played.values())

    await wait_until(no_agent_left, 30, "the agent of every deleted VM to be gone")
    figure(seconds_to_nothing_left=round(cleaned_seconds, 1))


async def test_a_cancel_waiting_at_a_continued_runs_first_task_still_reaps(temporal_env, vl_home, tmp_path):
    """Found by the chaos soak, `python bench/chaos.py --minutes 30 --seed 3` (docs/faults.md): its schedule's
    `{"at": 65.7, "kind": "cancel-resume", "slot": 3}` (run at 77.9 s, held back by the server restart before it)
    reached chaos-4 just as it continued as new, so the new run's first workflow task carried the cancel. The run saw it and ended, but the cancel the SDK was still to deliver
    cancelled the reap before it was scheduled: the run's handed-over secrets (and any host) were left. The order
    is forced here: the continued run's input is started on a queue nobody polls, cancelled, then a worker comes."""
    from worker.control import create_worker

    spec = make_counter_spec(tmp_path, steps=20, out=tmp_path / "out.json", env_secrets={"TOKEN": "env:VL_TEST_TOKEN"})
    handed = hand_over(spec.run_id, spec.env_secrets, {"local"}, {"VL_TEST_TOKEN": "planted"})
    assert handed == protocol.handed_over_path(vl_home, spec.run_id) and handed.exists()
    carried = RunStatus(run_id=spec.run_id, started_at=datetime.now(UTC), continued_as_new=1)
    queue = f"vl-test-{uuid.uuid4().hex[:8]}"
    client = temporal_env.client
    handle = await client.start_workflow(WORKFLOW_NAME, RunInput(spec=spec, carried=carried), id=spec.run_id,
                                         task_queue=queue)
    await handle.cancel()  # before any worker polls: the run's first task holds its start and the cancel
    async with create_worker(client, task_queue=queue, home=vl_home):
        with pytest.raises(WorkflowFailureError):
            await asyncio.wait_for(handle.result(), 60)
    reaps = [event.activity_task_scheduled_event_attributes.activity_type.name
             async for event in handle.fetch_history_events() if event.HasField("activity_task_scheduled_event_attributes")]
    assert reaps == ["reap_run"], "the cancelled run's end must reap it"
    assert not handed.exists(), "the run's end deletes its handed-over secret values"
    assert (await status_of(client, spec.run_id)).state == RunState.CANCELLED
    await record_histories(client, spec.run_id)  # VL_RECORD_HISTORIES: the replay guard covers the shielded reap
