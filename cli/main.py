"""`vl`: a thin command line over the Python client and the embedded-server bootstrap.

Exit codes of `vl run`: 0 the script succeeded; the script's own exit code when it failed (1 when the
run failed for another reason, such as a limit); 2 bad input (nothing was provisioned); 3 the run was
cancelled; 130 detached with Ctrl-C (the run goes on).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cli import errors
from vaultlayer.models import AttemptOutcome, Limits, Market, Pool, RunSpec, RunState, RunStatus
from vaultlayer.run_ids import new_run_id

EXIT_BAD_INPUT = 2
EXIT_CANCELLED = 3
EXIT_DETACHED = 130


class UsageError(Exception):
    """Bad input: reported on one line, before anything is provisioned."""


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    errors.print_traceback()
    print(f"vl: error: {message}", file=sys.stderr)
    errors.exit_now(code)


# ---------------------------------------------------------------- input validation


def seconds_option(flag: str, text: str | None) -> float | None:
    from vaultlayer.durations import parse_duration

    if text is None:
        return None
    try:
        return parse_duration(text)
    except ValueError as err:
        raise UsageError(f"{flag} {text!r}: {err}") from None


def resolve_command(command: list[str], workdir: Path) -> list[str]:
    """The command with its program resolved now, so a typo fails here and not on a host."""
    if not command:
        raise UsageError("no command given; usage: vl run [options] -- python train.py ...")
    program = command[0]
    if "/" in program:
        path = (workdir / program).resolve()
        if not path.is_file() or not os.access(path, os.X_OK):
            raise UsageError(f"command {program!r} does not exist or is not executable; check the path")
        return [str(path), *command[1:]]
    found = shutil.which(program)
    if found is None:
        raise UsageError(f"command {program!r} not found on PATH; check the spelling or give its path")
    return [os.path.abspath(found), *command[1:]]


def pools_from_flags(args: argparse.Namespace) -> list[Pool]:
    """Candidate pools in preference order: every zone (or region) given, with the GPU and market."""
    gpu, gpu_count = None, 0
    if args.gpu:
        name, _, count = args.gpu.partition(":")
        if not name or (count and (not count.isdigit() or int(count) < 1)):
            raise UsageError(f"--gpu {args.gpu!r}: expected CLASS or CLASS:COUNT, such as A10G:1 or L4:2")
        gpu, gpu_count = name, int(count or 1)
    try:
        market = Market(args.market)
    except ValueError:
        raise UsageError(f"--market {args.market!r}: use spot or on-demand") from None
    if args.provider == "local":
        places = [("local", None)] if not (args.region or args.zone) else \
            [(r, None) for r in args.region] + [("local", z) for z in args.zone]
    elif args.zone:
        # The provider derives the region from a zone when no single region was given.
        places = [(args.region[0] if len(args.region) == 1 else "", zone) for zone in args.zone]
    else:
        places = [(region, None) for region in args.region] or [("", None)]
    for flag, price in (("--price", args.price), ("--on-demand-price", args.on_demand_price)):
        if price is not None and price < 0:
            raise UsageError(f"{flag} {price}: must be zero or more (USD per hour)")
    pools = [Pool(provider=args.provider, region=region, zone=zone, gpu=gpu, gpu_count=gpu_count, market=market,
                  price_per_hour=args.price, on_demand_price_per_hour=args.on_demand_price)
             for region, zone in places]
    if args.on_demand_fallback and market == Market.SPOT:
        # After every spot pool: the policy uses them only when spot cannot meet the deadline.
        pools += [pool.model_copy(update={"market": Market.ON_DEMAND, "price_per_hour": args.on_demand_price})
                  for pool in pools]
    return pools


def checkpoint_dir_option(text: str | None, workdir: Path) -> str | None:
    """The zero-code directory, absolute. A restore replaces its contents, so it must not hold the work
    directory or the home directory."""
    if text is None:
        return None
    directory = (workdir / Path(text).expanduser()).resolve()
    for precious in (workdir.resolve(), Path.home().resolve()):
        if precious.is_relative_to(directory):
            raise UsageError(f"--checkpoint-dir {text!r} holds {precious}, and a restore replaces its contents;"
                             f" give the checkpoints a directory of their own, such as ./checkpoints")
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"--checkpoint-dir {text!r} is not a directory")
    return str(directory)


def build_spec(args: argparse.Namespace) -> RunSpec:
    from vaultlayer.catalog import KNOWN_PROVIDERS, priced_pools, validate_pools
    from vaultlayer import checkpoint
    from vaultlayer.durations import parse_interval
    from vaultlayer.home import default_storage_url
    from vaultlayer.run_ids import run_id_problem

    if (problem := run_id_problem(args.run_id)) is not None:
        raise UsageError(f"--run-id: {problem}")
    if args.provider not in KNOWN_PROVIDERS:
        raise UsageError(f"unknown provider {args.provider!r}; use one of: {', '.join(KNOWN_PROVIDERS)}")
    pools = args.file_pools or pools_from_flags(args)  # file_pools: cli/config_cmd.py
    try:
        validate_pools(pools)
    except ValueError as err:
        raise UsageError(str(err)) from None
    try:
        pools = priced_pools(pools)
    except ValueError as err:  # prices only rank the pools: go on without them
        print(f"vl: warning: {err}; pools are ranked without prices", file=sys.stderr)
    workdir = Path(args.workdir).resolve() if args.workdir else Path.cwd()
    if not workdir.is_dir():
        raise UsageError(f"--workdir {args.workdir!r} is not a directory; give an existing one")
    command = resolve_command(args.command, workdir)
    storage_url = args.storage or default_storage_url()
    try:
        checkpoint.validate_storage_url(storage_url)
    except ValueError as err:
        raise UsageError(f"--storage: {err}") from None
    checkpoint_every = args.checkpoint_every
    if checkpoint_every is not None:
        try:
            parse_interval(checkpoint_every)
        except ValueError as err:
            raise UsageError(f"--checkpoint-every {checkpoint_every!r}: {err}") from None
    bounds = [seconds_option(flag, text) for flag, text in (("--checkpoint-min", args.checkpoint_min),
                                                             ("--checkpoint-max", args.checkpoint_max))]
    if bounds[0] > bounds[1]:
        raise UsageError(f"--checkpoint-min {args.checkpoint_min} is above --checkpoint-max {args.checkpoint_max}")
    if args.notice_seconds <= 0:
        raise UsageError(f"--notice-seconds {args.notice_seconds}: must be positive, such as 30")
    checkpoint_dir = checkpoint_dir_option(args.checkpoint_dir, workdir)
    if args.keep_checkpoints < 1:
        raise UsageError(f"--keep-checkpoints {args.keep_checkpoints}: must be at least 1")
    env = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--env {item!r}: expected NAME=VALUE")
        env[name] = value
    from cli.config_cmd import secret_env

    try:
        env_secrets = secret_env(args, env)
    except ValueError as err:
        raise UsageError(str(err)) from None
    for name, value in (("--max-reclaims", args.max_reclaims), ("--max-attempts", args.max_attempts)):
        if value is not None and value < 0:
            raise UsageError(f"{name} {value}: must be zero or more")
    for name, value in (("--max-cost", args.max_cost), ("--total-steps", args.total_steps)):
        if value is not None and value <= 0:
            raise UsageError(f"{name} {value}: must be more than zero")
    deadline = seconds_option("--deadline", args.deadline)
    work_seconds = seconds_option("--work", args.work)
    if deadline is not None and args.total_steps is None:
        print("vl: warning: --deadline without --total-steps only stops the run at the deadline; give "
              "--total-steps (and --work) so that the policy plans to finish before it", file=sys.stderr)
    limits = Limits(script_retries=args.script_retries, max_cost=args.max_cost,
                    deadline=datetime.now(UTC) + timedelta(seconds=deadline) if deadline else None,
                    host_exclusion_seconds=seconds_option("--exclude-hosts-for", args.exclude_hosts_for))
    if args.max_reclaims is not None:
        limits.max_reclaims = args.max_reclaims
    if args.max_attempts is not None:
        limits.max_attempts = args.max_attempts
    return RunSpec(
        run_id=args.run_id,
        command=command,
        workdir=str(workdir),
        env=env,
        env_secrets=env_secrets,
        setup=args.setup or [],
        pools=pools,
        storage_url=storage_url,
        checkpoint_every=checkpoint_every,
        checkpoint_min=args.checkpoint_min,
        checkpoint_max=args.checkpoint_max,
        checkpoint_dir=checkpoint_dir,
        keep_checkpoints=args.keep_checkpoints,
        notice_seconds=args.notice_seconds,
        reclaim_every_seconds=seconds_option("--reclaim-every", args.reclaim_every),
        heartbeat_timeout_seconds=seconds_option("--heartbeat-timeout", args.heartbeat_timeout),
        start_timeout_seconds=seconds_option("--start-timeout", args.start_timeout),
        limits=limits,
        submitted_at=datetime.now(UTC),
        total_steps=args.total_steps,
        work_seconds=work_seconds,
        changeover_seconds=seconds_option("--changeover", args.changeover),
        reclaim_only_in=args.reclaim_in,
    )


# ---------------------------------------------------------------- connection


class Connection:
    def __init__(self, client, ui_url: str | None) -> None:
        self.client = client
        self.ui_url = ui_url

    def run_link(self, run_id: str) -> str | None:
        from vaultlayer.ui import run_link

        return run_link(self.ui_url, self.client.namespace, run_id) if self.ui_url else None


async def connect() -> Connection:
    from vaultlayer import client as vl_client
    from vaultlayer.codec import EncryptionKeyError, load_keys

    try:
        load_keys()  # a malformed key setting is bad input: say so before anything starts
    except EncryptionKeyError as err:
        raise UsageError(str(err)) from None
    address = vl_client.configured_address()
    if address:
        try:
            client = await vl_client.connect()
        except RuntimeError as err:
            fail(errors.connect_failure(address, err), code=1)
        return Connection(client, os.environ.get("VL_UI_URL"))
    from worker.local_server import EmbeddedError, ensure_embedded

    try:
        embedded = await asyncio.to_thread(ensure_embedded)
    except EmbeddedError as err:
        fail(str(err), code=1)
    for what in embedded.started:
        print(f"started {what} (vl down stops it)", file=sys.stderr)
    return Connection(await vl_client.connect(embedded.address), embedded.ui_url)


# ---------------------------------------------------------------- live view


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def ended_line(record) -> str:
    if record.outcome == AttemptOutcome.RECLAIMED and record.emergency_save == "missed":
        return (f"reclaimed at step {record.end_step}; the emergency save missed the notice deadline, "
                f"durable step {record.durable_step}")
    if record.outcome == AttemptOutcome.RECLAIMED:
        return f"reclaimed at step {record.end_step}, durable step {record.durable_step}"
    if record.outcome == AttemptOutcome.HOST_FAULT:
        return f"host {record.host} failed ({record.reason}) at step {record.end_step}"
    if record.outcome == AttemptOutcome.REFUSED:
        return f"no capacity in {record.pool} ({record.reason})"
    if record.outcome == AttemptOutcome.FAILED:
        return f"the script failed with exit code {record.exit_code} at step {record.end_step}"
    return f"attempt {record.attempt} {record.outcome.value if record.outcome else 'ended'}"


class LiveView:
    """Plain lines: one per event, and a progress line every few seconds while steps advance."""

    PROGRESS_EVERY = 3.0

    def __init__(self) -> None:
        self.announced: set[int] = set()
        self.ended: set[int] = set()
        self.last_progress = (0.0, None)

    def update(self, status: RunStatus) -> None:
        for index, record in enumerate(status.attempts):
            previous = status.attempts[index - 1] if index else None
            if record.host and record.attempt not in self.announced:
                self.announced.add(record.attempt)
                if previous is not None and previous.attempt not in self.ended:
                    self.ended.add(previous.attempt)
                    print(f"{ended_line(previous)}, resuming on host {record.host}", flush=True)
                resume = f"resuming from step {record.start_step}" if record.start_step else "starting at step 0"
                print(f"attempt {record.attempt} on host {record.host} ({record.pool}), {resume}", flush=True)
        current = status.attempts[-1] if status.attempts else None
        if current and current.outcome is None and status.step is not None:
            now = time.monotonic()
            shown_at, shown = self.last_progress
            key = (current.attempt, status.step, status.durable_step)
            if key != shown and now - shown_at >= self.PROGRESS_EVERY:
                self.last_progress = (now, key)
                durable = status.durable_step if status.durable_step is not None else "-"
                print(f"attempt {current.attempt} · host {current.host} · step {status.step} · "
                      f"durable step {durable}", flush=True)

    def finish(self, status: RunStatus) -> None:
        for record in status.attempts:
            if record.outcome not in (None, AttemptOutcome.COMPLETED) and record.attempt not in self.ended:
                self.ended.add(record.attempt)
                print(ended_line(record), flush=True)
        wall = (status.ended_at - status.started_at).total_seconds() if status.ended_at and status.started_at else 0
        print(f"{status.state.value}: {len(status.attempts)} attempts, {status.reclaims} reclaims, "
              f"{status.steps_lost} steps lost to reclaims, wall time {format_seconds(wall)}, "
              f"{cost_line(status)}", flush=True)
        if status.bad_checkpoints:
            print(f"skipped {len(status.bad_checkpoints)} bad checkpoint(s): "
                  + "; ".join(f"{c.name}: {c.reason}" for c in status.bad_checkpoints), flush=True)
        if status.state != RunState.SUCCEEDED and status.stop_reason:
            print(f"reason: {status.stop_reason}", flush=True)
            last = status.attempts[-1] if status.attempts else None
            if last is not None and last.log_tail:
                print("the end of the script's output:", flush=True)
                print(last.log_tail.rstrip(), flush=True)


def exit_code_of(status: RunStatus) -> int:
    if status.state == RunState.SUCCEEDED:
        return 0
    if status.state == RunState.CANCELLED:
        return EXIT_CANCELLED
    return status.exit_code if status.exit_code else 1


async def follow(conn: Connection, run_id: str, total_steps: int | None = None) -> int:
    from cli import live
    from vaultlayer import client as vl_client

    with live.view_for(sys.stdout, LiveView(), total_steps) as view:
        while True:
            status = await vl_client.status(conn.client, run_id)
            view.update(status)
            if status.state.finished:
                view.finish(status)
                return exit_code_of(status)
            await asyncio.sleep(1.0)


# ---------------------------------------------------------------- commands


def with_config(args: argparse.Namespace) -> argparse.Namespace:
    """`args` with the config file (-f FILE, or [tool.vaultlayer] in ./pyproject.toml) under the flags given
    (cli/config_cmd.py); each of its problems is a line of bad input."""
    from cli.config_cmd import apply_config
    from vaultlayer.config import ConfigError

    try:
        return apply_config(args)
    except ConfigError as err:
        raise UsageError("\nvl: error: ".join(err.problems)) from None


async def cmd_run(args: argparse.Namespace) -> int:
    from vaultlayer import client as vl_client
    from vaultlayer.ui import ensure_search_attributes

    args = with_config(args)
    spec = build_spec(args)  # every input check happens before anything starts
    if spec.checkpoint_dir is None:
        from cli.snippet import offer_on_run

        offer_on_run(spec.command, Path(spec.workdir))
    conn = await connect()
    problem = await ensure_search_attributes(conn.client)
    if problem:
        print(f"vl: warning: {problem}", file=sys.stderr)
    spec.search_attributes = problem is None
    await vl_client.submit(conn.client, spec)
    print(f"run {spec.run_id}", flush=True)
    return await started(conn, spec.run_id, args.detach, spec.total_steps)


async def started(conn: Connection, run_id: str, detach: bool, total_steps: int | None) -> int:
    """After a run is submitted (vl run, vl resume): its UI link, then either how to follow it or the live view."""
    link = conn.run_link(run_id)
    if link:
        print(f"Temporal UI: {link}", flush=True)
    if detach:
        print(f"detached; follow with: vl logs {run_id} -f   ·   vl status {run_id}   ·   "
              f"stop with: vl cancel {run_id}", flush=True)
        return 0
    return await follow(conn, run_id, total_steps)


def status_json(status: RunStatus, with_attempts: bool = True) -> dict:
    exclude = {"fences", "current_host"} | (set() if with_attempts else {"attempts", "bad_checkpoints"})
    return status.model_dump(mode="json", exclude=exclude) | {
        "host": status.current_host.host_id if status.current_host else None
    }


def cost_line(status: RunStatus) -> str:
    """What the run paid, and what the same host-hours would have cost on demand (closed attempts)."""
    line = f"cost ${status.cost_usd:.2f}, on demand ${status.on_demand_cost_usd:.2f}"
    if status.on_demand_cost_usd > 0:
        line += f" ({status.cost_usd / status.on_demand_cost_usd:.0%} of on-demand)"
    return line


def attempt_line(record) -> str:
    outcome = record.outcome.value if record.outcome else "running"
    cost = f" ${record.cost_usd:.2f}" if record.cost_usd is not None else ""
    return (f"  attempt {record.attempt} {record.pool} host {record.host or '-'} {outcome}: steps {record.start_step}"
            f"..{record.end_step if record.end_step is not None else '?'} durable {record.durable_step} "
            f"lost {record.steps_lost}{cost} {record.reason}")


async def cmd_status(args: argparse.Namespace) -> int:
    from temporalio.service import RPCError

    from vaultlayer import client as vl_client

    conn = await connect()
    try:
        status = await vl_client.status(conn.client, args.run_id)
    except RPCError as err:
        fail(f"no run {args.run_id!r} ({err.message}); list runs with: vl ls", code=1)
    if args.json:
        print(json.dumps(status_json(status), indent=2))
        return 0
    print(f"run {status.run_id}: {status.state.value}")
    if status.current_host:
        print(f"host {status.current_host.host_id}, step {status.step}, durable step {status.durable_step}")
    print(f"durable step {status.durable_step}, reclaims {status.reclaims}, steps lost {status.steps_lost}")
    print(cost_line(status))
    if status.checkpoint_interval:
        print(f"checkpoint interval: {status.checkpoint_interval}")
    for record in status.attempts:
        print(attempt_line(record))
    if status.stop_reason:
        print(f"reason: {status.stop_reason}")
    link = conn.run_link(status.run_id)
    if link:
        print(f"Temporal UI: {link}")
    return 0


async def cmd_ls(args: argparse.Namespace) -> int:
    from vaultlayer import client as vl_client

    conn = await connect()
    runs = await vl_client.list_runs(conn.client)
    if args.json:
        print(json.dumps([status_json(run, with_attempts=False) for run in runs], indent=2))
        return 0
    for run in runs:
        print(f"{run.run_id}  {run.state.value:<12} durable step {run.durable_step}  reclaims {run.reclaims}")
    return 0


async def cmd_reclaim(args: argparse.Namespace) -> int:
    from temporalio.client import WorkflowUpdateFailedError
    from temporalio.service import RPCError

    from vaultlayer import client as vl_client

    conn = await connect()
    try:
        ack = await vl_client.reclaim(conn.client, args.run_id, with_notice=not args.no_notice)
    except WorkflowUpdateFailedError as err:
        fail(f"cannot reclaim {args.run_id}: {err.cause}", code=1)
    except RPCError as err:
        if "already completed" in err.message:
            fail(f"cannot reclaim {args.run_id}: the run has finished; there is no host to reclaim", code=1)
        fail(f"cannot reclaim {args.run_id}: {err.message}", code=1)
    print(f"reclaiming host {ack.host} of {args.run_id}" + (" without notice" if args.no_notice else ""))
    return 0


async def cmd_cancel(args: argparse.Namespace) -> int:
    from temporalio.service import RPCError

    from vaultlayer import client as vl_client

    conn = await connect()
    try:
        await vl_client.cancel(conn.client, args.run_id)
    except RPCError as err:
        fail(f"cannot cancel {args.run_id}: {err.message}", code=1)
    print(f"cancel requested for {args.run_id}: its hosts are released, its checkpoints kept")
    return 0


def format_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


async def cmd_checkpoints(args: argparse.Namespace) -> int:
    from temporalio.service import RPCError

    from vaultlayer import checkpoint
    from vaultlayer import client as vl_client

    conn = await connect()
    try:
        spec = await vl_client.spec(conn.client, args.run_id)
        status = await vl_client.status(conn.client, args.run_id)
    except RPCError as err:
        fail(f"no run {args.run_id!r} ({err.message}); list runs with: vl ls", code=1)
    try:
        ended = [record.attempt for record in status.attempts if record.outcome is not None]
        listings = await asyncio.to_thread(checkpoint.describe_checkpoints, spec.storage_url, spec.run_id,
                                           status.fences, ended, args.verify)
    except Exception as err:  # noqa: BLE001 - storage errors, after retries: say so on one line
        fail(f"cannot read the checkpoints of {args.run_id} in {spec.storage_url}: {err}", code=1)
    now = datetime.now(UTC)
    ages = [(now - item.created_at).total_seconds() if item.created_at else None for item in listings]
    if args.json:
        print(json.dumps([item.model_dump(mode="json") | {"age_seconds": age} for item, age in zip(listings, ages)],
                         indent=2))
        return 0
    if not listings:
        print(f"no checkpoints in {spec.storage_url}/{spec.run_id}")
        return 0
    print(f"{'STEP':>10}  {'ATTEMPT':>7}  {'SIZE':>9}  {'AGE':>9}  STATE")
    for item, age in zip(listings, ages):
        state = f"{item.state.value}: {item.reason}" if item.reason else item.state.value
        print(f"{item.step:>10}  {item.attempt:>7}  {format_bytes(item.size):>9}  "
              f"{format_seconds(age) if age is not None else '-':>9}  {state}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from workflows import baselines, simulate

    if args.policy not in (*baselines.POLICY_NAMES, "all"):
        raise UsageError(f"--policy {args.policy!r}: use one of {', '.join(baselines.POLICY_NAMES)} or all")
    try:
        model = simulate.model_from_args(args, args.work, args.deadline)
        traces = simulate.load_traces(Path(args.traces))
    except (ValueError, OSError) as err:
        raise UsageError(str(err)) from None
    names = baselines.POLICY_NAMES if args.policy == "all" else (args.policy,)
    summaries = simulate.compare({name: baselines.STRATEGIES[name] for name in names}, traces, model, args.starts)
    if args.json:
        print(json.dumps([summary.as_dict() for summary in summaries], indent=2))
        return 0
    print(f"{len(traces)} pools, {args.starts} starts, {args.work:g} h of work, deadline {args.deadline:g} h")
    print(simulate.format_table(summaries))
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from worker.local_server import down

    stopped = down()
    print("stopped: " + ", ".join(stopped) if stopped else "nothing to stop")
    return 0


async def cmd_reap(args: argparse.Namespace) -> int:
    from vaultlayer.home import vl_home
    from vaultlayer.logs import configure_logging
    from worker.reaper import run_finished, sweep

    configure_logging()  # the providers' logs go to stderr; stdout says what was released
    conn = await connect()
    for run_id in args.run_ids:
        if await run_finished(conn.client, run_id) is False:
            fail(f"run {run_id} is still running; cancel it (vl cancel {run_id}) and its hosts are released",
                 code=1)
    released = await sweep(conn.client, vl_home(), args.run_ids or None)
    for run_id, hosts in released.items():
        print(f"{run_id}: released {', '.join(hosts)}")
    if not released:
        print("nothing to reap")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from vaultlayer.config import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    from worker.agent import main as agent_main

    agent_main(args.task_queue, args.host_id, Path(args.host_dir), args.run_id)
    return 0


def cmd_codec_server(args: argparse.Namespace) -> int:
    from vaultlayer.codec import AesGcmCodec, EncryptionKeyError, load_keys
    from vaultlayer.codec_server import DEFAULT_ORIGINS, make_server

    try:
        keys = load_keys()
    except EncryptionKeyError as err:
        raise UsageError(str(err)) from None
    if not keys:
        raise UsageError("no encryption key: set VL_ENCRYPTION_KEY or VL_ENCRYPTION_KEY_FILE as the workers have it")
    server = make_server(AesGcmCodec(keys), args.host, args.port, args.cors_origin or DEFAULT_ORIGINS, args.namespace)
    host, port = server.server_address[:2]
    print(f"codec server on http://{host}:{port} (UI: Settings > Codec Server endpoint; "
          f"CLI: --codec-endpoint http://{host}:{port})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # Ctrl-C is how it stops
        server.server_close()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.control import main as worker_main

    worker_main()
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="vl", description="Durable spot GPU training on Temporal.")
    top.add_argument("-v", "--verbose", action="store_true", help="tracebacks behind error messages")
    sub = top.add_subparsers(dest="verb", required=True)

    run = sub.add_parser("run", help="run a training command durably: vl run [options] -- python train.py ...")
    run.add_argument("-f", "--file", help="a run config (YAML, or a pyproject.toml's [tool.vaultlayer]); flags given "
                                          "here override it (docs/config.md)")
    run.add_argument("--provider", default="local", help="where hosts come from (default: local)")
    run.add_argument("--gpu", help="GPU class and count, such as A10G:1 (cloud providers)")
    run.add_argument("--region", action="append", default=[], help="allowed region (repeatable), in order")
    run.add_argument("--zone", action="append", default=[], help="allowed zone (repeatable), in order")
    run.add_argument("--market", default="spot", help="spot (default) or on-demand")
    run.add_argument("--storage", help="checkpoint storage URL (default: file://$VL_HOME/storage)")
    run.add_argument("--checkpoint-every", help="steps (50) or a duration (30s, 5m); default: Young/Daly from "
                                                "the measured save cost and the pool's reclaim rate")
    run.add_argument("--checkpoint-min", default="60s", help="shortest automatic interval (default 60s)")
    run.add_argument("--checkpoint-max", default="30m", help="longest automatic interval (default 30m)")
    run.add_argument("--checkpoint-dir", help="zero-code mode: the script saves and resumes its own checkpoints "
                                              "in DIR; vl restores DIR before each attempt and stores it when it "
                                              "changes and on a notice")
    run.add_argument("--keep-checkpoints", type=int, default=3, help="complete checkpoints kept (default 3)")
    run.add_argument("--notice-seconds", type=float, default=30.0, help="local reclaim grace period (default 30)")
    run.add_argument("--reclaim-every", help="inject a reclaim (with notice) this long into each attempt, e.g. 20s")
    run.add_argument("--heartbeat-timeout", default="30s", help="a host silent this long is lost (default 30s)")
    run.add_argument("--start-timeout", default="5m", help="a host agent that does not start in this long is faulty")
    run.add_argument("--max-reclaims", type=int, help="stop after this many reclaims (default 200)")
    run.add_argument("--max-attempts", type=int, help="stop after this many attempts (default: no limit)")
    run.add_argument("--max-cost", type=float, help="stop once the run has cost this much, USD")
    run.add_argument("--deadline", help="stop this long from now, such as 36h; with --total-steps the policy "
                                        "plans to finish before it (docs/policy.md)")
    run.add_argument("--total-steps", type=int, help="the step the script finishes at: how the policy measures "
                                                     "the work left")
    run.add_argument("--work", help="how long the run takes uninterrupted, such as 24h (default: measured)")
    run.add_argument("--on-demand-fallback", action="store_true",
                     help="add an on-demand pool after each spot pool, used only when spot cannot meet --deadline")
    run.add_argument("--price", type=float, help="USD per hour of the pools' hosts (overrides the provider's "
                                                 "list price; the local provider reports it, default 0)")
    run.add_argument("--on-demand-price", type=float, help="USD per hour of the same capacity on demand")
    run.add_argument("--changeover", default="6m",
                     help="from a placement decision to training again, for the deadline rule (default 6m)")
    run.add_argument("--exclude-hosts-for", help="how long a host that failed is excluded (default: the whole run)")
    run.add_argument("--reclaim-in", action="append", default=[], metavar="ZONE",
                     help="--reclaim-every only in this zone or region (repeatable)")
    run.add_argument("--script-retries", type=int, default=0, help="retries when the script itself fails")
    run.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="extra environment")
    run.add_argument("--env-secret", action="append", default=[], metavar="NAME=REF",
                     help="environment read on the host at attempt start, from env:NAME, file:/path, aws-sm:ID or "
                          "gcp-sm:projects/P/secrets/S; only the reference is stored")
    run.add_argument("--setup", action="append", metavar="CMD", help="a shell command run on the host before the "
                                                                    "command in each attempt (repeatable)")
    run.add_argument("--workdir", help="where the command runs (default: here, or the config file's folder)")
    run.add_argument("--run-id", help="run id (default: generated)")
    run.add_argument("--detach", action="store_true", help="submit and return")
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    run.set_defaults(handler=cmd_run, file_pools=None)

    schema = sub.add_parser("schema", help="print the JSON Schema of the run config file (vl run -f FILE)")
    schema.set_defaults(handler=cmd_schema)

    from cli.snippet import add_parser as add_init_parser

    add_init_parser(sub)

    status = sub.add_parser("status", help="show a run")
    status.add_argument("run_id")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=cmd_status)

    ls = sub.add_parser("ls", help="list runs, newest first")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(handler=cmd_ls)

    reclaim = sub.add_parser("reclaim", help="take the run's current host back now (local provider)")
    reclaim.add_argument("run_id")
    reclaim.add_argument("--no-notice", action="store_true", help="SIGKILL at once, with no notice")
    reclaim.set_defaults(handler=cmd_reclaim)

    cancel = sub.add_parser("cancel", help="cancel a run (releases hosts, keeps checkpoints)")
    cancel.add_argument("run_id")
    cancel.set_defaults(handler=cmd_cancel)

    checkpoints = sub.add_parser("checkpoints", help="a run's checkpoints: step, attempt, size, age, state")
    checkpoints.add_argument("run_id")
    checkpoints.add_argument("--verify", action="store_true", help="re-hash every stored byte against the manifests")
    checkpoints.add_argument("--json", action="store_true")
    checkpoints.set_defaults(handler=cmd_checkpoints)

    simulate = sub.add_parser("simulate", help="replay spot availability traces through the placement policy")
    simulate.add_argument("--traces", required=True, metavar="DIR", help="a folder of trace files, one per pool")
    simulate.add_argument("--work", type=float, required=True, metavar="HOURS", help="uninterrupted training time")
    simulate.add_argument("--deadline", type=float, required=True, metavar="HOURS", help="from the start")
    simulate.add_argument("--policy", default="vaultlayer", help="vaultlayer (default), a baseline, or all")
    simulate.add_argument("--json", action="store_true")
    from workflows.simulate import add_model_arguments

    add_model_arguments(simulate)
    simulate.set_defaults(handler=cmd_simulate)

    down = sub.add_parser("down", help="stop the embedded server, worker and local hosts vl started")
    down.set_defaults(handler=cmd_down)

    reap = sub.add_parser("reap", help="release hosts still alive for finished runs (all, or the runs named)")
    reap.add_argument("run_ids", nargs="*", metavar="RUN")
    reap.set_defaults(handler=cmd_reap)

    agent = sub.add_parser("agent", help="host agent (started by providers on each host)")
    agent.add_argument("--task-queue", required=True)
    agent.add_argument("--host-id", required=True)
    agent.add_argument("--host-dir", required=True)
    agent.add_argument("--run-id", required=True, help="the run this host serves; other runs' attempts are refused")
    agent.set_defaults(handler=cmd_agent)

    codec = sub.add_parser("codec-server", help="decode encrypted payloads for the Temporal UI and CLI")
    codec.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    codec.add_argument("--port", type=int, default=8081)
    codec.add_argument("--cors-origin", action="append", metavar="URL",
                       help="a Temporal UI origin allowed to call it (repeatable; default the embedded UI's)")
    codec.add_argument("--namespace", action="append", default=[], help="serve only this namespace (repeatable)")
    codec.set_defaults(handler=cmd_codec_server)

    worker = sub.add_parser("worker", help="control-plane worker in the foreground (for clusters)")
    worker.set_defaults(handler=cmd_worker)

    from cli.runs_cmd import add_parsers

    add_parsers(sub)  # vl logs, vl resume
    from cli.ui_cmd import add_parsers as add_ui_parsers

    add_ui_parsers(sub)  # vl ui
    for verb in sub.choices.values():  # --verbose after the verb too; SUPPRESS keeps the top-level value
        verb.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                          help="tracebacks behind error messages")
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.verb == "run":
        args.command = args.command[1:] if args.command[:1] == ["--"] else args.command
        args.run_id = args.run_id or new_run_id()
        args.argv = sys.argv[1:] if argv is None else argv  # the flags given override a config file
    errors.set_verbose(args.verbose)
    try:
        result = args.handler(args)
        code = asyncio.run(result) if asyncio.iscoroutine(result) else result
    except UsageError as err:
        fail(str(err))
    except Exception as err:
        message = errors.expected_message(err)
        if message is None:
            raise
        fail(message, code=1)
    except KeyboardInterrupt:
        run_id = getattr(args, "run_id", None)
        print("\ndetached; the run goes on" + (f" (vl status {run_id})" if run_id else ""), file=sys.stderr)
        code = EXIT_DETACHED
    errors.exit_now(code)


if __name__ == "__main__":
    main()
