"""Goodput benchmark: the placement policies replayed on real spot availability traces.

A 24 h job with a 36 h deadline (and a tighter 28 h one), from many start offsets, through the same
`workflows.policy` code the workflow runs, against the baselines of `workflows/baselines.py`. Prints one
table: policy, mean and p95 completion, deadline attainment, mean cost relative to on-demand (with `--nodes N`,
to N on-demand hosts).

    python bench/goodput.py                       # ../shared/traces/aws-p3-v100-2023-02 (45 days, AWS V100)
    python bench/goodput.py --traces DIR --json   # any folder of trace files
    python bench/goodput.py --synthetic 7         # generated traces no constant was chosen on
    python bench/goodput.py --nodes 4 --traces ../shared/traces/aws-4node-v100-2023-08   # gangs of 4 hosts

The model (prices, changeover, notice, checkpoint cost) and its defaults: docs/policy.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from workflows import baselines, simulate

# The single-host traces: ../shared/traces also holds 4-node ones, which a default run must not mix in.
DEFAULT_TRACES = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "aws-p3-v100-2023-02"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", type=Path, default=DEFAULT_TRACES, metavar="DIR",
                        help=f"a folder of trace files, searched recursively (default {DEFAULT_TRACES})")
    parser.add_argument("--synthetic", type=int, metavar="SEED", help="generated traces instead of --traces")
    parser.add_argument("--work", type=float, default=24.0, metavar="HOURS")
    parser.add_argument("--deadlines", type=float, nargs="+", default=[36.0, 28.0], metavar="HOURS")
    parser.add_argument("--json", action="store_true", help="the table as a list of objects")
    simulate.add_model_arguments(parser)
    args = parser.parse_args(argv)

    try:
        models = [simulate.model_from_args(args, args.work, deadline) for deadline in args.deadlines]
        traces = simulate.synthetic_traces(args.synthetic, nodes=args.nodes) if args.synthetic is not None \
            else simulate.load_traces(args.traces, args.nodes)
    except (ValueError, OSError) as err:
        print(f"goodput: {err}", file=sys.stderr)
        return 2
    began = time.monotonic()
    summaries = [summary for model in models
                 for summary in simulate.compare(baselines.STRATEGIES, traces, model, args.starts)]
    if args.json:
        print(json.dumps([summary.as_dict() for summary in summaries], indent=2))
        return 0
    source = f"synthetic seed {args.synthetic}" if args.synthetic is not None else str(args.traces)
    gang = f"gangs of {args.nodes} hosts; " if args.nodes > 1 else ""
    print(f"{len(traces)} pools from {source}; {gang}{args.work:g} h of work from {args.starts} start offsets; "
          f"spot at {args.spot_price:.2f} of on-demand, {args.changeover_minutes:g} min changeover, "
          f"{args.notice_seconds:g} s notice, {args.checkpoint_seconds:g} s per checkpoint every "
          f"{args.checkpoint_minutes:g} min")
    print(simulate.format_table(summaries))
    print(f"({time.monotonic() - began:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
