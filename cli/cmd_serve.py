"""The long-running and housekeeping commands: `vl agent` (the host agent a provider starts on each host, as
`python -m cli.main agent ...`), `vl worker` (a control-plane worker, for clusters), `vl codec-server` (decodes
encrypted payloads for the Temporal UI and CLI), `vl down` (stops what `vl` started) and `vl reap` (releases
hosts still alive for finished runs)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cli.context import UsageError, connect, fail


def add_parsers(sub: argparse._SubParsersAction) -> None:
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
