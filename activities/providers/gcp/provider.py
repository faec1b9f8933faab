"""The `gcp` provider's control plane: Spot (or on-demand) GPU VMs on Compute Engine, through google-cloud-compute.

A host is one VM named after its run and attempt, labelled `vaultlayer-run-id` / `vaultlayer-attempt`,
created with `provisioningModel=SPOT` and `instanceTerminationAction=DELETE`, so a preempted VM costs
nothing once it is gone. Its startup-script installs VaultLayer and starts `vl agent` on the host's
task queue; the agent reads the Temporal connection settings from Secret Manager with the VM's
service account, so no secret is ever in metadata. The agent learns of a preemption from the
metadata server (`GceMetadataNoticeSource` in host.py); after heartbeats stop, `describe`
tells a preempted VM from a failed one by its status and the zone's system-event operations.

A gang (`Placement.nodes` > 1) is N VMs in the pool's zone, inserted together under a compact placement
policy made for it (where the machine series takes one), each labelled with its gang and node rank. It is had
whole or not at all: when some inserts are refused, the VMs that were made are deleted before the refusal.

google-cloud-compute is imported lazily (`vl` works without it); its REST client blocks, so the control
activities call it from the worker's thread pool. The settings, the machine map and the price table are the
catalog's (vaultlayer/catalog/gcp.py); docs/providers/gcp.md has them.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
import uuid
from pathlib import Path

import structlog

from activities.providers.base import (
    NoCapacityError,
    ProviderConfigError,
    ProviderError,
    agent_install,
    agent_wheel_path,
    bootstrap_script,
    fetch_lines,
    host_queue,
)
from activities.providers.gcp.api import client_kwargs, error_reasons, retry_policy
from activities.providers.gcp.host import NOTICE_SOURCE
from vaultlayer.catalog.gcp import (
    CLOUD_PLATFORM_SCOPE,
    GcpSettings,
    Shape,
    load_settings,
    prices_of,
    region_of,
    shape_for,
)
from vaultlayer.models import Host, HostDescription, HostState, Market, ProvisionInput, ProvisionResult, Refusal

log = structlog.get_logger(__name__)

LABEL_RUN = "vaultlayer-run-id"
LABEL_ATTEMPT = "vaultlayer-attempt"
LABEL_GANG = "vaultlayer-gang"
LABEL_NODE = "vaultlayer-node"
RUN_ID_METADATA = "vaultlayer-run-id"  # the exact run id; the label holds a label-safe form of it
# A placement policy has no labels: its description names its run (exactly) and attempt.
POLICY_DESCRIPTION = re.compile(r"vaultlayer-run-id=(\S+) vaultlayer-attempt=(\d+)")
# The machine series of the map that compact placement policies take (N1, with attached GPUs, does not).
COMPACT_SERIES = {"a2", "a3", "g2"}
POLICY_GONE_SECONDS = 150  # how long a reap waits for a gang's VMs to go before deleting its placement policy

# Zone operations Compute Engine records when it, not the user, stops a VM (system events).
TAKEN_BY_PROVIDER = {
    "compute.instances.preempted": "preempted by Compute Engine",
    "compute.instances.terminateOnHostMaintenance": "terminated for host maintenance",
}
FAILED_ON_ITS_OWN = {
    "compute.instances.hostError": "the physical host failed",
    "compute.instances.guestTerminate": "shut down from inside (its bootstrap or agent failed)",
}
LIVE_STATUSES = {"PROVISIONING", "STAGING", "RUNNING"}
STOP_WAIT_SECONDS = 75  # a preempted VM gets 30 s to shut down, then Compute Engine stops it

# Operation error codes (and HTTP error reasons) that say "not here, not now": the policy moves on.
NO_CAPACITY_CODES = {"ZONE_RESOURCE_POOL_EXHAUSTED", "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS"}
QUOTA_CODES = {"QUOTA_EXCEEDED", "quotaExceeded"}
UNSUPPORTED_IN_ZONE = re.compile(r"(machineType|acceleratorType)s?\b.*(does not exist in zone|was not found)",
                                 re.IGNORECASE | re.DOTALL)


# ---------------------------------------------------------------- names and labels


def label_value(text: str) -> str:
    """A label value (lower-case letters, digits, `-`, `_`, at most 63) standing for `text`."""
    return re.sub(r"[^a-z0-9_-]", "_", text.lower())[:63]


def resource_name(run_id: str, suffix: str) -> str:
    """`vl-<run>-<suffix>`: RFC 1035, at most 63 characters, the same on a retried provision."""
    slug = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", run_id.lower())).strip("-")
    name = f"vl-{slug}-{suffix}"
    if len(name) > 63:
        name = f"vl-{slug[:40].strip('-')}-{uuid.uuid5(uuid.NAMESPACE_URL, run_id).hex[:8]}-{suffix}"
    return name


def instance_name(run_id: str, attempt: int, node: int | None = None) -> str:
    """A host's VM: `vl-<run>-<attempt>`, or `vl-<run>-<attempt>-n<node>` in a gang."""
    return resource_name(run_id, str(attempt) if node is None else f"{attempt}-n{node}")


def gang_label(run_id: str, attempt: int) -> str:
    return label_value(f"{run_id}-a{attempt}")


def policy_path(project: str, region: str, name: str) -> str:
    return f"projects/{project}/regions/{region}/resourcePolicies/{name}"


# ---------------------------------------------------------------- errors


def refusal_of_operation(code: str) -> Refusal | None:
    if code in NO_CAPACITY_CODES:
        return Refusal.NO_CAPACITY
    if code in QUOTA_CODES:
        return Refusal.QUOTA
    return None


def refusal_of_http(err) -> Refusal | None:
    """A refusal carried by the insert call itself: quota, or a type the zone does not offer."""
    from google.api_core import exceptions as api

    if error_reasons(err) & QUOTA_CODES:
        return Refusal.QUOTA
    if isinstance(err, api.BadRequest | api.NotFound) and UNSUPPORTED_IN_ZONE.search(err.message or ""):
        return Refusal.UNSUPPORTED
    return None


def refused_call(err, what: str) -> ProviderError:
    """The error of an insert call Compute Engine answered with an HTTP error (rate limits and server errors
    were retried): a typed refusal, a setting to fix (any other 4xx), or a failure the activity retries."""
    refusal = refusal_of_http(err)
    if refusal is not None:
        return NoCapacityError(refusal, err.message)
    failure = ProviderConfigError if 400 <= (err.code or 0) < 500 and err.code != 409 else ProviderError
    return failure(f"{what} failed: {err.message}")


def failed_operation(operation, what: str) -> ProviderError:
    """The error of an insert operation that ended in one: a typed refusal, or a failure with its code."""
    first = operation.error.errors[0]
    refusal = refusal_of_operation(first.code)
    if refusal is None:
        return ProviderError(f"{what} failed: {first.code}: {first.message}")
    return NoCapacityError(refusal, f"{first.code}: {first.message}")


def _is_missing(err) -> bool:
    from google.api_core import exceptions as api

    return isinstance(err, api.NotFound)


# ---------------------------------------------------------------- the provider


class GcpProvider:
    name = "gcp"

    def __init__(self, vl_home: Path, temporal_env: dict[str, str]) -> None:
        self.vl_home = vl_home
        self._lock = threading.Lock()
        self._client_of: dict[str, object] = {}

    @property
    def settings(self) -> GcpSettings:
        try:
            return load_settings(self.vl_home)
        except ValueError as err:
            raise ProviderConfigError(str(err)) from None

    @property
    def project(self) -> str:
        return self.settings.project

    def _client(self, kind: str):
        """A Compute client (`InstancesClient`, ...), built once on first use (REST: the only transport that
        takes an http endpoint, and a `wait` that does not poll behind the endpoint's back)."""
        from google.cloud import compute_v1

        with self._lock:
            if kind not in self._client_of:
                self._client_of[kind] = getattr(compute_v1, kind)(transport="rest", **client_kwargs())
            return self._client_of[kind]

    # ------------------------------------------------------------ provision

    def provision(self, request: ProvisionInput) -> ProvisionResult:
        placement = request.placement
        zone, shape, nodes = placement.pool.zone, shape_for(placement.pool), placement.nodes
        bound = log.bind(run_id=request.run_id, attempt=placement.attempt, zone=zone)
        policy = self._placement_policy(request, shape) if nodes > 1 else None
        vms, wanted = {}, []
        for node in range(nodes):
            name = instance_name(request.run_id, placement.attempt, node if nodes > 1 else None)
            existing = self._get(zone, name)
            if existing is not None:
                if existing.status in LIVE_STATUSES and existing.labels.get(LABEL_RUN) == label_value(request.run_id):
                    vms[node] = existing  # a retried provision: this host from the first try
                    continue
                name = f"{name}-{secrets.token_hex(2)}"  # that VM is going away: a new one beside it
            wanted.append((node, name))
        started = time.monotonic()
        failure = self._create(request, shape, policy, wanted, vms)
        if failure is not None:
            bound.warning("no hosts", nodes=nodes, made=len(vms), reason=str(failure))
            if nodes > 1:
                held = len(vms)
                self._give_back(zone, list(vms.values()), policy)
                if isinstance(failure, NoCapacityError):
                    failure = NoCapacityError(failure.kind, f"{held} of {nodes} hosts: {failure}",
                                              held_host_seconds=held * (time.monotonic() - started))
            raise failure
        hosts = [self._host(request, vms[node], shape, node, policy) for node in range(nodes)]
        bound.info("hosts provisioned", hosts=[host.host_id for host in hosts], machine_type=shape.machine_type,
                   market=placement.pool.market.value, price_per_hour=hosts[0].price_per_hour)
        return ProvisionResult(hosts=hosts)

    def _create(self, request: ProvisionInput, shape: Shape, policy: str | None, wanted: list[tuple[int, str]],
                vms: dict) -> ProviderError | None:
        """Insert the VMs `wanted` ((node, name) pairs) one after the other without waiting, then wait for each:
        those made go into `vms` (node -> VM). Returns the first failure, or None. Every request goes out with
        a fresh `requestId`, the same on every retry of that call, so Compute creates each VM once."""
        from google.api_core.exceptions import GoogleAPICallError
        from google.cloud import compute_v1

        zone = request.placement.pool.zone
        instances = self._client("InstancesClient")
        inserting, failure = [], None
        for node, name in wanted:
            insert = compute_v1.InsertInstanceRequest(
                project=self.project, zone=zone, request_id=str(uuid.uuid4()),
                instance_resource=self._instance(request, name, shape, node, policy))
            try:
                inserting.append((node, name, instances.insert_unary(request=insert, retry=retry_policy())))
            except GoogleAPICallError as err:
                failure = refused_call(err, f"creating {name} in {zone}")
                break  # the zone said no: the rest would hear the same
        for node, name, operation in inserting:
            operation = self._wait(zone, operation)
            if operation.error.errors:
                failure = failure or failed_operation(operation, f"creating {name} in {zone}")
            elif (created := self._get(zone, name)) is None:
                failure = failure or NoCapacityError(Refusal.NO_CAPACITY,
                                                     f"{name} was created, then taken back before it started")
            else:
                vms[node] = created
        return failure

    def _give_back(self, zone: str, vms: list, policy: str | None) -> None:
        """A gang had in part is had not at all: delete the VMs that were made, and once they have gone (a
        policy is in use until then), the gang's placement policy."""
        deleting = [self._delete(zone, vm.name) for vm in vms]
        for operation in deleting:
            if operation is not None:
                self._wait(zone, operation)
        if policy:
            self._delete_policy(policy)

    def _placement_policy(self, request: ProvisionInput, shape: Shape) -> str | None:
        """The gang's compact placement policy (made once: a retried provision finds it made), or None where
        the machine series takes none. The run's earlier gangs' policies that are no longer in use go first: a
        project has few of them per region (the RESOURCE_POLICIES quota)."""
        from google.api_core.exceptions import Conflict, GoogleAPICallError
        from google.cloud import compute_v1

        if shape.machine_type.split("-", 1)[0] not in COMPACT_SERIES:
            return None
        attempt, region = request.placement.attempt, region_of(request.placement.pool.zone)
        for path, _, earlier in self._policies(request.run_id):
            if earlier < attempt:
                self._delete_policy(path)
        name = resource_name(request.run_id, f"{attempt}-gang")
        policy = compute_v1.ResourcePolicy(
            name=name, description=f"vaultlayer-run-id={request.run_id} vaultlayer-attempt={attempt}",
            group_placement_policy=compute_v1.ResourcePolicyGroupPlacementPolicy(collocation="COLLOCATED"))
        what = f"creating placement policy {name} in {region}"
        try:
            operation = self._client("ResourcePoliciesClient").insert_unary(
                request=compute_v1.InsertResourcePolicyRequest(project=self.project, region=region,
                                                               resource_policy_resource=policy,
                                                               request_id=str(uuid.uuid4())),
                retry=retry_policy())
        except Conflict:
            pass  # made by an earlier try of this provision
        except GoogleAPICallError as err:
            raise refused_call(err, what) from None
        else:
            operation = self._wait_region(region, operation)
            if operation.error.errors:
                raise failed_operation(operation, what)
        return policy_path(self.project, region, name)

    def _instance(self, request: ProvisionInput, name: str, shape: Shape, node: int, policy: str | None):
        from google.cloud import compute_v1

        settings, placement = self.settings, request.placement
        pool, zone = placement.pool, placement.pool.zone
        install = agent_install(agent=request.agent, package=settings.package, extra="gcp", fetch=lambda agent: (
            fetch_lines(agent.url, agent_wheel_path(agent), google_token=True)))
        script = bootstrap_script(
            temporal_settings=settings.temporal_settings(), notice_source=NOTICE_SOURCE, install=install,
            setup=settings.setup, task_queue=host_queue(request.run_id, name), host_id=name, run_id=request.run_id)
        interface = {"network": settings.network}
        if settings.subnetwork:
            interface["subnetwork"] = settings.subnetwork
        if settings.external_ip:
            interface["access_configs"] = [compute_v1.AccessConfig(name="External NAT", type_="ONE_TO_ONE_NAT")]
        if pool.market == Market.SPOT:
            scheduling = compute_v1.Scheduling(provisioning_model="SPOT", instance_termination_action="DELETE",
                                               on_host_maintenance="TERMINATE", automatic_restart=False)
        else:
            scheduling = compute_v1.Scheduling(provisioning_model="STANDARD", on_host_maintenance="TERMINATE",
                                               automatic_restart=False)
        accelerators = [compute_v1.AcceleratorConfig(
            accelerator_type=f"zones/{zone}/acceleratorTypes/{shape.accelerator}",
            accelerator_count=shape.accelerator_count,
        )] if shape.accelerator else []
        labels = {LABEL_RUN: label_value(request.run_id), LABEL_ATTEMPT: str(placement.attempt)}
        if placement.nodes > 1:
            labels.update({LABEL_GANG: gang_label(request.run_id, placement.attempt), LABEL_NODE: str(node)})
        return compute_v1.Instance(
            name=name,
            machine_type=f"zones/{zone}/machineTypes/{shape.machine_type}",
            guest_accelerators=accelerators,
            scheduling=scheduling,
            labels=labels,
            metadata=compute_v1.Metadata(items=[
                compute_v1.Items(key="startup-script", value=script),
                compute_v1.Items(key="install-nvidia-driver", value="True"),
                compute_v1.Items(key=RUN_ID_METADATA, value=request.run_id),
            ]),
            disks=[compute_v1.AttachedDisk(
                boot=True, auto_delete=True,
                initialize_params=compute_v1.AttachedDiskInitializeParams(source_image=settings.image,
                                                                          disk_size_gb=settings.boot_disk_gb),
            )],
            network_interfaces=[compute_v1.NetworkInterface(**interface)],
            service_accounts=[compute_v1.ServiceAccount(email=settings.service_account, scopes=[CLOUD_PLATFORM_SCOPE])],
            resource_policies=[policy] if policy else [],
        )

    def _host(self, request: ProvisionInput, instance, shape: Shape, node: int, policy: str | None) -> Host:
        pool, nodes = request.placement.pool, request.placement.nodes
        prices = prices_of(shape, pool.region or region_of(pool.zone), self.settings.prices)
        spot, on_demand = prices if prices else (None, None)
        handle = {"project": self.project, "zone": pool.zone, "instance": instance.name, "id": str(instance.id)}
        if nodes > 1:
            handle.update(gang=gang_label(request.run_id, request.placement.attempt), node=str(node))
            if policy:
                handle["placement_policy"] = policy
        return Host(
            host_id=instance.name,
            provider=self.name,
            pool=pool,
            task_queue=host_queue(request.run_id, instance.name),
            handle=handle,
            price_per_hour=spot if pool.market == Market.SPOT else on_demand,
            on_demand_price_per_hour=on_demand,
            address=instance.network_interfaces[0].network_i_p if instance.network_interfaces else None,
        )

    def _wait(self, zone: str, operation):
        """Until the zone operation is DONE (each `wait` returns after at most two minutes)."""
        from google.cloud import compute_v1

        operations = self._client("ZoneOperationsClient")
        while operation.status != compute_v1.Operation.Status.DONE:
            operation = operations.wait(project=self.project, zone=zone, operation=operation.name, retry=retry_policy())
        return operation

    def _wait_region(self, region: str, operation):
        """Until the region operation is DONE, as `_wait`."""
        from google.cloud import compute_v1

        operations = self._client("RegionOperationsClient")
        while operation.status != compute_v1.Operation.Status.DONE:
            operation = operations.wait(project=self.project, region=region, operation=operation.name,
                                        retry=retry_policy())
        return operation

    def _get(self, zone: str, name: str):
        from google.api_core.exceptions import GoogleAPICallError

        try:
            return self._client("InstancesClient").get(project=self.project, zone=zone, instance=name,
                                                       retry=retry_policy())
        except GoogleAPICallError as err:
            if _is_missing(err):
                return None
            raise

    # ------------------------------------------------------------ release, describe, reap

    def release(self, host: Host) -> None:
        """Delete the VM without waiting for it to go: idempotent, and fast. The last host of a gang out tries
        to delete its placement policy (best effort: Compute keeps it in use until the gang's VMs have gone; the
        run's next gang, or its reap, deletes it then)."""
        self._delete(host.handle["zone"], host.handle["instance"])
        log.info("host released", host=host.host_id, zone=host.handle["zone"])
        policy = host.handle.get("placement_policy")
        if policy and not any(vm.status in LIVE_STATUSES and vm.name != host.handle["instance"]
                              for vm in self._labelled(f'labels.{LABEL_GANG} = "{host.handle["gang"]}"')):
            self._delete_policy(policy)

    def _delete(self, zone: str, name: str):
        """The VM's deletion operation; None when it is gone already, or on its way."""
        from google.api_core.exceptions import GoogleAPICallError

        try:
            return self._client("InstancesClient").delete_unary(project=self.project, zone=zone, instance=name,
                                                                retry=retry_policy())
        except GoogleAPICallError as err:
            if not (_is_missing(err) or "resourceNotReady" in error_reasons(err)):  # gone, or on its way
                raise
            return None

    def _delete_policy(self, path: str) -> None:
        """Best effort: a policy still in use (its VMs not yet gone) or gone already is left as it is."""
        from google.api_core.exceptions import GoogleAPICallError

        _, project, _, region, _, name = path.split("/")
        try:
            self._client("ResourcePoliciesClient").delete_unary(project=project, region=region, resource_policy=name,
                                                                retry=retry_policy())
        except GoogleAPICallError as err:
            if "resourceInUseByAnotherResource" in error_reasons(err):
                log.info("placement policy still in use: left for later", placement_policy=path)
            elif not _is_missing(err):
                raise
            return
        log.info("placement policy deleted", placement_policy=path)

    def _policies(self, run_id: str | None = None) -> list[tuple[str, str, int]]:
        """(path, run id, attempt) of the placement policies of gangs (of `run_id`), in every region."""
        from google.cloud import compute_v1

        listing = compute_v1.AggregatedListResourcePoliciesRequest(project=self.project)
        found = []
        for _, scoped in self._client("ResourcePoliciesClient").aggregated_list(request=listing, retry=retry_policy()):
            for policy in scoped.resource_policies:
                ours = POLICY_DESCRIPTION.fullmatch(policy.description)
                if ours and run_id in (None, ours.group(1)):
                    region = policy.region.rsplit("/", 1)[-1]
                    found.append((policy_path(self.project, region, policy.name), ours.group(1), int(ours.group(2))))
        return found

    def describe(self, host: Host) -> HostDescription:
        from google.cloud import compute_v1

        zone, name = host.handle["zone"], host.handle["instance"]
        instance = self._get(zone, name)
        if instance is not None and instance.status in LIVE_STATUSES:
            return HostDescription(state=HostState.RUNNING, reason=f"instance is {instance.status}")
        listing = compute_v1.ListZoneOperationsRequest(project=self.project, zone=zone,
                                                       filter=f"targetId = {host.handle['id']}")
        operations = self._client("ZoneOperationsClient").list(request=listing, retry=retry_policy())
        events = {op.operation_type for op in operations}
        for kind, why in TAKEN_BY_PROVIDER.items():
            if kind in events:
                # In its grace period a preempted VM still runs and could still upload: gone means stopped.
                if not self._stopped(zone, name):
                    return HostDescription(state=HostState.UNKNOWN, reason=f"{why} ({kind}), yet still stopping")
                return HostDescription(state=HostState.GONE, reason=f"{why} ({kind})")
        for kind, why in FAILED_ON_ITS_OWN.items():
            if kind in events:
                return HostDescription(state=HostState.FAULTY, reason=f"{why} ({kind})")
        if instance is None:
            return HostDescription(state=HostState.GONE, reason="instance deleted")
        return HostDescription(state=HostState.FAULTY, reason=f"instance is {instance.status} with no system event")

    def _stopped(self, zone: str, name: str) -> bool:
        """Whether the VM is stopped or deleted, waiting out a stop in progress (a preemption's 30 s)."""
        deadline = time.monotonic() + STOP_WAIT_SECONDS
        while (instance := self._get(zone, name)) is not None and instance.status != "TERMINATED":
            if time.monotonic() > deadline:
                return False
            time.sleep(1.0)
        return True

    def _labelled(self, label_filter: str) -> list:
        from google.cloud import compute_v1

        listing = compute_v1.AggregatedListInstancesRequest(project=self.project, filter=label_filter)
        found = []
        for _, scoped in self._client("InstancesClient").aggregated_list(request=listing, retry=retry_policy()):
            found += scoped.instances
        return found

    def reap(self, run_id: str) -> list[str]:
        """Delete every VM of the run, in every zone, and its gangs' placement policies once their VMs have
        gone (waiting for that a while); returns the VMs newly deleted."""
        reaped = []
        for instance in self._labelled(f'labels.{LABEL_RUN} = "{label_value(run_id)}"'):
            self._delete(instance.zone.rsplit("/", 1)[-1], instance.name)
            if instance.status != "STOPPING":  # STOPPING: already on its way out (released, preempted)
                reaped.append(instance.name)
        policies = self._policies(run_id)
        deadline = time.monotonic() + POLICY_GONE_SECONDS
        for path, _, attempt in policies:
            gang = f'labels.{LABEL_GANG} = "{gang_label(run_id, attempt)}"'
            while self._labelled(gang) and time.monotonic() < deadline:
                time.sleep(2.0)
            self._delete_policy(path)
        return reaped

    def live_runs(self) -> set[str]:
        """Runs with a VM, or a gang's placement policy left (a reap that could not wait its VMs out)."""
        runs = {run_id for _, run_id, _ in self._policies()}
        for instance in self._labelled(f"labels.{LABEL_RUN}:*"):
            exact = next((item.value for item in instance.metadata.items if item.key == RUN_ID_METADATA), None)
            runs.add(exact or instance.labels[LABEL_RUN])
        return runs
