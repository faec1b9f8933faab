"""What the first save of a host agent's process costs with and without the storage client opened ahead of it.

A reclaim notice may come before an attempt has stored anything, and then its emergency save is the agent's
first use of storage: without `checkpoint.connect` at the attempt's start (activities/host.py) that upload also
pays the backend's imports, its client and its first connection. For each storage (file://, moto's S3 on
loopback, fake-gcs-server), in one run, fresh processes that import what an agent has imported time their
first `upload_checkpoint` of a small save: cold (nothing opened before) against connected (`checkpoint.connect`
first, untimed). Each figure is the median of --repeats pairs taken in alternating order, min and max beside
it; cold_vs_connected = cold / connected (higher: more that the connection spares an emergency save).

    python bench/first_save.py [--json] [--repeats 7] [--storage file s3 gs]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from checkpoint_stall import load_average, start_moto

REPO = Path(__file__).resolve().parent.parent

# One agent-like process: the agent's imports, a save of two files, then the timed first upload.
CHILD = """
import os, sys, tempfile, time
from pathlib import Path
import activities.host
from vaultlayer import checkpoint
url, connect = sys.argv[1], sys.argv[2] == "connected"
save = Path(tempfile.mkdtemp())
(save / "model.pt").write_bytes(os.urandom(1 << 20))
(save / "optimizer.pt").write_bytes(os.urandom(2 << 20))
if connect:
    checkpoint.connect(url)
began = time.monotonic()
checkpoint.upload_checkpoint(save, url, "bench-run", 1, int(time.time() * 1000) % 10**9)
print(time.monotonic() - began)
"""


def first_upload_seconds(url: str, mode: str) -> float:
    done = subprocess.run([sys.executable, "-c", CHILD, url, mode], cwd=REPO, capture_output=True, text=True,
                          check=True, env=os.environ | {"PYTHONPATH": str(REPO)})
    return float(done.stdout.split()[-1])


def measure(url: str, repeats: int) -> dict:
    cold, connected = [], []
    for pair in range(repeats):
        for mode in (("cold", "connected") if pair % 2 == 0 else ("connected", "cold")):
            (cold if mode == "cold" else connected).append(first_upload_seconds(url, mode))
    ratios = [c / w for c, w in zip(cold, connected)]
    return {"cold_s": statistics.median(cold), "connected_s": statistics.median(connected),
            "cold_vs_connected": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}


def gcs_url(scratch: Path):
    sys.path.insert(0, str(REPO))
    from tests.object_storage import GcsServer

    (scratch / "gcs").mkdir()
    server = GcsServer(scratch / "gcs" / "root")
    server.start()
    os.environ.update(STORAGE_EMULATOR_HOST=server.url, GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
    return server, server.new_bucket_url()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--storage", nargs="+", choices=["file", "s3", "gs"], default=["file", "s3", "gs"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    rows, servers = [], []
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        urls = {"file": (scratch / "store").as_uri()}
        try:
            if "s3" in args.storage:
                logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
                moto, urls["s3"] = start_moto()
                servers.append(moto)
            if "gs" in args.storage:
                gcs, urls["gs"] = gcs_url(scratch)
                servers.append(gcs)
            for storage in args.storage:
                before = load_average()
                rows.append({"storage": storage, **measure(urls[storage], args.repeats),
                             "load": [before, load_average()]})
        finally:
            for server in servers:
                server.stop()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"first upload of a 3 MiB save in a fresh agent-like process, median of {args.repeats} pairs")
    print(f"{'storage':8} {'cold s':>8} {'connected s':>12} {'cold/connected':>15} {'(min-max)':>12}  load 1m")
    for r in rows:
        print(f"{r['storage']:8} {r['cold_s']:8.3f} {r['connected_s']:12.3f} {r['cold_vs_connected']:15.1f} "
              f"{r['ratio_min']:5.1f}-{r['ratio_max']:<5.1f}  {r['load'][0][0]}-{r['load'][1][0]}")


if __name__ == "__main__":
    main()
