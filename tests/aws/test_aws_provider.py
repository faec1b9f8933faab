"""The aws provider on its own, against moto over HTTP with the real boto3 client: launches and their
tags and user-data, gangs and their placement groups, capacity outcomes, retries, placement order, describe,
reap, prices, the settings a host reads, and the IAM policies. Instances are not booted here (the end-to-end
tests boot them)."""

from __future__ import annotations

import ast
import base64
import hashlib
import json
import shlex
import urllib.request
from pathlib import Path

import boto3
import pytest

from activities.providers.aws import AwsProvider, read_temporal_settings
from activities.providers.aws import host as aws_host
from activities.providers.aws import provider as aws_provider
from activities.providers.base import NoCapacityError
from vaultlayer.catalog import aws as aws_catalog
from vaultlayer.catalog import priced_pools
from tests.aws.conftest import DLAMI_PARAMETER, MOTO_AMI, REGION, SECRET_NAME
from tests.aws.fakes import instance_user_data, parse_user_data
from tests.conftest import REPO
from vaultlayer.models import AgentRef, HostState, Market, Placement, Pool, ProvisionInput, Refusal
from vaultlayer.workdir.agent import build_agent_wheel


def pool(zone: str | None = None, market: Market = Market.SPOT) -> Pool:
    return Pool(provider="aws", region="" if zone else REGION, zone=zone, gpu="A10G", gpu_count=1, market=market)


def request(run_id: str, attempt: int, zone: str | None = None, market: Market = Market.SPOT,
            nodes: int = 1) -> ProvisionInput:
    return ProvisionInput(run_id=run_id, placement=Placement(pool=pool(zone, market), attempt=attempt, nodes=nodes))


@pytest.fixture
def provider(aws, vl_home) -> AwsProvider:
    aws.player.booting = False
    return AwsProvider(vl_home, {})


def tags(instance: dict) -> dict[str, str]:
    return {tag["Key"]: tag["Value"] for tag in instance["Tags"]}


def test_spot_launch_is_tagged_and_its_user_data_holds_no_secret(aws, provider, temporal_address):
    host = provider.provision(request("r-tags", 1, zone="us-east-1b")).host
    [instance] = aws.instances("r-tags")
    assert instance["InstanceLifecycle"] == "spot"
    assert instance["Placement"]["AvailabilityZone"] == "us-east-1b" and instance["SubnetId"] == aws.subnets["us-east-1b"]
    assert tags(instance).items() >= {"vaultlayer:run-id": "r-tags", "vaultlayer:attempt": "1",
                                      "vaultlayer:host": "h-1"}.items()
    assert instance["MetadataOptions"]["HttpTokens"] == "required"
    assert instance["InstanceType"] == "g5.xlarge"  # the smallest A10G:1 host at the same (moto) spot price
    ssm = boto3.client("ssm")
    assert instance["ImageId"] == ssm.get_parameter(Name=DLAMI_PARAMETER)["Parameter"]["Value"]
    assert host.handle["instance_id"] == instance["InstanceId"] and host.handle["zone"] == "us-east-1b"
    assert host.price_per_hour == 0.00001  # moto's spot price history
    assert host.on_demand_price_per_hour == aws_catalog.ON_DEMAND_PRICES["g5.xlarge"]

    encoded = aws.ec2.describe_instance_attribute(InstanceId=instance["InstanceId"], Attribute="userData")
    user_data = base64.b64decode(encoded["UserData"]["Value"]).decode()
    exported, agent = parse_user_data(user_data)
    assert exported["VL_TEMPORAL_SETTINGS"] == f"secretsmanager:{SECRET_NAME}"
    assert exported["VL_NOTICE_SOURCE"] == "imds" and exported["AWS_DEFAULT_REGION"] == REGION
    assert not [name for name in exported if name.startswith("TEMPORAL_")]
    assert temporal_address not in user_data, "connection settings come from the secret, not the user-data"
    assert agent[:5] == ["agent", "--task-queue", host.task_queue, "--host-id", "h-1"]
    assert "pip install --quiet 'vaultlayer[aws]==0.1.0'" in user_data

    on_demand = provider.provision(request("r-tags", 2, zone="us-east-1b", market=Market.ON_DEMAND)).host
    second = next(i for i in aws.instances("r-tags") if i["InstanceId"] == on_demand.handle["instance_id"])
    assert "InstanceLifecycle" not in second
    assert on_demand.price_per_hour == on_demand.on_demand_price_per_hour == 1.006

    assert sorted(provider.reap("r-tags")) == sorted(i["InstanceId"] for i in aws.instances("r-tags"))
    aws.assert_nothing_left()


@pytest.mark.parametrize(("code", "refusal"), [
    ("InsufficientInstanceCapacity", Refusal.NO_CAPACITY),
    ("SpotMaxPriceTooLow", Refusal.PRICE_TOO_LOW),
    ("MaxSpotInstanceCountExceeded", Refusal.QUOTA),
    ("InstanceLimitExceeded", Refusal.QUOTA),
    ("VcpuLimitExceeded", Refusal.QUOTA),
    ("Unsupported", Refusal.UNSUPPORTED),
])
def test_capacity_errors_come_back_as_typed_refusals(aws, provider, code, refusal):
    aws.proxy.refuse("us-east-1a", code)
    with pytest.raises(NoCapacityError) as caught:
        provider.provision(request("r-refused", 1, zone="us-east-1a"))
    assert caught.value.kind == refusal
    assert f"g5.xlarge in us-east-1a: {code}" in str(caught.value)
    tried = [itype for zone, itype, outcome in aws.proxy.launches if outcome == code]
    # A quota is the region's: the other types would hit it too. Anything else: every type was tried.
    assert tried == (["g5.xlarge"] if refusal == Refusal.QUOTA else aws_catalog.INSTANCE_TYPES["A10G:1"])
    assert aws.instances("r-refused") == []
    aws.assert_nothing_left()


def test_throttling_and_server_errors_are_retried_without_a_second_launch(aws, provider):
    aws.proxy.fail_next("us-east-1a", "RequestLimitExceeded", "InternalError")
    host = provider.provision(request("r-throttled", 1, zone="us-east-1a")).host
    assert aws.proxy.launches == [("us-east-1a", "g5.xlarge", "RequestLimitExceeded"),
                                  ("us-east-1a", "g5.xlarge", "InternalError"),
                                  ("us-east-1a", "g5.xlarge", "launched")]
    assert [i["InstanceId"] for i in aws.instances("r-throttled")] == [host.handle["instance_id"]]
    provider.reap("r-throttled")
    aws.assert_nothing_left()


def test_a_region_pool_moves_off_the_reclaimed_zone_and_past_refusing_ones(aws, provider):
    first = provider.provision(request("r-region", 1)).host
    assert first.handle["zone"] == "us-east-1a"  # equal prices: the zones' order
    aws.market.reclaim_now(first.handle["instance_id"])
    aws.proxy.refuse("us-east-1b", "InsufficientInstanceCapacity")
    second = provider.provision(request("r-region", 2)).host
    assert second.handle["zone"] == "us-east-1c"
    # b was tried type by type and refused; a, where the run was just reclaimed, would have come last.
    assert [zone for zone, _, _ in aws.proxy.launches] == ["us-east-1a"] + ["us-east-1b"] * 5 + ["us-east-1c"]
    provider.reap("r-region")
    aws.assert_nothing_left()


def test_a_retried_provision_gets_the_host_of_the_first_try(aws, provider):
    first = provider.provision(request("r-retry", 1, zone="us-east-1a")).host
    again = provider.provision(request("r-retry", 1, zone="us-east-1a")).host
    assert again.handle["instance_id"] == first.handle["instance_id"] and again.task_queue == first.task_queue
    assert len(aws.instances("r-retry")) == 1
    provider.reap("r-retry")
    aws.assert_nothing_left()


def test_a_gang_is_launched_whole_into_a_cluster_placement_group(aws, provider):
    hosts = provider.provision(request("r-gang", 1, zone="us-east-1b", nodes=2)).hosts
    assert [host.host_id for host in hosts] == ["h-1-0", "h-1-1"]
    assert aws.proxy.launches == [("us-east-1b", "g5.xlarge", "launched")]  # one call for both
    [group] = aws.proxy.placement_groups.values()
    assert (group.name, group.strategy) == ("vl-r-gang-a1", "cluster")
    assert group.tags == {"vaultlayer:run-id": "r-gang", "vaultlayer:attempt": "1", "vaultlayer:gang": "r-gang-a1"}
    instances = {i["InstanceId"]: i for i in aws.instances("r-gang")}
    for node, host in enumerate(hosts):
        instance = instances[host.handle["instance_id"]]
        assert instance["Placement"]["GroupName"] == group.name
        assert instance["Placement"]["AvailabilityZone"] == host.handle["zone"] == "us-east-1b"
        assert tags(instance).items() >= {"vaultlayer:run-id": "r-gang", "vaultlayer:attempt": "1",
                                          "vaultlayer:gang": "r-gang-a1", "vaultlayer:node": str(node),
                                          "vaultlayer:host": host.host_id}.items()
        assert host.address == instance["PrivateIpAddress"]
        # One user-data for the gang: each instance runs the bootstrap of its launch index, its own host id.
        assert parse_user_data(instance_user_data(aws.ec2, instance))[1][:5] == [
            "agent", "--task-queue", host.task_queue, "--host-id", host.host_id]
    assert len({host.address for host in hosts}) == len({host.task_queue for host in hosts}) == 2

    again = provider.provision(request("r-gang", 1, zone="us-east-1b", nodes=2)).hosts  # a retried provision
    assert [(h.host_id, h.task_queue, h.handle, h.address) for h in again] == \
        [(h.host_id, h.task_queue, h.handle, h.address) for h in hosts]
    assert len(aws.proxy.launches) == 1 and len(aws.instances("r-gang")) == 2

    provider.release(hosts[0])
    assert aws.proxy.placement_groups  # still holds the other host
    provider.release(hosts[1])
    assert not aws.proxy.placement_groups  # the last host out deletes it
    assert provider.reap("r-gang") == []
    aws.assert_nothing_left()


def test_a_gang_the_zone_has_no_room_for_leaves_nothing_behind(aws, provider):
    aws.proxy.capacity("us-east-1a", 1)
    with pytest.raises(NoCapacityError) as caught:
        provider.provision(request("r-short", 1, zone="us-east-1a", nodes=2))
    assert caught.value.kind == Refusal.NO_CAPACITY and caught.value.held_host_seconds == 0
    # EC2 launches all of a MinCount or none, so a gang refused at launch held nothing: 0 of 2.
    assert str(caught.value).startswith("0 of 2 hosts: tried g5.xlarge in us-east-1a: InsufficientInstanceCapacity")
    assert aws.instances("r-short") == [] and not aws.proxy.placement_groups
    assert provider.provision(request("r-short", 2, zone="us-east-1a")).host  # one host fits
    provider.reap("r-short")
    aws.assert_nothing_left()


def test_a_retried_provision_releases_a_gang_that_lost_a_host(aws, provider):
    hosts = provider.provision(request("r-part", 1, zone="us-east-1a", nodes=2)).hosts
    aws.market.reclaim_now(hosts[1].handle["instance_id"])  # before the first try's result got through
    with pytest.raises(NoCapacityError, match="^1 of 2 hosts: ") as caught:
        provider.provision(request("r-part", 1, zone="us-east-1a", nodes=2))
    assert 0 <= caught.value.held_host_seconds < 60
    aws.assert_nothing_left()
    # The next attempt is a whole new gang, in a group of its own; the empty group of the last one goes on the way.
    again = provider.provision(request("r-part", 2, zone="us-east-1a", nodes=2)).hosts
    assert [host.host_id for host in again] == ["h-2-0", "h-2-1"]
    assert [group.name for group in aws.proxy.placement_groups.values()] == ["vl-r-part-a2"]
    assert sorted(provider.reap("r-part")) == sorted(host.handle["instance_id"] for host in again)
    assert not aws.proxy.placement_groups
    aws.assert_nothing_left()


def test_reap_and_the_sweep_find_a_placement_group_left_behind(aws, provider):
    hosts = provider.provision(request("r-left", 1, zone="us-east-1c", nodes=2)).hosts
    # The gang's instances went without a release (the worker that held them died): its group is left.
    aws.ec2.terminate_instances(InstanceIds=[host.handle["instance_id"] for host in hosts])
    assert provider.live_runs() == {"r-left"}
    assert provider.reap("r-left") == [] and not aws.proxy.placement_groups
    assert provider.live_runs() == set()
    aws.assert_nothing_left()


def test_describe_tells_a_reclaim_from_a_fault(aws, provider):
    reclaimed = provider.provision(request("r-describe", 1, zone="us-east-1a")).host
    assert provider.describe(reclaimed).state == HostState.RUNNING
    aws.market.reclaim_now(reclaimed.handle["instance_id"])
    described = provider.describe(reclaimed)
    assert described.state == HostState.GONE and "Server.SpotInstanceTermination" in described.reason

    failed = provider.provision(request("r-describe", 2, zone="us-east-1a")).host
    aws.ec2.stop_instances(InstanceIds=[failed.handle["instance_id"]])  # not EC2's doing: someone, or the host
    described = provider.describe(failed)
    assert described.state == HostState.FAULTY and "Client.UserInitiatedShutdown" in described.reason

    provider.release(failed)
    provider.release(failed)  # idempotent
    vanished = failed.model_copy(update={"handle": {**failed.handle, "instance_id": "i-0123456789abcdef0"}})
    assert provider.describe(vanished).state == HostState.GONE
    aws.assert_nothing_left()


def test_reap_and_live_runs_see_only_tagged_instances_of_the_run(aws, provider):
    provider.provision(request("r-one", 1, zone="us-east-1a"))
    other = provider.provision(request("r-two", 1, zone="us-east-1b")).host
    aws.ec2.run_instances(ImageId=MOTO_AMI, MinCount=1, MaxCount=1)  # not ours: untagged
    restricted = aws.settings_file.read_text()
    aws.settings_file.write_text(restricted.replace('regions = ["us-east-1"]', ""))
    assert provider.live_runs() == {"r-one", "r-two"}  # found by looking in every enabled region
    aws.settings_file.write_text(restricted)
    [reaped] = provider.reap("r-one")
    assert aws.instances("r-one")[0]["InstanceId"] == reaped
    assert provider.live_runs() == {"r-two"}
    assert provider.reap("r-two") == [other.handle["instance_id"]]
    assert provider.reap("r-two") == []
    untagged = [i for r in aws.ec2.describe_instances()["Reservations"] for i in r["Instances"] if "Tags" not in i]
    assert [i["State"]["Name"] for i in untagged] == ["running"]
    aws.ec2.terminate_instances(InstanceIds=[untagged[0]["InstanceId"]])
    aws.assert_nothing_left()


def test_pools_get_list_prices_from_spot_history_and_the_table(aws):
    spot, on_demand = priced_pools([pool("us-east-1a"), pool("us-east-1a", Market.ON_DEMAND)])
    assert spot.price_per_hour == 0.00001 and spot.on_demand_price_per_hour == 1.006
    assert on_demand.price_per_hour == on_demand.on_demand_price_per_hour == 1.006
    aws.settings_file.write_text(aws.settings_file.read_text() + '[on_demand_prices]\n"g5.xlarge" = 0.91\n')
    [overridden] = priced_pools([pool(None, Market.ON_DEMAND)])
    assert overridden.price_per_hour == 0.91
    aws.assert_nothing_left()


def test_a_host_reads_its_temporal_settings_with_its_role(aws, temporal_address):
    assert read_temporal_settings(f"secretsmanager:{SECRET_NAME}") == {
        "TEMPORAL_ADDRESS": temporal_address, "TEMPORAL_NAMESPACE": "default"}
    ssm = boto3.client("ssm")
    ssm.put_parameter(Name="/vaultlayer/temporal", Type="SecureString",
                      Value=json.dumps({"TEMPORAL_ADDRESS": "t.example:7233", "TEMPORAL_API_KEY": "k-123",
                                        "VL_ENCRYPTION_KEY": "a2V5"}))  # the payload key travels the same way
    settings = read_temporal_settings("ssm:/vaultlayer/temporal")
    assert settings["TEMPORAL_API_KEY"] == "k-123" and settings["VL_ENCRYPTION_KEY"] == "a2V5"
    ssm.put_parameter(Name="/vaultlayer/odd", Type="SecureString",
                      Value=json.dumps({"TEMPORAL_ADDRESS": "t.example:7233", "API_KEY": "k-secret-value"}))
    with pytest.raises(ValueError) as caught:
        read_temporal_settings("ssm:/vaultlayer/odd")
    assert "API_KEY" in str(caught.value) and "k-secret-value" not in str(caught.value)
    aws.assert_nothing_left()


def aws_calls() -> dict[str, set[str]]:
    """Every AWS operation the aws provider makes through `call`, by the role that makes it: the host's
    (its host side) or the control-plane worker's (its provider and the catalog's spot prices)."""
    service_of = {"get_secret_value": "secretsmanager", "get_parameter": "ssm"}
    calls: dict[str, set[str]] = {"host": set(), "worker": set()}
    for role, module in (("host", aws_host), ("worker", aws_provider), ("worker", aws_catalog)):
        for node in ast.walk(ast.parse(Path(module.__file__).read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "call":
                method = node.args[0].attr
                action = "".join(part.title() for part in method.split("_"))
                calls[role].add(f"{service_of.get(method, 'ec2')}:{action}")
    return calls


def test_iam_policies_grant_exactly_the_calls_made():
    def actions(name: str) -> set[str]:
        document = json.loads((REPO / "deploy" / "aws" / name).read_text())
        found = set()
        for statement in document["Statement"]:
            listed = statement["Action"]
            found |= {listed} if isinstance(listed, str) else set(listed)
        return found

    calls = aws_calls()
    assert "ec2:RunInstances" in calls["worker"] and "secretsmanager:GetSecretValue" in calls["host"]
    # Beyond the calls: tagging at launch and passing the instance role are authorised separately.
    assert actions("worker-policy.json") == calls["worker"] | {"ec2:CreateTags", "iam:PassRole"}
    assert actions("instance-policy.json") == calls["host"] | {"kms:Decrypt"}  # settings under a customer key


def test_an_aws_host_fetches_the_wheel_by_a_presigned_url(aws, tmp_path):
    """The user-data of a host of a run that carries its wheel (in S3): no index name, a pre-signed URL that
    serves exactly the stored wheel."""
    settings = aws.settings_file.read_text()
    aws.settings_file.write_text("\n".join(line for line in settings.splitlines() if not line.startswith("package")))
    name, data = build_agent_wheel()
    digest = hashlib.sha256(data).hexdigest()
    s3 = boto3.client("s3", endpoint_url=aws.moto_url, region_name=REGION)
    s3.create_bucket(Bucket="vl-wheels")
    s3.put_object(Bucket="vl-wheels", Key=f"runs/_code/agents/{digest}/{name}", Body=data)
    agent = AgentRef(url=f"s3://vl-wheels/runs/_code/agents/{digest}/{name}", sha256=digest, pins=["pydantic==2.14.4"])
    provider = AwsProvider(aws.settings_file.parent, {})
    try:
        host = provider.provision(ProvisionInput(run_id="r-wheel", placement=Placement(pool=pool("us-east-1a", Market.SPOT), attempt=1),
                                                 agent=agent)).host
        encoded = aws.ec2.describe_instance_attribute(InstanceId=host.handle["instance_id"], Attribute="userData")
        user_data = base64.b64decode(encoded["UserData"]["Value"]).decode()
    finally:
        provider.reap("r-wheel")
    assert "pip install --quiet --constraint /opt/vaultlayer/constraints.txt " \
           f"'/opt/vaultlayer/{name}[aws]'" in user_data
    assert f"{digest}  /opt/vaultlayer/{name}" in user_data and "\npydantic==2.14.4\n" in user_data
    assert "vaultlayer[aws]==" not in user_data
    [fetch] = [line for line in user_data.splitlines() if line.startswith("curl ")]
    with urllib.request.urlopen(shlex.split(fetch)[-1], timeout=30) as response:  # what the host's curl gets
        assert hashlib.sha256(response.read()).hexdigest() == digest
    assert parse_user_data(user_data)[1][:1] == ["agent"]  # and the agent starts after it
    aws.assert_nothing_left()
