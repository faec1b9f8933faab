"""Whole runs through the aws provider: the real workflow on a real Temporal dev server, the real boto3
client against moto over HTTP, and every instance moto runs booted from its user-data as a real
`vl agent` (which reads its Temporal settings from the secret) training real PyTorch."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid

import boto3
import pytest
from temporalio.client import WorkflowFailureError

from tests.aws.conftest import MOTO_AMI, REGION, SECRET_NAME
from tests.conftest import REPO, TRAIN_TINY, assert_same_weights, make_counter_spec, make_spec, travelling_spec
from tests.helpers import wait_until
from tests.test_multinode import gang_torchrun
from vaultlayer import client as vl_client
from vaultlayer.models import AttemptOutcome, Limits, Market, Pool, Refusal, RunState, RunStatus


def zone_pools(*zones: str) -> list[Pool]:
    return [Pool(provider="aws", region="", zone=zone, gpu="A10G", gpu_count=1, market=Market.SPOT) for zone in zones]


async def result_of(client, run_id: str, timeout: float = 240) -> RunStatus:
    try:
        await asyncio.wait_for(client.get_workflow_handle(run_id).result(), timeout)
    except WorkflowFailureError:
        pass
    return await vl_client.status(client, run_id)


async def on_host_with_checkpoint(client, run_id: str, attempt: int) -> RunStatus:
    async def ready():
        status = await vl_client.status(client, run_id)
        if not (status.current_host and len(status.attempts) == attempt):
            return None
        # A checkpoint of this attempt's own: the durable step carried over from the last one says nothing
        # about whether this host's agent has even started.
        durable = status.durable_step or 0
        return status if durable >= 10 * attempt and durable > status.attempts[-1].start_step else None

    return await wait_until(ready, 120, f"attempt {attempt} training with a checkpoint")


def zone_of(aws, status: RunStatus, attempt: int) -> str:
    [instance] = [i for i in aws.instances(status.run_id) if i["Tags"] and
                  {"Key": "vaultlayer:attempt", "Value": str(attempt)} in i["Tags"]]
    return instance["Placement"]["AvailabilityZone"]


async def test_spot_reclaim_with_notice_resumes_in_another_zone(temporal_env, control, aws, tmp_path,
                                                                 reference_weights):
    out = tmp_path / "w.pt"
    # The script exists only in the run's code snapshot; the agents run in empty folders of their own.
    spec = travelling_spec(tmp_path, steps=150, out=out, step_time=0.15, pools=zone_pools("us-east-1a", "us-east-1b"))
    client = temporal_env.client
    await vl_client.submit(client, spec, queue=control)
    status = await on_host_with_checkpoint(client, spec.run_id, 1)
    instance_id = status.current_host.handle["instance_id"]
    machine = aws.player.machine(instance_id)
    assert "TEMPORAL_ADDRESS" not in machine.env, "the agent must find the cluster through the secret"

    aws.market.interrupt(instance_id, notice_seconds=20)  # IMDS serves the notice; EC2 terminates at its time
    status = await result_of(client, spec.run_id)

    assert status.state == RunState.SUCCEEDED, status.stop_reason
    first, second = status.attempts[0], status.attempts[1]
    assert first.outcome == AttemptOutcome.RECLAIMED and first.reason == "reclaim notice"
    assert first.emergency_save == "saved" and first.durable_step == first.end_step
    assert second.start_step == first.durable_step
    assert (zone_of(aws, status, 1), zone_of(aws, status, 2)) == ("us-east-1a", "us-east-1b")
    assert "spot/instance-action" in machine.imds.reads
    assert first.price_per_hour == 0.00001 and first.on_demand_price_per_hour == 1.006 and first.cost_usd > 0
    assert_same_weights(out, reference_weights(150))
    aws.assert_nothing_left()


async def test_capacity_error_in_one_zone_moves_placement_on(temporal_env, control, aws, tmp_path):
    aws.proxy.refuse("us-east-1a", "InsufficientInstanceCapacity")
    aws.proxy.fail_next("us-east-1b", "RequestLimitExceeded")  # throttled once on the way
    spec = make_counter_spec(tmp_path, steps=20, out=tmp_path / "out.json",
                             pools=zone_pools("us-east-1a", "us-east-1b"))
    client = temporal_env.client
    await vl_client.submit(client, spec, queue=control)
    status = await result_of(client, spec.run_id)

    assert status.state == RunState.SUCCEEDED, status.stop_reason
    refused, completed = status.attempts
    assert refused.outcome == AttemptOutcome.REFUSED and refused.refusal == Refusal.NO_CAPACITY
    assert "InsufficientInstanceCapacity" in refused.reason and refused.host is None
    assert completed.outcome == AttemptOutcome.COMPLETED and zone_of(aws, status, 2) == "us-east-1b"
    assert [outcome for zone, _, outcome in aws.proxy.launches if zone == "us-east-1b"] == [
        "RequestLimitExceeded", "launched"]
    assert all(i["Placement"]["AvailabilityZone"] != "us-east-1a" for i in aws.instances(spec.run_id))
    aws.assert_nothing_left()


@pytest.mark.usefixtures("cloud_rendezvous_port")
async def test_a_gang_of_two_instances_runs_one_ddp_job_and_leaves_no_instance_or_group(temporal_env, control, aws,
                                                                                        tmp_path):
    out = tmp_path / "w.pt"
    # One torchrun per instance; each agent fills in its rank and node 0's private IP and port.
    spec = make_spec(tmp_path, steps=20, out=out, nodes=2, pools=zone_pools("us-east-1b"),
                     command=gang_torchrun(1, "--steps", "20", "--out", str(out)))
    client = temporal_env.client
    await vl_client.submit(client, spec, queue=control)
    status = await result_of(client, spec.run_id)

    assert status.state == RunState.SUCCEEDED, status.stop_reason
    [attempt] = status.attempts
    assert attempt.outcome == AttemptOutcome.COMPLETED and attempt.end_step == 20 and out.exists()
    assert attempt.nodes == 2 and attempt.hosts == ["h-1-0", "h-1-1"]
    assert aws.proxy.launches == [("us-east-1b", "g5.xlarge", "launched")]  # one RunInstances for both
    gang = f"{spec.run_id}-a1"
    instances = sorted(aws.instances(spec.run_id), key=lambda i: i["AmiLaunchIndex"])
    assert len(instances) == 2
    for node, instance in enumerate(instances):
        tags = {tag["Key"]: tag["Value"] for tag in instance["Tags"]}
        assert tags.items() >= {"vaultlayer:run-id": spec.run_id, "vaultlayer:attempt": "1", "vaultlayer:gang": gang,
                                "vaultlayer:node": str(node), "vaultlayer:host": f"h-1-{node}"}.items()
        placement = instance["Placement"]
        assert (placement["AvailabilityZone"], placement["GroupName"]) == ("us-east-1b", f"vl-{gang}")
        assert instance["State"]["Name"] == "terminated"
    assert not aws.proxy.placement_groups, "the gang's cluster placement group outlived it"
    aws.assert_nothing_left()


async def test_lost_heartbeats_are_told_apart_by_the_instance_state(temporal_env, control, aws, tmp_path,
                                                                     counter_reference):
    out = tmp_path / "out.json"
    spec = make_counter_spec(tmp_path, steps=150, out=out, step_time=0.1, heartbeat_timeout_seconds=5.0,
                             pools=zone_pools("us-east-1a", "us-east-1b"))
    client = temporal_env.client
    await vl_client.submit(client, spec, queue=control)

    status = await on_host_with_checkpoint(client, spec.run_id, 1)
    aws.player.kill_agent(aws.player.machine(status.current_host.handle["instance_id"]))  # instance stays up
    status = await on_host_with_checkpoint(client, spec.run_id, 2)
    aws.market.reclaim_now(status.current_host.handle["instance_id"])  # taken by EC2, no notice
    status = await result_of(client, spec.run_id)

    assert status.state == RunState.SUCCEEDED, status.stop_reason
    faulty, reclaimed, last = status.attempts
    assert faulty.outcome == AttemptOutcome.HOST_FAULT
    assert faulty.reason == "heartbeats stopped while the host is running (instance running)"
    assert reclaimed.outcome == AttemptOutcome.RECLAIMED
    assert "host gone (terminated: Server.SpotInstanceTermination" in reclaimed.reason
    assert last.outcome == AttemptOutcome.COMPLETED and zone_of(aws, status, 3) == "us-east-1b"
    assert out.read_text() == counter_reference(150)
    aws.assert_nothing_left()


async def test_an_agent_that_never_starts_is_a_host_fault_and_its_instance_released(temporal_env, control, aws,
                                                                                    tmp_path):
    aws.player.booting = False  # the instance runs, its bootstrap never brings the agent up
    spec = make_counter_spec(tmp_path, steps=10, out=tmp_path / "out.json", start_timeout_seconds=3.0,
                             pools=zone_pools("us-east-1a"), limits=Limits(max_host_faults=0))
    client = temporal_env.client
    await vl_client.submit(client, spec, queue=control)
    status = await result_of(client, spec.run_id)

    assert status.state == RunState.FAILED and "max_host_faults=0" in status.stop_reason
    [attempt] = status.attempts
    assert attempt.outcome == AttemptOutcome.HOST_FAULT and attempt.reason == "the host agent never started"
    assert [i["State"]["Name"] for i in aws.instances(spec.run_id)] == ["terminated"]
    aws.assert_nothing_left()


async def test_cancel_terminates_everything_tagged_with_the_run(temporal_env, control, aws, tmp_path):
    spec = make_counter_spec(tmp_path, steps=2000, out=tmp_path / "out.json", pools=zone_pools("us-east-1a"))
    client = temporal_env.client
    await vl_client.submit(client, spec, queue=control)
    status = await on_host_with_checkpoint(client, spec.run_id, 1)
    machine = aws.player.machine(status.current_host.handle["instance_id"])
    # A host the workflow never heard of: a provision whose result was lost.
    aws.ec2.run_instances(ImageId=MOTO_AMI, MinCount=1, MaxCount=1, TagSpecifications=[{
        "ResourceType": "instance", "Tags": [{"Key": "vaultlayer:run-id", "Value": spec.run_id},
                                             {"Key": "vaultlayer:attempt", "Value": "1"}]}])

    await vl_client.cancel(client, spec.run_id)
    status = await result_of(client, spec.run_id)
    assert status.state == RunState.CANCELLED
    assert sorted(i["State"]["Name"] for i in aws.instances(spec.run_id)) == ["terminated", "terminated"]
    async def agent_down():
        return machine.agent.poll() is not None

    await wait_until(agent_down, 10, "the agent to go down with its instance")
    aws.assert_nothing_left()


def vl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)


async def test_a_worker_start_sweeps_finished_runs_and_vl_reap_the_rest(temporal_env, temporal_address, aws,
                                                                       tmp_path):
    from vaultlayer.models import RunInput

    client = temporal_env.client
    idle_queue = f"vl-nobody-{uuid.uuid4().hex[:8]}"

    async def run_on_idle_queue() -> str:
        spec = make_counter_spec(tmp_path, steps=10, out=tmp_path / "out.json")
        await client.start_workflow("TrainingRun", RunInput(spec=spec), id=spec.run_id, task_queue=idle_queue)
        return spec.run_id

    def orphan(run_id: str) -> str:
        return aws.ec2.run_instances(ImageId=MOTO_AMI, MinCount=1, MaxCount=1, TagSpecifications=[{
            "ResourceType": "instance", "Tags": [{"Key": "vaultlayer:run-id", "Value": run_id}]}]
        )["Instances"][0]["InstanceId"]

    def state(instance_id: str) -> str:
        return aws.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]["State"]["Name"]

    finished, running = await run_on_idle_queue(), await run_on_idle_queue()
    await client.get_workflow_handle(finished).terminate("ended from the Temporal UI, say")
    of_finished, of_running, of_unknown = orphan(finished), orphan(running), orphan("r-from-another-cluster")

    env = {**aws.base_env, "TEMPORAL_ADDRESS": temporal_address, "VL_TASK_QUEUE": f"vl-test-{uuid.uuid4().hex[:8]}"}
    worker = subprocess.Popen([sys.executable, "-m", "worker.control"], env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "worker.log", "ab"))
    try:
        async def swept():
            return state(of_finished) == "terminated"

        await wait_until(swept, 60, "the start-up sweep")
    finally:
        worker.terminate()
        worker.wait()
    assert state(of_running) == state(of_unknown) == "running", "only finished runs are swept"

    refused = vl(env, "reap", running)
    assert refused.returncode == 1 and "still running" in refused.stderr
    reaped = vl(env, "reap", "r-from-another-cluster")
    assert reaped.returncode == 0, reaped.stderr
    assert reaped.stdout.strip() == f"r-from-another-cluster: released {of_unknown}"
    assert state(of_unknown) == "terminated" and state(of_running) == "running"

    await client.get_workflow_handle(running).terminate("test over")
    assert vl(env, "reap").stdout.strip() == f"{running}: released {of_running}"
    aws.assert_nothing_left()


def test_vl_run_on_aws_from_the_command_line(aws, tmp_path, reference_weights):
    from tests.helpers import free_port

    port = free_port()
    env = {**aws.base_env, "VL_TEMPORAL_PORT": str(port), "VL_UI_PORT": str(free_port()), "VL_TASK_QUEUE": "vaultlayer"}
    # Hosts find the cluster through the secret: here, the embedded server `vl run` starts.
    boto3.client("secretsmanager").put_secret_value(SecretId=SECRET_NAME, SecretString=json.dumps(
        {"TEMPORAL_ADDRESS": f"127.0.0.1:{port}", "TEMPORAL_NAMESPACE": "default"}))
    out = tmp_path / "w.pt"
    try:
        result = vl(env, "run", "--provider", "aws", "--gpu", "A10G:1", "--zone", "us-east-1b",
                    "--checkpoint-every", "10", "--", "python", str(TRAIN_TINY), "--steps", "30", "--out", str(out))
    finally:
        down = vl(env, "down")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "attempt 1 on host h-1 (aws/us-east-1b/A10G:1/spot), starting at step 0" in result.stdout
    assert result.stdout.splitlines()[-1].startswith("succeeded: 1 attempts")
    assert_same_weights(out, reference_weights(30))
    assert down.returncode == 0
    aws.assert_nothing_left()


BAD_INPUT = [
    (["--gpu", "Z99:1", "--region", REGION], "--gpu Z99:1: no AWS instance type for it"),
    (["--gpu", "A10G:1", "--region", "mars-north-1"], "--region 'mars-north-1' is not an AWS region"),
    (["--gpu", "A10G:1", "--region", REGION], "no AWS credentials found"),
]


@pytest.mark.parametrize(("flags", "expected"), BAD_INPUT, ids=["gpu", "region", "credentials"])
def test_bad_input_is_one_clear_error_and_launches_nothing(aws, tmp_path, flags, expected):
    env = {**aws.base_env, "VL_TEMPORAL_PORT": "1", "VL_UI_PORT": "1"}
    if expected.startswith("no AWS credentials"):
        env = {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        env.update(AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_CONFIG_FILE=os.devnull)
    result = vl(env, "run", "--provider", "aws", *flags, "--", "python", str(TRAIN_TINY), "--steps", "1")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vl: error: ") and expected in lines[0], result.stderr
    assert aws.instances() == [], "nothing may be launched for bad input"
    assert not (tmp_path / "vlhome" / "run").exists(), "no server or worker may start for bad input"
    aws.assert_nothing_left()
