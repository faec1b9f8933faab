"""`vl logs` and `vl resume`: thin commands over the Python client (vaultlayer/runs.py).

Exit codes: `vl logs` 0, or 1 when the run or its storage cannot be read; `vl resume` the same as `vl run`
(the new run's outcome; 0 right away with --detach), 1 when the run cannot be resumed (still running, no
verified checkpoint), 2 on bad input.
"""

from __future__ import annotations

import argparse
import os
import sys

from vaultlayer.models import RunSpec


def add_parsers(sub: argparse._SubParsersAction) -> None:
    logs = sub.add_parser("logs", help="the script's output, stored per attempt next to the checkpoints")
    logs.add_argument("run_id", metavar="RUN")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new output until the run ends")
    logs.add_argument("--attempt", type=int, metavar="N", help="only attempt N (default: every attempt)")
    logs.set_defaults(handler=cmd_logs)

    resume = sub.add_parser("resume", help="start a new run, same spec, from a finished run's last checkpoint")
    resume.add_argument("run_id", metavar="RUN")
    resume.add_argument("--run-id", dest="new_run_id", metavar="ID", help="the new run's id (default: generated)")
    resume.add_argument("--detach", action="store_true", help="submit and return")
    resume.set_defaults(handler=cmd_resume)


def spec_from_config(path: str | os.PathLike, *flags: str) -> RunSpec:
    """The RunSpec that `vl run -f PATH [FLAGS]` would submit, for the Python client: `client.submit(
    spec_from_config("vl.yaml"))`. Here, on the CLI floor, because the merge of a config file under the flags
    and the checks behind it are `vl run`'s own. Bad input raises UsageError, one line per problem."""
    from cli.main import build_spec, parser, with_config
    from vaultlayer.run_ids import new_run_id

    argv = ["run", "-f", str(path), *flags]
    args = parser().parse_args(argv)
    args.command = args.command[1:] if args.command[:1] == ["--"] else args.command
    args.run_id, args.argv = args.run_id or new_run_id(), argv
    return build_spec(with_config(args))


async def cmd_logs(args: argparse.Namespace) -> int:
    from cli.main import UsageError, connect, fail
    from vaultlayer.runs import AsyncClient, RunNotFound

    if args.attempt is not None and args.attempt < 1:
        raise UsageError(f"--attempt {args.attempt}: attempts count from 1; vl status {args.run_id} lists them")
    conn = await connect()
    try:
        run = await AsyncClient(conn.client).get_run(args.run_id)
        if args.follow:
            async for text in run.follow_logs(args.attempt):
                sys.stdout.write(text)
                sys.stdout.flush()
        else:
            text = await run.logs(args.attempt)
            sys.stdout.write(text)
            if not text:
                which = f"attempt {args.attempt} of run" if args.attempt else "run"
                print(f"vl: no output stored for {which} {args.run_id} (yet); follow it with: vl logs {args.run_id} -f",
                      file=sys.stderr)
    except RunNotFound as err:
        fail(str(err), code=1)
    except Exception as err:  # noqa: BLE001 - storage errors, after retries: say so on one line
        fail(f"cannot read the logs of {args.run_id}: {err}", code=1)
    return 0


async def cmd_resume(args: argparse.Namespace) -> int:
    from cli.main import UsageError, connect, fail, started
    from vaultlayer.checkpoint import CheckpointError
    from vaultlayer.run_ids import run_id_problem
    from vaultlayer.runs import AsyncClient, ClientError

    if args.new_run_id is not None and (problem := run_id_problem(args.new_run_id)) is not None:
        raise UsageError(f"--run-id: {problem}")
    old_run_id = args.run_id
    conn = await connect()
    try:
        run = await AsyncClient(conn.client).resume(args.run_id, args.new_run_id)
    except (ClientError, CheckpointError) as err:
        fail(f"cannot resume {old_run_id}: {err}", code=1)
    args.run_id = run.run_id  # what Ctrl-C's "detached" line names from here on
    print(f"run {run.run_id}", flush=True)
    print(f"resuming {old_run_id} from step {run.resumed_from.step} (checkpoint copied to {run.resumed_from.url})",
          flush=True)
    return await started(conn, run.run_id, args.detach, (await run.spec()).total_steps)
