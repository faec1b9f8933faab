"""The `gcp` provider's control plane: Spot (or on-demand) GPU VMs on Compute Engine, through google-cloud-compute.

A host is one VM named after its run and attempt, labelled `vaultlayer-run-id` / `vaultlayer-attempt`,
created with `provisioningModel=SPOT` and `instanceTerminationAction=DELETE`, so a preempted VM costs
nothing once it is gone. Its startup-script installs VaultLayer and starts `vl agent` on the host's
task queue; the agent reads the Temporal connection settings from Secret Manager with the VM's
service account, so no secret is ever in metadata. The agent learns of a preemption from the
metadata server (`GceMetadataNoticeSource` in host.py); after heartbeats stop, `describe`
tells a preempted VM from a failed one by its status and the zone's system-event operations.

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
RUN_ID_METADATA = "vaultlayer-run-id"  # the exact run id; the label holds a label-safe form of it

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


def instance_name(run_id: str, attempt: int) -> str:
    """`vl-<run>-<attempt>`: RFC 1035, at most 63 characters, the same on a retried provision."""
    slug = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", run_id.lower())).strip("-")
    name = f"vl-{slug}-{attempt}"
    if len(name) > 63:
        name = f"vl-{slug[:40].strip('-')}-{uuid.uuid5(uuid.NAMESPACE_URL, run_id).hex[:8]}-{attempt}"
    return name


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


def _is_missing(err) -> bool:
    from google.api_core import exceptions as api

    return isinstance(err, api.NotFound)


# ---------------------------------------------------------------- the provider


class GcpProvider:
    name = "gcp"

    def __init__(self, vl_home: Path, temporal_env: dict[str, str]) -> None:
        self.vl_home = vl_home
        self._lock = threading.Lock()
        self._instances = None
        self._operations = None

    @property
    def settings(self) -> GcpSettings:
        try:
            return load_settings(self.vl_home)
        except ValueError as err:
            raise ProviderConfigError(str(err)) from None

    @property
    def project(self) -> str:
        return self.settings.project

    def _clients(self):
        """The Compute clients, built once on first use (REST: the only transport that takes an http
        endpoint, and a `wait` that does not poll behind the endpoint's back)."""
        from google.cloud import compute_v1

        with self._lock:
            if self._instances is None:
                kwargs = client_kwargs()
                self._instances = compute_v1.InstancesClient(transport="rest", **kwargs)
                self._operations = compute_v1.ZoneOperationsClient(transport="rest", **kwargs)
        return self._instances, self._operations

    # ------------------------------------------------------------ provision

    def provision(self, request: ProvisionInput) -> ProvisionResult:
        from google.api_core.exceptions import GoogleAPICallError
        from google.cloud import compute_v1

        instances, _ = self._clients()
        pool = request.placement.pool
        zone, shape = pool.zone, shape_for(pool)
        name = instance_name(request.run_id, request.placement.attempt)
        existing = self._get(zone, name)
        if existing is not None:
            if existing.status in LIVE_STATUSES and existing.labels.get(LABEL_RUN) == label_value(request.run_id):
                return ProvisionResult(host=self._host(request, existing, shape))  # a retried provision
            name = f"{name}-{secrets.token_hex(2)}"
        bound = log.bind(run_id=request.run_id, attempt=request.placement.attempt, zone=zone, instance=name)
        insert = compute_v1.InsertInstanceRequest(
            project=self.project, zone=zone, instance_resource=self._instance(request, name, shape),
            request_id=str(uuid.uuid4()),  # the same on every retry of this call: Compute creates one VM
        )
        try:
            operation = instances.insert_unary(request=insert, retry=retry_policy())
        except GoogleAPICallError as err:
            refusal = refusal_of_http(err)
            if refusal is None:
                # Rate limits and server errors were retried; any other 4xx is a setting to fix.
                failure = ProviderConfigError if 400 <= (err.code or 0) < 500 and err.code != 409 else ProviderError
                raise failure(f"creating {name} in {zone} failed: {err.message}") from None
            bound.warning("no host", refusal=refusal.value, reason=err.message)
            raise NoCapacityError(refusal, err.message) from None
        operation = self._wait(zone, operation)
        if operation.error.errors:
            first = operation.error.errors[0]
            refusal = refusal_of_operation(first.code)
            bound.warning("no host", code=first.code, reason=first.message)
            if refusal is None:
                raise ProviderError(f"creating {name} in {zone} failed: {first.code}: {first.message}")
            raise NoCapacityError(refusal, f"{first.code}: {first.message}")
        created = self._get(zone, name)
        if created is None:
            raise NoCapacityError(Refusal.NO_CAPACITY, f"{name} was created, then taken back before it started")
        host = self._host(request, created, shape)
        bound.info("host provisioned", machine_type=shape.machine_type, market=pool.market.value,
                   price_per_hour=host.price_per_hour)
        return ProvisionResult(host=host)

    def _instance(self, request: ProvisionInput, name: str, shape: Shape):
        from google.cloud import compute_v1

        settings, pool, zone = self.settings, request.placement.pool, request.placement.pool.zone
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
        return compute_v1.Instance(
            name=name,
            machine_type=f"zones/{zone}/machineTypes/{shape.machine_type}",
            guest_accelerators=accelerators,
            scheduling=scheduling,
            labels={LABEL_RUN: label_value(request.run_id), LABEL_ATTEMPT: str(request.placement.attempt)},
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
        )

    def _host(self, request: ProvisionInput, instance, shape: Shape) -> Host:
        pool = request.placement.pool
        prices = prices_of(shape, pool.region or region_of(pool.zone), self.settings.prices)
        spot, on_demand = prices if prices else (None, None)
        return Host(
            host_id=instance.name,
            provider=self.name,
            pool=pool,
            task_queue=host_queue(request.run_id, instance.name),
            handle={"project": self.project, "zone": pool.zone, "instance": instance.name, "id": str(instance.id)},
            price_per_hour=spot if pool.market == Market.SPOT else on_demand,
            on_demand_price_per_hour=on_demand,
        )

    def _wait(self, zone: str, operation):
        """Until the zone operation is DONE (each `wait` returns after at most two minutes)."""
        from google.cloud import compute_v1

        _, operations = self._clients()
        while operation.status != compute_v1.Operation.Status.DONE:
            operation = operations.wait(project=self.project, zone=zone, operation=operation.name, retry=retry_policy())
        return operation

    def _get(self, zone: str, name: str):
        from google.api_core.exceptions import GoogleAPICallError

        instances, _ = self._clients()
        try:
            return instances.get(project=self.project, zone=zone, instance=name, retry=retry_policy())
        except GoogleAPICallError as err:
            if _is_missing(err):
                return None
            raise

    # ------------------------------------------------------------ release, describe, reap

    def release(self, host: Host) -> None:
        """Delete the VM without waiting for it to go: idempotent, and fast."""
        self._delete(host.handle["zone"], host.handle["instance"])
        log.info("host released", host=host.host_id, zone=host.handle["zone"])

    def _delete(self, zone: str, name: str) -> None:
        from google.api_core.exceptions import GoogleAPICallError

        instances, _ = self._clients()
        try:
            instances.delete_unary(project=self.project, zone=zone, instance=name, retry=retry_policy())
        except GoogleAPICallError as err:
            if not (_is_missing(err) or "resourceNotReady" in error_reasons(err)):  # gone, or on its way
                raise

    def describe(self, host: Host) -> HostDescription:
        from google.cloud import compute_v1

        zone, name = host.handle["zone"], host.handle["instance"]
        instance = self._get(zone, name)
        if instance is not None and instance.status in LIVE_STATUSES:
            return HostDescription(state=HostState.RUNNING, reason=f"instance is {instance.status}")
        _, operations = self._clients()
        listing = compute_v1.ListZoneOperationsRequest(project=self.project, zone=zone,
                                                       filter=f"targetId = {host.handle['id']}")
        events = {op.operation_type for op in operations.list(request=listing, retry=retry_policy())}
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

        instances, _ = self._clients()
        listing = compute_v1.AggregatedListInstancesRequest(project=self.project, filter=label_filter)
        found = []
        for _, scoped in instances.aggregated_list(request=listing, retry=retry_policy()):
            found += scoped.instances
        return found

    def reap(self, run_id: str) -> list[str]:
        reaped = []
        for instance in self._labelled(f'labels.{LABEL_RUN} = "{label_value(run_id)}"'):
            self._delete(instance.zone.rsplit("/", 1)[-1], instance.name)
            if instance.status != "STOPPING":  # STOPPING: already on its way out (released, preempted)
                reaped.append(instance.name)
        return reaped

    def live_runs(self) -> set[str]:
        runs = set()
        for instance in self._labelled(f"labels.{LABEL_RUN}:*"):
            exact = next((item.value for item in instance.metadata.items if item.key == RUN_ID_METADATA), None)
            runs.add(exact or instance.labels[LABEL_RUN])
        return runs
