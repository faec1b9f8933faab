"""The `aws` provider's catalog: GPU classes -> EC2 instance types, the on-demand price table, region and
zone rules, the settings file (`aws.toml` in VL_HOME, or the file CONFIG_VARIABLE names), the pool check and
pricing, and the one retried way to call AWS that the spot-price lookup and the provider share.

boto3 is imported inside the functions that need it (credentials, regions, spot prices): `vl` works without
it. See docs/providers/aws.md.
"""

from __future__ import annotations

import functools
import os
import random
import time
from datetime import UTC, datetime
from pathlib import Path

import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator

from vaultlayer.catalog.settings import load_toml_settings
from vaultlayer.home import vl_home as default_vl_home
from vaultlayer.models import Market, Pool, Refusal

log = structlog.get_logger(__name__)

CONFIG_VARIABLE = "VL_AWS_CONFIG"  # the settings file, when not $VL_HOME/aws.toml

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

# EC2 error codes of RunInstances that say "not here, not now": typed refusals, never crashes.
REFUSALS: dict[str, Refusal] = {
    "InsufficientInstanceCapacity": Refusal.NO_CAPACITY,
    "SpotMaxPriceTooLow": Refusal.PRICE_TOO_LOW,
    "MaxSpotInstanceCountExceeded": Refusal.QUOTA,
    "InstanceLimitExceeded": Refusal.QUOTA,
    "VcpuLimitExceeded": Refusal.QUOTA,
    "Unsupported": Refusal.UNSUPPORTED,
}
THROTTLING = {"RequestLimitExceeded", "Throttling", "ThrottlingException", "TooManyRequestsException",
              "RequestThrottled", "SlowDown"}
CALL_ATTEMPTS, BACKOFF_BASE_SECONDS, BACKOFF_MAX_SECONDS = 6, 0.5, 20.0
# A price quote before a placement is worth less than the run's time: one retry, short timeouts (at worst about
# 50 s, inside the quote's 60 s), and the control plane keeps the last good price when it fails.
QUOTE_CALL_ATTEMPTS, QUOTE_CONNECT_SECONDS, QUOTE_READ_SECONDS = 2, 5, 20
# Where `temporal_settings` may point: a Secrets Manager secret or an SSM SecureString parameter.
TEMPORAL_SETTINGS_STORES = ("secretsmanager", "ssm")


class AwsSettings(BaseModel):
    """`aws.toml`: the account-side settings hosts are launched with. Unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")

    temporal_settings: str  # "secretsmanager:<secret id or ARN>" or "ssm:<SecureString parameter name>"
    instance_profile: str  # name or ARN; its role may read temporal_settings and the checkpoint storage
    subnets: list[str] = Field(default_factory=list)  # allowed subnets, at most one per zone; []: default VPC
    security_groups: list[str] = Field(default_factory=list)
    key_name: str | None = None
    ami: str | None = None  # default: the region's latest Deep Learning Base AMI
    # What hosts pip-install from an index, set deliberately; by default they install the run's own agent wheel.
    package: str | None = None
    setup: list[str] = Field(default_factory=list)  # shell lines run before the agent (your code, its deps)
    instance_types: dict[str, list[str]] = Field(default_factory=dict)  # "A10G:1" -> types
    # Where runs may launch, and so where the reaper looks for their hosts; []: every enabled region.
    regions: list[str] = Field(default_factory=list)
    on_demand_prices: dict[str, float] = Field(default_factory=dict)  # instance type -> USD per hour

    @field_validator("temporal_settings")
    @classmethod
    def _known_store(cls, value: str) -> str:
        store, _, name = value.partition(":")
        if store not in TEMPORAL_SETTINGS_STORES or not name:
            raise ValueError("expected secretsmanager:<secret id> or ssm:<parameter name>")
        return value

    def types_for(self, gpu: str, count: int) -> list[str]:
        return {**INSTANCE_TYPES, **self.instance_types}.get(f"{gpu}:{count}", [])

    def on_demand_price(self, instance_type: str) -> float | None:
        return self.on_demand_prices.get(instance_type, ON_DEMAND_PRICES.get(instance_type))


def settings_path(vl_home: Path) -> Path:
    return Path(os.environ.get(CONFIG_VARIABLE) or vl_home / "aws.toml")


def is_configured(vl_home: Path) -> bool:
    return settings_path(vl_home).exists()


def load_settings(vl_home: Path) -> AwsSettings:
    path = settings_path(vl_home)
    return load_toml_settings(path, AwsSettings, f"the aws provider needs its settings in {path} "
                              "(temporal_settings, instance_profile); see docs/providers/aws.md")


def import_boto3():
    """boto3, imported on first use, or a ValueError saying how to install it."""
    try:
        import boto3
    except ImportError:
        raise ValueError("the aws provider needs boto3: pip install 'vaultlayer[aws]'") from None
    return boto3


@functools.cache
def known_regions() -> frozenset[str]:
    """Every region botocore knows, from its bundled endpoint data (no network)."""
    session = import_boto3().session.Session()
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
    region = pool.region or import_boto3().session.Session().region_name
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
    if import_boto3().session.Session().get_credentials() is None:
        raise ValueError("no AWS credentials found: set AWS_PROFILE, or AWS_ACCESS_KEY_ID and "
                         "AWS_SECRET_ACCESS_KEY, or run where an instance role provides them")


# ---------------------------------------------------------------- calls


def error_code(err: Exception) -> str:
    return getattr(err, "response", {}).get("Error", {}).get("Code", "")


def is_transient(err: Exception) -> bool:
    from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError, HTTPClientError

    if isinstance(err, (BotoConnectionError, HTTPClientError)):
        return True
    if not isinstance(err, ClientError) or error_code(err) in REFUSALS:
        return False
    status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return error_code(err) in THROTTLING or status >= 500


def call(operation, attempts: int = CALL_ATTEMPTS, **kwargs):
    """One AWS call (`kwargs` are its parameters); throttling, 5xx and dropped connections are retried with
    jittered backoff, up to `attempts` tries. Capacity errors (InsufficientInstanceCapacity is a 500) are not:
    the next zone is a better bet."""
    for attempt in range(attempts):
        try:
            return operation(**kwargs)
        except Exception as err:
            if not is_transient(err) or attempt == attempts - 1:
                raise
            delay = min(BACKOFF_MAX_SECONDS, BACKOFF_BASE_SECONDS * 2**attempt) * random.uniform(0.5, 1.0)
            log.warning("aws call retried", operation=operation.__name__, error=error_code(err) or type(err).__name__,
                        delay=round(delay, 2))
            time.sleep(delay)


def new_client(service: str, region: str | None, connect_timeout: float = 10, read_timeout: float = 60):
    """A boto3 client with botocore's retries off: `call` does them, and knows capacity errors."""
    from botocore.config import Config

    return import_boto3().session.Session().client(
        service, region_name=region,
        config=Config(retries={"mode": "standard", "total_max_attempts": 1}, connect_timeout=connect_timeout,
                      read_timeout=read_timeout),
    )


def spot_prices(ec2, types: list[str], zones: list[str] | None,
                attempts: int = CALL_ATTEMPTS) -> dict[tuple[str, str], float]:
    """The spot price in effect now per (zone, type), of `zones` or all. The zone is filtered here, not
    in the request: with StartTime=EndTime=now EC2 returns the price in effect for every zone."""
    now = datetime.now(UTC)
    prices: dict[tuple[str, str], tuple[datetime, float]] = {}
    token = None
    while True:
        page = call(ec2.describe_spot_price_history, attempts, InstanceTypes=types,
                    ProductDescriptions=["Linux/UNIX"], StartTime=now, EndTime=now,
                    **({"NextToken": token} if token else {}))
        for entry in page["SpotPriceHistory"]:
            key = (entry["AvailabilityZone"], entry["InstanceType"])
            if (zones is None or key[0] in zones) and (key not in prices or entry["Timestamp"] > prices[key][0]):
                prices[key] = (entry["Timestamp"], float(entry["SpotPrice"]))
        token = page.get("NextToken")
        if not token:
            return {key: price for key, (_, price) in prices.items()}


def cheapest_on_demand(settings: AwsSettings, types: list[str]) -> float | None:
    """The table's (with aws.toml's overrides) cheapest on-demand price of `types`."""
    return min((price for t in types if (price := settings.on_demand_price(t)) is not None), default=None)


def priced(pool: Pool) -> Pool:
    """The pool with list prices for the policy's ranking: the cheapest spot price now over its zones and
    types (from the spot price history), and the cheapest on-demand price of its types (the table)."""
    if pool.price_per_hour is not None:
        return pool
    settings = load_settings(default_vl_home())
    types = settings.types_for(pool.gpu or "", pool.gpu_count)
    on_demand = cheapest_on_demand(settings, types)
    price = on_demand
    if pool.market == Market.SPOT:
        try:
            price = cheapest_spot_now(pool, types)
        except Exception as err:
            raise ValueError(f"cannot read spot prices in {pool_region(pool)}: {error_code(err) or err}") from None
    return pool.model_copy(update={"price_per_hour": price, "on_demand_price_per_hour": on_demand})


def cheapest_spot_now(pool: Pool, types: list[str], quick: bool = False) -> float | None:
    """The cheapest spot price in effect now over the pool's zone (all zones of its region without one) and
    `types`. `quick`: QUOTE_CALL_ATTEMPTS tries with short timeouts, for a quote before a placement."""
    timeouts = {"connect_timeout": QUOTE_CONNECT_SECONDS, "read_timeout": QUOTE_READ_SECONDS} if quick else {}
    ec2 = new_client("ec2", pool_region(pool), **timeouts)
    found = spot_prices(ec2, types, [pool.zone] if pool.zone else None,
                        attempts=QUOTE_CALL_ATTEMPTS if quick else CALL_ATTEMPTS)
    return min(found.values(), default=None)


def current_price(pool: Pool) -> float | None:
    """USD per hour of one host of the pool now: on demand, the table's cheapest of its types; spot, the cheapest
    spot price in effect now (`cheapest_spot_now`, quick). None: no price known. Raises what the read raises (the
    `quote_prices` activity keeps the last good price then)."""
    settings = load_settings(default_vl_home())
    types = settings.types_for(pool.gpu or "", pool.gpu_count)
    if pool.market == Market.ON_DEMAND:
        return cheapest_on_demand(settings, types)
    return cheapest_spot_now(pool, types, quick=True)
