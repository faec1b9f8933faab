"""The `aws` provider's control plane: EC2 GPU hosts, spot or on-demand, in the user's own account.

A host is one instance from `run_instances` (spot as a one-time request through InstanceMarketOptions)
that boots the host agent from its user-data; the instance, its volumes and its spot request carry the
run's tags. Within a pool the provider tries (zone, instance type) candidates cheapest first, and moves
a region pool off the zone its previous host was in, since spot reclaims come in waves per zone.
Capacity and quota errors come back as typed refusals; throttling and 5xx are retried with backoff.

A gang (`Placement.nodes` > 1) is one `run_instances` call with MinCount = MaxCount = N, EC2's own all or
nothing, into a cluster placement group made for it. The N instances share one user-data: each runs the
bootstrap of its launch index, which is its node rank.

boto3 is imported lazily (`vl` works without it) and every call here blocks: the control activities
run on the worker's thread pool. The settings, instance-type map, prices and the retried `call` are the
catalog's (vaultlayer/catalog/aws.py); see docs/providers/aws.md.
"""

from __future__ import annotations

import gzip
import hashlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import structlog

from activities.providers.aws.host import NOTICE_SOURCE
from activities.providers.base import (
    HOST_HOME,
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
GANG_TAG, NODE_TAG = "vaultlayer:gang", "vaultlayer:node"
AGENT_URL_SECONDS = 6 * 3600  # a host's bootstrap fetches the agent wheel minutes after launch; hours is ample
ALIVE_STATES = ["pending", "running", "stopping", "stopped"]
NOT_TERMINATED = [*ALIVE_STATES, "shutting-down"]  # an instance in one of these still holds its placement group
GROUP_GONE_SECONDS = 150  # how long a reap waits for the run's instances to terminate before deleting its groups
IMDS = "http://169.254.169.254"
T = TypeVar("T")

# The latest Deep Learning Base OSS Nvidia Driver AMI (Ubuntu 24.04, Python 3.12) of each region.
DEFAULT_AMI_PARAMETER = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id"

# When candidates refuse for different reasons, the pool's refusal is the weightiest one.
REFUSAL_WEIGHT = [Refusal.UNSUPPORTED, Refusal.PRICE_TOO_LOW, Refusal.NO_CAPACITY, Refusal.QUOTA]
# State reasons that mean EC2 took the instance back (a reclaim) rather than it failing on its own.
PROVIDER_TOOK_IT = {"Server.SpotInstanceTermination", "Server.SpotInstanceShutdown", "Server.ScheduledStop",
                    "Server.InsufficientInstanceCapacity"}


def tag_value(resource: dict, key: str) -> str | None:
    return next((tag["Value"] for tag in resource.get("Tags", []) if tag["Key"] == key), None)


def gang_of(run_id: str, attempt: int) -> str:
    """The gang tag of an attempt's hosts; its cluster placement group is named `vl-<gang>`."""
    return f"{run_id}-a{attempt}"


def host_name(attempt: int, node: int, nodes: int) -> str:
    """`h-<attempt>`, or `h-<attempt>-<node>` in a gang: safe in a task-queue name, and known to a host at boot
    from its launch index alone."""
    return f"h-{attempt}" if nodes == 1 else f"h-{attempt}-{node}"


def gang_user_data(scripts: list[str]) -> bytes:
    """The one user-data of a gang's instances: each writes out the bootstrap of its launch index (0 to N-1 in
    the one `run_instances` call, read from IMDS) and runs it. Gzipped, which cloud-init unpacks: N bootstraps
    that differ only in the host's id would otherwise pass EC2's 16 KB limit."""
    lines = [
        "#!/bin/bash",
        "# VaultLayer gang bootstrap: this host runs the bootstrap of its launch index, its node rank.",
        "set -euo pipefail",
        "trap 'shutdown -h now' EXIT",
        f"token=$(curl -fsS --retry 5 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 300' {IMDS}/latest/api/token)",
        f'node=$(curl -fsS --retry 5 -H "X-aws-ec2-metadata-token: $token" {IMDS}/latest/meta-data/ami-launch-index)',
        f"mkdir -p {HOST_HOME}",
        'case "$node" in',
    ]
    for node, script in enumerate(scripts):
        lines += [f"{node}) cat > {HOST_HOME}/bootstrap.sh <<'VL_NODE_{node}'", script.rstrip("\n"), f"VL_NODE_{node}",
                  ";;"]
    lines += ["*) exit 1 ;;", "esac", f"exec bash {HOST_HOME}/bootstrap.sh", ""]
    return gzip.compress("\n".join(lines).encode(), mtime=0)


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
        nodes = request.placement.nodes
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
        if live:  # a retried provision: the hosts from the first try are the ones to use
            return self._adopt(ec2, request, settings, region, sorted(live, key=lambda i: i["AmiLaunchIndex"]))
        previous = [i for i in earlier if i not in this_attempt]
        last_zone = max(previous, key=lambda i: i["LaunchTime"])["Placement"]["AvailabilityZone"] if previous else None

        candidates = self._candidates(ec2, settings, pool, region, last_zone)
        user_data = self._user_data(request, settings, region)
        group = self._placement_group(ec2, request) if nodes > 1 else None
        refusals: list[tuple[Refusal, str]] = []
        for candidate in candidates:
            token = hashlib.sha256(f"{request.run_id}/{attempt}/{len(this_attempt)}/{candidate.zone}/"
                                   f"{candidate.instance_type}".encode()).hexdigest()[:64]
            try:
                instances = self._launch(ec2, settings, request, candidate, user_data, token, group)
            except ClientError as err:
                refusal = REFUSALS.get(error_code(err))
                if refusal is None:
                    if is_transient(err):
                        raise  # still throttled after the backoff: the activity retries later
                    raise ProviderConfigError(f"EC2 refused to launch {candidate.instance_type} in "
                                              f"{candidate.zone}: {error_code(err)}: {err}") from None
                refusals.append((refusal, f"{candidate.instance_type} in {candidate.zone}: {error_code(err)}"))
                log.info("no capacity", run_id=request.run_id, zone=candidate.zone,
                         instance_type=candidate.instance_type, nodes=nodes, error=error_code(err))
                if refusal == Refusal.QUOTA:
                    break  # an account limit of the region: the other candidates would hit it too
                continue
            if nodes > 1:
                self._tag_nodes(ec2, request, instances)
            log.info("hosts provisioned", run_id=request.run_id, attempt=attempt,
                     instances=[i["InstanceId"] for i in instances], zone=candidate.zone,
                     instance_type=candidate.instance_type, market=pool.market.value, price_per_hour=candidate.price)
            return ProvisionResult(hosts=[self._host(request, i, region, candidate) for i in instances])
        if group:
            self._delete_group(ec2, group)  # empty: no launch went into it
        kind = max((refusal for refusal, _ in refusals), key=REFUSAL_WEIGHT.index)
        gang = f"0 of {nodes} hosts: " if nodes > 1 else ""
        raise NoCapacityError(kind, gang + "tried " + "; ".join(tried for _, tried in refusals))

    def _adopt(self, ec2, request: ProvisionInput, settings: AwsSettings, region: str,
               live: list[dict]) -> ProvisionResult:
        """The result of a retried provision from the live instances of its first try. A gang missing some of
        them (taken back meanwhile) is released and refused rather than completed: a second launch could not
        join the first one's launch indices, so its hosts would not know their ranks, and the cluster placement
        group holds the others' zone until they have terminated. The next attempt launches a whole new gang."""
        nodes = request.placement.nodes
        if len(live) < nodes:
            call(ec2.terminate_instances, InstanceIds=[i["InstanceId"] for i in live])
            now = time.time()
            held = sum(now - i["LaunchTime"].timestamp() for i in live)
            log.warning("part of a gang released", run_id=request.run_id, attempt=request.placement.attempt,
                        instances=[i["InstanceId"] for i in live], nodes=nodes)
            raise NoCapacityError(Refusal.NO_CAPACITY, f"{len(live)} of {nodes} hosts: the gang launched by an "
                                  "earlier try lost the others before it was handed over; released them",
                                  held_host_seconds=held)
        live = live[:nodes]
        zone, itype = live[0]["Placement"]["AvailabilityZone"], live[0]["InstanceType"]
        market = request.placement.pool.market
        prices = spot_prices(ec2, [itype], [zone]) if market == Market.SPOT else {}
        candidate = self._candidate(settings, zone, itype, live[0].get("SubnetId"), prices, market)
        if nodes > 1:
            self._tag_nodes(ec2, request, live)  # the first try may have stopped before it tagged them
        return ProvisionResult(hosts=[self._host(request, i, region, candidate) for i in live])

    def _user_data(self, request: ProvisionInput, settings: AwsSettings, region: str) -> str | bytes:
        """The bootstrap of the one host, or of every host of a gang in one user-data (`gang_user_data`)."""
        attempt, nodes = request.placement.attempt, request.placement.nodes
        install = agent_install(agent=request.agent, package=settings.package, extra="aws", fetch=lambda agent: (
            fetch_lines(agent.url, agent_wheel_path(agent), presign=lambda url: self._presign(url, region))))
        scripts = [bootstrap_script(
            temporal_settings=settings.temporal_settings, notice_source=NOTICE_SOURCE, install=install,
            setup=settings.setup, task_queue=host_queue(request.run_id, host_name(attempt, node, nodes)),
            host_id=host_name(attempt, node, nodes), run_id=request.run_id, exports={"AWS_DEFAULT_REGION": region},
        ) for node in range(nodes)]
        return scripts[0] if nodes == 1 else gang_user_data(scripts)

    def _placement_group(self, ec2, request: ProvisionInput) -> str:
        """The gang's cluster placement group, made once (a retried provision finds it made). Groups of the run's
        earlier gangs whose instances have gone are deleted first: an account has at most 500 per region."""
        from botocore.exceptions import ClientError

        attempt = request.placement.attempt
        for group in self._groups(ec2, [{"Name": f"tag:{RUN_TAG}", "Values": [request.run_id]}]):
            if int(tag_value(group, ATTEMPT_TAG)) < attempt:
                self._delete_group(ec2, group["GroupName"])
        name = f"vl-{gang_of(request.run_id, attempt)}"
        tags = [{"Key": RUN_TAG, "Value": request.run_id}, {"Key": ATTEMPT_TAG, "Value": str(attempt)},
                {"Key": GANG_TAG, "Value": gang_of(request.run_id, attempt)}]
        try:
            call(ec2.create_placement_group, GroupName=name, Strategy="cluster",
                 TagSpecifications=[{"ResourceType": "placement-group", "Tags": tags}])
        except ClientError as err:
            if error_code(err) == "PlacementGroupLimitExceeded":
                raise NoCapacityError(Refusal.QUOTA, f"no placement group for a gang: {err}") from None
            if error_code(err) != "InvalidPlacementGroup.Duplicate":
                raise
        return name

    def _tag_nodes(self, ec2, request: ProvisionInput, instances: list[dict]) -> None:
        """Each host of a gang gets its own rank, id and name: the launch tagged them all alike."""
        attempt, nodes = request.placement.attempt, request.placement.nodes
        for instance in instances:
            node = instance["AmiLaunchIndex"]
            host_id = host_name(attempt, node, nodes)
            call(ec2.create_tags, Resources=[instance["InstanceId"]],
                 Tags=[{"Key": NODE_TAG, "Value": str(node)}, {"Key": HOST_TAG, "Value": host_id},
                       {"Key": "Name", "Value": f"vl-{request.run_id}-{host_id}"}])

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

    def _launch(self, ec2, settings: AwsSettings, request: ProvisionInput, candidate: Candidate,
                user_data: str | bytes, token: str, group: str | None) -> list[dict]:
        """The placement's instances from one `run_instances` call (all of a gang's, or none), by launch index."""
        run_id, pool = request.run_id, request.placement.pool
        attempt, nodes = request.placement.attempt, request.placement.nodes
        tags = [{"Key": RUN_TAG, "Value": run_id}, {"Key": ATTEMPT_TAG, "Value": str(attempt)}]
        if nodes == 1:
            host_id = host_name(attempt, 0, nodes)
            tags += [{"Key": HOST_TAG, "Value": host_id}, {"Key": "Name", "Value": f"vl-{run_id}-{host_id}"}]
        else:  # each host's own id, rank and name follow the launch (`_tag_nodes`)
            tags += [{"Key": GANG_TAG, "Value": gang_of(run_id, attempt)}]
        tagged = ["instance", "volume", "network-interface"] + (["spot-instances-request"]
                                                                if pool.market == Market.SPOT else [])
        profile = settings.instance_profile
        params = dict(
            ImageId=self._ami(settings, ec2.meta.region_name),
            InstanceType=candidate.instance_type,
            MinCount=nodes,  # all or nothing
            MaxCount=nodes,
            UserData=user_data,
            ClientToken=token,  # a retried call (5xx, timeout) launches nothing twice
            IamInstanceProfile={"Arn": profile} if profile.startswith("arn:") else {"Name": profile},
            InstanceInitiatedShutdownBehavior="terminate",
            MetadataOptions={"HttpTokens": "required", "HttpEndpoint": "enabled"},
            TagSpecifications=[{"ResourceType": kind, "Tags": tags} for kind in tagged],
        )
        placement = {"GroupName": group} if group else {}
        if candidate.subnet:
            params["SubnetId"] = candidate.subnet
        else:
            placement["AvailabilityZone"] = candidate.zone
        if placement:
            params["Placement"] = placement
        if settings.security_groups:
            params["SecurityGroupIds"] = settings.security_groups
        if settings.key_name:
            params["KeyName"] = settings.key_name
        if pool.market == Market.SPOT:
            params["InstanceMarketOptions"] = {
                "MarketType": "spot",
                "SpotOptions": {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"},
            }
        return sorted(call(ec2.run_instances, **params)["Instances"], key=lambda i: i["AmiLaunchIndex"])

    def _host(self, request: ProvisionInput, instance: dict, region: str, candidate: Candidate) -> Host:
        attempt, nodes = request.placement.attempt, request.placement.nodes
        node = instance["AmiLaunchIndex"]
        host_id = host_name(attempt, node, nodes)
        handle = {"instance_id": instance["InstanceId"], "region": region, "zone": candidate.zone,
                  "instance_type": candidate.instance_type}
        if nodes > 1:
            gang = gang_of(request.run_id, attempt)
            handle.update(gang=gang, node=str(node), placement_group=f"vl-{gang}")
        return Host(
            host_id=host_id,
            provider=self.name,
            pool=request.placement.pool,
            task_queue=host_queue(request.run_id, host_id),
            handle=handle,
            price_per_hour=candidate.price,
            on_demand_price_per_hour=candidate.on_demand_price,
            address=instance.get("PrivateIpAddress"),
        )

    # ------------------------------------------------------------ after

    def release(self, host: Host) -> None:
        """Terminate; idempotent, and it does not wait for the instance to be gone. The last host of a gang
        out deletes its placement group, if EC2 lets it yet (best effort: while instances of the group are
        still shutting down it is in use; the run's next gang, or its reap, deletes it)."""
        ec2 = self.client("ec2", host.handle["region"])
        try:
            call(ec2.terminate_instances, InstanceIds=[host.handle["instance_id"]])
        except Exception as err:
            if error_code(err) != "InvalidInstanceID.NotFound":
                raise
        log.info("host released", host=host.host_id, instance=host.handle["instance_id"])
        group = host.handle.get("placement_group")
        if group and not self._instances(ec2, [{"Name": f"tag:{GANG_TAG}", "Values": [host.handle["gang"]]},
                                               {"Name": "instance-state-name", "Values": ALIVE_STATES}]):
            self._delete_group(ec2, group)

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
        """Terminate every instance of the run still alive, in every region, and delete its placement groups
        once their instances are gone; returns the instances' ids."""
        run = [{"Name": f"tag:{RUN_TAG}", "Values": [run_id]}]

        def reap_region(region: str) -> list[str]:
            ec2 = self.client("ec2", region)
            ids = [i["InstanceId"] for i in self._instances(ec2, [*run, {"Name": "instance-state-name",
                                                                          "Values": ALIVE_STATES}])]
            if ids:
                call(ec2.terminate_instances, InstanceIds=ids)
            groups = self._groups(ec2, run)
            if groups:  # EC2 deletes a group only once its instances have terminated: wait for them, a while
                deadline = time.monotonic() + GROUP_GONE_SECONDS
                while (self._instances(ec2, [*run, {"Name": "instance-state-name", "Values": NOT_TERMINATED}])
                       and time.monotonic() < deadline):
                    time.sleep(5.0)
            for group in groups:
                self._delete_group(ec2, group["GroupName"])
            return ids

        reaped = [i for ids in self._everywhere(reap_region).values() for i in ids]
        if reaped:
            log.warning("instances reaped", run_id=run_id, instances=reaped)
        return reaped

    def live_runs(self) -> set[str]:
        """Runs with an instance alive, or a placement group left (a reap that could not wait its instances out)."""
        tagged = [{"Name": "tag-key", "Values": [RUN_TAG]}]

        def runs_in(region: str) -> set[str]:
            ec2 = self.client("ec2", region)
            found = self._instances(ec2, [*tagged, {"Name": "instance-state-name", "Values": ALIVE_STATES}])
            return {tag_value(resource, RUN_TAG) for resource in found + self._groups(ec2, tagged)}

        return set().union(*self._everywhere(runs_in).values())

    def _everywhere(self, work: Callable[[str], T]) -> dict[str, T]:
        """`work` done in every region runs may launch in (`regions`, else all enabled ones), side by side."""
        regions = self.settings.regions
        if not regions:
            home = import_boto3().session.Session().region_name or "us-east-1"
            regions = [r["RegionName"] for r in call(self.client("ec2", home).describe_regions)["Regions"]]
        with ThreadPoolExecutor(max_workers=8) as pool:
            return dict(zip(regions, pool.map(work, regions), strict=True))

    @staticmethod
    def _delete_group(ec2, name: str) -> None:
        """Best effort: a group still in use is left for the next try (a later gang of the run, its reap, the
        sweep of finished runs)."""
        try:
            call(ec2.delete_placement_group, GroupName=name)
        except Exception as err:
            if error_code(err) == "InvalidPlacementGroup.InUse":
                log.info("placement group still in use: left for later", placement_group=name)
            elif error_code(err) != "InvalidPlacementGroup.Unknown":
                raise
            return
        log.info("placement group deleted", placement_group=name)

    @staticmethod
    def _groups(ec2, filters: list[dict]) -> list[dict]:
        return call(ec2.describe_placement_groups, Filters=filters)["PlacementGroups"]

    @staticmethod
    def _instances(ec2, filters: list[dict], **kwargs) -> list[dict]:
        instances, token = [], None
        while True:
            page = call(ec2.describe_instances, Filters=filters, **kwargs, **({"NextToken": token} if token else {}))
            instances += [i for reservation in page["Reservations"] for i in reservation["Instances"]]
            token = page.get("NextToken")
            if not token:
                return instances
