"""`vl run` and `vl resume`: start a run, then follow it (or detach).

`vl run` turns its flags into a `RunRequest` over the config file's (`-f FILE`, else `[tool.vaultlayer]` in
./pyproject.toml): a flag given on the command line wins, the file fills the rest, the request's defaults
the remainder. Its options default to "not given" (argparse.SUPPRESS), so the flags given are exactly the
names in the parsed namespace. `vaultlayer.request.build_spec` checks the request, as it does for the
notebook client.

Exit codes: as cli/context.py says for `vl run`; `vl resume` the same (the new run's outcome; 0 right away
with --detach), 1 when the run cannot be resumed (still running, no verified checkpoint), 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli.context import Connection, UsageError, connect, consent, fail, warn
from cli.render import follow
from vaultlayer.request import PoolRequest, RunRequest, build_spec, check_storage, pack_code, select_code

POOL_OPTIONS = set(PoolRequest.model_fields) - {"where"}


def add_parsers(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", argument_default=argparse.SUPPRESS,
                         help="run a training command durably: vl run [options] -- python train.py ...")
    run.add_argument("-f", "--file", default=None, help="a run config (YAML, or a pyproject.toml's "
                                                        "[tool.vaultlayer]); flags given here override it "
                                                        "(docs/config.md)")
    run.add_argument("--provider", help="where hosts come from (default: local)")
    run.add_argument("--gpu", help="GPU class and count, such as A10G:1 (cloud providers)")
    run.add_argument("--region", dest="regions", action="append", metavar="REGION",
                     help="allowed region (repeatable), in order")
    run.add_argument("--zone", dest="zones", action="append", metavar="ZONE",
                     help="allowed zone (repeatable), in order")
    run.add_argument("--market", help="spot (default) or on-demand")
    run.add_argument("--nodes", type=int, help="hosts per attempt, one gang in one pool, started, saved and moved "
                                               "together; a torchrun command gets the gang's --nnodes, --node_rank, "
                                               "--master_addr and --master_port (docs/distributed.md); default 1")
    run.add_argument("--storage", help="checkpoint storage URL (default: file://$VL_HOME/storage)")
    run.add_argument("--checkpoint-every", help="steps (50) or a duration (30s, 5m); default: Young/Daly from "
                                                "the measured save cost and the pool's reclaim rate")
    run.add_argument("--checkpoint-min", help="shortest automatic interval (default 60s)")
    run.add_argument("--checkpoint-max", help="longest automatic interval (default 30m)")
    run.add_argument("--checkpoint-dir", help="zero-code mode: the script saves and resumes its own checkpoints "
                                              "in DIR; vl restores DIR before each attempt and stores it when it "
                                              "changes and on a notice")
    run.add_argument("--keep-checkpoints", type=int, help="complete checkpoints kept (default 3)")
    run.add_argument("--notice-seconds", type=float,
                     help="local reclaim grace period (default 30); 0: --reclaim-every takes hosts without notice")
    run.add_argument("--reclaim-every", help="inject a reclaim (with notice) this long into each attempt, e.g. 20s")
    run.add_argument("--heartbeat-timeout", help="a host silent this long is lost (default 30s)")
    run.add_argument("--start-timeout", help="a host agent that does not start in this long is faulty (default 5m)")
    run.add_argument("--max-reclaims", type=int, help="stop after this many reclaims (default 200)")
    run.add_argument("--max-attempts", type=int, help="stop after this many attempts (default: no limit)")
    run.add_argument("--max-attempts-without-progress", type=int,
                     help="stop after this many attempts in a row store no checkpoint (default 10)")
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
    run.add_argument("--on-demand-price", type=float, help="USD per hour of the same capacity on demand (the "
                                                           "price of --on-demand-fallback's pools)")
    run.add_argument("--speed", type=float, help="one host's training speed relative to one V100 (default: the "
                                                 "GPU class's; the speed the run measures replaces it)")
    run.add_argument("--changeover",
                     help="from a placement decision to training again, for the deadline rule (default 6m)")
    run.add_argument("--exclude-hosts-for", help="how long a host that failed is excluded (default: the whole run)")
    run.add_argument("--reclaim-in", action="append", metavar="ZONE",
                     help="--reclaim-every only in this zone or region (repeatable)")
    run.add_argument("--script-retries", type=int, help="retries when the script itself fails (default 0)")
    run.add_argument("--env", action="append", metavar="NAME=VALUE", help="extra environment")
    run.add_argument("--env-secret", dest="env_secrets", action="append", metavar="NAME=REF",
                     help="environment read on the host at attempt start, from env:NAME, file:/path, aws-sm:ID or "
                          "gcp-sm:projects/P/secrets/S; only the reference is stored")
    run.add_argument("--setup", action="append", metavar="CMD", help="a shell command run on the host before the "
                                                                    "command in each attempt (repeatable)")
    run.add_argument("--no-setup-cache", dest="setup_cache", action="store_false",
                     help="keep no setup cache: setup uses the host's own caches (default: what setup leaves "
                          "in pip's and uv's caches is stored once and restored on later hosts)")
    run.add_argument("--workdir", help="the code that travels with the run: packed once at submit, every attempt "
                                       "runs in it (default: here, or the config file's folder)")
    run.add_argument("--no-code", dest="code", action="store_false",
                     help="ship no code: the command runs in --workdir as each host has it (an image with the code)")
    run.add_argument("--allow-secret-file", dest="allow_secret_files", action="append", metavar="PATH",
                     help="ship this workdir file although its name looks like a secret (repeatable)")
    run.add_argument("--workdir-max-size", help="refuse a workdir bigger than this, such as 500MB (default 100MB)")
    run.add_argument("--output-dir", help="a folder of the workdir the script writes its results to: stored when "
                                          "it succeeds, fetched with vl pull")
    run.add_argument("--run-id", help="run id (default: generated)")
    run.add_argument("--detach", action="store_true", default=False, help="submit and return")
    run.add_argument("command", nargs=argparse.REMAINDER, default=[], help="-- then the command to run")
    run.set_defaults(handler=cmd_run)

    resume = sub.add_parser("resume", help="start a new run, same spec, from a finished run's last checkpoint")
    resume.add_argument("run_id", metavar="RUN")
    resume.add_argument("--run-id", dest="new_run_id", metavar="ID", help="the new run's id (default: generated)")
    resume.add_argument("--detach", action="store_true", help="submit and return")
    resume.add_argument("--fresh-code", action="store_true",
                        help="pack the workdir again (default: the code the old run ran)")
    resume.set_defaults(handler=cmd_resume)


def request_from_args(args: argparse.Namespace) -> RunRequest:
    """The run `vl run ARGS` asks for: the flags given over the config file. Raises RunRequestError (a
    ConfigError for the file) or UsageError, one line per problem."""
    given = {name: value for name, value in vars(args).items() if name in RunRequest.model_fields}
    pool = {name: value for name, value in vars(args).items() if name in POOL_OPTIONS}
    if pool:
        given["pools"] = [PoolRequest(**pool)]
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if command:
        given["command"] = command
    else:
        given.pop("command", None)
    if "env" in given:
        given["env"] = _pairs(given["env"], "--env", "NAME=VALUE")
    if "env_secrets" in given:
        given["env_secrets"] = _pairs(given["env_secrets"], "--env-secret", "NAME=REF, such as HF_TOKEN=env:HF_TOKEN")
    from vaultlayer.config import load_file, load_pyproject  # yaml and fsspec: only when a run is asked for

    flags = RunRequest(**given)
    if args.file:
        loaded = load_file(Path(args.file))
    else:
        loaded = load_pyproject(Path.cwd())
        if loaded is not None:
            print("vl: using [tool.vaultlayer] from ./pyproject.toml (-f FILE reads another config)", file=sys.stderr)
    return flags if loaded is None else loaded.request(flags)


def _pairs(items: list[str], flag: str, expected: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError(f"{flag} {item!r}: expected {expected}")
        pairs[name] = value
    return pairs


async def cmd_run(args: argparse.Namespace) -> int:
    from vaultlayer import client as vl_client
    from vaultlayer.ui import ensure_search_attributes

    request = request_from_args(args)
    spec = build_spec(request, warn=warn)  # every input check happens before anything starts
    args.run_id = spec.run_id  # what Ctrl-C's "detached" line names
    if spec.checkpoint_dir is None:
        offer_on_run(spec.command, Path(spec.workdir))
    code = select_code(request, spec, warn=warn)  # after the offer: lines it adds to the script travel too
    check_storage(spec.storage_url)
    spec = pack_code(code, spec)
    if code is not None:
        print(f"code: {code.summary(spec.code.short)}", flush=True)
    conn = await connect()
    problem = await ensure_search_attributes(conn.client)
    if problem:
        warn(problem)
    spec.search_attributes = problem is None
    await vl_client.submit(conn.client, spec)
    print(f"run {spec.run_id}", flush=True)
    return await started(conn, spec.run_id, args.detach, spec.total_steps)


async def cmd_resume(args: argparse.Namespace) -> int:
    from vaultlayer.checkpoint import CheckpointError
    from vaultlayer.run_ids import run_id_problem
    from vaultlayer.runs import AsyncClient, ClientError

    if args.new_run_id is not None and (problem := run_id_problem(args.new_run_id)) is not None:
        raise UsageError(f"--run-id: {problem}")
    old_run_id = args.run_id
    conn = await connect()
    try:
        run = await AsyncClient(conn.client).resume(args.run_id, args.new_run_id, fresh_code=args.fresh_code)
    except (ClientError, CheckpointError) as err:
        fail(f"cannot resume {old_run_id}: {err}", code=1)
    args.run_id = run.run_id  # what Ctrl-C's "detached" line names from here on
    print(f"run {run.run_id}", flush=True)
    print(f"resuming {old_run_id} from step {run.resumed_from.step} (checkpoint copied to {run.resumed_from.url})",
          flush=True)
    return await started(conn, run.run_id, args.detach, (await run.spec()).total_steps)


async def started(conn: Connection, run_id: str, detach: bool, total_steps: int | None) -> int:
    """After a run is submitted: its UI link, then either how to follow it or the live view."""
    link = conn.run_link(run_id)
    if link:
        print(f"Temporal UI: {link}", flush=True)
    if detach:
        print(f"detached; follow with: vl logs {run_id} -f   ·   vl status {run_id}   ·   "
              f"stop with: vl cancel {run_id}", flush=True)
        return 0
    return await follow(conn, run_id, total_steps)


def offer_on_run(command: list[str], workdir: Path) -> None:
    """Before `vl run` starts a script that would restart from scratch after a reclaim: ask, or hint. On a
    terminal it shows the diff and asks; otherwise (CI, a pipe) it prints a one-line hint and runs the script
    unchanged."""
    from vaultlayer.snippet import NotApplicable, proposal_for, script_of, write

    path = script_of(command, workdir)
    if path is None:
        return
    try:
        proposal = proposal_for(path)
    except NotApplicable:
        return
    if not sys.stdin.isatty():
        print(f"vl: hint: {path.name} ({proposal.framework}) does not save through VaultLayer, so a reclaim "
              f"restarts it from the beginning; `vl init {path.name}` adds the lines that make it resume",
              file=sys.stderr)
        return
    print(f"{path.name} ({proposal.framework}) does not save through VaultLayer: a reclaim would restart it "
          "from the beginning. These lines make it resume:\n")
    print(proposal.diff)
    if consent(f"Add them to {path.name} before the run?"):
        backup = write(path, proposal)
        print(f"{path.name} updated (the original is in {backup.name})", flush=True)
