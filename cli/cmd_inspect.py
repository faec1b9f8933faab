"""The commands that read a run: `vl status`, `vl ls`, `vl logs`, `vl checkpoints`, `vl code`, `vl pull` and
`vl ui`.

Exit codes: 0, or 1 when the run, its storage or the UI address cannot be read; 2 on bad input. `vl ui RUN`
prints the run's page in the Temporal UI (embedded: http://localhost:8233; a cluster: VL_UI_URL): the current
execution's User Metadata tab, where the run's current details (state, step, durable step, attempt, cost)
are; a run that continues as new gets a new execution, and `vl ui` a new link.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from cli.context import UsageError, connect, fail
from cli.render import (
    attempt_line,
    cost_line,
    format_seconds,
    no_progress_line,
    pool_speed_lines,
    pool_speeds,
    status_json,
)
from vaultlayer.workdir import human_bytes

if TYPE_CHECKING:
    from vaultlayer.models import RunState, SnapshotRef
    from vaultlayer.runs import AsyncRun


def add_parsers(sub: argparse._SubParsersAction) -> None:
    status = sub.add_parser("status", help="show a run")
    status.add_argument("run_id")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=cmd_status)

    ls = sub.add_parser("ls", help="list runs, newest first")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(handler=cmd_ls)

    checkpoints = sub.add_parser("checkpoints", help="a run's checkpoints: step, attempt, size, age, state")
    checkpoints.add_argument("run_id")
    checkpoints.add_argument("--verify", action="store_true", help="re-hash every stored byte against the manifests")
    checkpoints.add_argument("--json", action="store_true")
    checkpoints.set_defaults(handler=cmd_checkpoints)

    logs = sub.add_parser("logs", help="the script's output, stored per attempt next to the checkpoints")
    logs.add_argument("run_id", metavar="RUN")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new output until the run ends")
    logs.add_argument("--attempt", type=int, metavar="N", help="only attempt N (default: every attempt)")
    logs.set_defaults(handler=cmd_logs)

    code = sub.add_parser("code", help="the files of the code snapshot a run runs: path, size, digest")
    code.add_argument("run_id", metavar="RUN")
    code.add_argument("--json", action="store_true")
    code.set_defaults(handler=cmd_code)

    pull = sub.add_parser("pull", help="download a run's outputs (--output-dir), every file checked")
    pull.add_argument("run_id", metavar="RUN")
    pull.add_argument("dest", metavar="DEST", nargs="?", help="an absent or empty folder (default: ./RUN)")
    pull.set_defaults(handler=cmd_pull)

    ui = sub.add_parser("ui", help="print the run's link in the Temporal UI")
    ui.add_argument("run_id", metavar="RUN")
    ui.set_defaults(handler=cmd_ui)


async def cancelled_outputs(run: AsyncRun, output_dir: str | None, state: RunState) -> SnapshotRef | None:
    """The outputs a cancelled attempt stored on its way out: only its storage knows them (the attempt ended
    as cancelled, with no result). None when there are none or storage cannot be read from here."""
    from vaultlayer.models import RunState

    if output_dir is None or state != RunState.CANCELLED:
        return None
    try:
        return await run.outputs()
    except Exception as err:  # noqa: BLE001 - a status line is not worth failing `vl status` over
        print(f"warning: cannot read the run's outputs from its storage: {err}", file=sys.stderr)
        return None


async def cmd_status(args: argparse.Namespace) -> int:
    from temporalio.service import RPCError

    from vaultlayer import client as vl_client
    from vaultlayer.runs import AsyncClient, AsyncRun

    conn = await connect()
    run = AsyncRun(AsyncClient(conn.client), args.run_id)
    try:
        status = await vl_client.status(conn.client, args.run_id)
        spec = await run.spec()  # from history when no worker answers
    except RPCError as err:
        fail(f"no run {args.run_id!r} ({err.message}); list runs with: vl ls", code=1)
    outputs = status.outputs or await cancelled_outputs(run, spec.output_dir, status.state)
    if args.json:
        code = spec.code.model_dump(mode="json") if spec.code else None
        print(json.dumps(status_json(status) | {"code": code,
                                                "outputs": outputs.model_dump(mode="json") if outputs else None,
                                                "pool_speeds": pool_speeds(spec, status)},
                         indent=2))
        return 0
    print(f"run {status.run_id}: {status.state.value}")
    if spec.code:
        print(f"code: snapshot {spec.code.short}, {spec.code.file_count} files, {human_bytes(spec.code.total_bytes)}"
              f" (vl code {status.run_id} lists them)")
    if outputs:
        print(f"outputs: {outputs.file_count} files, {human_bytes(outputs.total_bytes)} (vl pull {status.run_id})")
    if status.current_host:
        print(f"host {status.current_host.host_id}, step {status.step}, durable step {status.durable_step}")
    print(f"durable step {status.durable_step}, reclaims {status.reclaims}, steps lost {status.steps_lost}")
    print(cost_line(status))
    if stalled := no_progress_line(status):
        print(f"warning: {stalled}")
    if status.checkpoint_interval:
        print(f"checkpoint interval: {status.checkpoint_interval}")
    if status.waiting_on:
        print(f"waiting on {status.waiting_on} (saves are retried; the run carries on)")
    print("speed per pool:")
    for line in pool_speed_lines(spec, status):
        print(line)
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
        print(f"{item.step:>10}  {item.attempt:>7}  {human_bytes(item.size):>9}  "
              f"{format_seconds(age) if age is not None else '-':>9}  {state}")
    return 0


async def cmd_logs(args: argparse.Namespace) -> int:
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


async def cmd_code(args: argparse.Namespace) -> int:
    from vaultlayer.runs import AsyncClient, ClientError

    conn = await connect()
    try:
        run = await AsyncClient(conn.client).get_run(args.run_id)
        manifest = await run.code()
    except ClientError as err:
        fail(str(err), code=1)
    if args.json:
        print(json.dumps(manifest.model_dump(mode="json"), indent=2))
        return 0
    for entry in sorted(manifest.files, key=lambda item: item.path):
        print(f"{human_bytes(entry.size):>9}  {entry.blake3[:12]}  {entry.path}")
    for link in sorted(manifest.links, key=lambda item: item.path):
        print(f"{'link':>9}  {'':12}  {link.path} -> {link.target}")
    return 0


async def cmd_pull(args: argparse.Namespace) -> int:
    from vaultlayer.runs import AsyncClient, ClientError

    conn = await connect()
    try:
        run = await AsyncClient(conn.client).get_run(args.run_id)
        dest = await run.pull(args.dest or args.run_id)
        pulled = await run.outputs()
    except ClientError as err:
        fail(str(err), code=1)
    print(f"pulled the outputs of {args.run_id} into {dest} ({pulled.file_count} files,"
          f" {human_bytes(pulled.total_bytes)}, every file checked)")
    return 0


async def cmd_ui(args: argparse.Namespace) -> int:
    from temporalio.service import RPCError

    conn = await connect()
    if not conn.ui_url:
        fail("no Temporal UI address for this cluster: set VL_UI_URL to your UI, such as "
             "https://temporal.example.com (Temporal Cloud: https://cloud.temporal.io)", code=1)
    try:
        execution = await conn.client.get_workflow_handle(args.run_id).describe()
    except RPCError as err:
        fail(f"no run {args.run_id!r} ({err.message}); list runs with: vl ls", code=1)
    print(f"{conn.run_link(args.run_id)}/{execution.run_id}/user-metadata")
    return 0
