"""An AWS account on loopback: moto in server mode (started once per session) behind the EC2 proxy that
plays capacity errors, reached by the real boto3 client over HTTP; per test a fresh account with a VPC,
three subnets, an instance profile, the Temporal settings secret and `aws.toml`, and the instance
player that boots every instance moto runs. Every test ends with no tagged instance left running."""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.aws.fakes import MOTO_ACCOUNT, Ec2Proxy, InstancePlayer, SpotMarket

REGION = "us-east-1"
ZONES = ("us-east-1a", "us-east-1b", "us-east-1c")
SECRET_NAME = "vaultlayer/temporal"
PROFILE_NAME = "vaultlayer-host"
MOTO_AMI = "ami-12c6146b"  # one of the images moto ships
DLAMI_PARAMETER = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id"


@pytest.fixture(scope="session")
def moto_port():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    yield server.get_host_and_port()[1]
    server.stop()


@pytest.fixture(scope="session")
def ec2_proxy(moto_port):
    proxy = Ec2Proxy(moto_port)
    yield proxy
    proxy.close()


def credentials() -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION}


@dataclass
class Account:
    moto_url: str
    proxy: Ec2Proxy
    ec2: object  # boto3 EC2 client straight to moto: the test's own view, not counted by the proxy
    subnets: dict[str, str]  # zone -> subnet id
    player: InstancePlayer
    market: SpotMarket
    settings_file: Path
    base_env: dict[str, str]  # what a process needs to reach this account (the CLI, a worker)

    def instances(self, run_id: str | None = None, states: tuple[str, ...] = ()) -> list[dict]:
        filters = [{"Name": "tag:vaultlayer:run-id", "Values": [run_id]} if run_id else
                   {"Name": "tag-key", "Values": ["vaultlayer:run-id"]}]
        if states:
            filters.append({"Name": "instance-state-name", "Values": list(states)})
        pages = self.ec2.describe_instances(Filters=filters)
        return [i for r in pages["Reservations"] for i in r["Instances"]]

    def assert_nothing_left(self) -> None:
        alive = self.instances(states=("pending", "running", "stopping", "stopped"))
        assert not alive, f"instances outlived their run: {[(i['InstanceId'], i['Tags']) for i in alive]}"


def fresh_account() -> None:
    """Forget what earlier tests did in the services used here. Not /moto-api/reset: that would also
    empty moto's S3, which the storage tests serve from this same process."""
    from moto.ec2.models import ec2_backends
    from moto.iam.models import iam_backends
    from moto.secretsmanager.models import secretsmanager_backends
    from moto.ssm.models import ssm_backends

    for backends in (ec2_backends, iam_backends, secretsmanager_backends, ssm_backends):
        for account in backends.values():
            account.reset()
        backends.clear()


def publish_dlami(ami: str) -> None:
    """AWS publishes the DLAMI ids as public SSM parameters; moto ships some, not these."""
    from datetime import UTC, datetime

    from moto.ssm.models import Parameter, ssm_backends

    parameters = ssm_backends[MOTO_ACCOUNT][REGION]._parameters
    parameters[DLAMI_PARAMETER].append(Parameter(
        account_id=MOTO_ACCOUNT, name=DLAMI_PARAMETER, value=ami, parameter_type="String", description=None,
        allowed_pattern=None, keyid=None, last_modified_date=datetime.now(UTC), version=1, data_type="aws:ec2:image",
    ))


@pytest.fixture
def aws(moto_port, ec2_proxy, vl_home, tmp_path, monkeypatch, temporal_address):
    import boto3

    moto_url = f"http://127.0.0.1:{moto_port}"
    fresh_account()
    ec2_proxy.reset()
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in {**credentials(), "AWS_ENDPOINT_URL": ec2_proxy.url, "AWS_EC2_METADATA_DISABLED": "true",
                        "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}.items():
        monkeypatch.setenv(name, value)

    direct = {service: boto3.session.Session().client(service, endpoint_url=moto_url, **{
        "aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": REGION})
        for service in ("ec2", "iam", "secretsmanager")}
    ec2 = direct["ec2"]
    # On loopback (EC2 would refuse 127/8; moto does not): moto gives each instance a private IP of its subnet, and
    # the instances are local processes, so a gang's hosts reach each other there (torchrun's master_addr).
    vpc = ec2.create_vpc(CidrBlock="127.7.0.0/16")["Vpc"]["VpcId"]
    subnets = {zone: ec2.create_subnet(VpcId=vpc, CidrBlock=f"127.7.{n}.0/24",
                                       AvailabilityZone=zone)["Subnet"]["SubnetId"]
               for n, zone in enumerate(ZONES)}
    ec2_proxy.subnet_zones = {subnet: zone for zone, subnet in subnets.items()}
    group = ec2.create_security_group(GroupName="vaultlayer-hosts", Description="hosts", VpcId=vpc)["GroupId"]
    direct["iam"].create_instance_profile(InstanceProfileName=PROFILE_NAME)
    direct["secretsmanager"].create_secret(Name=SECRET_NAME, SecretString=json.dumps(
        {"TEMPORAL_ADDRESS": temporal_address, "TEMPORAL_NAMESPACE": "default"}))
    publish_dlami(MOTO_AMI)

    settings_file = vl_home / "aws.toml"
    settings_file.write_text("\n".join([
        f'temporal_settings = "secretsmanager:{SECRET_NAME}"',
        f'instance_profile = "{PROFILE_NAME}"',
        f"subnets = {json.dumps(list(subnets.values()))}",
        f"security_groups = {json.dumps([group])}",
        'package = "vaultlayer[aws]==0.1.0"',
        f'regions = ["{REGION}"]',
        "",
    ]))
    venv_bin = str(Path(sys.executable).parent)
    host_env = {k: v for k, v in os.environ.items() if not k.startswith(("VL_", "TEMPORAL_", "AWS_"))}
    host_env.update(credentials(), PATH=f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
                    AWS_ENDPOINT_URL=moto_url)
    player = InstancePlayer(ec2, tmp_path / "machines", host_env)
    market = SpotMarket(player)
    base_env = {**host_env, "AWS_ENDPOINT_URL": ec2_proxy.url, "AWS_EC2_METADATA_DISABLED": "true",
                "VL_HOME": str(vl_home)}
    account = Account(moto_url, ec2_proxy, ec2, subnets, player, market, settings_file, base_env)
    try:
        yield account
    finally:
        market.close()
        player.close()
    account.assert_nothing_left()
