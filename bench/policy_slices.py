"""VaultLayer against Uniform Progress on every slice of the real traces and on synthetic markets no constant was
chosen on: the claim of docs/policy.md ("never dearer than Uniform Progress at 100% attainment"), slice by slice.

For each set of traces and each deadline, both policies run from the same start offsets; the table gives each
one's attainment and mean cost relative to on-demand, and the difference (ours - UP, in points of on-demand
cost: negative is cheaper) with two standard errors of it over the starts. A row where VaultLayer misses a deadline UP
meets, or costs more, is marked "<-"; "beyond 2 SE" where it costs more by more than the noise of its starts.

    python bench/policy_slices.py                  # real slices, and synthetic seeds 100-109 of every market
    python bench/policy_slices.py --seeds 200 210  # other held-out seeds
    python bench/policy_slices.py --json

The real slices keep the first or last half of every file, or the zones named; synthetic markets are those of
`workflows.simulate.MARKETS` ("mixed": the default of every earlier figure; "calm": long uptimes, rare
shortages; "choppy": capacity that comes and goes in minutes), as 3 regions of 3 zones and as one region of 3.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

from workflows import baselines, simulate

TRACES = Path(__file__).resolve().parents[1].parent / "shared" / "traces"
POLICIES = ("vaultlayer", "uniform_progress")


def halves(traces: list[simulate.Trace], which: int) -> list[simulate.Trace]:
    def cut(counts: tuple[int, ...]) -> tuple[int, ...]:
        middle = len(counts) // 2
        return counts[:middle] if which == 0 else counts[middle:]
    return [replace(t, counts=cut(t.counts)) for t in traces]


def real_slices() -> list[tuple[str, list[simulate.Trace], int]]:
    """(name, traces, nodes) for each slice of ../shared/traces; none when the folder is not beside the clone."""
    single, gangs = TRACES / "aws-p3-v100-2023-02", TRACES / "aws-4node-v100-2023-08"
    if not single.is_dir():
        return []
    every = simulate.load_traces(single)
    slices = [
        ("real: all 9 zones", every, 1),
        ("real: first 22.5 days", halves(every, 0), 1),
        ("real: last 22.5 days", halves(every, 1), 1),
        ("real: without us-east-1", [t for t in every if not t.zone.startswith("us-east-1")], 1),
        ("real: without us-west-2", [t for t in every if not t.zone.startswith("us-west-2")], 1),
        ("real: us-west-2 only", [t for t in every if t.zone.startswith("us-west-2")], 1),
        ("real: us-east-1 only", [t for t in every if t.zone.startswith("us-east-1")], 1),
    ]
    if gangs.is_dir():
        slices += [(f"real 4-node: gangs of {n}", simulate.load_traces(gangs, n), n) for n in (2, 4)]
    return slices


def synthetic_slices(seeds: range) -> list[tuple[str, list[simulate.Trace], int]]:
    slices = []
    for market in simulate.MARKETS:
        for seed in seeds:
            slices.append((f"{market} 3x3 seed {seed}", simulate.synthetic_traces(seed, market=market), 1))
            slices.append((f"{market} 1x3 seed {seed}", simulate.synthetic_traces(seed, regions=1, market=market), 1))
    return slices


def measure(job: tuple[str, list[simulate.Trace], int, float, int]) -> dict:
    name, traces, nodes, deadline, starts = job
    model = simulate.Model(deadline_hours=deadline, nodes=nodes)
    ours, uniform = simulate.compare({p: baselines.STRATEGIES[p] for p in POLICIES}, traces, model, starts)
    return {"slice": name, "deadline_h": deadline, "ours_attainment": ours.attainment,
            "up_attainment": uniform.attainment, "ours_cost": ours.cost_vs_ondemand,
            "up_cost": uniform.cost_vs_ondemand, "ours_reclaims": ours.mean_reclaims,
            "up_reclaims": uniform.mean_reclaims,
            "diff_se": paired_standard_error([(a.cost - b.cost) / model.on_demand_cost
                                              for a, b in zip(ours.results, uniform.results)])}


def paired_standard_error(differences: list[float]) -> float:
    """The standard error of the mean of per-start differences (both policies run from the same starts): how far
    the slice's difference could move with other starts. Two of them is the line between noise and a real gap."""
    if len(differences) < 2:
        return math.inf
    return statistics.stdev(differences) / math.sqrt(len(differences))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs=2, default=[100, 110], metavar=("FIRST", "END"),
                        help="synthetic seeds FIRST..END-1 of every market (default 100 110)")
    parser.add_argument("--starts", type=int, default=40, help="start offsets per slice (default 40)")
    parser.add_argument("--deadlines", type=float, nargs="+", default=[36.0, 28.0], metavar="HOURS")
    parser.add_argument("--markets", nargs="+", default=["real", *simulate.MARKETS],
                        choices=["real", *simulate.MARKETS], help="the sets to run (default: all)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    began = time.monotonic()
    slices = [s for s in real_slices() + synthetic_slices(range(*args.seeds))
              if s[0].split()[0].rstrip(":") in args.markets]
    jobs = [(name, traces, nodes, deadline, args.starts) for name, traces, nodes in slices
            for deadline in args.deadlines]
    with ProcessPoolExecutor(args.workers) as pool:
        rows = list(pool.map(measure, jobs))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'slice':<28} {'deadline':>8} {'ours':>8} {'UP':>8} {'diff':>7} {'2 SE':>6} {'reclaims ours/UP':>17} "
          f"{'attained ours/UP':>17}")
    worse = beyond_noise = 0
    for row in rows:
        diff, noise = (row["ours_cost"] - row["up_cost"]) * 100, 2 * row["diff_se"] * 100
        behind = row["ours_attainment"] < row["up_attainment"] or diff > 0.005
        worse += behind
        clear = row["ours_attainment"] < row["up_attainment"] or diff > noise
        beyond_noise += clear
        print(f"{row['slice']:<28} {row['deadline_h']:>7g}h {row['ours_cost']:>8.2%} {row['up_cost']:>8.2%} "
              f"{diff:>+7.2f} {noise:>6.2f} {row['ours_reclaims']:>8.1f}/{row['up_reclaims']:<8.1f} "
              f"{row['ours_attainment']:>7.1%}/{row['up_attainment']:<7.1%}{'  <-' if behind else ''}"
              f"{' beyond 2 SE' if clear else ''}")
    for market in ["real", *simulate.MARKETS]:
        for deadline in args.deadlines:
            group = [r for r in rows if r["slice"].startswith(market) and r["deadline_h"] == deadline]
            if group:
                ours = sum(r["ours_cost"] for r in group) / len(group)
                uniform = sum(r["up_cost"] for r in group) / len(group)
                noise = 2 * math.sqrt(sum(r["diff_se"] ** 2 for r in group)) / len(group)
                print(f"mean of {len(group)} {market} slices at {deadline:g} h: ours {ours:.2%}, UP {uniform:.2%} "
                      f"({(ours - uniform) * 100:+.2f} points, 2 SE {noise * 100:.2f}), "
                      f"ours cheaper or equal on {sum(r['ours_cost'] <= r['up_cost'] + 5e-5 for r in group)}")
    print(f"{worse} of {len(rows)} rows where VaultLayer is dearer or attains less; {beyond_noise} where it is dearer "
          f"by more than two standard errors of the paired difference ({time.monotonic() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
