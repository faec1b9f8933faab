"""Cancel during provisioning: nothing may leak.

Provisioning on the gcp provider (the real google-cloud-compute client against the local Compute fake,
tests/fakes/gce.py) is slow in two ways Compute Engine is: the zone operation that creates the VM takes a while,
and the create call itself can be answered 503 and retried with backoff. The run is cancelled in either window:
before the VM exists (the retried create then makes it, after the cancel) or while it is being created. The run
ends cancelled, and no VM and no agent of it is left (the `gce` fixture also checks no labelled VM is left).
"""

from __future__ import annotations

import asyncio
import time

import pytest
from temporalio.client import WorkflowFailureError

from tests.conftest import make_spec
from tests.fakes.gce import error_body
from tests.faults.conftest import status_of
from tests.helpers import wait_until
from vaultlayer import client as vl_client
from vaultlayer.models import Pool, RunState

FAILED_CREATES = 3


@pytest.mark.parametrize("window", ["before the VM exists", "while the VM is created"])
async def test_cancel_during_provisioning_leaves_nothing(temporal_env, control, gce, gce_hosts, tmp_path, figure,
                                                        window):
    gce.op_seconds = 4.0  # the zone operation that creates a VM (and the one that deletes it)
    if window == "before the VM exists":  # the create call is answered 503 several times; the provider retries it
        gce.fail_next("POST", r"/zones/[^/]+/instances$", 503, error_body(503, "backend error", "backendError"),
                      FAILED_CREATES)
    spec = make_spec(tmp_path, steps=20, out=tmp_path / "w.pt",
                     pools=[Pool(provider="gcp", region="", zone="us-central1-a", gpu="L4", gpu_count=1)])
    client = temporal_env.client
    await vl_client.submit(client, spec, queue=control)

    def creates() -> int:
        return sum(method == "POST" and path.endswith("/instances") for method, path in gce.requests)

    async def in_window():
        status = await status_of(client, spec.run_id)
        if status.state != RunState.PROVISIONING:
            return False
        if window == "before the VM exists":
            return creates() >= 1 and not gce.labelled()
        return any(vm["status"] == "PROVISIONING" for vm in gce.labelled())

    await wait_until(in_window, 60, f"provisioning, {window}")
    await vl_client.cancel(client, spec.run_id)
    cancelled_at = time.monotonic()
    with pytest.raises(WorkflowFailureError):
        await asyncio.wait_for(client.get_workflow_handle(spec.run_id).result(), 60)

    async def created():
        return creates() == FAILED_CREATES + 1 if window == "before the VM exists" else True

    await wait_until(created, 30, "the provider's create call to go through")

    async def nothing_left():
        return not gce.labelled()

    await wait_until(nothing_left, 30, "every VM of the run to be deleted")
    cleaned_seconds = time.monotonic() - cancelled_at
    status = await status_of(client, spec.run_id)
    assert status.state == RunState.CANCELLED
    assert status.current_host is None and all(record.host is None for record in status.attempts)
    await asyncio.to_thread(gce.settle)  # the creation's operation ends: it must not bring the VM back
    assert not gce.labelled(), "a VM of the cancelled run came back"

    async def no_agent_left():  # a VM that came up before the reap deleted it may have started its agent
        return all(vm.process.poll() is not None for vm in gce_hosts.played.values())

    await wait_until(no_agent_left, 30, "the agent of every deleted VM to be gone")
    figure(seconds_to_nothing_left=round(cleaned_seconds, 1))
