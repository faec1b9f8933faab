"""The checkpoint format on real object storage over HTTP (moto's S3 server, fake-gcs-server), how each
backend finds its endpoint, retention, the listing `vl checkpoints` shows, and zero-code snapshots."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from activities.snapshots import DirectorySnapshots, restore_directory
from tests.conftest import REPO
from tests.object_storage import storage_fs
from vaultlayer import checkpoint
from vaultlayer.checkpoint import (
    MANIFEST_NAME,
    CheckpointState,
    checkpoint_name,
    choose_checkpoint,
    classify_checkpoints,
    describe_checkpoints,
    list_checkpoints,
    prune_checkpoints,
    quarantine_records,
    restore_checkpoint,
    upload_checkpoint,
)
from vaultlayer.protocol import SAVE_RECORD

RUN = "run-1"
OBJECT_STORES = pytest.mark.parametrize("storage_url", ["s3", "gs"], indirect=True)


def staged(tmp_path: Path, step: int, attempt: int = 1) -> Path:
    local = tmp_path / f"staged-{step}-{attempt}"
    (local / "nested").mkdir(parents=True)
    (local / "model.pt").write_bytes(f"model at {step}".encode() * 100)
    (local / "nested" / "rng.bin").write_bytes(bytes(range(256)) * 7)
    (local / SAVE_RECORD).write_text(json.dumps({"step": step}))
    return local


def upload(tmp_path: Path, url: str, step: int, attempt: int = 1):
    return upload_checkpoint(staged(tmp_path, step, attempt), url, RUN, attempt, step)


def remote_dir(url: str, step: int, attempt: int = 1) -> str:
    fs, root = storage_fs(url)
    return f"{root}/{RUN}/checkpoints/{checkpoint_name(step, attempt)}"


@OBJECT_STORES
def test_roundtrip_on_object_storage(tmp_path, storage_url):
    upload(tmp_path, storage_url, 10)
    newest = upload(tmp_path, storage_url, 20)
    assert [name for name, _, _ in list_checkpoints(storage_url, RUN)] == ["000000000020-a1", "000000000010-a1"]
    assert choose_checkpoint(storage_url, RUN, {}).chosen == newest
    restore_checkpoint(newest, tmp_path / "dest")
    assert (tmp_path / "dest" / "model.pt").read_bytes() == b"model at 20" * 100
    assert (tmp_path / "dest" / "nested" / "rng.bin").read_bytes() == bytes(range(256)) * 7
    fs, _ = storage_fs(storage_url)
    assert sorted(p.rsplit("/", 1)[1] for p in fs.find(remote_dir(storage_url, 20))) == \
        [MANIFEST_NAME, "model.pt", "rng.bin"]  # the manifest is written in place: no temporary left behind


def corrupt_remote(url: str, case: str) -> None:
    fs, _ = storage_fs(url)
    directory = remote_dir(url, 20)
    if case == "truncated file":
        fs.pipe_file(f"{directory}/nested/rng.bin", b"short")
    elif case == "flipped byte":
        data = bytearray(fs.cat_file(f"{directory}/model.pt"))
        data[len(data) // 2] ^= 0x01
        fs.pipe_file(f"{directory}/model.pt", bytes(data))
    elif case == "missing file":
        fs.rm_file(f"{directory}/nested/rng.bin")
    elif case == "missing manifest":
        fs.rm_file(f"{directory}/{MANIFEST_NAME}")
    elif case == "unparsable manifest":
        fs.pipe_file(f"{directory}/{MANIFEST_NAME}", b"{not json")
    elif case == "manifest of another run":
        manifest = json.loads(fs.cat_file(f"{directory}/{MANIFEST_NAME}"))
        fs.pipe_file(f"{directory}/{MANIFEST_NAME}", json.dumps(manifest | {"run_id": "other-run"}).encode())
    fs.invalidate_cache()


CORRUPTIONS = {
    "truncated file": "nested/rng.bin: size 5 bytes",
    "flipped byte": "model.pt: blake3",
    "missing file": "nested/rng.bin: missing",
    "missing manifest": "no MANIFEST.json",
    "unparsable manifest": "unparsable MANIFEST.json",
    "manifest of another run": "run_id 'other-run'",
}


@OBJECT_STORES
@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corruption_on_object_storage_is_reported_quarantined_and_skipped(tmp_path, storage_url, case):
    good = upload(tmp_path, storage_url, 10)
    upload(tmp_path, storage_url, 20)
    corrupt_remote(storage_url, case)
    reason = CORRUPTIONS[case]

    # `vl checkpoints --verify` finds it before any run looked (ended attempt: fence 1 -> 20).
    [newest, older] = describe_checkpoints(storage_url, RUN, {1: 20}, ended=[1], verify=True)
    assert (newest.state, older.state) == (CheckpointState.BAD, CheckpointState.COMPLETE)
    assert reason in newest.reason

    result = choose_checkpoint(storage_url, RUN, {1: 20})
    assert result.chosen == good
    assert [r.name for r in result.rejected] == ["000000000020-a1"] and reason in result.rejected[0].reason
    assert [r.name for r in quarantine_records(storage_url, RUN)] == ["000000000020-a1"]
    # Quarantined: listed as bad without re-reading its bytes.
    assert reason in describe_checkpoints(storage_url, RUN, {1: 20}, ended=[1])[0].reason


def test_listing_tells_uploads_in_progress_from_partial_and_fenced_ones(tmp_path, storage_url):
    upload(tmp_path, storage_url, 10, attempt=1)
    upload(tmp_path, storage_url, 30, attempt=1)  # after attempt 1 was written off at step 10
    upload(tmp_path, storage_url, 20, attempt=2)
    upload(tmp_path, storage_url, 40, attempt=2)
    fs, _ = storage_fs(storage_url)
    fs.rm_file(f"{remote_dir(storage_url, 40, 2)}/{MANIFEST_NAME}")  # attempt 2 is still uploading it

    listed = {item.name: item for item in describe_checkpoints(storage_url, RUN, fences={1: 10}, ended=[1])}
    assert [name for name in listed] == ["000000000040-a2", "000000000030-a1", "000000000020-a2", "000000000010-a1"]
    assert listed["000000000040-a2"].state == CheckpointState.UPLOADING
    assert (listed["000000000030-a1"].state, listed["000000000030-a1"].reason) == \
        (CheckpointState.BAD, "fenced: attempt 1 ended at step 10")
    assert listed["000000000020-a2"].state == CheckpointState.COMPLETE
    assert listed["000000000020-a2"].size == len(b"model at 20" * 100) + 256 * 7 + \
        fs.size(f"{remote_dir(storage_url, 20, 2)}/{MANIFEST_NAME}")
    assert listed["000000000020-a2"].created_at is not None

    # Once attempt 2 has ended, the same directory is an upload that will never finish: its host is gone
    # (no fence), or it was written off below this step (fenced).
    after = describe_checkpoints(storage_url, RUN, fences={1: 10}, ended=[1, 2])[0]
    assert (after.state, after.reason) == (CheckpointState.BAD, "no MANIFEST.json: the upload never finished")
    after = describe_checkpoints(storage_url, RUN, fences={1: 10, 2: 20}, ended=[1, 2])[0]
    assert (after.state, after.reason) == (CheckpointState.BAD, "fenced: attempt 2 ended at step 20")


@pytest.mark.parametrize("storage_url", ["file", "s3"], indirect=True)
def test_retention_keeps_the_newest_and_the_protected_and_removes_dead_partials(tmp_path, storage_url):
    for step in (10, 20, 30, 35):
        upload(tmp_path, storage_url, step, attempt=1)
    fs, root = storage_fs(storage_url)
    fs.pipe_file(f"{remote_dir(storage_url, 35)}/model.pt", b"bit rot")
    assert choose_checkpoint(storage_url, RUN, {}).chosen.step == 30  # 35-a1 quarantined: kept as evidence
    upload(tmp_path, storage_url, 40, attempt=1)
    upload(tmp_path, storage_url, 50, attempt=1)  # a zombie of attempt 1 (fenced at 40): evidence, kept
    upload(tmp_path, storage_url, 60, attempt=1)  # ... and one it never finished
    for step in (50, 60, 70, 80):
        upload(tmp_path, storage_url, step, attempt=2)
    for name in ("000000000060-a1", "000000000080-a2"):  # attempt 2 is still uploading 80
        fs.rm_file(f"{root}/{RUN}/checkpoints/{name}/{MANIFEST_NAME}")
    # 20-a1 is what attempt 2 resumed from; attempt 1 ended at 40.
    removed = prune_checkpoints(storage_url, RUN, keep=2, fences={1: 40}, reported={1: 40},
                                protect=["000000000020-a1"])

    assert sorted(removed) == ["000000000010-a1", "000000000030-a1", "000000000040-a1", "000000000050-a2",
                               "000000000060-a1"]
    assert [name for name, _, _ in list_checkpoints(storage_url, RUN)] == [
        "000000000080-a2",  # in flight
        "000000000070-a2", "000000000060-a2",  # the newest two complete
        "000000000050-a1",  # fenced
        "000000000035-a1",  # quarantined
        "000000000020-a1",  # protected
    ]
    assert prune_checkpoints(storage_url, RUN, keep=2, fences={1: 40}, reported={1: 40},
                             protect=["000000000020-a1"]) == []


def test_retention_removes_the_partial_of_a_host_that_died_unfenced(tmp_path, storage_url):
    """A host the provider confirmed gone gets no fence; what it reported stored still bounds its uploads."""
    for step in (10, 20, 30):
        upload(tmp_path, storage_url, step)
    fs, _ = storage_fs(storage_url)
    fs.rm_file(f"{remote_dir(storage_url, 30)}/{MANIFEST_NAME}")  # it died committing 30, having reported 20
    assert prune_checkpoints(storage_url, RUN, keep=3, fences={}, reported={1: 20}) == ["000000000030-a1"]
    assert prune_checkpoints(storage_url, RUN, keep=3, fences={}, reported={}) == [], "attempt 1 may still run"


def test_retention_keeps_a_lost_manifest_below_the_fence_for_verification_to_report(tmp_path, storage_url):
    upload(tmp_path, storage_url, 10)
    upload(tmp_path, storage_url, 20)
    fs, root = storage_fs(storage_url)
    fs.rm_file(f"{remote_dir(storage_url, 20)}/{MANIFEST_NAME}")  # complete once: attempt 1 reported 20 stored
    assert prune_checkpoints(storage_url, RUN, keep=3, fences={1: 20}, reported={1: 20}) == []
    result = choose_checkpoint(storage_url, RUN, {1: 20})
    assert result.chosen.step == 10 and "no MANIFEST.json" in result.rejected[0].reason


def run_python(code: str, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


LIST = "from vaultlayer import checkpoint; print(checkpoint.list_checkpoints({url!r}, 'run-1')[0][0])"


@pytest.mark.parametrize("storage_url", ["s3"], indirect=True)
@pytest.mark.parametrize("how", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS config file", "fsspec config"])
def test_s3_endpoint_comes_from_the_usual_places(tmp_path, storage_url, s3_server, how):
    upload(tmp_path, storage_url, 10)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_ENDPOINT_URL", "FSSPEC_"))}
    env["AWS_CONFIG_FILE"] = str(tmp_path / "no-aws-config")
    if how == "AWS config file":
        (tmp_path / "aws-config").write_text(f"[default]\nendpoint_url = {s3_server.url}\n")
        env["AWS_CONFIG_FILE"] = str(tmp_path / "aws-config")
    elif how == "fsspec config":
        env["FSSPEC_S3_ENDPOINT_URL"] = s3_server.url
    else:
        env[how] = s3_server.url
    assert run_python(LIST.format(url=storage_url), env) == "000000000010-a1"


@pytest.mark.parametrize("storage_url", ["gs"], indirect=True)
def test_gcs_emulator_comes_from_storage_emulator_host_alone(tmp_path, storage_url, gcs_server):
    upload(tmp_path, storage_url, 10)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GCSFS_")}
    code = LIST.format(url=storage_url) + textwrap.dedent(f"""
        from fsspec.core import url_to_fs
        print(type(url_to_fs({storage_url!r})[0]).__name__)
    """)
    # Plain JSON API: without VaultLayer's default gcsfs would take its gRPC-first class, slow on an emulator.
    assert run_python(code, env).splitlines() == ["000000000010-a1", "GCSFileSystem"]


def test_snapshots_wait_for_the_directory_to_settle_and_skip_what_is_stored(tmp_path):
    directory, staging = tmp_path / "ckpts", tmp_path / "staging"
    staging.mkdir()
    snapshots = DirectorySnapshots(directory, staging, step=7, restored=False)
    assert not snapshots.snapshot_if_settled(0.0), "nothing to store in a missing directory"
    directory.mkdir()
    (directory / "last.ckpt").write_bytes(b"one")
    assert not snapshots.snapshot_if_settled(3600.0), "a save may be in progress: wait for it to settle"
    assert snapshots.snapshot_if_settled(0.0)
    assert not snapshots.snapshot_if_settled(0.0), "unchanged since the last snapshot"
    (directory / "sub").mkdir()
    (directory / "sub" / "epoch=1.ckpt").write_bytes(b"two")
    assert snapshots.snapshot_if_settled(0.0, notice_id="n-1")
    assert snapshots.covered_notice == "n-1"

    saves = sorted(p for p in staging.iterdir())
    assert [p.name.split("-")[0] for p in saves] == ["000000000008", "000000000009"]
    records = [json.loads((p / SAVE_RECORD).read_text()) for p in saves]
    assert [(r["step"], r["emergency"], r["notice_id"]) for r in records] == [(8, False, None), (9, True, "n-1")]
    assert (saves[1] / "sub" / "epoch=1.ckpt").read_bytes() == b"two"
    assert snapshots.step == 9


def test_a_notice_with_nothing_new_is_covered_without_a_snapshot(tmp_path):
    directory, staging = tmp_path / "ckpts", tmp_path / "staging"
    directory.mkdir()
    staging.mkdir()
    (directory / "last.ckpt").write_bytes(b"restored")
    snapshots = DirectorySnapshots(directory, staging, step=3, restored=True)
    assert not snapshots.snapshot_if_settled(0.0, notice_id="n-2")
    assert snapshots.covered_notice == "n-2" and list(staging.iterdir()) == []


def test_restore_directory_replaces_what_is_there(tmp_path, storage_url):
    ref = upload(tmp_path, storage_url, 10)
    directory = tmp_path / "ckpts"
    directory.mkdir()
    (directory / "newer-than-the-checkpoint.ckpt").write_bytes(b"lost with the host")
    restore_directory(ref, directory)
    assert sorted(str(p.relative_to(directory)) for p in directory.rglob("*")) == \
        ["model.pt", "nested", "nested/rng.bin"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpts")] == []


@pytest.mark.parametrize("storage_url", ["file", "s3"], indirect=True)
@pytest.mark.parametrize("unsafe", ["../outside.ckpt", "/tmp/vl-zero-code-outside.ckpt"])
def test_restore_directory_refuses_an_unsafe_manifest_and_leaves_the_directory_alone(tmp_path, storage_url, unsafe):
    ref = upload(tmp_path, storage_url, 10)
    fs, _ = storage_fs(storage_url)
    manifest_path = f"{remote_dir(storage_url, 10)}/{MANIFEST_NAME}"
    manifest = json.loads(fs.cat_file(manifest_path))
    manifest["files"].append({"path": unsafe, "size": 1, "sha256": "0" * 64})
    forged = json.dumps(manifest).encode()
    fs.pipe_file(manifest_path, forged)
    ref = ref.model_copy(update={"manifest_sha256": hashlib.sha256(forged).hexdigest()})  # as if verified
    directory = tmp_path / "work" / "ckpts"
    directory.mkdir(parents=True)
    (directory / "last.ckpt").write_bytes(b"the script's own")

    with pytest.raises(checkpoint.CheckpointError, match="refusing to restore"):
        restore_directory(ref, directory)
    assert [p.name for p in directory.iterdir()] == ["last.ckpt"]
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["ckpts"]
    assert not Path("/tmp/vl-zero-code-outside.ckpt").exists()


def test_a_directory_many_ranks_write_is_snapshotted_only_once_every_rank_has_settled(tmp_path, monkeypatch):
    """Zero-code mode under torchrun: rank 0's shard is complete while rank 1 still writes its own; no snapshot is
    taken until rank 1's file has stopped changing too, and then one holds both (docs/distributed.md)."""
    import activities.snapshots

    clock = [100.0]
    monkeypatch.setattr(activities.snapshots.time, "monotonic", lambda: clock[0])
    directory, staging = tmp_path / "ckpts", tmp_path / "staging"
    (directory / "step-10").mkdir(parents=True)
    staging.mkdir()
    snapshots = DirectorySnapshots(directory, staging, step=0, restored=False)
    (directory / "step-10" / "rank-0.distcp").write_bytes(b"shard 0")
    rank_1 = directory / "step-10" / "rank-1.distcp"
    for chunk in range(5):  # rank 1 writes on, a chunk per second of the settle time
        with rank_1.open("ab") as file:
            file.write(b"shard 1 part %d " % chunk)
        assert not snapshots.snapshot_if_settled(1.0), "rank 1's file is still being written"
        clock[0] += 0.9
    assert not snapshots.snapshot_if_settled(1.0)
    clock[0] += 1.0
    assert snapshots.snapshot_if_settled(1.0)
    [save] = list(staging.iterdir())
    assert (save / "step-10" / "rank-0.distcp").read_bytes() == b"shard 0"
    assert (save / "step-10" / "rank-1.distcp").read_bytes() == rank_1.read_bytes()


@pytest.mark.parametrize("storage_url", ["s3"], indirect=True)
def test_a_file_rewritten_behind_a_cached_listing_is_read_afresh_and_its_checkpoint_rejected(tmp_path, storage_url):
    """A file another process rewrote after this one listed it is read as it is now and judged. Found by the chaos
    soak, `python bench/chaos.py --minutes 30 --seed 4`: at 785.7 s `reclaim-no-notice slot 2` took the host of
    chaos-25 (s3), at 791.1 s `corrupt-newest slot 2` rewrote its 000000000050-a1/state.json, and the worker's
    verification, opening it with the ETag of its cached listing (If-Match), got FileExpired on every read until
    the run failed. Without the fresh listing, this fails the same way."""
    from fsspec.core import url_to_fs

    older = upload(tmp_path, storage_url, 10)
    upload(tmp_path, storage_url, 20)
    path = f"{remote_dir(storage_url, 20)}/model.pt"  # remote_dir clears the cache: before the listing, not after
    assert choose_checkpoint(storage_url, RUN, {}).chosen.step == 20  # listed (with ETags) and read
    elsewhere, _ = url_to_fs(storage_url, skip_instance_cache=True)  # another process: this one's cache stays
    data = bytearray(elsewhere.cat_file(path))
    data[len(data) // 2] ^= 0x01
    elsewhere.pipe_file(path, bytes(data))
    result = choose_checkpoint(storage_url, RUN, {})
    assert result.chosen == older
    assert [bad.name for bad in result.rejected] == ["000000000020-a1"] and "model.pt" in result.rejected[0].reason


@pytest.mark.parametrize("storage_url", ["s3"], indirect=True)
def test_a_restore_of_a_file_rewritten_behind_a_cached_listing_refuses_the_bytes_stored_now(tmp_path, storage_url):
    """The restore's side of the same case: a filesystem that listed the checkpoint (its ETags) before another
    process rewrote a file reads what is stored now and refuses it. The restore downloads with `get_file`, which
    sends no If-Match; were it to read through `open`, every read would raise FileExpired until the retries ran
    out, as the verification's did."""
    from fsspec.core import url_to_fs

    upload(tmp_path, storage_url, 20)
    path = f"{remote_dir(storage_url, 20)}/model.pt"  # remote_dir clears the cache: before the listing, not after
    chosen = choose_checkpoint(storage_url, RUN, {}).chosen
    classify_checkpoints(storage_url, RUN, {})  # this process lists it again: its files' ETags are cached
    elsewhere, _ = url_to_fs(storage_url, skip_instance_cache=True)
    data = bytearray(elsewhere.cat_file(path))
    data[len(data) // 2] ^= 0x01
    elsewhere.pipe_file(path, bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="model.pt: got .* manifest says"):
        restore_checkpoint(chosen, tmp_path / "dest")
