"""Cancel during provisioning: nothing may leak.

Provisioning on the gcp provider (the real google-cloud-compute client against the local Compute fake,
tests/fakes/gce.py) takes as long as the zone operation that creates the VM; the fake makes that several
seconds, as Compute Engine does. The run is cancelled while the VM is being created: the run ends cancelled,
the VM is deleted, no agent was ever started for it (the `gce` fixture also checks no labelled VM is left).
"""

from __future__ import annotations

import asyncio
import time

import pytest
from temporalio.client import WorkflowFailureError

from tests.conftest import make_spec, wait_until
from tests.faults.conftest import status_of
from vaultlayer import client as vl_client
from vaultlayer.models import Pool, RunState


async def test_cancel_during_provisioning_leaves_nothing(temporal_env, control, gce, gce_hosts, tmp_path, figure):
    gce.op_seconds = 8.0  # the zone operation that creates a VM
    spec = make_spec(tmp_path, steps=20, out=tmp_path / "w.pt",
                     pools=[Pool(provider="gcp", region="", zone="us-central1-a", gpu="L4", gpu_count=1)])
    client = temporal_env.client
    await vl_client.submit(client, spec, queue=control)

    async def creating():
        status = await status_of(client, spec.run_id)
        return status.state == RunState.PROVISIONING and any(vm["status"] == "PROVISIONING" for vm in gce.labelled())

    await wait_until(creating, 60, "the VM to be in creation")
    await vl_client.cancel(client, spec.run_id)
    cancelled_at = time.monotonic()
    with pytest.raises(WorkflowFailureError):
        await asyncio.wait_for(client.get_workflow_handle(spec.run_id).result(), 60)

    async def nothing_left():
        return not gce.labelled()

    await wait_until(nothing_left, 30, "every VM of the run to be deleted")
    cleaned_seconds = time.monotonic() - cancelled_at
    status = await status_of(client, spec.run_id)
    assert status.state == RunState.CANCELLED
    assert status.current_host is None and all(record.host is None for record in status.attempts)
    await asyncio.to_thread(gce.settle)  # the creation's operation ends: it must not bring the VM back
    assert not gce.labelled() and not gce_hosts.played, "a VM of the cancelled run came up"
    figure(seconds_to_nothing_left=round(cleaned_seconds, 1))
