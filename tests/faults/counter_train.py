"""A training script without torch, for fault tests that need many short attempts.

Its "weights" are floats that every step updates from a seeded `random.Random`, whose state travels in the
checkpoint with them, so a resume that lost or repeated a step, or restored the wrong RNG state, ends
with different numbers. `--out` gets the weights as exact hex floats: equal files, bit-identical weights.
Uses only the framework-free SDK (`vaultlayer.resume/should_save/save`); plainly, without `vl`, it just runs.

    python tests/faults/counter_train.py --steps 100 --out /tmp/counter.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import vaultlayer

WIDTH = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--step-time", type=float, default=0.0, help="pad each step to at least this many seconds")
    args = parser.parse_args()

    rng, weights, start = random.Random(0), [0.0] * WIDTH, 0
    if restored := vaultlayer.resume():
        state = json.loads((restored.path / "state.json").read_text())
        start, weights = state["step"], [float.fromhex(w) for w in state["weights"]]
        version, internal, gauss_next = state["rng"]
        rng.setstate((version, tuple(internal), gauss_next))
        print(f"resuming at step {start}", flush=True)

    for step in range(start, args.steps):
        began = time.monotonic()
        weights = [0.9 * w + rng.gauss(0.0, 1.0) for w in weights]
        time.sleep(max(0.0, args.step_time - (time.monotonic() - began)))
        if vaultlayer.should_save(step + 1):
            with vaultlayer.save(step + 1) as directory:
                state = {"step": step + 1, "weights": [w.hex() for w in weights], "rng": rng.getstate()}
                (directory / "state.json").write_text(json.dumps(state))

    partial = args.out.with_name(f".{args.out.name}.partial-{os.getpid()}")
    partial.write_text(json.dumps({"steps": args.steps, "weights": [w.hex() for w in weights]}))
    os.replace(partial, args.out)
    print(f"done: {args.steps} steps", flush=True)


if __name__ == "__main__":
    main()
