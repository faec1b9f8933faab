import hashlib
import json
from collections import Counter
from pathlib import Path

import blake3
import fsspec
import pytest

from vaultlayer.checkpoint import listing, transfer
from vaultlayer.checkpoint import storage as storage_access
from vaultlayer.checkpoint import (
    CheckpointError,
    Manifest,
    Standing,
    checkpoint_name,
    choose_checkpoint,
    classify,
    list_checkpoints,
    parse_checkpoint_name,
    quarantine_records,
    restore_checkpoint,
    retention_plan,
    upload_checkpoint,
    validate_storage_url,
    verify_checkpoint,
)
from vaultlayer.models import CheckpointCheck

RUN = "run-1"


@pytest.fixture
def storage(tmp_path: Path) -> str:
    return (tmp_path / "storage").as_uri()


def storage_path(storage_url: str) -> Path:
    return Path(storage_url.removeprefix("file://"))


def make_local(tmp_path: Path, step: int, attempt: int = 1) -> Path:
    """A staged checkpoint as the SDK leaves it: files, a nested one, and the SDK's own vl-save.json."""
    local = tmp_path / f"staged-{step}-{attempt}"
    (local / "nested").mkdir(parents=True)
    (local / "model.pt").write_bytes(f"model at {step}".encode() * 100)
    (local / "nested" / "rng.bin").write_bytes(bytes(range(256)) * 7)
    (local / "vl-save.json").write_text(json.dumps({"step": step}))
    return local


def upload(tmp_path: Path, storage: str, step: int, attempt: int = 1):
    return upload_checkpoint(make_local(tmp_path, step, attempt), storage, RUN, attempt, step)


def ckpt_dir(storage: str, step: int, attempt: int = 1) -> Path:
    return storage_path(storage) / RUN / "checkpoints" / checkpoint_name(step, attempt)


def test_names_roundtrip_and_reject_other_directories():
    assert checkpoint_name(20, 3) == "000000000020-a3"
    assert parse_checkpoint_name("000000000020-a3") == (20, 3)
    assert parse_checkpoint_name("000000000020-a0") == (20, 0)  # copied in by vl resume (vaultlayer/seed.py)
    for other in ("20-a3", "000000000020-a03", "000000000020", "000000000020-a3.tmp", "quarantine"):
        assert parse_checkpoint_name(other) is None


def test_upload_writes_files_and_a_manifest_that_describes_them(tmp_path, storage):
    ref = upload(tmp_path, storage, 10)
    directory = ckpt_dir(storage, 10)
    manifest_bytes = (directory / "MANIFEST.json").read_bytes()
    manifest = Manifest.model_validate_json(manifest_bytes)
    assert ref.name == "000000000010-a1" and ref.step == 10 and ref.attempt == 1
    assert ref.url == f"{storage}/{RUN}/checkpoints/000000000010-a1"
    assert ref.manifest_sha256 == hashlib.sha256(manifest_bytes).hexdigest()
    assert (manifest.run_id, manifest.step, manifest.attempt, manifest.format_version) == (RUN, 10, 1, 2)
    assert manifest.created_at.utcoffset().total_seconds() == 0
    assert [f.path for f in manifest.files] == ["model.pt", "nested/rng.bin"]  # vl-save.json skipped
    for entry in manifest.files:
        data = (directory / entry.path).read_bytes()
        assert entry.size == len(data) and entry.blake3 == blake3.blake3(data).hexdigest()
    assert not (directory / "vl-save.json").exists()
    assert sorted(p.name for p in directory.iterdir()) == ["MANIFEST.json", "model.pt", "nested"]


def test_manifest_is_written_last(tmp_path, storage, monkeypatch):
    """If the upload dies before the manifest, the checkpoint must read as incomplete."""
    monkeypatch.setattr(storage_access, "RETRY_DELAYS_SECONDS", ())

    def fail(*args, **kwargs):
        assert not list(ckpt_dir(storage, 10).glob("MANIFEST*")), "manifest written before the manifest step"
        assert (ckpt_dir(storage, 10) / "nested" / "rng.bin").exists(), "files must all be in place first"
        raise PermissionError("storage went away")

    monkeypatch.setattr(storage_access, "write_atomically", fail)
    with pytest.raises(PermissionError):
        upload(tmp_path, storage, 10)
    check, ref = verify_checkpoint(storage, RUN, "000000000010-a1")
    assert ref is None and "no MANIFEST.json" in check.reason


def test_upload_retries_transient_storage_errors(tmp_path, storage, monkeypatch):
    monkeypatch.setattr(storage_access, "RETRY_DELAYS_SECONDS", (0, 0, 0))
    real_send = transfer._send_file
    failures = {"model.pt": 2}

    def flaky_send(fs, local, remote, relative, known=None):
        if failures.get(relative, 0) > 0:
            failures[relative] -= 1
            raise ConnectionResetError("connection reset by peer")
        return real_send(fs, local, remote, relative, known)

    monkeypatch.setattr(transfer, "_send_file", flaky_send)
    ref = upload(tmp_path, storage, 10)
    assert failures["model.pt"] == 0
    assert verify_checkpoint(storage, RUN, ref.name)[0].ok


def test_upload_gives_up_after_the_retries(tmp_path, storage, monkeypatch):
    monkeypatch.setattr(storage_access, "RETRY_DELAYS_SECONDS", (0, 0))
    calls = []

    def always_down(*args):
        calls.append(args)
        raise TimeoutError("storage unreachable")

    monkeypatch.setattr(transfer, "_send_file", always_down)
    with pytest.raises(TimeoutError):
        upload(tmp_path, storage, 10)
    # Each file that was tried was tried once plus two retries; a file not yet started when the first one
    # gave up is not tried at all (the save as a whole is retried later).
    tries = Counter(relative for _, _, _, relative, _ in calls)
    assert tries and set(tries.values()) == {3}, tries


def test_roundtrip_choose_and_restore(tmp_path, storage):
    upload(tmp_path, storage, 10)
    upload(tmp_path, storage, 20, attempt=1)
    newest = upload(tmp_path, storage, 20, attempt=2)
    assert [name for name, _, _ in list_checkpoints(storage, RUN)] == [
        "000000000020-a2",
        "000000000020-a1",
        "000000000010-a1",
    ]
    result = choose_checkpoint(storage, RUN, fences={})
    assert result.chosen == newest and result.rejected == []
    dest = tmp_path / "restored"
    restore_checkpoint(result.chosen, dest)
    source = make_local(tmp_path / "again", 20, 2)
    assert (dest / "model.pt").read_bytes() == (source / "model.pt").read_bytes()
    assert (dest / "nested" / "rng.bin").read_bytes() == (source / "nested" / "rng.bin").read_bytes()
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*")) == ["model.pt", "nested", "nested/rng.bin"]


def test_list_and_choose_tolerate_a_run_without_checkpoints(storage):
    assert list_checkpoints(storage, "never-ran") == []
    assert quarantine_records(storage, "never-ran") == []
    result = choose_checkpoint(storage, "never-ran", {})
    assert result.chosen is None and result.rejected == []


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def rewrite_manifest(path: Path, **changes) -> None:
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


CORRUPTIONS = {
    "flipped byte": (lambda d: flip_byte(d / "model.pt"), "model.pt: blake3"),
    "truncated file": (lambda d: (d / "nested/rng.bin").write_bytes(b"short"), "nested/rng.bin: size 5 bytes"),
    "missing file": (lambda d: (d / "nested/rng.bin").unlink(), "nested/rng.bin: missing"),
    "missing manifest": (lambda d: (d / "MANIFEST.json").unlink(), "no MANIFEST.json"),
    "unparsable manifest": (lambda d: (d / "MANIFEST.json").write_text("{not json"), "unparsable MANIFEST.json"),
    "manifest of another run": (
        lambda d: rewrite_manifest(d / "MANIFEST.json", run_id="other-run"),
        "run_id 'other-run'",
    ),
    "manifest of another attempt": (lambda d: rewrite_manifest(d / "MANIFEST.json", attempt=7), "attempt 7"),
    "manifest of another step": (lambda d: rewrite_manifest(d / "MANIFEST.json", step=99), "step 99"),
    "unsafe manifest path": (
        lambda d: rewrite_manifest(
            d / "MANIFEST.json", files=[{"path": "../../escape", "size": 1, "sha256": "0" * 64}]
        ),
        "'..'",
    ),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_checkpoint_is_quarantined_and_the_previous_one_chosen(tmp_path, storage, corruption):
    corrupt, reason = CORRUPTIONS[corruption]
    good = upload(tmp_path, storage, 10)
    upload(tmp_path, storage, 20)
    corrupt(ckpt_dir(storage, 20))

    check, ref = verify_checkpoint(storage, RUN, "000000000020-a1")
    assert ref is None and not check.ok and reason in check.reason

    result = choose_checkpoint(storage, RUN, {})
    assert result.chosen == good
    assert [(r.name, r.ok) for r in result.rejected] == [("000000000020-a1", False)]
    assert reason in result.rejected[0].reason
    records = quarantine_records(storage, RUN)
    assert [(r.name, r.reason) for r in records] == [("000000000020-a1", result.rejected[0].reason)]
    assert ckpt_dir(storage, 20).exists(), "quarantine records, it does not move"

    # Once quarantined it is skipped without being read again, with the recorded reason.
    again = choose_checkpoint(storage, RUN, {})
    assert again.chosen == good and again.rejected == result.rejected


def test_quarantined_checkpoint_is_not_verified_again(tmp_path, storage, monkeypatch):
    good = upload(tmp_path, storage, 10)
    upload(tmp_path, storage, 20)
    flip_byte(ckpt_dir(storage, 20) / "model.pt")
    choose_checkpoint(storage, RUN, {})
    verified = []
    real_verify = listing.verify_checkpoint
    monkeypatch.setattr(listing, "verify_checkpoint", lambda *a: verified.append(a[2]) or real_verify(*a))
    assert choose_checkpoint(storage, RUN, {}).chosen == good
    assert verified == ["000000000010-a1"]


def test_fenced_checkpoints_are_rejected_not_quarantined(tmp_path, storage):
    upload(tmp_path, storage, 10, attempt=1)
    upload(tmp_path, storage, 20, attempt=1)
    upload(tmp_path, storage, 30, attempt=1)  # a zombie of attempt 1 wrote this after it was written off
    resumed = upload(tmp_path, storage, 20, attempt=2)
    result = choose_checkpoint(storage, RUN, fences={1: 20})
    assert result.chosen == resumed
    assert [(r.name, r.reason) for r in result.rejected] == [("000000000030-a1", "fenced: attempt 1 ended at step 20")]
    assert quarantine_records(storage, RUN) == []

    only_attempt_one = choose_checkpoint(storage, RUN, fences={1: 20, 2: 0})
    assert only_attempt_one.chosen.name == "000000000020-a1"
    assert [r.name for r in only_attempt_one.rejected] == ["000000000030-a1", "000000000020-a2"]


def test_nothing_usable_gives_no_choice(tmp_path, storage):
    upload(tmp_path, storage, 10)
    (ckpt_dir(storage, 10) / "model.pt").unlink()
    result = choose_checkpoint(storage, RUN, {})
    assert result.chosen is None and [r.name for r in result.rejected] == ["000000000010-a1"]


def forge_manifest(storage: str, step: int, files: list[dict]):
    """Replace a checkpoint's manifest and return a ref whose sha256 matches it, as if it had been verified."""
    ref = upload_checkpoint(make_local(Path(storage_path(storage).parent), step), storage, RUN, 1, step)
    manifest_path = ckpt_dir(storage, step) / "MANIFEST.json"
    rewrite_manifest(manifest_path, files=files)
    return ref.model_copy(update={"manifest_sha256": hashlib.sha256(manifest_path.read_bytes()).hexdigest()})


@pytest.mark.parametrize(
    "unsafe", ["../outside.txt", "nested/../../outside.txt", "/tmp/vl-test-outside.txt", "..\\outside.txt", "C:/x"]
)
def test_restore_refuses_unsafe_paths_and_writes_nothing(tmp_path, storage, unsafe):
    data = b"payload"
    files = [
        {"path": "model.pt", "size": 1, "sha256": "0" * 64},
        {"path": unsafe, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()},
    ]
    ref = forge_manifest(storage, 10, files)
    dest = tmp_path / "work" / "dest"
    dest.mkdir(parents=True)
    with pytest.raises(CheckpointError, match="refusing to restore"):
        restore_checkpoint(ref, dest)
    assert list(dest.iterdir()) == []
    assert not (tmp_path / "work" / "outside.txt").exists()
    assert not Path("/tmp/vl-test-outside.txt").exists()


def test_restore_refuses_a_symlink_that_leads_outside(tmp_path, storage):
    data = b"payload"
    entry = {"path": "link/escape.txt", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    ref = forge_manifest(storage, 10, [entry])
    (ckpt_dir(storage, 10) / "link").mkdir()
    (ckpt_dir(storage, 10) / "link" / "escape.txt").write_bytes(data)
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "link").symlink_to(outside)
    with pytest.raises(CheckpointError, match="outside"):
        restore_checkpoint(ref, dest)
    assert list(outside.iterdir()) == []


def test_restore_refuses_a_manifest_changed_since_verification(tmp_path, storage):
    ref = upload(tmp_path, storage, 10)
    rewrite_manifest(ckpt_dir(storage, 10) / "MANIFEST.json", created_at="2020-01-01T00:00:00Z")
    with pytest.raises(CheckpointError, match="changed since it was verified"):
        restore_checkpoint(ref, tmp_path / "dest")


def test_restore_refuses_bytes_that_do_not_match_and_leaves_no_partial_file(tmp_path, storage):
    ref = upload(tmp_path, storage, 10)
    flip_byte(ckpt_dir(storage, 10) / "model.pt")
    dest = tmp_path / "dest"
    with pytest.raises(CheckpointError, match="model.pt"):
        restore_checkpoint(ref, dest)
    assert not (dest / "model.pt").exists()
    assert not list(dest.rglob("*vl-partial*"))


def test_restore_reports_a_missing_file(tmp_path, storage):
    ref = upload(tmp_path, storage, 10)
    (ckpt_dir(storage, 10) / "nested" / "rng.bin").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        restore_checkpoint(ref, tmp_path / "dest")


def test_upload_refuses_a_file_named_like_the_manifest(tmp_path, storage):
    local = make_local(tmp_path, 10)
    (local / "MANIFEST.json").write_text("{}")
    with pytest.raises(CheckpointError, match="MANIFEST.json"):
        upload_checkpoint(local, storage, RUN, 1, 10)


def test_memory_storage_works_too(tmp_path):
    """Any fsspec URL, not only local paths."""
    url = "memory://vl-test-checkpoints"
    ref = upload_checkpoint(make_local(tmp_path, 5), url, RUN, 1, 5)
    try:
        assert choose_checkpoint(url, RUN, {}).chosen == ref
        restore_checkpoint(ref, tmp_path / "dest")
        assert (tmp_path / "dest" / "nested" / "rng.bin").read_bytes() == bytes(range(256)) * 7
    finally:
        fsspec.filesystem("memory").rm("/vl-test-checkpoints", recursive=True)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("x://bucket/path", "fsspec knows no protocol 'x'; use file://, s3:// or gs://"),
        ("/abs/path", "use file:///abs/path"),
        ("relative/path", "use file:///abs/path"),
        ("file://relative/path", "use file:///abs/path"),
    ],
)
def test_invalid_storage_urls_are_refused_with_the_fix(url, message):
    with pytest.raises(ValueError) as err:
        validate_storage_url(url)
    assert message in str(err.value) and repr(url) in str(err.value)


def test_a_known_protocol_without_its_package_says_what_to_install():
    try:
        import paramiko  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("paramiko is installed here")
    with pytest.raises(ValueError, match='protocol .sftp. needs a package that is not installed.*"paramiko".*'
                                         "install the package it names"):
        validate_storage_url("sftp://host/prefix")


@pytest.mark.parametrize("url", ["file:///var/vl/storage", "memory://somewhere"])
def test_valid_storage_urls_pass(url):
    validate_storage_url(url)


def test_a_format_1_checkpoint_hashed_with_sha256_still_verifies_and_restores(tmp_path, storage):
    """Checkpoints written before BLAKE3 (format 1, sha256 per file) stay resumable after an upgrade."""
    upload(tmp_path, storage, 10)
    directory = ckpt_dir(storage, 10)
    manifest_path = directory / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["files"]:
        del entry["blake3"]
        entry["sha256"] = hashlib.sha256((directory / entry["path"]).read_bytes()).hexdigest()
    rewrite_manifest(manifest_path, format_version=1, files=manifest["files"])
    check, ref = verify_checkpoint(storage, RUN, "000000000010-a1")
    assert check.ok and ref is not None, check.reason
    restore_checkpoint(ref, tmp_path / "restored")
    assert (tmp_path / "restored" / "model.pt").read_bytes() == (directory / "model.pt").read_bytes()

    flip_byte(directory / "model.pt")
    check, _ = verify_checkpoint(storage, RUN, "000000000010-a1")
    assert not check.ok and "model.pt: sha256" in check.reason


@pytest.mark.parametrize("digests", [{}, {"sha256": "0" * 64, "blake3": "0" * 64}])
def test_a_manifest_entry_needs_exactly_one_digest(tmp_path, storage, digests):
    upload(tmp_path, storage, 10)
    rewrite_manifest(ckpt_dir(storage, 10) / "MANIFEST.json",
                     files=[{"path": "model.pt", "size": 1, **digests}])
    check, ref = verify_checkpoint(storage, RUN, "000000000010-a1")
    assert ref is None and "exactly one of blake3 or sha256" in check.reason


def test_upload_takes_the_writers_digest_only_for_a_file_unchanged_since(tmp_path, storage):
    """The SDK records each file's BLAKE3 as it writes (vl-save.json); the upload uses it instead of reading
    the bytes again, but only while the file has the size and mtime it was hashed at."""
    local = make_local(tmp_path, 10)
    recorded = "ab" * 32  # not the real digest: seeing it in the manifest proves the upload did not rehash
    model, rng = (local / "model.pt").stat(), (local / "nested" / "rng.bin").stat()
    (local / "vl-save.json").write_text(json.dumps({"step": 10, "files": {
        "model.pt": {"size": model.st_size, "mtime_ns": model.st_mtime_ns, "blake3": recorded},
        "nested/rng.bin": {"size": rng.st_size, "mtime_ns": rng.st_mtime_ns - 1, "blake3": recorded},
    }}))
    upload_checkpoint(local, storage, RUN, 1, 10)
    manifest = Manifest.model_validate_json((ckpt_dir(storage, 10) / "MANIFEST.json").read_bytes())
    digests = {entry.path: entry.blake3 for entry in manifest.files}
    assert digests["model.pt"] == recorded
    assert digests["nested/rng.bin"] == blake3.blake3((local / "nested" / "rng.bin").read_bytes()).hexdigest()


# The one classification of a checkpoint directory, and retention as a pure plan: no storage involved.
MANIFEST_ONLY = {"MANIFEST.json": 100, "model.pt": 1000}
FILES_ONLY = {"model.pt": 1000}


def bad_record(name: str, reason: str = "model.pt: missing") -> CheckpointCheck:
    step, attempt = parse_checkpoint_name(name)
    return CheckpointCheck(name=name, step=step, attempt=attempt, ok=False, reason=reason)


def test_classify_puts_fences_before_quarantine_before_a_missing_manifest():
    stored = {checkpoint_name(50, 1): FILES_ONLY, checkpoint_name(40, 1): MANIFEST_ONLY,
              checkpoint_name(30, 2): FILES_ONLY, checkpoint_name(30, 1): MANIFEST_ONLY,
              checkpoint_name(20, 1): MANIFEST_ONLY}
    quarantined = {name: bad_record(name) for name in (checkpoint_name(50, 1), checkpoint_name(30, 1))}
    classified = classify(stored, fences={1: 45}, quarantined=quarantined)
    assert [(entry.name, entry.standing, entry.reason) for entry in classified] == [
        (checkpoint_name(50, 1), Standing.FENCED, "fenced: attempt 1 ended at step 45"),
        (checkpoint_name(40, 1), Standing.COMPLETE, ""),
        (checkpoint_name(30, 2), Standing.PARTIAL, "no MANIFEST.json: the upload never finished"),
        (checkpoint_name(30, 1), Standing.QUARANTINED, "model.pt: missing"),
        (checkpoint_name(20, 1), Standing.COMPLETE, ""),
    ]
    assert [entry.has_manifest for entry in classified] == [False, True, False, True, True]
    assert classified[0].size == 1000 and classified[1].size == 1100
    assert classified[3].rejection() is quarantined[checkpoint_name(30, 1)]
    assert classified[0].rejection().reason == "fenced: attempt 1 ended at step 45"


def test_retention_plan_keeps_the_newest_complete_the_protected_and_the_evidence():
    stored = {checkpoint_name(step, 1): MANIFEST_ONLY for step in (10, 20, 30, 40, 50, 60)}
    stored[checkpoint_name(70, 1)] = FILES_ONLY  # a partial above what attempt 1 reported: its host died
    stored[checkpoint_name(5, 1)] = FILES_ONLY  # a partial at or below: it was complete once; kept as evidence
    quarantined = {checkpoint_name(50, 1): bad_record(checkpoint_name(50, 1))}
    classified = classify(stored, fences={1: 60}, quarantined=quarantined)
    plan = retention_plan(classified, keep=2, reported={1: 60}, protect=[checkpoint_name(20, 1)])
    assert plan == [checkpoint_name(70, 1), checkpoint_name(30, 1), checkpoint_name(10, 1)]


def test_retention_plan_removes_a_partial_upload_only_once_its_attempt_ended():
    stored = {checkpoint_name(20, 1): MANIFEST_ONLY, checkpoint_name(30, 1): FILES_ONLY}
    classified = classify(stored, fences={1: 20}, quarantined={})  # fenced as well: removed all the same
    assert retention_plan(classified, keep=1, reported={}) == [], "attempt 1 may still be uploading it"
    assert retention_plan(classified, keep=1, reported={1: 20}) == [checkpoint_name(30, 1)]
    with pytest.raises(ValueError, match="keep must be at least 1"):
        retention_plan(classified, keep=0, reported={})
