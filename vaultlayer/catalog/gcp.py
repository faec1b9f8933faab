"""The `gcp` provider's catalog: GPU classes -> Compute Engine shapes (a machine type, plus attached GPUs
on N1), the (spot, on-demand) price table, zone rules, the settings file (`gcp.toml` in VL_HOME, or the file
CONFIG_VARIABLE names), the pool check and pricing.

google-auth is imported inside the credentials check only: `vl` works without the Google libraries. See
docs/providers/gcp.md.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from vaultlayer.catalog.settings import load_toml_settings
from vaultlayer.home import vl_home as default_vl_home
from vaultlayer.models import Market, Pool

CONFIG_VARIABLE = "VL_GCP_CONFIG"  # the settings file, when not $VL_HOME/gcp.toml
# Where set (tests), every Google API call goes to this endpoint, with anonymous credentials.
EMULATOR_VARIABLE = "VL_GCP_EMULATOR_HOST"
DEFAULT_IMAGE = "projects/deeplearning-platform-release/global/images/family/common-cu128-ubuntu-2204-nvidia-570"
SECRET_STORE = "gcp-secret-manager"  # the hosts' Temporal settings: gcp-secret-manager:projects/../versions/..
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
ZONE_NAME = re.compile(r"^([a-z]+-[a-z]+[0-9]+)-[a-z]$")


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
    # What hosts pip-install from an index, set deliberately; by default they install the run's own agent wheel.
    package: str | None = None
    setup: list[str] = Field(default_factory=list)  # shell lines run before the agent (your code, its deps)
    prices: dict[str, PriceOverride] = Field(default_factory=dict)  # "[region/]machine-or-gpu" -> USD per hour

    def temporal_settings(self) -> str:
        """Where the host reads its Temporal settings: the secret's version."""
        name = self.temporal_secret
        if not name.startswith("projects/"):
            name = f"projects/{self.project}/secrets/{name}"
        return f"{SECRET_STORE}:{name if '/versions/' in name else name + '/versions/latest'}"


def settings_path(vl_home: Path) -> Path:
    return Path(os.environ.get(CONFIG_VARIABLE) or vl_home / "gcp.toml")


def is_configured(vl_home: Path) -> bool:
    return settings_path(vl_home).exists()


def load_settings(vl_home: Path) -> GcpSettings:
    path = settings_path(vl_home)
    return load_toml_settings(path, GcpSettings, f"the gcp provider needs its settings in {path} "
                              "(project, service_account); see docs/providers/gcp.md")


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
    if not os.environ.get(EMULATOR_VARIABLE):
        default_credentials()


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


def current_price(pool: Pool) -> float | None:
    """USD per hour of one host of the pool now: the table's (with gcp.toml's overrides) price in the pool's market. The table is Google's published Spot prices, which change up to once a
    month: there is no live price to read. None: a part of the pool's shape has no price."""
    prices = prices_of(shape_for(pool), pool.region or region_of(pool.zone), load_settings(default_vl_home()).prices)
    if prices is None:
        return None
    spot, on_demand = prices
    return spot if pool.market == Market.SPOT else on_demand


def default_credentials():
    """Application Default Credentials, or a ValueError saying how to get them."""
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        credentials, _ = google.auth.default(scopes=[CLOUD_PLATFORM_SCOPE])
    except DefaultCredentialsError as err:
        raise ValueError(f"no Google Cloud credentials ({err}); run `gcloud auth application-default login`, "
                         "or set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file") from None
    return credentials
