"""Whole runs through the gcp provider: the real google-cloud-compute client against the local Compute
fake, each VM played by a local `vl agent` started from its startup-script (tests/fakes/gce.py), on the
real Temporal dev server with real PyTorch. No labelled VM may outlive a test."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys

import pytest
from temporalio.client import WorkflowFailureError

from activities.providers.gcp import label_value
from tests.conftest import REPO, assert_same_weights, make_counter_spec, make_spec, travelling_spec
from tests.fakes.gce import stockout
from tests.helpers import wait_until
from tests.test_multinode import gang_torchrun
from vaultlayer import checkpoint
from vaultlayer import client as vl_client
from vaultlayer.models import AttemptOutcome, Limits, Pool, RunState, RunStatus


def gcp_pool(zone: str) -> Pool:
    return Pool(provider="gcp", region="", zone=zone, gpu="L4", gpu_count=1)


async def result_of(client, run_id: str, timeout: float = 240) -> RunStatus:
    with contextlib.suppress(WorkflowFailureError):  # a failed or cancelled run: its status says how
        await asyncio.wait_for(client.get_workflow_handle(run_id).result(), timeout)
    return await vl_client.status(client, run_id)


async def checkpointed(client, run_id: str, step: int) -> RunStatus:
    async def check():
        status = await vl_client.status(client, run_id)
        return status if (status.durable_step or 0) >= step and status.current_host else None

    return await wait_until(check, 120, f"a checkpoint at step {step} or later")


async def no_vm_left(gce, run_id: str | None = None) -> None:
    async def check():
        return not [vm for vm in gce.labelled()
                    if run_id is None or vm["labels"]["vaultlayer-run-id"] == label_value(run_id)]

    await wait_until(check, 30, "every labelled VM to be deleted")


async def test_a_preempted_vm_fails_over_to_another_zone(temporal_env, control, gce, gce_hosts, tmp_path,
                                                         reference_weights):
    out = tmp_path / "w.pt"
    # The script exists only in the run's code snapshot; the agents run in empty folders of their own.
    spec = travelling_spec(tmp_path, steps=150, out=out, pools=[gcp_pool("us-central1-a"), gcp_pool("us-central1-b")])
    client = temporal_env.client
    await vl_client.submit(client, spec, queue=control)
    first = (await checkpointed(client, spec.run_id, 10)).current_host

    gce.preempt(first.host_id)  # Compute Engine takes the Spot VM back; its metadata server says so

    status = await result_of(client, spec.run_id)
    assert status.state == RunState.SUCCEEDED, status.stop_reason
    preempted, resumed = status.attempts[0], status.attempts[1]
    assert preempted.outcome == AttemptOutcome.RECLAIMED and preempted.reason == "reclaim notice"
    assert preempted.durable_step == preempted.end_step  # the emergency save made it before the deadline
    assert (preempted.pool, resumed.pool) == ("gcp/us-central1-a/L4:1/spot", "gcp/us-central1-b/L4:1/spot")
    assert resumed.start_step == preempted.durable_step and resumed.outcome == AttemptOutcome.COMPLETED
    assert "reclaim notice from the metadata server" in gce_hosts.agent_log(first.host_id)
    assert preempted.price_per_hour == 0.2827 and preempted.cost_usd > 0
    assert_same_weights(out, reference_weights(150))
    await no_vm_left(gce)


async def test_an_exhausted_zone_moves_the_run_on(temporal_env, control, gce, gce_hosts, tmp_path):
    gce.insert_errors["us-central1-a"] = stockout(gce.project, "us-central1-a", with_details=True)
    spec = make_counter_spec(tmp_path, steps=20, out=tmp_path / "out.json",
                             pools=[gcp_pool("us-central1-a"), gcp_pool("us-central1-f")])
    client = temporal_env.client
    await vl_client.submit(client, spec, queue=control)

    status = await result_of(client, spec.run_id)
    assert status.state == RunState.SUCCEEDED, status.stop_reason
    refused, placed = status.attempts
    assert refused.outcome == AttemptOutcome.REFUSED and refused.refusal == "no-capacity"
    assert "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS" in refused.reason
    assert placed.pool == "gcp/us-central1-f/L4:1/spot" and placed.outcome == AttemptOutcome.COMPLETED
    await no_vm_left(gce)


@pytest.mark.usefixtures("cloud_rendezvous_port")
async def test_a_gang_of_two_vms_runs_one_ddp_job_under_a_placement_policy_and_leaves_nothing(
        temporal_env, control, gce, gce_hosts, tmp_path):
    out = tmp_path / "w.pt"
    # One torchrun per VM; each agent fills in its rank and node 0's internal IP and port.
    spec = make_spec(tmp_path, steps=20, out=out, nodes=2, pools=[gcp_pool("us-central1-a")],
                     command=gang_torchrun(1, "--steps", "20", "--out", str(out)))
    client = temporal_env.client
    # Both VMs' deletions wait while the test looks at the gang that ran; they go once it has.
    deleting = gce.hold_next("DELETE", r"/zones/[^/]+/instances/[^/]+$", times=2)
    await vl_client.submit(client, spec, queue=control)
    try:
        released = await asyncio.to_thread(deleting.wait_held, 2, 240)
        assert released, f"the gang's VMs were never released: {await vl_client.status(client, spec.run_id)}"
        vms, [policy] = gce.labelled(), gce.resource_policies()
    finally:
        deleting.release()
    status = await result_of(client, spec.run_id)

    assert status.state == RunState.SUCCEEDED, status.stop_reason
    [attempt] = status.attempts
    assert attempt.outcome == AttemptOutcome.COMPLETED and attempt.end_step == 20 and out.exists()
    assert attempt.nodes == 2 and attempt.hosts == [f"vl-{spec.run_id}-1-n0", f"vl-{spec.run_id}-1-n1"]
    assert policy["groupPlacementPolicy"] == {"collocation": "COLLOCATED"}
    assert sorted(vm["name"] for vm in vms) == attempt.hosts
    for vm in vms:
        node = attempt.hosts.index(vm["name"])
        assert vm["labels"] == {"vaultlayer-run-id": label_value(spec.run_id), "vaultlayer-attempt": "1",
                                "vaultlayer-gang": label_value(f"{spec.run_id}-a1"), "vaultlayer-node": str(node)}
        assert vm["zone"].endswith("/zones/us-central1-a") and vm["resourcePolicies"] == [policy["selfLink"]]

    async def nothing_left():
        return not gce.labelled() and not gce.resource_policies()

    await wait_until(nothing_left, 30, "the gang's VMs and placement policy to be deleted")


async def test_cancel_deletes_every_vm_labelled_with_the_run(temporal_env, temporal_address, control, gce,
                                                             gce_hosts, vl_home, tmp_path):
    spec = make_counter_spec(tmp_path, steps=2000, out=tmp_path / "out.json", pools=[gcp_pool("us-central1-a")])
    client = temporal_env.client
    await vl_client.submit(client, spec, queue=control)
    await checkpointed(client, spec.run_id, 10)
    # A VM whose provision never reached the workflow: only its label ties it to the run.
    gce.add_instance("us-central1-c", "vl-lost-provision", labels={"vaultlayer-run-id": label_value(spec.run_id)})

    await vl_client.cancel(client, spec.run_id)
    status = await result_of(client, spec.run_id, timeout=60)
    assert status.state == RunState.CANCELLED
    await no_vm_left(gce)
    assert checkpoint.list_checkpoints(spec.storage_url, spec.run_id), "cancel must keep checkpoints"

    # `vl reap` by label: a VM left for the finished run goes; one of a run this cluster does not know
    # stays unless named.
    gce.add_instance("us-central1-c", "vl-late", labels={"vaultlayer-run-id": label_value(spec.run_id)})
    gce.add_instance("us-central1-c", "vl-elsewhere", labels={"vaultlayer-run-id": "t-another-cluster"})
    env = {**os.environ, "TEMPORAL_ADDRESS": temporal_address, "VL_HOME": str(vl_home)}

    def vl_reap(*run_ids: str) -> str:
        done = subprocess.run([sys.executable, "-m", "cli.main", "reap", *run_ids], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert f"{spec.run_id}: released vl-late" in await asyncio.to_thread(vl_reap)
    await no_vm_left(gce, spec.run_id)
    assert [vm["name"] for vm in gce.labelled()] == ["vl-elsewhere"]
    assert "t-another-cluster: released vl-elsewhere" in await asyncio.to_thread(vl_reap, "t-another-cluster")
    await no_vm_left(gce)


async def test_an_agent_that_cannot_start_is_a_host_fault(temporal_env, control, gce, gce_hosts, tmp_path):
    del gce.secrets["vaultlayer-temporal"]  # the hosts cannot learn where the cluster is
    spec = make_counter_spec(tmp_path, steps=20, out=tmp_path / "out.json", pools=[gcp_pool("us-central1-a")],
                             start_timeout_seconds=10.0, limits=Limits(max_host_faults=0))
    client = temporal_env.client
    # The workflow's delete of the VM (after the 10 s start timeout) waits until the VM powered itself off: on
    # a loaded machine the failing agent may take longer than that to start and exit.
    delete = gce.hold_next("DELETE", r"/zones/[^/]+/instances/[^/]+$")
    await vl_client.submit(client, spec, queue=control)

    def powered_off():
        return any(op["operationType"] == "compute.instances.guestTerminate" for op in list(gce.operations.values()))

    try:
        await asyncio.to_thread(delete.wait_held)
        await wait_until(lambda: asyncio.to_thread(powered_off), 120, "the VM to power itself off")
    finally:
        delete.release()
    status = await result_of(client, spec.run_id)
    assert status.state == RunState.FAILED and "max_host_faults" in status.stop_reason
    [attempt] = status.attempts
    assert attempt.outcome == AttemptOutcome.HOST_FAULT and attempt.reason == "the host agent never started"
    assert "not found or has no versions" in gce_hosts.agent_log(attempt.host)
    # Its startup-script powered the VM off when the agent exited, so it stopped costing at once.
    assert any(op["operationType"] == "compute.instances.guestTerminate" and op["targetLink"].endswith(attempt.host)
               for op in gce.operations.values())
    await no_vm_left(gce)

