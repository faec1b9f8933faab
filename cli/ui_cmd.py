"""`vl ui RUN`: the run's page in the Temporal UI (embedded: http://localhost:8233; a cluster: VL_UI_URL).

The link opens the current execution's User Metadata tab, where the run's current details (state, step,
durable step, attempt, cost) are; a run that continues as new gets a new execution, and `vl ui` a new link.
"""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    ui = sub.add_parser("ui", help="print the run's link in the Temporal UI")
    ui.add_argument("run_id", metavar="RUN")
    ui.set_defaults(handler=cmd_ui)


async def cmd_ui(args: argparse.Namespace) -> int:
    from temporalio.service import RPCError

    from cli.main import connect, fail

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
