"""Two ranks with a save decision to agree on, where only rank 0 sees the reclaim notice (tests/test_distributed.py).

Rank 0's control directory holds a notice from the start; rank 1's holds none, as if the notice landed after
rank 1 had already looked. Without one decision for all ranks, rank 0 would save alone and wait for rank 1 in
the next collective while rank 1 trains on: a save that never completes. Each rank writes its decisions to
decisions-<rank>.json (one file each: the ranks' prints would interleave on the shared stdout).
"""

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank = dist.get_rank()
control = Path(sys.argv[1]) / f"control-{rank}"
control.mkdir(parents=True, exist_ok=True)
if rank == 0:
    (control / "notice.json").write_text(json.dumps({"id": "n-1", "deadline": time.time(), "kind": "test"}))
os.environ["VL_CONTROL_DIR"] = str(control)

import vaultlayer  # noqa: E402 - after this rank's control directory is set

saved = []
for step in range(1, 8):
    tensor = torch.ones(1)
    dist.all_reduce(tensor)  # training's own collective, every step
    if vaultlayer.should_save(step):
        with vaultlayer.save(step) as directory:
            (directory / f"rank-{rank}.txt").write_text(str(step))
        saved.append(step)
(Path(sys.argv[1]) / f"decisions-{rank}.json").write_text(json.dumps({"rank": rank, "saved": saved}))

dist.destroy_process_group()
