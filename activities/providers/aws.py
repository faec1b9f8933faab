"""The `aws` provider: EC2 GPU hosts, spot or on-demand, in the user's own account.

A host is one instance from `run_instances` (spot as a one-time request through InstanceMarketOptions)
that boots the host agent from its user-data; the instance, its volumes and its spot request carry the
run's tags. Within a pool the provider tries (zone, instance type) candidates cheapest first, and moves
a region pool off the zone its previous host was in, since spot reclaims come in waves per zone.
Capacity and quota errors come back as typed refusals; throttling and 5xx are retried with backoff.

boto3 is imported lazily (`vl` works without it) and every call here blocks: the control activities
run on the worker's thread pool. Settings live in `$VL_HOME/aws.toml` (or `$VL_AWS_CONFIG`); see
docs/providers/aws.md.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import shlex
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator

from activities.providers.base import load_toml_settings, NoCapacityError, ProviderConfigError
from vaultlayer.codec import KEY_ENV
from vaultlayer.home import vl_home as default_vl_home
from vaultlayer.models import Host, HostDescription, HostState, Market, Pool, ProvisionInput, ProvisionResult, Refusal

log = structlog.get_logger(__name__)

RUN_TAG, ATTEMPT_TAG, HOST_TAG = "vaultlayer:run-id", "vaultlayer:attempt", "vaultlayer:host"
ALIVE_STATES = ["pending", "running", "stopping", "stopped"]

# GPU class:count -> instance types with exactly that many of that GPU, in preference order (smallest
# host first). `instance_types` in aws.toml replaces entries or adds classes.
INSTANCE_TYPES: dict[str, list[str]] = {
    "T4:1": ["g4dn.xlarge", "g4dn.2xlarge", "g4dn.4xlarge", "g4dn.8xlarge", "g4dn.16xlarge"],
    "T4:4": ["g4dn.12xlarge"],
    "T4:8": ["g4dn.metal"],
    "A10G:1": ["g5.xlarge", "g5.2xlarge", "g5.4xlarge", "g5.8xlarge", "g5.16xlarge"],
    "A10G:4": ["g5.12xlarge", "g5.24xlarge"],
    "A10G:8": ["g5.48xlarge"],
    "L4:1": ["g6.xlarge", "g6.2xlarge", "g6.4xlarge", "g6.8xlarge", "g6.16xlarge"],
    "L4:4": ["g6.12xlarge", "g6.24xlarge"],
    "L4:8": ["g6.48xlarge"],
    "L40S:1": ["g6e.xlarge", "g6e.2xlarge", "g6e.4xlarge", "g6e.8xlarge", "g6e.16xlarge"],
    "L40S:4": ["g6e.12xlarge", "g6e.24xlarge"],
    "L40S:8": ["g6e.48xlarge"],
    "V100:1": ["p3.2xlarge"],
    "V100:4": ["p3.8xlarge"],
    "V100:8": ["p3.16xlarge", "p3dn.24xlarge"],
    "A100:8": ["p4d.24xlarge", "p4de.24xlarge"],
    "H100:8": ["p5.48xlarge"],
    "H200:8": ["p5e.48xlarge", "p5en.48xlarge"],
}

# On-demand USD per hour, Linux, shared tenancy, US East (N. Virginia), from the Amazon EC2 On-Demand
# pricing page (aws.amazon.com/ec2/pricing/on-demand/) as of 2025-06. Other regions cost up to ~30%
# more; `on_demand_prices` in aws.toml overrides any entry. P4/P5 are left out (their prices were cut
# in June 2025): add them there. Used for ranking on-demand placements and for attempt costs.
ON_DEMAND_PRICES_AS_OF = "2025-06"
ON_DEMAND_PRICES: dict[str, float] = {
    "g4dn.xlarge": 0.526, "g4dn.2xlarge": 0.752, "g4dn.4xlarge": 1.204, "g4dn.8xlarge": 2.176,
    "g4dn.16xlarge": 4.352, "g4dn.12xlarge": 3.912, "g4dn.metal": 7.824,
    "g5.xlarge": 1.006, "g5.2xlarge": 1.212, "g5.4xlarge": 1.624, "g5.8xlarge": 2.448,
    "g5.16xlarge": 4.096, "g5.12xlarge": 5.672, "g5.24xlarge": 8.144, "g5.48xlarge": 16.288,
    "g6.xlarge": 0.8048, "g6.2xlarge": 0.9776, "g6.4xlarge": 1.3232, "g6.8xlarge": 2.0144,
    "g6.16xlarge": 3.3968, "g6.12xlarge": 4.6016, "g6.24xlarge": 6.6752, "g6.48xlarge": 13.3504,
    "g6e.xlarge": 1.861, "g6e.2xlarge": 2.24208, "g6e.4xlarge": 3.00424, "g6e.8xlarge": 4.52856,
    "g6e.16xlarge": 7.57719, "g6e.12xlarge": 10.49264, "g6e.24xlarge": 15.06559, "g6e.48xlarge": 30.13118,
    "p3.2xlarge": 3.06, "p3.8xlarge": 12.24, "p3.16xlarge": 24.48, "p3dn.24xlarge": 31.212,
}

# The latest Deep Learning Base OSS Nvidia Driver AMI (Ubuntu 24.04, Python 3.12) of each region.
DEFAULT_AMI_PARAMETER = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id"

# EC2 error codes of RunInstances that say "not here, not now": typed refusals, never crashes.
REFUSALS: dict[str, Refusal] = {
    "InsufficientInstanceCapacity": Refusal.NO_CAPACITY,
    "SpotMaxPriceTooLow": Refusal.PRICE_TOO_LOW,
    "MaxSpotInstanceCountExceeded": Refusal.QUOTA,
    "InstanceLimitExceeded": Refusal.QUOTA,
    "VcpuLimitExceeded": Refusal.QUOTA,
    "Unsupported": Refusal.UNSUPPORTED,
}
# When candidates refuse for different reasons, the pool's refusal is the weightiest one.
REFUSAL_WEIGHT = [Refusal.UNSUPPORTED, Refusal.PRICE_TOO_LOW, Refusal.NO_CAPACITY, Refusal.QUOTA]
THROTTLING = {"RequestLimitExceeded", "Throttling", "ThrottlingException", "TooManyRequestsException",
              "RequestThrottled", "SlowDown"}
CALL_ATTEMPTS, BACKOFF_BASE_SECONDS, BACKOFF_MAX_SECONDS = 6, 0.5, 20.0

# State reasons that mean EC2 took the instance back (a reclaim) rather than it failing on its own.
PROVIDER_TOOK_IT = {"Server.SpotInstanceTermination", "Server.SpotInstanceShutdown", "Server.ScheduledStop",
                    "Server.InsufficientInstanceCapacity"}

HOST_HOME = "/opt/vaultlayer"


def package_requirement() -> str:
    try:
        return f"vaultlayer[aws]=={version('vaultlayer')}"
    except PackageNotFoundError:
        return "vaultlayer[aws]"


class AwsSettings(BaseModel):
    """`aws.toml`: the account-side settings hosts are launched with. Unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")

    temporal_settings: str  # "secretsmanager:<secret id or ARN>" or "ssm:<SecureString parameter name>"
    instance_profile: str  # name or ARN; its role may read temporal_settings and the checkpoint storage
    subnets: list[str] = Field(default_factory=list)  # allowed subnets, at most one per zone; []: default VPC
    security_groups: list[str] = Field(default_factory=list)
    key_name: str | None = None
    ami: str | None = None  # default: DEFAULT_AMI_PARAMETER of the region
    package: str = Field(default_factory=package_requirement)  # what hosts pip-install: the run's version
    setup: list[str] = Field(default_factory=list)  # shell lines run before the agent (your code, its deps)
    instance_types: dict[str, list[str]] = Field(default_factory=dict)  # "A10G:1" -> types
    # Where runs may launch, and so where the reaper looks for their hosts; []: every enabled region.
    regions: list[str] = Field(default_factory=list)
    on_demand_prices: dict[str, float] = Field(default_factory=dict)  # instance type -> USD per hour

    @field_validator("temporal_settings")
    @classmethod
    def _known_store(cls, value: str) -> str:
        store, _, name = value.partition(":")
        if store not in ("secretsmanager", "ssm") or not name:
            raise ValueError("expected secretsmanager:<secret id> or ssm:<parameter name>")
        return value

    def types_for(self, gpu: str, count: int) -> list[str]:
        return {**INSTANCE_TYPES, **self.instance_types}.get(f"{gpu}:{count}", [])

    def on_demand_price(self, instance_type: str) -> float | None:
        return self.on_demand_prices.get(instance_type, ON_DEMAND_PRICES.get(instance_type))


def settings_path(vl_home: Path) -> Path:
    return Path(os.environ.get("VL_AWS_CONFIG") or vl_home / "aws.toml")


def is_configured(vl_home: Path) -> bool:
    return settings_path(vl_home).exists()


def load_settings(vl_home: Path) -> AwsSettings:
    path = settings_path(vl_home)
    return load_toml_settings(path, AwsSettings, f"the aws provider needs its settings in {path} (temporal_settings, instance_profile); "
                         "see docs/providers/aws.md")


# ---------------------------------------------------------------- checks before anything starts


def _boto3():
    try:
        import boto3
    except ImportError:
        raise ValueError("the aws provider needs boto3: pip install 'vaultlayer[aws]'") from None
    return boto3


@functools.cache
def known_regions() -> frozenset[str]:
    """Every region botocore knows, from its bundled endpoint data (no network)."""
    session = _boto3().session.Session()
    return frozenset(region for partition in session.get_available_partitions()
                     for region in session.get_available_regions("ec2", partition_name=partition))


def region_of_zone(zone: str) -> str:
    """us-east-1a -> us-east-1; Local Zones too (us-east-1-bos-1a -> us-east-1)."""
    for region in sorted(known_regions(), key=len, reverse=True):
        rest = zone[len(region):]
        if zone.startswith(region) and rest and (rest.isalpha() and len(rest) == 1 or rest.startswith("-")):
            return region
    raise ValueError(f"--zone {zone!r} is not an availability zone of any AWS region; zones look like us-east-1a")


def pool_region(pool: Pool) -> str:
    if pool.zone:
        region = region_of_zone(pool.zone)
        if pool.region and pool.region != region:
            raise ValueError(f"--zone {pool.zone} is in {region}, not in --region {pool.region}")
        return region
    region = pool.region or _boto3().session.Session().region_name
    if not region:
        raise ValueError("no AWS region: give --region or --zone, or set AWS_DEFAULT_REGION")
    if region not in known_regions():
        raise ValueError(f"--region {region!r} is not an AWS region; regions look like us-east-1 or eu-west-1")
    return region


def validate_pool(pool: Pool) -> None:
    settings = load_settings(default_vl_home())
    if pool.gpu is None:
        raise ValueError("the aws provider launches GPU hosts: give --gpu, such as --gpu A10G:1")
    if not settings.types_for(pool.gpu, pool.gpu_count):
        known = sorted({*INSTANCE_TYPES, *settings.instance_types})
        raise ValueError(f"--gpu {pool.gpu}:{pool.gpu_count}: no AWS instance type for it; known: {', '.join(known)} "
                         "(map more in instance_types of aws.toml)")
    region = pool_region(pool)
    if settings.regions and region not in settings.regions:
        raise ValueError(f"region {region} is not in regions of aws.toml ({', '.join(settings.regions)}); "
                         "add it there, so that the reaper looks for hosts in it")
    if _boto3().session.Session().get_credentials() is None:
        raise ValueError("no AWS credentials found: set AWS_PROFILE, or AWS_ACCESS_KEY_ID and "
                         "AWS_SECRET_ACCESS_KEY, or run where an instance role provides them")


# ---------------------------------------------------------------- calls


def error_code(err: Exception) -> str:
    return getattr(err, "response", {}).get("Error", {}).get("Code", "")


def _transient(err: Exception) -> bool:
    from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError, HTTPClientError

    if isinstance(err, (BotoConnectionError, HTTPClientError)):
        return True
    if not isinstance(err, ClientError) or error_code(err) in REFUSALS:
        return False
    status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return error_code(err) in THROTTLING or status >= 500


def call(operation, **kwargs):
    """One AWS call; throttling, 5xx and dropped connections are retried with jittered backoff.
    Capacity errors (InsufficientInstanceCapacity is a 500) are not: the next zone is a better bet."""
    for attempt in range(CALL_ATTEMPTS):
        try:
            return operation(**kwargs)
        except Exception as err:
            if not _transient(err) or attempt == CALL_ATTEMPTS - 1:
                raise
            delay = min(BACKOFF_MAX_SECONDS, BACKOFF_BASE_SECONDS * 2**attempt) * random.uniform(0.5, 1.0)
            log.warning("aws call retried", operation=operation.__name__, error=error_code(err) or type(err).__name__,
                        delay=round(delay, 2))
            time.sleep(delay)


def new_client(service: str, region: str | None):
    """A boto3 client with botocore's retries off: `call` does them, and knows capacity errors."""
    from botocore.config import Config

    return _boto3().session.Session().client(
        service, region_name=region,
        config=Config(retries={"mode": "standard", "total_max_attempts": 1}, connect_timeout=10, read_timeout=60),
    )


def spot_prices(ec2, types: list[str], zones: list[str] | None) -> dict[tuple[str, str], float]:
    """The spot price in effect now per (zone, type), of `zones` or all. The zone is filtered here, not
    in the request: with StartTime=EndTime=now EC2 returns the price in effect for every zone."""
    now = datetime.now(UTC)
    prices: dict[tuple[str, str], tuple[datetime, float]] = {}
    token = None
    while True:
        page = call(ec2.describe_spot_price_history, InstanceTypes=types, ProductDescriptions=["Linux/UNIX"],
                    StartTime=now, EndTime=now, **({"NextToken": token} if token else {}))
        for entry in page["SpotPriceHistory"]:
            key = (entry["AvailabilityZone"], entry["InstanceType"])
            if (zones is None or key[0] in zones) and (key not in prices or entry["Timestamp"] > prices[key][0]):
                prices[key] = (entry["Timestamp"], float(entry["SpotPrice"]))
        token = page.get("NextToken")
        if not token:
            return {key: price for key, (_, price) in prices.items()}


def priced(pool: Pool) -> Pool:
    """The pool with list prices for the policy's ranking: the cheapest spot price now over its zones and
    types (from the spot price history), and the cheapest on-demand price of its types (the table)."""
    if pool.price_per_hour is not None:
        return pool
    settings = load_settings(default_vl_home())
    types = settings.types_for(pool.gpu or "", pool.gpu_count)
    on_demand = min((price for t in types if (price := settings.on_demand_price(t)) is not None), default=None)
    price = on_demand
    if pool.market == Market.SPOT:
        region = pool_region(pool)
        try:
            found = spot_prices(new_client("ec2", region), types, [pool.zone] if pool.zone else None)
        except Exception as err:
            raise ValueError(f"cannot read spot prices in {region}: {error_code(err) or err}") from None
        price = min(found.values(), default=None)
    return pool.model_copy(update={"price_per_hour": price, "on_demand_price_per_hour": on_demand})


def tag_value(resource: dict, key: str) -> str | None:
    return next((tag["Value"] for tag in resource.get("Tags", []) if tag["Key"] == key), None)


def read_temporal_settings(reference: str) -> dict[str, str]:
    """On the host: the Temporal connection settings, read with the instance role. The stored value is a
    JSON object of Temporal environment-config variables (TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE,
    TEMPORAL_API_KEY, TEMPORAL_TLS_*, and VL_ENCRYPTION_KEY when payloads are encrypted). Errors name keys,
    never values."""
    boto3 = _boto3()
    from botocore.config import Config

    # The agent reads this before it can serve its host: a stalled request must not hold it past the
    # workflow's start timeout (botocore's default read timeout alone is 60 s), so short timeouts, retried.
    quick = Config(connect_timeout=5, read_timeout=10, retries={"mode": "standard", "total_max_attempts": 5})
    store, _, name = reference.partition(":")
    region = name.split(":")[3] if name.startswith("arn:") else None
    if store == "secretsmanager":
        client = boto3.session.Session().client("secretsmanager", region_name=region, config=quick)
        text = call(client.get_secret_value, SecretId=name)["SecretString"]
    elif store == "ssm":
        client = boto3.session.Session().client("ssm", region_name=region, config=quick)
        text = call(client.get_parameter, Name=name, WithDecryption=True)["Parameter"]["Value"]
    else:
        raise ValueError(f"VL_TEMPORAL_SETTINGS {reference!r}: expected secretsmanager:<id> or ssm:<name>")
    try:
        settings = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"{reference}: not a JSON object of TEMPORAL_* settings") from None
    if not isinstance(settings, dict) or "TEMPORAL_ADDRESS" not in settings:
        raise ValueError(f"{reference}: expected a JSON object with at least TEMPORAL_ADDRESS")
    odd = [key for key, value in settings.items()
           if not (key.startswith("TEMPORAL_") or key == KEY_ENV) or not isinstance(value, str)]
    if odd:
        raise ValueError(f"{reference}: keys must be TEMPORAL_* or {KEY_ENV}, with string values; "
                         f"check {', '.join(odd)}")
    return settings


def bootstrap_script(settings: AwsSettings, region: str, task_queue: str, host_id: str, run_id: str) -> str:
    """The instance's user-data (cloud-init runs it once as root). It holds no secret: the agent reads
    the Temporal connection settings with the instance role from the reference exported here."""
    venv = f"{HOST_HOME}/venv"
    return "\n".join([
        "#!/bin/bash",
        "# VaultLayer host bootstrap: install the run's version, start the host agent.",
        "set -euo pipefail",
        "exec >>/var/log/vaultlayer-bootstrap.log 2>&1",
        "# However this ends (a failed step, the agent exiting) the host powers off, which terminates it.",
        "trap 'shutdown -h now' EXIT",
        f"export VL_HOME={HOST_HOME}",
        f"export AWS_DEFAULT_REGION={shlex.quote(region)}",
        f"export VL_TEMPORAL_SETTINGS={shlex.quote(settings.temporal_settings)}",
        "export VL_NOTICE_SOURCE=imds",
        f"python3 -m venv {venv} || {{ apt-get update -q && apt-get install -y -q python3-venv && python3 -m venv {venv}; }}",
        f"{venv}/bin/pip install --quiet {shlex.quote(settings.package)}",
        *settings.setup,
        f"{venv}/bin/vl agent --task-queue {shlex.quote(task_queue)} --host-id {shlex.quote(host_id)} "
        f"--host-dir {HOST_HOME}/host --run-id {shlex.quote(run_id)}",
        "",
    ])


@dataclass(frozen=True)
class Candidate:
    zone: str
    instance_type: str
    subnet: str | None
    price: float | None  # what the host would cost per hour: spot price now, or on demand
    on_demand_price: float | None


class AwsProvider:
    name = "aws"

    def __init__(self, vl_home: Path, temporal_env: dict[str, str]) -> None:
        self.vl_home = vl_home
        self._clients: dict[tuple[str, str], object] = {}
        self._lock = threading.Lock()
        self._amis: dict[str, str] = {}

    @property
    def settings(self) -> AwsSettings:
        try:
            return load_settings(self.vl_home)
        except ValueError as err:
            raise ProviderConfigError(str(err)) from None

    def client(self, service: str, region: str):
        """One client per service and region, shared by the activity threads (clients are thread-safe)."""
        with self._lock:
            if (service, region) not in self._clients:
                self._clients[service, region] = new_client(service, region)
            return self._clients[service, region]

    # ------------------------------------------------------------ provision

    def provision(self, request: ProvisionInput) -> ProvisionResult:
        from botocore.exceptions import ClientError, NoCredentialsError

        settings, pool, attempt = self.settings, request.placement.pool, request.placement.attempt
        try:
            region = pool_region(pool)
        except ValueError as err:
            raise ProviderConfigError(str(err)) from None
        ec2 = self.client("ec2", region)
        try:
            earlier = self._instances(ec2, [{"Name": f"tag:{RUN_TAG}", "Values": [request.run_id]}])
        except NoCredentialsError:
            raise ProviderConfigError("no AWS credentials on the control-plane worker") from None
        this_attempt = [i for i in earlier if tag_value(i, ATTEMPT_TAG) == str(attempt)]
        live = [i for i in this_attempt if i["State"]["Name"] in ("pending", "running")]
        if live:  # a retried provision: the host from the first try is the one to use
            instance = live[0]
            zone, itype = instance["Placement"]["AvailabilityZone"], instance["InstanceType"]
            prices = spot_prices(ec2, [itype], [zone]) if pool.market == Market.SPOT else {}
            return ProvisionResult(host=self._host(request, instance, region, self._candidate(
                settings, zone, itype, instance.get("SubnetId"), prices, pool.market)))
        previous = [i for i in earlier if i not in this_attempt]
        last_zone = max(previous, key=lambda i: i["LaunchTime"])["Placement"]["AvailabilityZone"] if previous else None

        candidates = self._candidates(ec2, settings, pool, region, last_zone)
        host_id = f"h-{attempt}"
        task_queue = f"vl-host-{request.run_id}-{host_id}"
        user_data = bootstrap_script(settings, region, task_queue, host_id, request.run_id)
        refusals: list[tuple[Refusal, str]] = []
        for candidate in candidates:
            token = hashlib.sha256(f"{request.run_id}/{attempt}/{len(this_attempt)}/{candidate.zone}/"
                                   f"{candidate.instance_type}".encode()).hexdigest()[:64]
            try:
                instance = self._launch(ec2, settings, pool, candidate, request.run_id, attempt, host_id,
                                        user_data, token)
            except ClientError as err:
                refusal = REFUSALS.get(error_code(err))
                if refusal is None:
                    if _transient(err):
                        raise  # still throttled after the backoff: the activity retries later
                    raise ProviderConfigError(f"EC2 refused to launch {candidate.instance_type} in "
                                              f"{candidate.zone}: {error_code(err)}: {err}") from None
                refusals.append((refusal, f"{candidate.instance_type} in {candidate.zone}: {error_code(err)}"))
                log.info("no capacity", run_id=request.run_id, zone=candidate.zone,
                         instance_type=candidate.instance_type, error=error_code(err))
                if refusal == Refusal.QUOTA:
                    break  # an account limit of the region: the other candidates would hit it too
                continue
            log.info("host provisioned", run_id=request.run_id, host=host_id, instance=instance["InstanceId"],
                     zone=candidate.zone, instance_type=candidate.instance_type, market=pool.market.value,
                     price_per_hour=candidate.price)
            return ProvisionResult(host=self._host(request, instance, region, candidate))
        kind = max((refusal for refusal, _ in refusals), key=REFUSAL_WEIGHT.index)
        raise NoCapacityError(kind, "tried " + "; ".join(tried for _, tried in refusals))

    def _candidates(self, ec2, settings: AwsSettings, pool: Pool, region: str,
                    last_zone: str | None) -> list[Candidate]:
        """Every (zone, type) of the pool that EC2 offers, cheapest first; the zone of the run's previous
        host last, so that a region pool moves on after a reclaim."""
        subnets = self._zone_subnets(ec2, settings, region)
        if pool.zone and pool.zone not in subnets:
            allowed = ", ".join(sorted(subnets)) or "none"
            raise ProviderConfigError(f"zone {pool.zone} is not allowed here (zones with an allowed subnet or "
                                      f"available: {allowed})")
        zones = [pool.zone] if pool.zone else sorted(subnets)
        types = settings.types_for(pool.gpu or "", pool.gpu_count)
        offered = set()
        for offering in call(ec2.describe_instance_type_offerings, LocationType="availability-zone",
                             Filters=[{"Name": "instance-type", "Values": types},
                                      {"Name": "location", "Values": zones}])["InstanceTypeOfferings"]:
            offered.add((offering["Location"], offering["InstanceType"]))
        if not offered:
            raise NoCapacityError(Refusal.UNSUPPORTED, f"none of {', '.join(types)} is offered in {', '.join(zones)}")
        prices = spot_prices(ec2, types, zones) if pool.market == Market.SPOT else {}
        candidates = [self._candidate(settings, zone, itype, subnets[zone], prices, pool.market)
                      for zone in zones for itype in types if (zone, itype) in offered]
        return sorted(candidates, key=lambda c: (c.zone == last_zone, c.price is None, c.price or 0.0,
                                                 zones.index(c.zone), types.index(c.instance_type)))

    @staticmethod
    def _candidate(settings: AwsSettings, zone: str, itype: str, subnet: str | None,
                   spot_prices: dict[tuple[str, str], float], market: Market) -> Candidate:
        on_demand = settings.on_demand_price(itype)
        price = spot_prices.get((zone, itype)) if market == Market.SPOT else on_demand
        return Candidate(zone, itype, subnet, price, on_demand)

    def _zone_subnets(self, ec2, settings: AwsSettings, region: str) -> dict[str, str | None]:
        """zone -> the allowed subnet there (None: the default VPC's subnet of the zone)."""
        if settings.subnets:
            found = call(ec2.describe_subnets, Filters=[{"Name": "subnet-id", "Values": settings.subnets}])["Subnets"]
            return {subnet["AvailabilityZone"]: subnet["SubnetId"] for subnet in found}
        zones = call(ec2.describe_availability_zones,
                     Filters=[{"Name": "zone-type", "Values": ["availability-zone"]},
                              {"Name": "state", "Values": ["available"]}])["AvailabilityZones"]
        return {zone["ZoneName"]: None for zone in zones}

    def _ami(self, settings: AwsSettings, region: str) -> str:
        if settings.ami:
            return settings.ami
        if region not in self._amis:
            ssm = self.client("ssm", region)
            self._amis[region] = call(ssm.get_parameter, Name=DEFAULT_AMI_PARAMETER)["Parameter"]["Value"]
        return self._amis[region]

    def _launch(self, ec2, settings: AwsSettings, pool: Pool, candidate: Candidate, run_id: str, attempt: int,
                host_id: str, user_data: str, token: str) -> dict:
        tags = [{"Key": RUN_TAG, "Value": run_id}, {"Key": ATTEMPT_TAG, "Value": str(attempt)},
                {"Key": HOST_TAG, "Value": host_id}, {"Key": "Name", "Value": f"vl-{run_id}-{host_id}"}]
        tagged = ["instance", "volume", "network-interface"] + (["spot-instances-request"]
                                                                if pool.market == Market.SPOT else [])
        profile = settings.instance_profile
        params = dict(
            ImageId=self._ami(settings, ec2.meta.region_name),
            InstanceType=candidate.instance_type,
            MinCount=1,
            MaxCount=1,
            UserData=user_data,
            ClientToken=token,  # a retried call (5xx, timeout) launches nothing twice
            IamInstanceProfile={"Arn": profile} if profile.startswith("arn:") else {"Name": profile},
            InstanceInitiatedShutdownBehavior="terminate",
            MetadataOptions={"HttpTokens": "required", "HttpEndpoint": "enabled"},
            TagSpecifications=[{"ResourceType": kind, "Tags": tags} for kind in tagged],
        )
        if candidate.subnet:
            params["SubnetId"] = candidate.subnet
        else:
            params["Placement"] = {"AvailabilityZone": candidate.zone}
        if settings.security_groups:
            params["SecurityGroupIds"] = settings.security_groups
        if settings.key_name:
            params["KeyName"] = settings.key_name
        if pool.market == Market.SPOT:
            params["InstanceMarketOptions"] = {
                "MarketType": "spot",
                "SpotOptions": {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"},
            }
        return call(ec2.run_instances, **params)["Instances"][0]

    def _host(self, request: ProvisionInput, instance: dict, region: str, candidate: Candidate) -> Host:
        host_id = tag_value(instance, HOST_TAG) or f"h-{request.placement.attempt}"
        return Host(
            host_id=host_id,
            provider=self.name,
            pool=request.placement.pool,
            task_queue=f"vl-host-{request.run_id}-{host_id}",
            handle={"instance_id": instance["InstanceId"], "region": region, "zone": candidate.zone,
                    "instance_type": candidate.instance_type},
            price_per_hour=candidate.price,
            on_demand_price_per_hour=candidate.on_demand_price,
        )

    # ------------------------------------------------------------ after

    def release(self, host: Host) -> None:
        """Terminate; idempotent, and it does not wait for the instance to be gone."""
        ec2 = self.client("ec2", host.handle["region"])
        try:
            call(ec2.terminate_instances, InstanceIds=[host.handle["instance_id"]])
        except Exception as err:
            if error_code(err) != "InvalidInstanceID.NotFound":
                raise
        log.info("host released", host=host.host_id, instance=host.handle["instance_id"])

    def describe(self, host: Host) -> HostDescription:
        """After heartbeats stopped: taken by EC2 (a reclaim) or failed on its own (a host fault)."""
        ec2 = self.client("ec2", host.handle["region"])
        try:
            instances = self._instances(ec2, [], InstanceIds=[host.handle["instance_id"]])
        except Exception as err:
            if error_code(err) != "InvalidInstanceID.NotFound":
                raise
            return HostDescription(state=HostState.GONE, reason="the instance no longer exists")
        instance = instances[0]
        state = instance["State"]["Name"]
        if state in ("pending", "running"):
            return HostDescription(state=HostState.RUNNING, reason=f"instance {state}")
        reason = instance.get("StateReason", {})
        said = reason.get("Message") or reason.get("Code") or "no reason given"
        if reason.get("Code") in PROVIDER_TOOK_IT:
            return HostDescription(state=HostState.GONE, reason=f"{state}: {said}")
        return HostDescription(state=HostState.FAULTY, reason=f"{state}: {said}")

    def reap(self, run_id: str) -> list[str]:
        """Terminate every instance of the run still alive, in every region; returns their ids."""
        found = self._everywhere([{"Name": f"tag:{RUN_TAG}", "Values": [run_id]},
                                  {"Name": "instance-state-name", "Values": ALIVE_STATES}])
        reaped = []
        for region, instances in found.items():
            ids = [instance["InstanceId"] for instance in instances]
            call(self.client("ec2", region).terminate_instances, InstanceIds=ids)
            reaped += ids
        if reaped:
            log.warning("instances reaped", run_id=run_id, instances=reaped)
        return reaped

    def live_runs(self) -> set[str]:
        found = self._everywhere([{"Name": "tag-key", "Values": [RUN_TAG]},
                                  {"Name": "instance-state-name", "Values": ALIVE_STATES}])
        return {tag_value(instance, RUN_TAG) for instances in found.values() for instance in instances}

    def _everywhere(self, filters: list[dict]) -> dict[str, list[dict]]:
        """Matching instances in every region runs may launch in (`regions`, else all enabled ones)."""
        regions = self.settings.regions
        if not regions:
            home = _boto3().session.Session().region_name or "us-east-1"
            regions = [r["RegionName"] for r in call(self.client("ec2", home).describe_regions)["Regions"]]
        with ThreadPoolExecutor(max_workers=8) as pool:
            found = pool.map(lambda region: (region, self._instances(self.client("ec2", region), filters)), regions)
            return {region: instances for region, instances in found if instances}

    @staticmethod
    def _instances(ec2, filters: list[dict], **kwargs) -> list[dict]:
        instances, token = [], None
        while True:
            page = call(ec2.describe_instances, Filters=filters, **kwargs, **({"NextToken": token} if token else {}))
            instances += [i for reservation in page["Reservations"] for i in reservation["Instances"]]
            token = page.get("NextToken")
            if not token:
                return instances
