"""The commands that need no server: `vl simulate` (replays spot availability traces through the placement
policy and its baselines) and `vl schema` (the JSON Schema of the run config file)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cli.context import UsageError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from workflows.simulate import add_model_arguments

    simulate = sub.add_parser("simulate", help="replay spot availability traces through the placement policy")
    simulate.add_argument("--traces", required=True, metavar="DIR", help="a folder of trace files, one per pool")
    simulate.add_argument("--work", type=float, required=True, metavar="HOURS", help="uninterrupted training time")
    simulate.add_argument("--deadline", type=float, required=True, metavar="HOURS", help="from the start")
    simulate.add_argument("--policy", default="vaultlayer", help="vaultlayer (default), a baseline, or all")
    simulate.add_argument("--json", action="store_true")
    add_model_arguments(simulate)
    simulate.set_defaults(handler=cmd_simulate)

    schema = sub.add_parser("schema", help="print the JSON Schema of the run config file (vl run -f FILE)")
    schema.set_defaults(handler=cmd_schema)


def cmd_simulate(args: argparse.Namespace) -> int:
    from workflows import baselines, simulate

    if args.policy not in (*baselines.POLICY_NAMES, "all"):
        raise UsageError(f"--policy {args.policy!r}: use one of {', '.join(baselines.POLICY_NAMES)} or all")
    try:
        model = simulate.model_from_args(args, args.work, args.deadline)
        traces = simulate.load_traces(Path(args.traces), model.nodes)
    except (ValueError, OSError) as err:
        raise UsageError(str(err)) from None
    names = baselines.POLICY_NAMES if args.policy == "all" else (args.policy,)
    summaries = simulate.compare({name: baselines.STRATEGIES[name] for name in names}, traces, model, args.starts)
    if args.json:
        print(json.dumps([summary.as_dict() for summary in summaries], indent=2))
        return 0
    gang = f", gangs of {model.nodes} hosts" if model.nodes > 1 else ""
    print(f"{len(traces)} pools{gang}, {args.starts} starts, {args.work:g} h of work, deadline {args.deadline:g} h")
    print(simulate.format_table(summaries))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from vaultlayer.config import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0
