"""The `aws` provider's control plane: EC2 GPU hosts, spot or on-demand, in the user's own account.

A host is one instance from `run_instances` (spot as a one-time request through InstanceMarketOptions)
that boots the host agent from its user-data; the instance, its volumes and its spot request carry the
run's tags. Within a pool the provider tries (zone, instance type) candidates cheapest first, and moves
a region pool off the zone its previous host was in, since spot reclaims come in waves per zone.
Capacity and quota errors come back as typed refusals; throttling and 5xx are retried with backoff.

boto3 is imported lazily (`vl` works without it) and every call here blocks: the control activities
run on the worker's thread pool. The settings, instance-type map, prices and the retried `call` are the
catalog's (vaultlayer/catalog/aws.py); see docs/providers/aws.md.
"""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import structlog

from activities.providers.aws.host import NOTICE_SOURCE
from activities.providers.base import (
    NoCapacityError,
    ProviderConfigError,
    agent_install,
    agent_wheel_path,
    bootstrap_script,
    fetch_lines,
    host_queue,
)
from vaultlayer.catalog.aws import (
    REFUSALS,
    AwsSettings,
    call,
    error_code,
    import_boto3,
    is_transient,
    load_settings,
    new_client,
    pool_region,
    spot_prices,
)
from vaultlayer.models import Host, HostDescription, HostState, Market, Pool, ProvisionInput, ProvisionResult, Refusal

log = structlog.get_logger(__name__)

RUN_TAG, ATTEMPT_TAG, HOST_TAG = "vaultlayer:run-id", "vaultlayer:attempt", "vaultlayer:host"
AGENT_URL_SECONDS = 6 * 3600  # a host's bootstrap fetches the agent wheel minutes after launch; hours is ample
ALIVE_STATES = ["pending", "running", "stopping", "stopped"]

# The latest Deep Learning Base OSS Nvidia Driver AMI (Ubuntu 24.04, Python 3.12) of each region.
DEFAULT_AMI_PARAMETER = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id"

# When candidates refuse for different reasons, the pool's refusal is the weightiest one.
REFUSAL_WEIGHT = [Refusal.UNSUPPORTED, Refusal.PRICE_TOO_LOW, Refusal.NO_CAPACITY, Refusal.QUOTA]
# State reasons that mean EC2 took the instance back (a reclaim) rather than it failing on its own.
PROVIDER_TOOK_IT = {"Server.SpotInstanceTermination", "Server.SpotInstanceShutdown", "Server.ScheduledStop",
                    "Server.InsufficientInstanceCapacity"}


def tag_value(resource: dict, key: str) -> str | None:
    return next((tag["Value"] for tag in resource.get("Tags", []) if tag["Key"] == key), None)


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

    def _presign(self, url: str, region: str) -> str:
        """A time-limited HTTPS URL the host's bootstrap downloads the agent wheel from, before boto3 is there."""
        bucket, _, key = url.removeprefix("s3://").partition("/")
        return self.client("s3", region).generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=AGENT_URL_SECONDS)

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
        install = agent_install(agent=request.agent, package=settings.package, extra="aws", fetch=lambda agent: (
            fetch_lines(agent.url, agent_wheel_path(agent), presign=lambda url: self._presign(url, region))))
        user_data = bootstrap_script(
            temporal_settings=settings.temporal_settings, notice_source=NOTICE_SOURCE, install=install,
            setup=settings.setup, task_queue=host_queue(request.run_id, host_id), host_id=host_id,
            run_id=request.run_id, exports={"AWS_DEFAULT_REGION": region})
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
                    if is_transient(err):
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
            task_queue=host_queue(request.run_id, host_id),
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
            home = import_boto3().session.Session().region_name or "us-east-1"
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
