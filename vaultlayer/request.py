"""The run request: every option of `vl run`, as the flags, a config file or a notebook give it, and the one
function that checks it and turns it into the `RunSpec` the workflow runs.

`vl run` fills a `RunRequest` from its flags over a config file (vaultlayer/config.py: `LoadedConfig.request`);
the notebook client (vaultlayer/runs.py) from a file, a mapping or a `RunRequest` it is handed. Both go through
`build_spec`, so the same bad input is refused with the same one-line messages, before anything starts.
Messages name the `vl run` flag, or the config file's field where the value came from a file.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from vaultlayer import protocol
from vaultlayer.catalog import KNOWN_PROVIDERS, priced_pools, validate_pools
from vaultlayer.catalog.throughput import prior_speed
from vaultlayer.durations import parse_duration, parse_interval
from vaultlayer.home import default_storage_url, vl_home
from vaultlayer.models import Limits, Market, Pool, RunSpec
from vaultlayer.run_ids import new_run_id, run_id_problem
from vaultlayer.secrets import ENV_NAME, looks_secret, parse_reference

if TYPE_CHECKING:
    from vaultlayer.workdir import Selection


class RunRequestError(ValueError):
    """Bad input, refused before anything is provisioned: one line per problem."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else problems
        super().__init__("\n".join(self.problems))


class PoolRequest(BaseModel):
    """Candidate capacity as a person writes it: one provider, its regions or zones (in order), a GPU class and
    count, a market and prices. `build_spec` makes one `Pool` per zone (or region) of it."""

    model_config = ConfigDict(extra="forbid")

    provider: str = "local"
    regions: list[str] = Field(default_factory=list)
    zones: list[str] = Field(default_factory=list)
    gpu: str | None = None  # CLASS or CLASS:COUNT, such as A10G:1
    market: str = "spot"
    price: float | None = None  # USD per hour of a host; overrides the provider's list price
    on_demand_price: float | None = None  # USD per hour of the same capacity on demand: the fallback pool's price
    speed: float | None = None  # one host's training speed relative to one V100; default: the GPU class's
    where: str | None = None  # where it was written, such as "vl.yaml: resources.pools[0]", for messages


PLACE_FIELDS = {"provider", "regions", "zones"}  # a pool given with any of these replaces a config file's pools


class RunRequest(BaseModel):
    """Every option of `vl run`, unchecked. Fields left out keep `vl run`'s defaults; durations are text such
    as "30s" or "2h". Relative paths are relative to the current directory (a config file's to its folder)."""

    model_config = ConfigDict(extra="forbid")

    run_id: str | None = None  # default: generated
    command: list[str] = Field(default_factory=list)
    workdir: str | None = None  # default: the current directory
    code: bool = True  # pack the workdir and run every attempt in that snapshot (docs/code-and-outputs.md)
    allow_secret_files: list[str] = Field(default_factory=list)  # likely secrets shipped on purpose (workdir paths)
    workdir_max_size: str | None = None  # such as 500MB; default 100 MB
    output_dir: str | None = None  # relative to the workdir: stored when the script succeeds, for `vl pull`
    env: dict[str, str] = Field(default_factory=dict)
    env_secrets: dict[str, str] = Field(default_factory=dict)  # NAME -> env:NAME, file:/path, aws-sm:ID, gcp-sm:...
    setup: list[str] = Field(default_factory=list)
    setup_cache: bool = True  # store what setup leaves in pip's and uv's caches once; restore it on later hosts
    pools: list[PoolRequest] | None = None  # default: one local pool
    nodes: int = 1  # hosts per attempt, one gang (docs/distributed.md)
    on_demand_fallback: bool = False
    storage: str | None = None  # default: file://$VL_HOME/storage
    checkpoint_every: str | None = None  # steps or a duration; default: Young/Daly
    checkpoint_min: str = "60s"
    checkpoint_max: str = "30m"
    checkpoint_dir: str | None = None
    keep_checkpoints: int = 3
    notice_seconds: float = 30.0
    reclaim_every: str | None = None
    reclaim_in: list[str] = Field(default_factory=list)
    heartbeat_timeout: str = "30s"
    start_timeout: str = "5m"
    max_reclaims: int | None = None
    max_attempts: int | None = None
    max_attempts_without_progress: int | None = None
    max_cost: float | None = None
    deadline: str | datetime | None = None  # a duration from now, or a time with its zone
    total_steps: int | None = None
    work: str | None = None
    changeover: str = "6m"
    exclude_hosts_for: str | None = None
    script_retries: int = 0


Warn = Callable[[str], None]
HOSTS_ON_THIS_MACHINE = ("local", "harness")  # providers whose hosts run this very installation


def _python_warning(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def build_spec(request: RunRequest, warn: Warn = _python_warning) -> RunSpec:
    """The `RunSpec` to submit, after every check `vl run` makes; RunRequestError names the first problem.
    `warn` hears about what is allowed but probably not meant (`vl run` prints it; the default warns)."""
    run_id = request.run_id or new_run_id()
    if (problem := run_id_problem(run_id)) is not None:
        raise RunRequestError(f"--run-id: {problem}")
    pools = _pools(request)
    try:
        pools = priced_pools(pools)
    except ValueError as err:  # prices only rank the pools: go on without them
        warn(f"{err}; pools are ranked without prices")
    workdir = Path(request.workdir).resolve() if request.workdir else Path.cwd()
    if not workdir.is_dir():
        raise RunRequestError(f"--workdir {request.workdir!r} is not a directory; give an existing one")
    command = gang_command(resolve_command(request.command, workdir), request.nodes, warn)
    from vaultlayer import checkpoint  # fsspec: imported when a spec is built, not by every `vl` command

    storage_url = request.storage or default_storage_url()
    try:
        checkpoint.validate_storage_url(storage_url)
    except ValueError as err:
        raise RunRequestError(f"--storage: {err}") from None
    if request.checkpoint_every is not None:
        try:
            parse_interval(request.checkpoint_every)
        except ValueError as err:
            raise RunRequestError(f"--checkpoint-every {request.checkpoint_every!r}: {err}") from None
    shortest = _seconds("--checkpoint-min", request.checkpoint_min)
    if shortest > _seconds("--checkpoint-max", request.checkpoint_max):
        raise RunRequestError(f"--checkpoint-min {request.checkpoint_min} is above "
                              f"--checkpoint-max {request.checkpoint_max}")
    if request.notice_seconds < 0:
        raise RunRequestError(f"--notice-seconds {request.notice_seconds}: must be zero (no notice) or more, "
                              "such as 30")
    checkpoint_dir = checkpoint_directory(request.checkpoint_dir, workdir)
    if checkpoint_dir is not None and request.nodes > 1:
        raise RunRequestError(f"--checkpoint-dir with --nodes {request.nodes}: zero-code checkpoints are one "
                              "directory of one host, and a gang's hosts each write their own; use the SDK "
                              "(vaultlayer.save, or an integration: docs/integrations.md), whose saves every rank "
                              "of every node takes part in (docs/distributed.md)")
    if request.code and checkpoint_dir is not None and Path(checkpoint_dir).is_relative_to(workdir):
        checkpoint_dir = Path(checkpoint_dir).relative_to(workdir).as_posix()  # inside the unpacked code
    output_dir = _output_dir(request.output_dir, workdir)
    if request.keep_checkpoints < 1:
        raise RunRequestError(f"--keep-checkpoints {request.keep_checkpoints}: must be at least 1")
    env_secrets = _secret_references(request.env_secrets, request.env)
    for name in request.env:
        if looks_secret(name):
            warn(f"env {name} looks like a secret, and a plain value is stored in the run's history; pass a "
                 f"reference instead: --env-secret {name}=env:{name} (in a config file: {name}: {{secret: "
                 f"env:{name}}}), see docs/config.md")
    for flag, value in (("--max-reclaims", request.max_reclaims), ("--max-attempts", request.max_attempts)):
        if value is not None and value < 0:
            raise RunRequestError(f"{flag} {value}: must be zero or more")
    for flag, value in (("--max-cost", request.max_cost), ("--total-steps", request.total_steps),
                        ("--max-attempts-without-progress", request.max_attempts_without_progress)):
        if value is not None and value <= 0:
            raise RunRequestError(f"{flag} {value}: must be more than zero")
    submitted_at = datetime.now(UTC)
    deadline = _deadline(request.deadline, submitted_at)
    work_seconds = _seconds("--work", request.work)
    if deadline is not None and request.total_steps is None:
        warn("--deadline without --total-steps only stops the run at the deadline; give --total-steps (and "
             "--work) so that the policy plans to finish before it")
    limits = Limits(script_retries=request.script_retries, max_cost=request.max_cost, deadline=deadline,
                    host_exclusion_seconds=_seconds("--exclude-hosts-for", request.exclude_hosts_for))
    if request.max_reclaims is not None:
        limits.max_reclaims = request.max_reclaims
    if request.max_attempts is not None:
        limits.max_attempts = request.max_attempts
    if request.max_attempts_without_progress is not None:
        limits.max_attempts_without_progress = request.max_attempts_without_progress
    return RunSpec(
        run_id=run_id,
        command=command,
        workdir=str(workdir),
        output_dir=output_dir,
        env=dict(request.env),
        env_secrets=env_secrets,
        setup=list(request.setup),
        setup_cache=request.setup_cache,
        pools=pools,
        nodes=request.nodes,
        storage_url=storage_url,
        checkpoint_every=request.checkpoint_every,
        checkpoint_min=request.checkpoint_min,
        checkpoint_max=request.checkpoint_max,
        checkpoint_dir=checkpoint_dir,
        keep_checkpoints=request.keep_checkpoints,
        notice_seconds=request.notice_seconds,
        reclaim_every_seconds=_seconds("--reclaim-every", request.reclaim_every),
        heartbeat_timeout_seconds=_seconds("--heartbeat-timeout", request.heartbeat_timeout),
        start_timeout_seconds=_seconds("--start-timeout", request.start_timeout),
        limits=limits,
        submitted_at=submitted_at,
        total_steps=request.total_steps,
        work_seconds=work_seconds,
        changeover_seconds=_seconds("--changeover", request.changeover),
        reclaim_only_in=list(request.reclaim_in),
    )


# ---------------------------------------------------------------- the code that travels with the run


def select_code(request: RunRequest, spec: RunSpec, warn: Warn = _python_warning) -> Selection | None:
    """What of the workdir travels with the run (None with `--no-code`): read and checked here (likely secrets,
    size, links), before anything is written anywhere. RunRequestError says what to change. An argument naming
    a shipped file by its absolute path would read the live directory (or nothing, on a cloud host) rather
    than the snapshot: `warn` hears of it."""
    if not request.code:
        return None
    from vaultlayer.workdir import DEFAULT_MAX_BYTES, MAX_SIZE_FLAG, WorkdirError, parse_size, select_files

    max_bytes = DEFAULT_MAX_BYTES
    if request.workdir_max_size is not None:
        try:
            max_bytes = parse_size(request.workdir_max_size)
        except ValueError as err:
            raise RunRequestError(f"{MAX_SIZE_FLAG} {request.workdir_max_size!r}: {err}") from None
    workdir = Path(spec.workdir)
    never = [vl_home()] + ([workdir / spec.checkpoint_dir] if spec.checkpoint_dir else [])
    try:
        selection = select_files(workdir, exclude_paths=never, allow_secret_files=[
            workdir / path for path in request.allow_secret_files], max_bytes=max_bytes)
    except WorkdirError as err:
        raise RunRequestError(str(err)) from None
    shipped = {entry.path for entry in selection.files}
    for argument in spec.command[1:]:
        if relative := _shipped_path(argument, workdir, shipped):
            warn(f"argument {argument} names a file of the workdir by its absolute path: the hosts run the code "
                 f"snapshot, so give it relative to {workdir} ({relative})")
    return selection


def pack_code(selection: Selection | None, spec: RunSpec) -> RunSpec:
    """The spec with its code stored in the run's storage (after check_storage): content-addressed, so a tree
    stored before by any run costs one existence check. A run that may place hosts in a cloud also carries
    the agent they install: this VaultLayer, as a wheel beside the code (vaultlayer/workdir/agent.py)."""
    from vaultlayer.workdir import WorkdirError, store_snapshot
    from vaultlayer.workdir.agent import store_agent

    update: dict = {}
    if any(pool.provider not in HOSTS_ON_THIS_MACHINE for pool in spec.pools) and spec.agent is None:
        update["agent"] = store_agent(spec.storage_url)
    if selection is None:
        return spec.model_copy(update=update)
    try:
        update["code"] = store_snapshot(selection, spec.storage_url)
    except WorkdirError as err:
        raise RunRequestError(str(err)) from None
    command = list(spec.command)
    program = _shipped_path(command[0], Path(spec.workdir), {entry.path for entry in selection.files})
    if program is not None:  # a program that travels runs from the snapshot (a venv's python stays as it is)
        command[0] = f"./{program}"
    return spec.model_copy(update=update | {"command": command})


def _shipped_path(text: str, workdir: Path, shipped: set[str]) -> str | None:
    """The snapshot path of the shipped file `text` names by its absolute path, if it names one."""
    if not text.startswith("/") or not Path(text).is_relative_to(workdir):
        return None
    relative = Path(text).relative_to(workdir).as_posix()
    return relative if relative in shipped else None


def _output_dir(text: str | None, workdir: Path) -> str | None:
    """--output-dir, relative to the workdir and inside it: it names a place in the code the hosts run."""
    if text is None:
        return None
    path = Path(text)
    relative = path.relative_to(workdir) if path.is_absolute() and path.is_relative_to(workdir) else path
    if relative.is_absolute() or ".." in relative.parts or relative == Path("."):
        raise RunRequestError(f"--output-dir {text!r}: give a folder inside the workdir ({workdir}), such as "
                              f"outputs; the hosts run the command there")
    return relative.as_posix()


# ---------------------------------------------------------------- the checks, one per kind of input


def check_storage(storage_url: str) -> None:
    """At submit, before anything is provisioned: the run's storage can be written (checkpoint.check_writable),
    or RunRequestError names the cause and the fix."""
    from vaultlayer import checkpoint  # fsspec: imported when needed, as above

    try:
        checkpoint.check_writable(storage_url)
    except ValueError as err:
        raise RunRequestError(str(err)) from None


def resolve_command(command: list[str], workdir: Path) -> list[str]:
    """The command with its program resolved now, so a typo fails here and not on a host."""
    if not command:
        raise RunRequestError("no command given; usage: vl run [options] -- python train.py ...")
    program = command[0]
    if "/" in program:
        path = (workdir / program).resolve()
        if not path.is_file() or not os.access(path, os.X_OK):
            raise RunRequestError(f"command {program!r} does not exist or is not executable; check the path")
        return [str(path), *command[1:]]
    found = shutil.which(program)
    if found is None:
        raise RunRequestError(f"command {program!r} not found on PATH; check the spelling or give its path")
    return [os.path.abspath(found), *command[1:]]


# torchrun's options that take no value; every other option before the script takes one.
_TORCHRUN_FLAGS = {"--standalone", "--no-python", "--no_python", "-m", "--module", "--run-path", "--run_path"}
# What `vl run --nodes N -- torchrun ...` adds when the command leaves it out: the gang's rendezvous, from the
# variables every host's agent sets (and expands in the command: it runs without a shell).
_TORCHRUN_GANG_OPTIONS = {"nnodes": None, "node_rank": "$" + protocol.ENV_NODE_RANK,
                          "master_addr": "$" + protocol.ENV_MASTER_ADDR, "master_port": "$" + protocol.ENV_MASTER_PORT}


def _torchrun_options(command: list[str]) -> tuple[dict[str, str | None], int] | None:
    """A torchrun command's own options (name with `_` for `-` -> value, None for a flag) and where they start;
    None when the command is not torchrun (`torchrun ...` or `python -m torch.distributed.run ...`)."""
    if Path(command[0]).name == "torchrun":
        first = 1
    elif command[1:3] == ["-m", "torch.distributed.run"]:
        first = 3
    else:
        return None
    options: dict[str, str | None] = {}
    index = first
    while index < len(command) and command[index].startswith("-"):
        name, equals, value = command[index].partition("=")
        key = name.lstrip("-").replace("-", "_")
        if equals:
            options[key], index = value, index + 1
        elif name in _TORCHRUN_FLAGS:
            options[key], index = None, index + 1
        else:
            options[key], index = (command[index + 1] if index + 1 < len(command) else ""), index + 2
    return options, first


def gang_command(command: list[str], nodes: int, warn: Warn = _python_warning) -> list[str]:
    """The command every host of a gang runs. For torchrun, the gang's options it leaves out are added (`--nnodes`
    N, `--node_rank $VL_NODE_RANK`, `--master_addr $VL_MASTER_ADDR`, `--master_port $VL_MASTER_PORT`); options
    that contradict the gang are refused here, before any host is provisioned."""
    if nodes < 1:
        raise RunRequestError(f"--nodes {nodes}: must be at least 1")
    if nodes == 1:
        return command
    parsed = _torchrun_options(command)
    if parsed is None:
        if not any(("$" + name) in arg or ("${" + name + "}") in arg
                   for arg in command for name in protocol.GANG_VARIABLES):
            warn(f"--nodes {nodes}: the command is not torchrun and names no $VL_NODE_RANK; every host runs it as "
                 f"it is, so it must read {protocol.ENV_NODE_RANK} and {protocol.ENV_MASTER_ADDR} itself "
                 "(docs/distributed.md)")
        return command
    options, first = parsed
    if "standalone" in options:
        raise RunRequestError(f"--nodes {nodes} with torchrun --standalone: standalone is one host; leave "
                              "--standalone out and vl adds the gang's rendezvous")
    given = options.get("nnodes")
    if given is not None and given not in (str(nodes), f"{nodes}:{nodes}"):
        raise RunRequestError(f"torchrun --nnodes {given} but --nodes {nodes}: a gang is a fixed number of hosts; "
                              f"give torchrun --nnodes {nodes}, or leave it out and vl adds it")
    if any(key.startswith("rdzv") for key in options):
        return command  # the user's own rendezvous: nothing to add
    added = []
    for key, value in _TORCHRUN_GANG_OPTIONS.items():
        if key not in options:
            added += [f"--{key}", str(nodes) if value is None else value]
    return [*command[:first], *added, *command[first:]]


def checkpoint_directory(text: str | None, workdir: Path) -> str | None:
    """The zero-code directory, absolute. A restore replaces its contents, so it must not hold the work
    directory or the home directory."""
    if text is None:
        return None
    directory = (workdir / Path(text).expanduser()).resolve()
    for precious in (workdir.resolve(), Path.home().resolve()):
        if precious.is_relative_to(directory):
            raise RunRequestError(f"--checkpoint-dir {text!r} holds {precious}, and a restore replaces its "
                                  f"contents; give the checkpoints a directory of their own, such as ./checkpoints")
    if directory.exists() and not directory.is_dir():
        raise RunRequestError(f"--checkpoint-dir {text!r} is not a directory")
    return str(directory)


def _pools(request: RunRequest) -> list[Pool]:
    """Every requested pool, checked by its provider's catalog, then (with the fallback) an on-demand copy of
    every spot pool after all of them, at its on-demand price: the policy uses those only when spot cannot
    meet the deadline."""
    pools: list[Pool] = []
    for wanted in request.pools or [PoolRequest()]:
        prefix = f"{wanted.where}: " if wanted.where else ""
        if wanted.provider not in KNOWN_PROVIDERS:
            raise RunRequestError(f"{prefix}unknown provider {wanted.provider!r}; use one of: "
                                  f"{', '.join(KNOWN_PROVIDERS)}")
        try:
            made = _pools_of(wanted)
            validate_pools(made)
        except ValueError as err:
            raise RunRequestError(f"{prefix}{err}") from None
        pools += made
    if request.on_demand_fallback:
        # Before pricing, a pool's on-demand price can only be the user's (--on-demand-price).
        fallback = [pool.model_copy(update={"market": Market.ON_DEMAND,
                                            "price_per_hour": pool.on_demand_price_per_hour,
                                            "price_given": pool.on_demand_price_per_hour is not None})
                    for pool in pools if pool.market == Market.SPOT]
        try:
            validate_pools(fallback)
        except ValueError as err:
            raise RunRequestError(str(err)) from None
        pools += fallback
    return pools


def _pools_of(wanted: PoolRequest) -> list[Pool]:
    """One pool per zone (or region) given, in order, with the GPU, market and prices."""
    gpu, gpu_count = None, 0
    if wanted.gpu:
        name, _, count = wanted.gpu.partition(":")
        if not name or (count and (not count.isdigit() or int(count) < 1)):
            raise ValueError(f"--gpu {wanted.gpu!r}: expected CLASS or CLASS:COUNT, such as A10G:1 or L4:2")
        gpu, gpu_count = name, int(count or 1)
    try:
        market = Market(wanted.market)
    except ValueError:
        raise ValueError(f"--market {wanted.market!r}: use spot or on-demand") from None
    regions, zones = wanted.regions, wanted.zones
    if wanted.provider == "local":
        places = [("local", None)] if not (regions or zones) else \
            [(region, None) for region in regions] + [("local", zone) for zone in zones]
    elif zones:
        # The provider derives the region from a zone when no single region was given.
        places = [(regions[0] if len(regions) == 1 else "", zone) for zone in zones]
    else:
        places = [(region, None) for region in regions] or [("", None)]
    for flag, price in (("--price", wanted.price), ("--on-demand-price", wanted.on_demand_price)):
        if price is not None and price < 0:
            raise ValueError(f"{flag} {price}: must be zero or more (USD per hour)")
    if wanted.speed is not None and wanted.speed <= 0:
        raise ValueError(f"--speed {wanted.speed}: must be more than zero (1 = one V100; an H100 is about 7.9)")
    speed = wanted.speed if wanted.speed is not None else prior_speed(gpu, gpu_count)
    return [Pool(provider=wanted.provider, region=region, zone=zone, gpu=gpu, gpu_count=gpu_count, market=market,
                 price_per_hour=wanted.price, on_demand_price_per_hour=wanted.on_demand_price,
                 price_given=wanted.price is not None, speed=speed)
            for region, zone in places]


def _secret_references(references: dict[str, str], env: dict[str, str]) -> dict[str, str]:
    """NAME -> the reference in its stored form (a relative file: path made absolute against this directory)."""
    checked = {}
    for name, reference in references.items():
        if not ENV_NAME.fullmatch(name):
            raise RunRequestError(f"--env-secret {f'{name}={reference}'!r}: expected NAME=REF, such as "
                                  f"HF_TOKEN=env:HF_TOKEN")
        if name in env:
            raise RunRequestError(f"--env-secret {name}: {name} also has a plain value (--env or env:); fix: keep one")
        try:
            checked[name] = parse_reference(reference)
        except ValueError as err:
            raise RunRequestError(f"--env-secret {name}: {err}") from None
    return checked


def _seconds(flag: str, text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return parse_duration(text)
    except ValueError as err:
        raise RunRequestError(f"{flag} {text!r}: {err}") from None


def _deadline(deadline: str | datetime | None, now: datetime) -> datetime | None:
    if isinstance(deadline, datetime):
        if deadline.tzinfo is None or deadline <= now:
            raise RunRequestError(f"--deadline '{deadline.isoformat()}': give a later time with its zone, or a "
                                  "duration from now such as 36h")
        return deadline
    seconds = _seconds("--deadline", deadline)
    return now + timedelta(seconds=seconds) if seconds else None
