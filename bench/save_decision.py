"""The per-step cost of the save decision under torchrun: what `vaultlayer.should_save(step)` adds to a step.

Under torchrun the ranks agree on every decision with one all-reduce of three integers (vaultlayer/sdk.py). This
bench runs, side by side in one torchrun of N ranks on gloo (CPU), and in alternating rounds:
- `bare`: an all-reduce of three integers alone (the collective's floor on this machine);
- `decision`: `should_save(step)` with the SDK active and an interval that is never due (the agreement, a
  stat of the notice file, the progress throttle);
- `step`: one training step of examples/train_ddp.py's model (forward, backward, DDP's gradient all-reduce,
  AdamW), the unit the decision's cost is measured against.
and prints microseconds per call and the decision's share of a step. On NCCL the decision is the same single
tiny all-reduce; a GPU figure belongs in docs/checkpoint-speed.md when one is at hand.

    python bench/save_decision.py [--ranks 2] [--calls 2000] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def rank_main(calls: int, rounds: int) -> None:
    """One rank: time each variant `calls` times per round, rounds alternated; rank 0 prints the medians."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    sys.path.insert(0, str(REPO / "examples"))
    from train_ddp import VOCAB, TinyTransformer, batch

    import vaultlayer

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = DistributedDataParallel(TinyTransformer())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    flags = torch.zeros(3, dtype=torch.int64)

    def bare(_: int) -> None:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)

    def decision(step: int) -> None:
        vaultlayer.should_save(step)

    def step(_: int) -> None:
        inputs, targets = batch(8)
        loss = nn.functional.cross_entropy(model(inputs).reshape(-1, VOCAB), targets.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    variants = {"bare": (bare, calls), "decision": (decision, calls), "step": (step, max(calls // 20, 20))}
    for function, _ in variants.values():
        function(0)  # warm up
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (function, count) in variants.items():
            dist.barrier()
            began = time.perf_counter()
            for index in range(count):
                function(index)
            samples[name].append((time.perf_counter() - began) / count * 1e6)
    if dist.get_rank() == 0:
        print(json.dumps({name: statistics.median(values) for name, values in samples.items()}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_main:
        rank_main(args.calls, args.rounds)
        return
    with tempfile.TemporaryDirectory(prefix="vl-bench-") as scratch:
        env = {name: value for name, value in os.environ.items() if not name.startswith("VL_")}
        env |= {"VL_STAGING_DIR": f"{scratch}/staging", "VL_CONTROL_DIR": f"{scratch}/control",
                "VL_CHECKPOINT_EVERY": "1000000000", "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc_per_node={args.ranks}", __file__, "--rank-main", "--calls", str(args.calls),
                               "--rounds", str(args.rounds)], env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        sys.exit(f"torchrun failed ({done.returncode}):\n{done.stderr[-3000:]}")
    figures = json.loads(lines[-1])
    figures |= {"ranks": args.ranks, "decision_share_of_step": figures["decision"] / figures["step"],
                "decision_over_bare": figures["decision"] / figures["bare"]}
    if args.json:
        print(json.dumps(figures))
        return
    print(f"{args.ranks} ranks, gloo on CPU, medians of {args.rounds} alternated rounds (microseconds per call)")
    print(f"  all-reduce of 3 integers alone  {figures['bare']:9.1f}")
    print(f"  should_save(step), agreed       {figures['decision']:9.1f}   ({figures['decision_over_bare']:.2f} x the bare all-reduce)")
    print(f"  one training step (train_ddp)   {figures['step']:9.1f}")
    print(f"  the decision's share of a step: {figures['decision_share_of_step']:.1%}")


if __name__ == "__main__":
    main()
