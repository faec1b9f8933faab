"""Goodput benchmark: the placement policies replayed on real spot availability traces.

A 24 h job with a 36 h deadline (and a tighter 28 h one), from many start offsets, through the same
`workflows.policy` code the workflow runs, against the baselines of `workflows/baselines.py`. Prints one
table: policy, mean and p95 completion, deadline attainment, mean cost relative to on-demand (with `--nodes N`,
to N on-demand hosts).

    python bench/goodput.py                       # ../shared/traces/aws-p3-v100-2023-02 (45 days, AWS V100)
    python bench/goodput.py --traces DIR --json   # any folder of trace files
    python bench/goodput.py --synthetic 7         # generated traces no constant was chosen on
    python bench/goodput.py --nodes 4 --traces ../shared/traces/aws-4node-v100-2023-08   # gangs of 4 hosts
    python bench/goodput.py --price-walk 3        # spot prices that move (a seeded walk per zone)
    python bench/goodput.py --mixed               # two GPU classes: 2.5x faster at 2x the price on every other zone

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
    parser.add_argument("--prices", type=Path, metavar="DIR", help="spot price series per zone (docs/policy.md)")
    parser.add_argument("--price-walk", type=int, metavar="SEED", help="a seeded spot price walk per zone")
    parser.add_argument("--mixed", action="store_true",
                        help="every other zone holds a faster GPU class (--fast-speed, --fast-price); adds the "
                             "policy ranking by price per hour (price_only) to compare")
    parser.add_argument("--fast-speed", type=float, default=2.5, help="the fast class's speed (default 2.5)")
    parser.add_argument("--fast-price", type=float, default=2.0,
                        help="the fast class's prices as a multiple of the slow one's (default 2)")
    simulate.add_model_arguments(parser)
    args = parser.parse_args(argv)

    try:
        models = [simulate.model_from_args(args, args.work, deadline) for deadline in args.deadlines]
        traces = simulate.synthetic_traces(args.synthetic, nodes=args.nodes) if args.synthetic is not None \
            else simulate.load_traces(args.traces, args.nodes)
        if args.prices is not None:
            traces = simulate.load_prices(traces, args.prices)
        elif args.price_walk is not None:
            traces = simulate.synthetic_prices(traces, args.price_walk, args.spot_price)
        if args.mixed:
            if args.fast_speed <= 0 or args.fast_price <= 0:
                raise ValueError("--fast-speed and --fast-price must be more than zero")
            traces = simulate.with_classes(traces, args.fast_speed, args.fast_price)
    except (ValueError, OSError) as err:
        print(f"goodput: {err}", file=sys.stderr)
        return 2
    began = time.monotonic()
    strategies = dict(baselines.STRATEGIES)
    if args.mixed:
        strategies = {"vaultlayer": strategies["vaultlayer"],
                      "price_only": lambda world, model, start, index: simulate.PriceOnly(),
                      **{name: make for name, make in strategies.items() if name != "vaultlayer"}}
    summaries = [summary for model in models
                 for summary in simulate.compare(strategies, traces, model, args.starts)]
    if args.json:
        print(json.dumps([summary.as_dict() for summary in summaries], indent=2))
        return 0
    source = f"synthetic seed {args.synthetic}" if args.synthetic is not None else str(args.traces)
    scenario = f"gangs of {args.nodes} hosts; " if args.nodes > 1 else ""
    if args.mixed:
        scenario += (f"every other zone {args.fast_speed:g}x as fast at {args.fast_price:g}x the price "
                     f"(work measured on the slow class); ")
    if args.prices is not None or args.price_walk is not None:
        scenario += f"spot prices from {args.prices or f'a walk, seed {args.price_walk}'}; "
    print(f"{len(traces)} pools from {source}; {scenario}{args.work:g} h of work from {args.starts} start offsets; "
          f"on-demand ${args.on_demand_usd:g}/h, spot at {args.spot_price:.2f} of it, "
          f"{args.changeover_minutes:g} min changeover, "
          f"{args.notice_seconds:g} s notice, {args.checkpoint_seconds:g} s per checkpoint every "
          f"{args.checkpoint_minutes:g} min")
    print(simulate.format_table(summaries))
    print(f"({time.monotonic() - began:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
