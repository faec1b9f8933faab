"""One run, two clouds: AWS (moto, tests/aws/) and GCP (the Compute fake, tests/fakes/gce.py), each
host played by a local `vl agent` from the bootstrap its provider wrote. When AWS keeps reclaiming, the
run moves to GCP and resumes there from the checkpoint in the shared storage URL. (How many AWS
reclaims that takes is the policy's call: zone pools of one region share its trouble.)"""

from __future__ import annotations

import asyncio

from tests.aws.conftest import aws, ec2_proxy, moto_port  # noqa: F401 - fixtures
from tests.conftest import make_counter_spec
from tests.helpers import wait_until
from vaultlayer import client as vl_client
from vaultlayer.models import AttemptOutcome, Pool, RunState, RunStatus


async def training_on_attempt(client, run_id: str, attempt: int, past_step: int) -> RunStatus:
    """Until attempt `attempt` trains on its host and has stored a checkpoint beyond `past_step`."""

    async def check():
        status = await vl_client.status(client, run_id)
        return status if (len(status.attempts) == attempt and status.current_host
                          and (status.durable_step or 0) >= past_step + 10) else None

    return await wait_until(check, 120, f"attempt {attempt} to store a checkpoint")


async def test_reclaimed_on_aws_the_run_finishes_on_gcp(temporal_env, control, aws, gce,  # noqa: F811
                                                      gce_hosts, tmp_path, counter_reference):
    out = tmp_path / "out.json"
    pools = [Pool(provider="aws", region="", zone=zone, gpu="A10G", gpu_count=1)
             for zone in ("us-east-1a", "us-east-1b")]
    pools.append(Pool(provider="gcp", region="", zone="us-central1-a", gpu="L4", gpu_count=1))
    spec = make_counter_spec(tmp_path, steps=400, out=out, pools=pools)
    client = temporal_env.client
    await vl_client.submit(client, spec, queue=control)

    # Every host the run gets on AWS is reclaimed, until it lands on GCP.
    durable, attempt = 0, 1
    while (status := await training_on_attempt(client, spec.run_id, attempt, durable)).current_host.provider == "aws":
        assert attempt <= len(pools) - 1, status.attempts
        instance_id = status.current_host.handle["instance_id"]
        await asyncio.to_thread(aws.player.machine, instance_id)
        aws.market.interrupt(instance_id, notice_seconds=20)
        durable, attempt = status.durable_step, attempt + 1
    assert attempt > 1, "the run must start on AWS, the preferred cloud"

    await asyncio.wait_for(client.get_workflow_handle(spec.run_id).result(), 240)
    status = await vl_client.status(client, spec.run_id)
    assert status.state == RunState.SUCCEEDED, status.stop_reason
    *on_aws, on_gcp = status.attempts
    assert all(a.pool.startswith("aws/") and a.outcome == AttemptOutcome.RECLAIMED and a.reason == "reclaim notice"
               for a in on_aws), on_aws
    assert on_gcp.pool == "gcp/us-central1-a/L4:1/spot" and on_gcp.outcome == AttemptOutcome.COMPLETED
    assert on_gcp.start_step == on_aws[-1].durable_step > 0  # resumed on GCP from AWS's checkpoint
    assert out.read_text() == counter_reference(400)
    aws.assert_nothing_left()
    assert not gce.labelled()
