"""How long a checkpoint blocks training: the SDK's background save against a synchronous torch.save.

In one run, for training states of 100 MB and 1 GB (float32 tensors on the CPU, or on the GPU with
`--device cuda`), on file:// and on s3:// (moto in server mode on loopback):

- blocked: the time the training loop cannot go on. SDK: `Checkpointer.save()` returns once the state is
  copied into host memory. Synchronous: `torch.save` straight to the storage URL.
- upload: the agent's `upload_checkpoint` (part size from the file's size, parallel parts, manifest last)
  of the saved files against a raw fsspec `put_file` (s3fs's defaults) of the same files;
- restore: `restore_checkpoint` (manifest check, BLAKE3 of every byte) against a raw fsspec `get_file`.

Ratios: stall_ratio = synchronous blocked / SDK blocked (higher is better); upload_vs_raw and
restore_vs_raw = our throughput / raw throughput (1.0 = as fast as raw). Each is the median of --repeats
(at least 5) pairs taken in alternating order after a warm-up, with the min and max of the pairs beside
it, the page cache dropped (or, --cache warm, filled) before every timed action, and the load average at
the start and end of each row: what the bench cannot hold still, it reports (see `paired` and `Cache`).

    python bench/checkpoint_stall.py [--json] [--sizes-mb 100 1000] [--repeats 5] [--device cpu|cuda]
        [--storage file s3] [--cache cold|warm]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
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


Action = Callable[[], "Callable[[], None] | None"]  # timed; returns its untimed clean-up, if any


def paired(ours: Action, theirs: Action, repeats: int, settle: Callable[[], None]) -> dict:
    """Seconds of each side and the ratio theirs / ours (above 1: ours is faster), from `repeats` pairs.

    One untimed warm-up of each side first (imports, connection pools, first-touch page faults), then pairs
    taken in alternating order (ours then theirs, theirs then ours, ...), so that a drift in the machine's
    load hits both sides alike and neither always runs second. Each pair gives one ratio, measured seconds
    apart; the result is the median of those ratios with their min and max beside it. `settle` runs
    (untimed) before every action: it flushes dirty pages, so the write-back of one action never lands in
    the next one's time, and puts the page cache in the same state for both (see `Cache`).
    """
    def timed(action: Action) -> float:
        settle()
        began = time.perf_counter()
        clean_up = action()
        seconds = time.perf_counter() - began
        if clean_up is not None:
            clean_up()
        return seconds

    timed(ours), timed(theirs)
    pairs = []
    for index in range(repeats):
        if index % 2 == 0:
            ours_s = timed(ours)
            theirs_s = timed(theirs)
        else:
            theirs_s = timed(theirs)
            ours_s = timed(ours)
        pairs.append((ours_s, theirs_s))
    ratios = [theirs_s / ours_s for ours_s, theirs_s in pairs]
    return {
        "ours_s": statistics.median(o for o, _ in pairs),
        "theirs_s": statistics.median(t for _, t in pairs),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }


class Cache:
    """Puts the page cache in one known state before each timed action, without root: every file under the
    scratch directory is fsynced, then either dropped from the cache (`cold`: posix_fadvise DONTNEED, what a
    replacement host restoring from a mounted file system sees) or read back into it (`warm`: what the agent
    sees uploading a save the SDK just wrote). What this cannot reach is reported, not hidden: other
    processes' load, moto's memory, and file systems that ignore the advice (tmpfs keeps every page)."""

    def __init__(self, scratch: Path, mode: str) -> None:
        self.scratch, self.mode = scratch, mode

    def __call__(self) -> None:
        os.sync()
        for parent, _, names in os.walk(self.scratch):
            for name in names:
                try:
                    fd = os.open(os.path.join(parent, name), os.O_RDONLY)
                except OSError:  # gone meanwhile (a clean-up, moto's own files)
                    continue
                try:
                    os.fsync(fd)
                    if self.mode == "cold":
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    else:
                        while os.read(fd, 8 << 20):
                            pass
                finally:
                    os.close(fd)

    def describe(self) -> str:
        fs_type = file_system_type(self.scratch)
        how = ("dropped (fsync, then posix_fadvise DONTNEED)" if self.mode == "cold"
               else "warmed (fsync, then every file read back)")
        if fs_type == "tmpfs" and self.mode == "cold":
            how = "NOT dropped: the scratch directory is on tmpfs, whose pages cannot leave memory"
        return f"{self.mode}: {how}, before every timed action, for files under {self.scratch} ({fs_type})"


def file_system_type(path: Path) -> str:
    """The type of the file system holding `path`, from /proc/mounts (the longest mount point above it)."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "unknown"
    resolved = str(path.resolve())
    above = [(point, kind) for point, kind in mounts
             if resolved == point or resolved.startswith(point.rstrip("/") + "/")]
    return max(above, key=lambda m: len(m[0]))[1] if above else "unknown"


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def start_moto() -> tuple[object, str]:
    from moto.server import ThreadedMotoServer

    # Objects and parts stay in moto's memory instead of spilling to temporary files past ~5 MiB: no disk
    # I/O on the store's side to blur the figures.
    os.environ.setdefault("MOTO_S3_DEFAULT_KEY_BUFFER_SIZE", str(4 << 30))
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    return server, "s3://bench/vl"


def measure(size_mb: int, storage_url: str, scratch: Path, repeats: int, device: str, cache: str) -> dict:
    import fsspec
    import torch

    import vaultlayer
    from vaultlayer import checkpoint, protocol, sdk
    from vaultlayer.pytorch import Checkpointer

    model = training_state(size_mb, device)
    fs, root = fsspec.core.url_to_fs(storage_url)
    fs.makedirs(root, exist_ok=True)
    settle = Cache(scratch.parent, cache)
    load_at_start = load_average()

    # Synchronous torch.save straight to storage: training waits for every byte.
    def synchronous():
        path = f"{root}/sync-{uuid.uuid4().hex}.pt"
        with fs.open(path, "wb") as file:
            torch.save(model.state_dict(), file)
        return lambda: fs.rm_file(path)

    # The SDK: training waits only for the copy into host memory.
    staging, control = scratch / "staging", scratch / "control"
    os.environ.update({protocol.ENV_STAGING_DIR: str(staging), protocol.ENV_CONTROL_DIR: str(control),
                       protocol.ENV_CHECKPOINT_EVERY: "1"})
    sdk._session.cache_clear()
    ckpt = Checkpointer(model)
    steps = itertools.count(1)

    def saved_dirs() -> list[Path]:
        return sorted(p for p in staging.iterdir() if not protocol.is_being_written(p.name))

    def sdk_save():
        assert ckpt.save(next(steps)) == "started"

        def written() -> None:  # untimed: the background write, then only the newest save is kept
            vaultlayer.wait_for_saves()
            for old in saved_dirs()[:-1]:
                shutil.rmtree(old)
        return written

    stall = paired(sdk_save, synchronous, repeats, settle)
    saved = saved_dirs()[-1]
    files = [p for p in saved.iterdir() if p.name != protocol.SAVE_RECORD]
    nbytes = sum(p.stat().st_size for p in files)

    def ours_upload():
        ref = checkpoint.upload_checkpoint(saved, storage_url, f"bench-{uuid.uuid4().hex[:8]}", 1, 1)
        return lambda: fs.rm(fsspec.core.url_to_fs(ref.url)[1], recursive=True)

    def raw_upload():
        target = f"{root}/raw-{uuid.uuid4().hex}"
        fs.makedirs(target, exist_ok=True)
        for path in files:
            fs.put_file(str(path), f"{target}/{path.name}")
        return lambda: fs.rm(target, recursive=True)

    upload = paired(ours_upload, raw_upload, repeats, settle)

    run_id = f"bench-restore-{uuid.uuid4().hex[:8]}"
    ref = checkpoint.upload_checkpoint(saved, storage_url, run_id, 1, 1)

    def ours_restore():
        target = scratch / f"restore-{uuid.uuid4().hex}"
        checkpoint.restore_checkpoint(ref, target)
        return lambda: shutil.rmtree(target)

    def raw_restore():
        target = scratch / f"raw-{uuid.uuid4().hex}"
        target.mkdir()
        for path in files:
            fs.get_file(f"{ref.url}/{path.name}", str(target / path.name))
        return lambda: shutil.rmtree(target)

    restore = paired(ours_restore, raw_restore, repeats, settle)
    shutil.rmtree(staging, ignore_errors=True)
    fs.rm(fsspec.core.url_to_fs(ref.url)[1], recursive=True)
    mb = nbytes / 2**20
    return {
        "size_mb": round(mb),
        "sync_blocked_s": round(stall["theirs_s"], 4),
        "sdk_blocked_s": round(stall["ours_s"], 4),
        "stall_ratio": round(stall["ratio"], 1),
        "stall_ratio_min": round(stall["ratio_min"], 1),
        "stall_ratio_max": round(stall["ratio_max"], 1),
        "upload_mb_s": round(mb / upload["ours_s"], 1),
        "raw_upload_mb_s": round(mb / upload["theirs_s"], 1),
        "upload_vs_raw": round(upload["ratio"], 2),
        "upload_vs_raw_min": round(upload["ratio_min"], 2),
        "upload_vs_raw_max": round(upload["ratio_max"], 2),
        "restore_mb_s": round(mb / restore["ours_s"], 1),
        "raw_restore_mb_s": round(mb / restore["theirs_s"], 1),
        "restore_vs_raw": round(restore["ratio"], 2),
        "restore_vs_raw_min": round(restore["ratio_min"], 2),
        "restore_vs_raw_max": round(restore["ratio_max"], 2),
        "load_average": [load_at_start, load_average()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--repeats", type=int, default=5, help="pairs per ratio after the warm-up (at least 5)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda where a GPU is present")
    parser.add_argument("--storage", nargs="+", default=["file", "s3"], choices=["file", "s3"])
    parser.add_argument("--cache", default="cold", choices=["cold", "warm"],
                        help="page cache before each timed action: dropped (default) or filled")
    args = parser.parse_args()
    if args.repeats < 5:
        parser.error("--repeats: at least 5 pairs; a median of fewer moves with the machine's load")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device here; run on a GPU machine or use --device cpu")

    load_at_start = load_average()
    rows = []
    moto = None
    with tempfile.TemporaryDirectory(prefix="vl-stall-") as scratch_dir:
        scratch = Path(scratch_dir)
        page_cache = Cache(scratch, args.cache).describe()
        try:
            urls = {}
            if "file" in args.storage:
                urls["file"] = (scratch / "storage").as_uri()
            if "s3" in args.storage:
                moto, urls["s3"] = start_moto()
            for name, url in urls.items():
                for size in args.sizes_mb:
                    row = measure(size, url, scratch / f"{name}-{size}", args.repeats, args.device, args.cache)
                    rows.append({"storage": name, "device": args.device, **row})
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # kept should a later row fail
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
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "load_average_start": load_at_start,
        "load_average_end": load_average(),
        "page_cache": page_cache,
        "rows": rows,
    }
    if args.json:
        print(json.dumps(summary))
        return

    def spread(r: dict, key: str) -> str:
        return f"{r[key]} ({r[key + '_min']}-{r[key + '_max']})"

    print(f"medians of {args.repeats} alternating pairs after a warm-up, (min-max) of the pairs beside each;"
          f" {summary['cpus']} CPUs, load average (1, 5, 15 min) {load_at_start} at start,"
          f" {summary['load_average_end']} at end; page cache {page_cache}")
    header = ("storage", "MB", "sync blocked s", "SDK blocked s", "stall ratio", "upload MB/s (raw)",
              "upload/raw", "restore MB/s (raw)", "restore/raw", "load average (start, end)")
    print(" | ".join(header))
    for r in rows:
        print(" | ".join(str(x) for x in (
            r["storage"], r["size_mb"], r["sync_blocked_s"], r["sdk_blocked_s"], spread(r, "stall_ratio"),
            f"{r['upload_mb_s']} ({r['raw_upload_mb_s']})", spread(r, "upload_vs_raw"),
            f"{r['restore_mb_s']} ({r['raw_restore_mb_s']})", spread(r, "restore_vs_raw"),
            f"{r['load_average'][0][0]}, {r['load_average'][1][0]}")))
    print(f"stall_ratio_file_1gb={summary['stall_ratio_file_1gb']} stall_ratio_s3_1gb={summary['stall_ratio_s3_1gb']}"
          f" upload_vs_raw={summary['upload_vs_raw']} restore_vs_raw={summary['restore_vs_raw']}")


if __name__ == "__main__":
    main()
