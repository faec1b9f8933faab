"""Pydantic models for every message that crosses a boundary.

Workflow input and state, activity inputs and outputs, heartbeat details and the status the CLI and
the notebook client read. New fields always get defaults so that running workflows keep decoding.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field


class VLModel(BaseModel):
    """Base for wire models: unknown fields are ignored so that older code reads newer messages."""

    model_config = ConfigDict(extra="ignore")


class Market(StrEnum):
    SPOT = "spot"
    ON_DEMAND = "on-demand"


class Pool(VLModel):
    """Where capacity comes from: one provider, region/zone, GPU class and market."""

    provider: str = "local"
    region: str = "local"
    zone: str | None = None
    gpu: str | None = None
    gpu_count: int = 0
    market: Market = Market.SPOT

    @property
    def key(self) -> str:
        place = self.zone or self.region
        gpu = f"{self.gpu}:{self.gpu_count}" if self.gpu else "cpu"
        return f"{self.provider}/{place}/{gpu}/{self.market.value}"


class Limits(VLModel):
    """Run limits. Reclaims and failures have separate budgets: reclaims never use up retries."""

    max_attempts: int | None = None
    max_reclaims: int = 200
    max_host_faults: int = 3
    script_retries: int = 0


class RunSpec(VLModel):
    """Everything the workflow needs to drive a run. Holds no secrets: it lives in history."""

    run_id: str
    command: list[str]
    workdir: str
    env: dict[str, str] = Field(default_factory=dict)
    pools: list[Pool] = Field(default_factory=lambda: [Pool()])
    storage_url: str
    checkpoint_every: str | None = None
    notice_seconds: float = 30.0
    reclaim_every_seconds: float | None = None
    heartbeat_timeout_seconds: float = 30.0
    start_timeout_seconds: float = 300.0
    limits: Limits = Field(default_factory=Limits)
    submitted_at: datetime | None = None


class Placement(VLModel):
    pool: Pool
    attempt: int
    excluded_hosts: list[str] = Field(default_factory=list)


class Host(VLModel):
    """A provisioned host. `handle` holds the provider's own identifiers (pgid, instance id)."""

    host_id: str
    provider: str
    pool: Pool
    task_queue: str
    handle: dict[str, str] = Field(default_factory=dict)
    price_per_hour: float | None = None  # what this host costs, USD
    on_demand_price_per_hour: float | None = None  # what the same capacity costs on demand, USD


class ProvisionInput(VLModel):
    run_id: str
    placement: Placement
    notice_seconds: float = 30.0


class ProvisionResult(VLModel):
    """A host, or a typed refusal (no capacity, quota) the policy can act on."""

    host: Host | None = None
    refusal: str | None = None
    message: str = ""


class HostState(StrEnum):
    RUNNING = "running"
    GONE = "gone"  # taken or terminated by the provider
    UNKNOWN = "unknown"


class HostDescription(VLModel):
    state: HostState
    reason: str = ""


class InjectReclaimInput(VLModel):
    host: Host
    notice_seconds: float
    with_notice: bool = True


class ReapInput(VLModel):
    run_id: str
    providers: list[str]


class CheckpointRef(VLModel):
    """A verified, complete checkpoint that an attempt may resume from."""

    name: str
    step: int
    attempt: int
    url: str
    manifest_sha256: str


class CheckpointCheck(VLModel):
    name: str
    step: int
    attempt: int
    ok: bool
    reason: str = ""


class VerifyInput(VLModel):
    run_id: str
    storage_url: str
    fences: dict[int, int] = Field(default_factory=dict)  # attempt -> highest step accepted from it


class VerifyResult(VLModel):
    chosen: CheckpointRef | None = None
    rejected: list[CheckpointCheck] = Field(default_factory=list)


class Notice(VLModel):
    """A reclaim notice: the host will be taken at `deadline`."""

    kind: str = "spot-termination"
    action: str = "terminate"
    deadline: datetime
    received_at: datetime


class AttemptOutcome(StrEnum):
    COMPLETED = "completed"
    FAILED = "failed"  # the script exited non-zero
    RECLAIMED = "reclaimed"  # notice seen, or the provider says the host was taken
    HOST_FAULT = "host-fault"  # agent never started, or heartbeats stopped on a live host
    REFUSED = "refused"  # the provider had no capacity
    CANCELLED = "cancelled"


class AttemptInput(VLModel):
    run_id: str
    attempt: int
    host: Host
    command: list[str]
    workdir: str
    env: dict[str, str] = Field(default_factory=dict)
    storage_url: str
    checkpoint: CheckpointRef | None = None
    checkpoint_every: str | None = None
    heartbeat_interval_seconds: float = 1.0


class AttemptProgress(VLModel):
    """Heartbeat details of `run_attempt`: what the live view and a lost-host diagnosis read."""

    phase: str = "starting"
    step: int | None = None
    durable_step: int | None = None
    start_step: int = 0
    notice: Notice | None = None


class AttemptResult(VLModel):
    outcome: AttemptOutcome
    start_step: int = 0
    end_step: int | None = None
    durable_step: int | None = None
    exit_code: int | None = None
    notice: Notice | None = None
    emergency_save: str | None = None  # "saved", "missed" or None when there was no notice
    reason: str = ""
    log_tail: str = ""  # the end of the script's output when it failed, so the failure explains itself


class AttemptRecord(VLModel):
    attempt: int
    host: str | None = None
    pool: str
    outcome: AttemptOutcome | None = None  # None while running
    start_step: int = 0
    end_step: int | None = None
    durable_step: int | None = None
    steps_lost: int = 0
    exit_code: int | None = None
    reason: str = ""
    log_tail: str = ""
    started_at: datetime
    ended_at: datetime | None = None


class RunState(StrEnum):
    PENDING = "pending"
    PROVISIONING = "provisioning"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED)


class RunStatus(VLModel):
    """The run as a person sees it; also the carried state across continue-as-new."""

    run_id: str
    state: RunState = RunState.PENDING
    attempts: list[AttemptRecord] = Field(default_factory=list)
    durable_step: int | None = None
    steps_lost: int = 0
    reclaims: int = 0
    host_faults: int = 0
    script_failures: int = 0
    excluded_hosts: list[str] = Field(default_factory=list)
    fences: dict[int, int] = Field(default_factory=dict)
    bad_checkpoints: list[CheckpointCheck] = Field(default_factory=list)
    current_host: Host | None = None
    step: int | None = None  # live step, filled in by the client from heartbeats
    stop_reason: str = ""
    exit_code: int | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    continued_as_new: int = 0


class RunInput(VLModel):
    spec: RunSpec
    carried: RunStatus | None = None


class ReclaimRequest(VLModel):
    with_notice: bool = True


class ReclaimAck(VLModel):
    host: str
