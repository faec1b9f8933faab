"""Moving checkpoint bytes: the part size chosen from a file's size, the chunked file:// restore that hashes
right behind the copy, and multipart uploads against moto's S3 server."""

from __future__ import annotations

import math
import os

import pytest

from tests.object_storage import storage_fs
from vaultlayer.checkpoint import CheckpointError, checkpoint_name, restore_checkpoint, transfer, upload_checkpoint

MiB = 1 << 20
RUN = "run-1"


@pytest.mark.parametrize("size", [0, 1, 5 * MiB, 96 * MiB, 128 * MiB - 1])
def test_a_file_below_the_threshold_goes_up_in_one_request(size):
    part = transfer.part_bytes(size)
    assert size < 2 * part, "s3fs sends one PUT only when size < 2 x part size"
    assert part >= transfer.MIN_PART_BYTES and part % MiB == 0


@pytest.mark.parametrize("size", [128 * MiB, 1000 * MiB, 992 * MiB + 1, 2 << 30, 100 << 30, 5 << 40])
def test_a_big_file_goes_in_about_16_parts_within_s3_limits(size):
    part = transfer.part_bytes(size)
    parts = math.ceil(size / part)
    assert transfer.MIN_PART_BYTES <= part and part % MiB == 0 and parts <= transfer.MAX_PARTS
    # Past the cap only when one MiB less would need more than 10000 parts.
    assert part <= transfer.MAX_PART_BYTES or math.ceil(size / (part - MiB)) > transfer.MAX_PARTS
    if size <= transfer.TARGET_PARTS * transfer.MAX_PART_BYTES:
        assert parts == transfer.TARGET_PARTS


def test_the_part_size_grows_past_its_cap_only_for_the_10000_part_limit():
    assert transfer.part_bytes(16 * 128 * MiB) == 128 * MiB
    assert transfer.part_bytes(1 << 40) == 128 * MiB  # 8192 parts
    assert transfer.part_bytes(2 << 40) == math.ceil((2 << 40) / 10_000 / MiB) * MiB


def stored(tmp_path, storage_url, data: bytes):
    local = tmp_path / "staged"
    local.mkdir()
    (local / "weights.bin").write_bytes(data)
    (local / "empty.bin").write_bytes(b"")
    ref = upload_checkpoint(local, storage_url, RUN, 1, 5)
    fs, root = storage_fs(storage_url)
    return ref, f"{root}/{RUN}/checkpoints/{checkpoint_name(5, 1)}/weights.bin"


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 4 KiB, so a small file takes the chunked copy's every path: many chunks and a short tail."""
    monkeypatch.setattr(transfer, "COPY_CHUNK_BYTES", 4096)


def test_file_restore_copies_in_chunks_and_verifies(tmp_path, storage_url, small_chunks):
    data = os.urandom(10 * 4096 + 123)
    ref, _ = stored(tmp_path, storage_url, data)
    restore_checkpoint(ref, tmp_path / "dest")
    assert (tmp_path / "dest" / "weights.bin").read_bytes() == data
    assert (tmp_path / "dest" / "empty.bin").read_bytes() == b""


@pytest.mark.parametrize("case", ["flipped byte in the last chunk", "truncated file"])
def test_file_restore_refuses_a_stored_file_changed_after_upload(tmp_path, storage_url, small_chunks, case):
    data = os.urandom(10 * 4096 + 123)
    ref, path = stored(tmp_path, storage_url, data)
    if case == "truncated file":
        os.truncate(path, 5 * 4096)
    else:
        with open(path, "r+b") as file:
            file.seek(len(data) - 1)
            file.write(bytes([data[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="weights.bin: got"):
        restore_checkpoint(ref, tmp_path / "dest")
    assert not (tmp_path / "dest" / "weights.bin").exists()
    assert not [p.name for p in (tmp_path / "dest").iterdir() if "vl-partial" in p.name]


@pytest.mark.parametrize("storage_url", ["s3"], indirect=True)
def test_a_file_of_several_parts_round_trips_on_s3(tmp_path, storage_url, monkeypatch):
    monkeypatch.setattr(transfer, "SINGLE_PUT_BYTES", 10 * MiB)  # 12 MiB: 3 parts of the 5 MiB minimum
    data = os.urandom(12 * MiB + 1)
    ref, remote = stored(tmp_path, storage_url, data)
    fs, _ = storage_fs(storage_url)
    etag = fs.info(remote)["ETag"].strip('"')
    assert etag.endswith("-3"), f"a multipart upload of 3 parts expected: {etag}"
    restore_checkpoint(ref, tmp_path / "dest")
    assert (tmp_path / "dest" / "weights.bin").read_bytes() == data

