"""The commands that act on a running run: `vl cancel` (hosts released, checkpoints kept) and `vl reclaim`
(take the current host back now, as a provider would; the local provider's way to rehearse a reclaim).
Exit codes: 0, or 1 when the server refuses (the run has finished, no such run)."""

from __future__ import annotations

import argparse

from cli.context import connect, fail


def add_parsers(sub: argparse._SubParsersAction) -> None:
    reclaim = sub.add_parser("reclaim", help="take the run's current host back now (local provider)")
    reclaim.add_argument("run_id")
    reclaim.add_argument("--no-notice", action="store_true", help="SIGKILL at once, with no notice")
    reclaim.add_argument("--node", type=int, default=0, metavar="K",
                         help="of a multi-node run, the host of node rank K (default 0)")
    reclaim.set_defaults(handler=cmd_reclaim)

    cancel = sub.add_parser("cancel", help="cancel a run (releases hosts, keeps checkpoints)")
    cancel.add_argument("run_id")
    cancel.set_defaults(handler=cmd_cancel)


async def cmd_reclaim(args: argparse.Namespace) -> int:
    from temporalio.client import WorkflowUpdateFailedError
    from temporalio.service import RPCError

    from vaultlayer import client as vl_client

    conn = await connect()
    try:
        ack = await vl_client.reclaim(conn.client, args.run_id, with_notice=not args.no_notice, node=args.node)
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
