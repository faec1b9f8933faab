"""How long a checkpoint blocks training: the SDK's background save against a synchronous torch.save.

In one run, for training states of 100 MB and 1 GB (float32 tensors on the CPU, or on the GPU with
`--device cuda`), on file:// and on s3:// (moto in server mode on loopback):

- blocked: the time the training loop cannot go on. SDK: `Checkpointer.save()` returns once the state is
  copied into host memory. Synchronous: `torch.save` straight to the storage URL.
- upload: the agent's `upload_checkpoint` (hash, parallel/multipart put, manifest last) of the saved
  files against a raw fsspec `put` of the same files;
- restore: `restore_checkpoint` (manifest check, sha256 of every byte) against a raw fsspec `get`.

Ratios, measured side by side in this run: stall_ratio = synchronous blocked / SDK blocked (higher is
better); upload_vs_raw and restore_vs_raw = our throughput / raw throughput (1.0 = as fast as raw).

    python bench/checkpoint_stall.py [--json] [--sizes-mb 100 1000] [--repeats 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def training_state(size_mb: int, device: str):
    import torch

    tensor_mb = 16
    count = max(1, size_mb // tensor_mb)
    elements = min(size_mb, tensor_mb) * 1024 * 1024 // 4
    model = torch.nn.ParameterList(
        [torch.nn.Parameter(torch.randn(elements, device=device)) for _ in range(count)]
    )
    return model


def median_seconds(action, repeats: int) -> float:
    return side_by_side({"only": action}, repeats)["only"]


def side_by_side(actions: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each action, taken in turns so that drift in the machine's load hits all alike.

    Dirty pages are flushed (untimed) before each action: otherwise the write-back of what the previous
    action wrote lands in the next one's time, and whichever runs second looks slower.
    """
    times: dict[str, list[float]] = {name: [] for name in actions}
    for _ in range(repeats):
        for name, action in actions.items():
            os.sync()
            began = time.perf_counter()
            action()
            times[name].append(time.perf_counter() - began)
    return {name: statistics.median(values) for name, values in times.items()}


def start_moto() -> tuple[object, str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    return server, "s3://bench/vl"


def measure(size_mb: int, storage_url: str, scratch: Path, repeats: int, device: str) -> dict:
    import fsspec
    import torch

    import vaultlayer
    from vaultlayer import checkpoint, protocol, sdk
    from vaultlayer.pytorch import Checkpointer

    model = training_state(size_mb, device)
    fs, root = fsspec.core.url_to_fs(storage_url)
    fs.makedirs(root, exist_ok=True)

    # Synchronous torch.save straight to storage: training waits for every byte.
    def synchronous() -> None:
        with fs.open(f"{root}/sync-{uuid.uuid4().hex}.pt", "wb") as file:
            torch.save(model.state_dict(), file)

    sync_blocked = median_seconds(synchronous, repeats)

    # The SDK: training waits only for the copy into host memory.
    staging, control = scratch / "staging", scratch / "control"
    os.environ.update({protocol.ENV_STAGING_DIR: str(staging), protocol.ENV_CONTROL_DIR: str(control),
                       protocol.ENV_CHECKPOINT_EVERY: "1"})
    sdk._session.cache_clear()
    ckpt = Checkpointer(model)
    blocked = []
    for step in range(1, repeats + 1):
        os.sync()
        began = time.perf_counter()
        assert ckpt.save(step) == "started"
        blocked.append(time.perf_counter() - began)
        vaultlayer.wait_for_saves()
    sdk_blocked = statistics.median(blocked)
    saved = sorted(p for p in staging.iterdir() if not protocol.is_being_written(p.name))[-1]
    files = [p for p in saved.iterdir() if p.name != protocol.SAVE_RECORD]
    nbytes = sum(p.stat().st_size for p in files)

    def ours_upload() -> None:
        checkpoint.upload_checkpoint(saved, storage_url, f"bench-{uuid.uuid4().hex[:8]}", 1, 1)

    def raw_upload() -> None:
        target = f"{root}/raw-{uuid.uuid4().hex}"
        fs.makedirs(target, exist_ok=True)
        for path in files:
            fs.put_file(str(path), f"{target}/{path.name}")

    upload = side_by_side({"ours": ours_upload, "raw": raw_upload}, repeats)
    upload_ours, upload_raw = upload["ours"], upload["raw"]

    run_id = f"bench-restore-{uuid.uuid4().hex[:8]}"
    ref = checkpoint.upload_checkpoint(saved, storage_url, run_id, 1, 1)

    def ours_restore() -> None:
        target = scratch / f"restore-{uuid.uuid4().hex}"
        checkpoint.restore_checkpoint(ref, target)
        shutil.rmtree(target)

    def raw_restore() -> None:
        target = scratch / f"raw-{uuid.uuid4().hex}"
        target.mkdir()
        for path in files:
            fs.get_file(f"{ref.url}/{path.name}", str(target / path.name))
        shutil.rmtree(target)

    restore = side_by_side({"ours": ours_restore, "raw": raw_restore}, repeats)
    restore_ours, restore_raw = restore["ours"], restore["raw"]
    shutil.rmtree(staging, ignore_errors=True)
    return {
        "size_mb": round(nbytes / 2**20),
        "sync_blocked_s": round(sync_blocked, 4),
        "sdk_blocked_s": round(sdk_blocked, 4),
        "stall_ratio": round(sync_blocked / sdk_blocked, 1),
        "upload_mb_s": round(nbytes / 2**20 / upload_ours, 1),
        "raw_upload_mb_s": round(nbytes / 2**20 / upload_raw, 1),
        "upload_vs_raw": round(upload_raw / upload_ours, 2),
        "restore_mb_s": round(nbytes / 2**20 / restore_ours, 1),
        "raw_restore_mb_s": round(nbytes / 2**20 / restore_raw, 1),
        "restore_vs_raw": round(restore_raw / restore_ours, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda where a GPU is present")
    parser.add_argument("--storage", nargs="+", default=["file", "s3"], choices=["file", "s3"])
    args = parser.parse_args()
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device here; run on a GPU machine or use --device cpu")

    rows = []
    moto = None
    with tempfile.TemporaryDirectory(prefix="vl-stall-") as scratch_dir:
        scratch = Path(scratch_dir)
        try:
            urls = {}
            if "file" in args.storage:
                urls["file"] = (scratch / "storage").as_uri()
            if "s3" in args.storage:
                moto, urls["s3"] = start_moto()
            for name, url in urls.items():
                for size in args.sizes_mb:
                    row = measure(size, url, scratch / f"{name}-{size}", args.repeats, args.device)
                    rows.append({"storage": name, "device": args.device, **row})
        finally:
            if moto is not None:
                moto.stop()

    def pick(storage: str, key: str) -> float | None:
        largest = [r for r in rows if r["storage"] == storage]
        return max(largest, key=lambda r: r["size_mb"])[key] if largest else None

    summary = {
        "stall_ratio_file_1gb": pick("file", "stall_ratio"),
        "stall_ratio_s3_1gb": pick("s3", "stall_ratio"),
        "upload_vs_raw": min(r["upload_vs_raw"] for r in rows),
        "restore_vs_raw": min(r["restore_vs_raw"] for r in rows),
        "rows": rows,
    }
    if args.json:
        print(json.dumps(summary))
        return
    header = ("storage", "MB", "sync blocked s", "SDK blocked s", "stall ratio", "upload MB/s (raw)",
              "upload/raw", "restore MB/s (raw)", "restore/raw")
    print(" | ".join(header))
    for r in rows:
        print(" | ".join(str(x) for x in (
            r["storage"], r["size_mb"], r["sync_blocked_s"], r["sdk_blocked_s"], r["stall_ratio"],
            f"{r['upload_mb_s']} ({r['raw_upload_mb_s']})", r["upload_vs_raw"],
            f"{r['restore_mb_s']} ({r['raw_restore_mb_s']})", r["restore_vs_raw"])))
    print(f"stall_ratio_file_1gb={summary['stall_ratio_file_1gb']} stall_ratio_s3_1gb={summary['stall_ratio_s3_1gb']}"
          f" upload_vs_raw={summary['upload_vs_raw']} restore_vs_raw={summary['restore_vs_raw']}")


if __name__ == "__main__":
    main()
