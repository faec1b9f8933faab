"""The `gcp` provider: Spot (or on-demand) GPU VMs on Compute Engine, through google-cloud-compute.

A host is one VM named after its run and attempt, labelled `vaultlayer-run-id` / `vaultlayer-attempt`,
created with `provisioningModel=SPOT` and `instanceTerminationAction=DELETE`, so a preempted VM costs
nothing once it is gone. Its startup-script installs VaultLayer and starts `vl agent` on the host's
task queue; the agent reads the Temporal connection settings from Secret Manager with the VM's
service account, so no secret is ever in metadata. The agent learns of a preemption from the
metadata server (`activities.notices.GceMetadataNoticeSource`); after heartbeats stop, `describe`
tells a preempted VM from a failed one by its status and the zone's system-event operations.

google-cloud-compute is imported lazily (`vl` works without it); its REST client blocks, so the control
activities call it from the worker's thread pool. Settings live in `$VL_HOME/gcp.toml` (or
`$VL_GCP_CONFIG`); docs/providers/gcp.md has them, the machine map and the price table.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import threading
import time
import uuid
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import structlog
from pydantic import BaseModel, ConfigDict, Field

from activities.providers.base import load_toml_settings, NoCapacityError, ProviderConfigError, ProviderError
from vaultlayer.codec import KEY_ENV
from vaultlayer.home import vl_home as default_vl_home
from vaultlayer.models import Host, HostDescription, HostState, Market, Pool, ProvisionInput, ProvisionResult, Refusal

log = structlog.get_logger(__name__)

LABEL_RUN = "vaultlayer-run-id"
LABEL_ATTEMPT = "vaultlayer-attempt"
RUN_ID_METADATA = "vaultlayer-run-id"  # the exact run id; the label holds a label-safe form of it
DEFAULT_IMAGE = "projects/deeplearning-platform-release/global/images/family/common-cu128-ubuntu-2204-nvidia-570"
HOST_HOME = "/opt/vaultlayer"
SECRET_STORE = "gcp-secret-manager"  # VL_TEMPORAL_SETTINGS=gcp-secret-manager:projects/../versions/..
EMULATOR_HOST = "VL_GCP_EMULATOR_HOST"
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
ZONE_NAME = re.compile(r"^([a-z]+-[a-z]+[0-9]+)-[a-z]$")

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
RATE_LIMIT_REASONS = {"rateLimitExceeded", "userRateLimitExceeded"}
UNSUPPORTED_IN_ZONE = re.compile(r"(machineType|acceleratorType)s?\b.*(does not exist in zone|was not found)",
                                 re.IGNORECASE | re.DOTALL)


# ---------------------------------------------------------------- machine map and prices


@dataclass(frozen=True)
class Shape:
    """What Compute Engine is asked for: a machine type, plus GPUs to attach on N1 machines (accelerator-
    optimized types such as g2, a2 and a3 come with theirs)."""

    machine_type: str
    accelerator: str | None = None
    accelerator_count: int = 0


def _n1_with(accelerator: str, counts: dict[int, str]) -> dict[int, Shape]:
    return {count: Shape(machine, accelerator, count) for count, machine in counts.items()}


def _builtin(counts: dict[int, str]) -> dict[int, Shape]:
    return {count: Shape(machine) for count, machine in counts.items()}


N1_BY_GPU_COUNT = {1: "n1-standard-8", 2: "n1-standard-16", 4: "n1-standard-32", 8: "n1-standard-64"}
SHAPES: dict[str, dict[int, Shape]] = {
    "T4": _n1_with("nvidia-tesla-t4", {n: N1_BY_GPU_COUNT[n] for n in (1, 2, 4)}),
    "P100": _n1_with("nvidia-tesla-p100", {n: N1_BY_GPU_COUNT[n] for n in (1, 2, 4)}),
    "V100": _n1_with("nvidia-tesla-v100", N1_BY_GPU_COUNT),
    "L4": _builtin({1: "g2-standard-4", 2: "g2-standard-24", 4: "g2-standard-48", 8: "g2-standard-96"}),
    "A100": _builtin({1: "a2-highgpu-1g", 2: "a2-highgpu-2g", 4: "a2-highgpu-4g", 8: "a2-highgpu-8g",
                      16: "a2-megagpu-16g"}),
    "A100-80GB": _builtin({1: "a2-ultragpu-1g", 2: "a2-ultragpu-2g", 4: "a2-ultragpu-4g", 8: "a2-ultragpu-8g"}),
    "H100": _builtin({1: "a3-highgpu-1g", 2: "a3-highgpu-2g", 4: "a3-highgpu-4g", 8: "a3-highgpu-8g"}),
}
GPU_ALIASES = {"A100-40GB": "A100"}

# USD per hour in us-central1, (spot, on-demand), per machine type and per attached GPU. Compiled
# 2026-11 from cloud.google.com/compute/vm-instance-pricing, /compute/gpus-pricing and
# /spot-vms/pricing; spot prices move up to once a month: `prices` in gcp.toml overrides any entry.
PRICES_AS_OF = "2026-11"
PRICES: dict[str, tuple[float, float]] = {
    "n1-standard-8": (0.0802, 0.3800),
    "n1-standard-16": (0.1604, 0.7600),
    "n1-standard-32": (0.3208, 1.5200),
    "n1-standard-64": (0.6416, 3.0400),
    "nvidia-tesla-t4": (0.1400, 0.3500),
    "nvidia-tesla-p100": (0.5840, 1.4600),
    "nvidia-tesla-v100": (0.9920, 2.4800),
    "g2-standard-4": (0.2827, 0.7068),
    "g2-standard-24": (0.8003, 2.0007),
    "g2-standard-48": (1.6006, 4.0014),
    "g2-standard-96": (3.2011, 8.0028),
    "a2-highgpu-1g": (1.4694, 3.6734),
    "a2-highgpu-2g": (2.9387, 7.3468),
    "a2-highgpu-4g": (5.8774, 14.6935),
    "a2-highgpu-8g": (11.7548, 29.3871),
    "a2-megagpu-16g": (22.2959, 55.7398),
    "a2-ultragpu-1g": (2.0275, 5.0688),
    "a2-ultragpu-2g": (4.0550, 10.1376),
    "a2-ultragpu-4g": (8.1101, 20.2752),
    "a2-ultragpu-8g": (16.2202, 40.5504),
    "a3-highgpu-1g": (3.3182, 11.0606),
    "a3-highgpu-2g": (6.6364, 22.1212),
    "a3-highgpu-4g": (13.2727, 44.2424),
    "a3-highgpu-8g": (26.5455, 88.4848),
}


class PriceOverride(BaseModel):
    model_config = ConfigDict(extra="forbid")

    spot: float = Field(ge=0)
    on_demand: float = Field(ge=0)


def gpu_class(name: str) -> str:
    upper = name.upper().replace("_", "-")
    return GPU_ALIASES.get(upper, upper)


def shape_for(pool: Pool) -> Shape:
    return SHAPES[gpu_class(pool.gpu)][pool.gpu_count]


def prices_of(shape: Shape, region: str, overrides: dict[str, PriceOverride]) -> tuple[float, float] | None:
    """(spot, on-demand) USD per hour of a shape: the override for the region, then for any region,
    then the bundled table; None when a part of the shape has no price."""

    def one(item: str) -> tuple[float, float] | None:
        override = overrides.get(f"{region}/{item}") or overrides.get(item)
        return (override.spot, override.on_demand) if override else PRICES.get(item)

    parts = [one(shape.machine_type)]
    if shape.accelerator:
        gpu = one(shape.accelerator)
        parts.append(gpu and (gpu[0] * shape.accelerator_count, gpu[1] * shape.accelerator_count))
    if any(part is None for part in parts):
        return None
    return round(sum(p[0] for p in parts), 4), round(sum(p[1] for p in parts), 4)


# ---------------------------------------------------------------- settings and pool checks


def package_requirement() -> str:
    try:
        return f"vaultlayer[gcp]=={version('vaultlayer')}"
    except PackageNotFoundError:
        return "vaultlayer[gcp]"


class GcpSettings(BaseModel):
    """`gcp.toml`: the project-side settings VMs are created with. Unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")

    project: str
    service_account: str  # the hosts' e-mail; it may read temporal_secret and the checkpoint storage
    temporal_secret: str = "vaultlayer-temporal"  # Secret Manager secret (id or resource name): TEMPORAL_* JSON
    network: str = "global/networks/default"
    subnetwork: str | None = None
    external_ip: bool = True  # hosts reach PyPI and Temporal through it; set false behind Cloud NAT
    image: str = DEFAULT_IMAGE  # a Deep Learning VM image: NVIDIA driver and CUDA included
    boot_disk_gb: int = Field(default=200, ge=10)
    package: str = Field(default_factory=package_requirement)  # what hosts pip-install: the run's version
    setup: list[str] = Field(default_factory=list)  # shell lines run before the agent (your code, its deps)
    prices: dict[str, PriceOverride] = Field(default_factory=dict)  # "[region/]machine-or-gpu" -> USD per hour

    def temporal_settings(self) -> str:
        """What the host exports as VL_TEMPORAL_SETTINGS: the secret's version to read."""
        name = self.temporal_secret
        if not name.startswith("projects/"):
            name = f"projects/{self.project}/secrets/{name}"
        return f"{SECRET_STORE}:{name if '/versions/' in name else name + '/versions/latest'}"


def settings_path(vl_home: Path) -> Path:
    return Path(os.environ.get("VL_GCP_CONFIG") or vl_home / "gcp.toml")


def is_configured(vl_home: Path) -> bool:
    return settings_path(vl_home).exists()


def load_settings(vl_home: Path) -> GcpSettings:
    path = settings_path(vl_home)
    return load_toml_settings(path, GcpSettings, f"the gcp provider needs its settings in {path} (project, service_account); "
                         "see docs/providers/gcp.md")


def region_of(zone: str) -> str:
    match = ZONE_NAME.match(zone)
    if not match:
        raise ValueError(f"--zone {zone!r} is not a Compute Engine zone name, such as us-central1-a")
    return match.group(1)


def validate_pool(pool: Pool) -> None:
    load_settings(default_vl_home())
    if not pool.gpu:
        raise ValueError("the gcp provider creates GPU VMs: give --gpu, such as --gpu L4:1")
    name = gpu_class(pool.gpu)
    if name not in SHAPES:
        raise ValueError(f"--gpu {pool.gpu}: not a GPU class the gcp provider knows; use one of: {', '.join(SHAPES)}")
    if pool.gpu_count not in SHAPES[name]:
        counts = ", ".join(str(count) for count in SHAPES[name])
        raise ValueError(f"--gpu {pool.gpu}:{pool.gpu_count}: gcp offers {name} VMs with {counts} GPUs")
    if not pool.zone:
        raise ValueError("the gcp provider places VMs in zones: give --zone, such as --zone us-central1-a "
                         "(repeatable, in order of preference)")
    region = region_of(pool.zone)
    if pool.region and pool.region != region:
        raise ValueError(f"--zone {pool.zone} is in {region}, not in --region {pool.region}")
    if not os.environ.get(EMULATOR_HOST):
        _default_credentials()


def priced(pool: Pool) -> Pool:
    """The pool with the table's prices, so the policy ranks placements by what they cost."""
    if pool.price_per_hour is not None:
        return pool
    prices = prices_of(shape_for(pool), pool.region or region_of(pool.zone), load_settings(default_vl_home()).prices)
    if prices is None:
        return pool
    spot, on_demand = prices
    return pool.model_copy(update={"price_per_hour": spot if pool.market == Market.SPOT else on_demand,
                                   "on_demand_price_per_hour": on_demand})


def _default_credentials():
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        credentials, _ = google.auth.default(scopes=[CLOUD_PLATFORM_SCOPE])
    except DefaultCredentialsError as err:
        raise ValueError(f"no Google Cloud credentials ({err}); run `gcloud auth application-default login`, "
                         "or set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file") from None
    return credentials


def client_kwargs() -> dict:
    """How a google-cloud client reaches the API: the real one with Application Default Credentials,
    or, where VL_GCP_EMULATOR_HOST is set (tests), that endpoint with anonymous credentials."""
    emulator = os.environ.get(EMULATOR_HOST)
    if emulator:
        from google.auth.credentials import AnonymousCredentials

        return {"client_options": {"api_endpoint": emulator}, "credentials": AnonymousCredentials()}
    try:
        return {"credentials": _default_credentials()}
    except ValueError as err:
        raise ProviderConfigError(str(err)) from None


# ---------------------------------------------------------------- names, labels, bootstrap


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


def host_queue(run_id: str, host_id: str) -> str:
    return f"vl-host-{run_id}-{host_id}"


def startup_script(settings: GcpSettings, task_queue: str, host_id: str, run_id: str) -> str:
    """The VM's startup-script (run as root at boot). It holds no secret: the agent reads the Temporal
    connection settings from Secret Manager with the VM's service account. However it ends (a failed
    step, the agent exiting) the VM powers off, so a broken host stops costing GPU time and `describe`
    reads it as failed (a guest shutdown)."""
    venv = f"{HOST_HOME}/venv"
    return "\n".join([
        "#!/bin/bash",
        "# VaultLayer host bootstrap: install the run's version, start the host agent.",
        "set -euo pipefail",
        "exec >>/var/log/vaultlayer-bootstrap.log 2>&1",
        "trap 'shutdown -h now' EXIT",
        f"export VL_HOME={HOST_HOME}",
        f"export VL_TEMPORAL_SETTINGS={shlex.quote(settings.temporal_settings())}",
        "export VL_NOTICE_SOURCE=gce-metadata",
        f"python3 -m venv {venv} || "
        f"{{ apt-get update -q && apt-get install -y -q python3-venv && python3 -m venv {venv}; }}",
        f"{venv}/bin/pip install --quiet {shlex.quote(settings.package)}",
        *settings.setup,
        f"{venv}/bin/vl agent --task-queue {shlex.quote(task_queue)} --host-id {shlex.quote(host_id)} "
        f"--host-dir {HOST_HOME}/host --run-id {shlex.quote(run_id)}",
        "",
    ])


# ---------------------------------------------------------------- errors


def _retryable(err: Exception) -> bool:
    """Rate limits and server errors: worth another try of the same call."""
    from google.api_core import exceptions as api

    if isinstance(err, api.TooManyRequests | api.InternalServerError | api.BadGateway | api.ServiceUnavailable
                  | api.GatewayTimeout):
        return True
    return isinstance(err, api.Forbidden) and bool(_reasons(err) & RATE_LIMIT_REASONS)


def _retry():
    from google.api_core.retry import Retry

    return Retry(predicate=_retryable, initial=1.0, maximum=20.0, multiplier=2.0, timeout=180.0)


def _reasons(err) -> set[str]:
    return {item.get("reason", "") for item in getattr(err, "errors", None) or () if isinstance(item, dict)}


def refusal_of_operation(code: str) -> Refusal | None:
    if code in NO_CAPACITY_CODES:
        return Refusal.NO_CAPACITY
    if code in QUOTA_CODES:
        return Refusal.QUOTA
    return None


def refusal_of_http(err) -> Refusal | None:
    """A refusal carried by the insert call itself: quota, or a type the zone does not offer."""
    from google.api_core import exceptions as api

    if _reasons(err) & QUOTA_CODES:
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
            operation = instances.insert_unary(request=insert, retry=_retry())
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
        script = startup_script(settings, host_queue(request.run_id, name), name, request.run_id)
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
            operation = operations.wait(project=self.project, zone=zone, operation=operation.name, retry=_retry())
        return operation

    def _get(self, zone: str, name: str):
        from google.api_core.exceptions import GoogleAPICallError

        instances, _ = self._clients()
        try:
            return instances.get(project=self.project, zone=zone, instance=name, retry=_retry())
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
            instances.delete_unary(project=self.project, zone=zone, instance=name, retry=_retry())
        except GoogleAPICallError as err:
            if not (_is_missing(err) or "resourceNotReady" in _reasons(err)):  # gone, or on its way
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
        events = {op.operation_type for op in operations.list(request=listing, retry=_retry())}
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
        for _, scoped in instances.aggregated_list(request=listing, retry=_retry()):
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


# ---------------------------------------------------------------- host side


def read_temporal_settings(reference: str) -> dict[str, str]:
    """On the host: the Temporal connection settings, read with the VM's service account from
    `gcp-secret-manager:<secret version>`. The stored value is a JSON object of Temporal environment-
    config variables (TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE, TEMPORAL_API_KEY, TEMPORAL_TLS_*, and
    VL_ENCRYPTION_KEY when payloads are encrypted).
    Errors name keys, never values."""
    import google_crc32c
    from google.api_core.exceptions import GoogleAPICallError
    from google.cloud import secretmanager

    store, _, name = reference.partition(":")
    if store != SECRET_STORE or not name:
        raise ValueError(f"VL_TEMPORAL_SETTINGS {reference!r}: expected {SECRET_STORE}:projects/P/secrets/S/versions/V")
    client = secretmanager.SecretManagerServiceClient(transport="rest", **client_kwargs())
    try:
        payload = client.access_secret_version(name=name, retry=_retry()).payload
    except GoogleAPICallError as err:
        raise ValueError(f"{reference}: {err.message}") from None
    if payload.data_crc32c and google_crc32c.value(payload.data) != payload.data_crc32c:
        raise ValueError(f"{reference}: the payload does not match its checksum")
    try:
        settings = json.loads(payload.data)
    except ValueError:
        raise ValueError(f"{reference}: not a JSON object of TEMPORAL_* settings") from None
    if not isinstance(settings, dict) or "TEMPORAL_ADDRESS" not in settings:
        raise ValueError(f"{reference}: expected a JSON object with at least TEMPORAL_ADDRESS")
    odd = [key for key, value in settings.items()
           if not (key.startswith("TEMPORAL_") or key == KEY_ENV) or not isinstance(value, str)]
    if odd:
        raise ValueError(f"{reference}: keys must be TEMPORAL_* or {KEY_ENV}, with string values; "
                         f"check {', '.join(odd)}")
    return settings
