"""Pydantic models for every message that crosses a boundary.

Workflow input and state, activity inputs and outputs, heartbeat details and the status the CLI and
the notebook client read. New fields always get defaults so that running workflows keep decoding.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vaultlayer.run_ids import check_run_id


class VLModel(BaseModel):
    """Base for wire models: unknown fields are ignored so that older code reads newer messages."""

    model_config = ConfigDict(extra="ignore")


HEX_DIGEST = r"^[0-9a-f]{64}$"  # a BLAKE3 or SHA-256, lower-case hex


class SnapshotRef(VLModel):
    """A stored snapshot of a directory (vaultlayer/workdir): the run's code, as its spec carries it, or its
    outputs. Where, which (the digest every host checks), how big."""

    url: str  # <storage_url>/_code
    digest: str = Field(pattern=HEX_DIGEST)
    file_count: int
    total_bytes: int
    link_count: int = 0

    @property
    def manifest_url(self) -> str:
        return f"{self.url}/snapshots/{self.digest}.json"

    @property
    def short(self) -> str:
        return self.digest[:12]


class AgentRef(VLModel):
    """The VaultLayer a run was submitted with, as a wheel in its storage (vaultlayer/workdir/agent.py): what a
    cloud host's bootstrap installs, checked against `sha256`, with the dependencies pinned as `pins`."""

    url: str  # <storage_url>/_code/agents/<sha256>/vaultlayer-<version>-py3-none-any.whl
    sha256: str = Field(pattern=HEX_DIGEST)
    pins: list[str] = Field(default_factory=list)  # name==version

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


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
    # Expected prices, USD per hour (a provider's price list, or the user's): they rank pools before any
    # host of the pool was seen. The host a provider hands back carries what it actually costs.
    price_per_hour: float | None = None
    on_demand_price_per_hour: float | None = None
    # price_per_hour is the user's (`--price`, a config file's `price`, `--on-demand-price` for a fallback pool),
    # not the provider's: it wins over every price read later (catalog.current_prices). False in specs submitted
    # before this field, whose pools' prices are then read like any list price.
    price_given: bool = False
    # How fast one host of the pool trains, relative to one V100 (vaultlayer/catalog/throughput.py, or the
    # user's `speed`): the prior the policy ranks by until the run has measured itself there. None: unknown.
    speed: float | None = Field(default=None, gt=0)

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
    max_cost: float | None = None  # USD, over all attempts
    deadline: datetime | None = None  # stop here; with a work estimate the policy plans to finish before it
    host_exclusion_seconds: float | None = None  # how long a faulty host stays excluded; None: the whole run
    max_attempts_without_progress: int = 10  # attempts in a row that store no checkpoint


class RunSpec(VLModel):
    """Everything the workflow needs to drive a run. Holds no secrets: it lives in history."""

    run_id: str
    command: list[str]
    workdir: str  # where the code was packed from, on the submitting machine
    # The code that travels (docs/code-and-outputs.md): every host unpacks this snapshot, checks every digest and
    # runs the command in it; relative paths of the command, checkpoint_dir and output_dir resolve there. None:
    # the command runs in `workdir` as the host has it (`--no-code`: an image that holds the code).
    code: SnapshotRef | None = None
    output_dir: str | None = None  # relative to the code: stored when the script succeeds, for `vl pull`
    agent: AgentRef | None = None  # what cloud hosts install; None: the provider's `package` setting
    env: dict[str, str] = Field(default_factory=dict)
    # NAME -> a secret reference (env:, file:, aws-sm:, gcp-sm:; vaultlayer/secrets.py), read on the host.
    env_secrets: dict[str, str] = Field(default_factory=dict)
    setup: list[str] = Field(default_factory=list)  # shell commands run on the host before each attempt's command
    # What setup leaves in pip's and uv's caches is stored once and restored on every later host (vaultlayer/workdir).
    setup_cache: bool = True
    pools: list[Pool] = Field(default_factory=lambda: [Pool()])
    # Hosts per attempt (`--nodes`): a gang placed in one pool, started together, and moved together when any is
    # lost (docs/distributed.md). Costs, and the capacity a pool must have, are per gang.
    nodes: int = Field(default=1, ge=1)
    storage_url: str
    checkpoint_every: str | None = None  # None: Young/Daly from the measured save cost and the pool's MTBF
    checkpoint_min: str = "60s"
    checkpoint_max: str = "30m"
    notice_seconds: float = 30.0
    reclaim_every_seconds: float | None = None
    heartbeat_timeout_seconds: float = 30.0
    start_timeout_seconds: float = 300.0
    limits: Limits = Field(default_factory=Limits)
    submitted_at: datetime | None = None
    # What the deadline rule needs to know how much work is left: the step the script ends at, and how long
    # the whole run takes uninterrupted (without it, the speed is measured from the attempts).
    total_steps: int | None = None
    work_seconds: float | None = None
    changeover_seconds: float = 360.0  # from a placement decision to training again (provision + restore)
    # How many seconds of training measured on a pool its speed prior is worth (workflows/speed.py): the default
    # 10 min keeps one short attempt from swinging the ranking; tests of seconds-long attempts set it lower.
    speed_prior_seconds: float = Field(default=600.0, ge=0)
    reclaim_only_in: list[str] = Field(default_factory=list)  # zones/regions --reclaim-every applies to
    # Zero-code mode: the script writes its own checkpoints here; the agent restores and snapshots it.
    checkpoint_dir: str | None = None
    keep_checkpoints: int = 3  # retention: the newest complete checkpoints kept
    prune_every_seconds: float = 600.0  # retention also runs this often while an attempt runs
    # The server has the Vl* search attributes (vaultlayer/ui.py): the workflow keeps them current.
    search_attributes: bool = False

    # The run id names a storage directory and host task queues: one that could escape them is refused.
    _run_id_is_safe = field_validator("run_id")(check_run_id)


class Placement(VLModel):
    pool: Pool
    attempt: int
    excluded_hosts: list[str] = Field(default_factory=list)
    nodes: int = Field(default=1, ge=1)  # RunSpec.nodes: hosts the provider must hand over together, or none


class Host(VLModel):
    """A provisioned host. `handle` holds the provider's own identifiers (pgid, instance id)."""

    host_id: str
    provider: str
    pool: Pool
    task_queue: str
    handle: dict[str, str] = Field(default_factory=dict)
    price_per_hour: float | None = None  # what this host costs, USD
    on_demand_price_per_hour: float | None = None  # what the same capacity costs on demand, USD
    address: str | None = None  # the private address the gang's other hosts reach this one at


class ProvisionInput(VLModel):
    run_id: str
    placement: Placement
    notice_seconds: float = 30.0
    agent: AgentRef | None = None  # RunSpec.agent


class ProvisionResult(VLModel):
    """The placement's hosts (all of them: a gang is had whole or not at all), or a typed refusal (no capacity,
    quota) the policy can act on."""

    host: Host | None = None  # the first of `hosts` (node 0), the one host of a single-node run
    refusal: str | None = None  # a `Refusal` value
    message: str = ""
    hosts: list[Host] = Field(default_factory=list)  # in node-rank order
    master_port: int = 29500  # the rendezvous port on node 0 (torchrun's default; a free one on the local provider)
    # A gang the provider could only have part of: those hosts were released at once, but billed for the while held.
    held_cost_usd: float = 0.0

    @model_validator(mode="after")
    def _node_zero_is_host(self) -> ProvisionResult:
        """A result recorded before gangs has `host` alone; a new one is read the same either way."""
        if self.host is not None and not self.hosts:
            self.hosts = [self.host]
        elif self.hosts and self.host is None:
            self.host = self.hosts[0]
        return self


class Refusal(StrEnum):
    """Why a provider gave no host: each calls for a different move (other zone, type or market)."""

    NO_CAPACITY = "no-capacity"  # the zone has none of the type now
    PRICE_TOO_LOW = "price-too-low"  # the spot price is above the maximum price
    QUOTA = "quota"  # an account limit for the region and market: other zones of it will refuse too
    UNSUPPORTED = "unsupported"  # the type is not offered in the zone


class HostState(StrEnum):
    RUNNING = "running"
    GONE = "gone"  # taken or terminated by the provider
    FAULTY = "faulty"  # stopped for a reason of its own (crash, shutdown from inside, hardware)
    UNKNOWN = "unknown"


class HostDescription(VLModel):
    state: HostState
    reason: str = ""


class InjectReclaimInput(VLModel):
    host: Host
    notice_seconds: float
    with_notice: bool = True


class QuotePricesInput(VLModel):
    pools: list[Pool]


class PriceQuotes(VLModel):
    """What one host of each pool costs now, USD per hour (`quote_prices`), by `Pool.key`. A pool whose read
    failed is in `failed` with a short reason, and in `prices` too when an earlier read of it is cached."""

    prices: dict[str, float] = Field(default_factory=dict)
    failed: dict[str, str] = Field(default_factory=dict)


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


class PruneInput(VLModel):
    run_id: str
    storage_url: str
    keep: int
    fences: dict[int, int] = Field(default_factory=dict)
    reported: dict[int, int] = Field(default_factory=dict)  # ended attempt -> durable step it reported, or -1
    protect: list[str] = Field(default_factory=list)  # checkpoint names never removed


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
    VACATED = "vacated"  # the policy moved the run off this host (back to spot, or a limit was reached)


class FailureCause(StrEnum):
    """What a failed attempt failed of. Only `script` is the script's own exit; the others fail the same way on
    every host, so they end the run with their own reason (workflows/policy.py), never as "exit code None"."""

    SCRIPT = "script"  # the script exited non-zero
    SECRET = "secret"  # a secret env reference could not be read on the host
    SETUP = "setup"  # a setup command failed
    COMMAND = "command"  # the command is not found (or not executable) on the host
    RESTORE = "restore"  # the checkpoint to resume from could not be restored
    CODE = "code"  # the run's code snapshot could not be unpacked or failed verification
    OUTPUTS = "outputs"  # the script succeeded but its output directory could not be stored


class GangRole(VLModel):
    """One host's place in a gang: what its script reads as VL_NODE_RANK, VL_NUM_NODES, VL_NODE_ADDRS,
    VL_MASTER_ADDR and VL_MASTER_PORT (vaultlayer/protocol.py)."""

    node_rank: int
    addresses: list[str]  # every host's private address, in node-rank order
    master_port: int

    @property
    def nodes(self) -> int:
        return len(self.addresses)


class AttemptInput(VLModel):
    run_id: str
    attempt: int
    host: Host
    command: list[str]
    workdir: str
    code: SnapshotRef | None = None  # RunSpec.code: unpacked and verified before setup; None: run in `workdir`
    output_dir: str | None = None  # RunSpec.output_dir
    env: dict[str, str] = Field(default_factory=dict)
    env_secrets: dict[str, str] = Field(default_factory=dict)  # RunSpec.env_secrets: references, never values
    setup: list[str] = Field(default_factory=list)  # RunSpec.setup
    setup_cache: bool = False  # RunSpec.setup_cache
    storage_url: str
    checkpoint: CheckpointRef | None = None
    checkpoint_every: str | None = None
    checkpoint_min: str = "60s"
    checkpoint_max: str = "30m"
    mtbf_seconds: float | None = None  # the workflow's estimate for this pool, for the automatic interval
    shortest_host_life_seconds: float | None = None  # interval.shortest_life_without_a_save, for the first save
    host_since: datetime | None = None  # AttemptRecord.running_at: the host's life, and the early save, count from it
    heartbeat_interval_seconds: float = 1.0
    checkpoint_dir: str | None = None  # zero-code mode (RunSpec.checkpoint_dir)
    gang: GangRole | None = None  # a multi-node run: this host's rank and its peers; None: a single host


class AttemptProgress(VLModel):
    """Heartbeat details of `run_attempt`: what the live view and a lost-host diagnosis read."""

    phase: str = "starting"
    step: int | None = None
    durable_step: int | None = None
    start_step: int = 0
    notice: Notice | None = None
    checkpoint_interval: str = ""  # the interval the SDK uses now, and why
    waiting_on: str = ""  # what holds the run's saves up now, e.g. "storage: <error>" while uploads are retried
    node_rank: int = 0  # of a gang's host: only node 0 commits checkpoints, so only its durable step is the run's


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
    cause: FailureCause | None = None  # when the outcome is failed: what failed
    host_gone: bool = False  # the provider confirmed the host terminated: it cannot publish anything more
    refusal: str | None = None  # a `Refusal` value when the outcome is refused
    outputs: SnapshotRef | None = None  # the output directory, stored when the script succeeded
    setup_seconds: float | None = None  # from the host's start on setup (its cache restore included) to its end
    setup_cache: str = ""  # "restored" from the run's storage, "stored" there by this attempt, or ""
    faulty_host: str | None = None  # a gang's host that failed for a host reason (it is excluded), when not node 0
    # The script's speed as the agent saw it, the changeover left out: steps from the first step it saw past
    # the restore to the last, and the seconds between them (workflows/speed.py measures pools by them).
    trained_steps: int | None = None
    trained_seconds: float | None = None


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
    cause: FailureCause | None = None  # AttemptResult.cause
    emergency_save: str | None = None  # on a notice: "saved" in time, or "missed" the deadline
    started_at: datetime
    ended_at: datetime | None = None
    refusal: str | None = None  # a `Refusal` value when the outcome is refused
    price_per_hour: float | None = None  # of the attempt's host, USD
    cost_usd: float | None = None  # price x the time from provisioned to released
    running_at: datetime | None = None  # when the provider handed the host over: billing starts
    placement_reason: str = ""  # why the policy chose this pool
    on_demand_price_per_hour: float | None = None  # of the same capacity on demand
    on_demand_cost_usd: float | None = None  # what the same host-hours would have cost on demand
    resumed_from: str | None = None  # the checkpoint's name; retention never removes it while the attempt runs
    setup_seconds: float | None = None  # AttemptResult.setup_seconds
    setup_cache: str = ""  # AttemptResult.setup_cache
    hosts: list[str] = Field(default_factory=list)  # a gang's hosts in node-rank order (`host` is node 0); else empty
    nodes: int = 1  # hosts the attempt holds (RunSpec.nodes): it is billed nodes x price_per_hour (one host's)
    faulty_host: str | None = None  # AttemptResult.faulty_host: the gang's host excluded for a host fault
    trained_steps: int | None = None  # AttemptResult.trained_steps
    trained_seconds: float | None = None  # AttemptResult.trained_seconds


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
    cost_usd: float = 0.0  # closed attempts
    on_demand_cost_usd: float = 0.0
    reclaims: int = 0
    host_faults: int = 0
    script_failures: int = 0
    excluded_hosts: list[str] = Field(default_factory=list)
    fences: dict[int, int] = Field(default_factory=dict)
    bad_checkpoints: list[CheckpointCheck] = Field(default_factory=list)
    current_host: Host | None = None  # node 0 of a gang
    current_hosts: list[Host] = Field(default_factory=list)  # every host of the running gang; empty for one host
    step: int | None = None  # live step, filled in by the client from heartbeats
    checkpoint_interval: str = ""  # live, from heartbeats: the SDK's interval and why
    waiting_on: str = ""  # live, from heartbeats: AttemptProgress.waiting_on
    stop_reason: str = ""
    exit_code: int | None = None
    outputs: SnapshotRef | None = None  # the run's outputs (RunSpec.output_dir), for `vl pull`
    started_at: datetime | None = None
    ended_at: datetime | None = None
    continued_as_new: int = 0
    # USD per hour of one host of each pool (by Pool.key), as last quoted before a placement (`quote_prices`); a
    # pool whose read failed keeps its earlier quote. The policy ranks by these first (policy.pool_price).
    price_quotes: dict[str, float] = Field(default_factory=dict)
    price_quotes_at: datetime | None = None  # when the last quote came

    @property
    def current_attempt(self) -> AttemptRecord | None:
        """The attempt in progress (its host being provisioned, or running); None between attempts.

        The oldest attempt not yet ended, not the last record: a move provisions the next attempt's host
        while this one runs, and a move the provider refused is recorded after the attempt that runs on.
        An attempt always ends before the one after it starts (make before break), so only a move's host
        can be open beside it.
        """
        return next((record for record in self.attempts if record.outcome is None), None)

    @property
    def last_ended_attempt(self) -> AttemptRecord | None:
        """The attempt that ended last (a refused move is recorded after the attempt it left running)."""
        ended = [record for record in self.attempts if record.ended_at is not None]
        return max(ended, key=lambda record: (record.ended_at, record.attempt)) if ended else None


class RunInput(VLModel):
    spec: RunSpec
    carried: RunStatus | None = None


class ReclaimRequest(VLModel):
    with_notice: bool = True
    node: int = Field(default=0, ge=0)  # which host of a gang the provider takes


class ReclaimAck(VLModel):
    host: str
