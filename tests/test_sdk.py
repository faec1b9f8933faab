import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vaultlayer
from vaultlayer import protocol, sdk

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_session(monkeypatch):
    """Each test gets the SDK as a new process would: no VL_ variables unless it sets them."""
    for name in list(os.environ):
        if name.startswith("VL_"):
            monkeypatch.delenv(name)
    sdk._session.cache_clear()
    yield
    sdk._session.cache_clear()


class ManualClock:
    """The SDK's monotonic clock, moved by the test: a busy machine cannot add time between two calls."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> ManualClock:
    manual = ManualClock()
    monkeypatch.setattr(sdk, "_monotonic", manual)
    return manual


@pytest.fixture
def agent(tmp_path, monkeypatch):
    """The directories and variables a host agent sets up for the script."""
    staging, control = tmp_path / "staging", tmp_path / "control"
    staging.mkdir()
    control.mkdir()
    monkeypatch.setenv("VL_RUN_ID", "run-1")
    monkeypatch.setenv("VL_ATTEMPT", "1")
    monkeypatch.setenv("VL_STAGING_DIR", str(staging))
    monkeypatch.setenv("VL_CONTROL_DIR", str(control))
    return staging, control


def committed(staging: Path) -> list[Path]:
    return sorted(p for p in staging.iterdir() if not p.name.startswith(".tmp-"))


def save_record(directory: Path) -> dict:
    return json.loads((directory / "vl-save.json").read_text())


def write_notice(control: Path, notice_id: str, deadline: float) -> None:
    (control / "notice.json").write_text(json.dumps({"id": notice_id, "deadline": deadline, "kind": "spot-termination"}))


def test_import_stays_light():
    heavy = ("torch", "fsspec", "temporalio", "numpy", "pydantic")
    code = f"import sys, vaultlayer; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "[]"


def test_inactive_without_a_staging_dir(tmp_path):
    assert not vaultlayer.active()
    assert vaultlayer.resume() is None
    assert not any(vaultlayer.should_save(step) for step in range(1000))
    with vaultlayer.save(10) as scratch:
        (scratch / "model.pt").write_bytes(b"x")
        assert scratch.is_dir()
    assert not scratch.exists(), "an inactive save is thrown away"


def test_active_and_resume_from_the_restore_dir(agent, tmp_path, monkeypatch):
    monkeypatch.setenv("VL_RESTORE_DIR", str(tmp_path / "restore"))
    monkeypatch.setenv("VL_RESTORE_STEP", "20")
    assert vaultlayer.active()
    assert vaultlayer.resume() == vaultlayer.Restored(step=20, path=tmp_path / "restore")


def test_fresh_attempt_resumes_nothing(agent):
    assert vaultlayer.active() and vaultlayer.resume() is None


def test_no_interval_means_saves_only_on_notices(agent):
    assert not any(vaultlayer.should_save(step) for step in range(1, 500))


def test_interval_in_steps_counts_from_the_resumed_step(agent, tmp_path, monkeypatch):
    monkeypatch.setenv("VL_CHECKPOINT_EVERY", "10")
    monkeypatch.setenv("VL_RESTORE_DIR", str(tmp_path / "restore"))
    monkeypatch.setenv("VL_RESTORE_STEP", "25")
    assert [step for step in range(26, 36) if vaultlayer.should_save(step)] == [35]
    with vaultlayer.save(35):
        pass
    assert [step for step in range(36, 46) if vaultlayer.should_save(step)] == [45]


def test_interval_in_time(agent, monkeypatch, clock):
    monkeypatch.setenv("VL_CHECKPOINT_EVERY", "0.5s")
    assert not vaultlayer.should_save(1)
    clock.advance(0.25)
    assert not vaultlayer.should_save(2)
    clock.advance(0.25)
    assert vaultlayer.should_save(3)
    with vaultlayer.save(3):
        pass
    clock.advance(0.25)
    assert not vaultlayer.should_save(4), "the clock restarts at each save"
    clock.advance(0.25)
    assert vaultlayer.should_save(5)


def test_bad_interval_names_the_variable(agent, monkeypatch):
    monkeypatch.setenv("VL_CHECKPOINT_EVERY", "5 minutes")
    with pytest.raises(ValueError, match="VL_CHECKPOINT_EVERY.*'5 minutes'"):
        vaultlayer.should_save(1)


def test_save_commits_atomically_with_its_record(agent):
    staging, _ = agent
    before = time.time()
    with vaultlayer.save(30) as directory:
        assert directory.parent == staging and directory.name.startswith(".tmp-30-")
        (directory / "model.pt").write_bytes(b"weights")
        assert committed(staging) == [], "nothing is complete before the block exits"
    [checkpoint] = committed(staging)
    assert checkpoint.name.startswith("000000000030-")
    assert not [p for p in staging.iterdir() if p.name.startswith(".tmp-")]
    assert (checkpoint / "model.pt").read_bytes() == b"weights"
    record = save_record(checkpoint)
    assert record["step"] == 30 and record["emergency"] is False and record["notice_id"] is None
    assert before <= record["created_at"] <= time.time()


def test_failed_save_leaves_nothing_and_reraises(agent):
    staging, _ = agent
    with pytest.raises(RuntimeError, match="disk full"):
        with vaultlayer.save(30) as directory:
            (directory / "model.pt").write_bytes(b"half")
            raise RuntimeError("disk full")
    assert list(staging.iterdir()) == []


def test_progress_is_throttled_and_always_written_before_a_save(agent, clock):
    _, control = agent
    progress = control / "progress.json"
    vaultlayer.should_save(1)
    assert json.loads(progress.read_text())["step"] == 1
    clock.advance(0.125)
    vaultlayer.should_save(2)
    assert json.loads(progress.read_text())["step"] == 1, "at most every 0.2 s"
    clock.advance(0.125)
    vaultlayer.should_save(3)
    assert json.loads(progress.read_text())["step"] == 3
    with vaultlayer.save(4):
        assert json.loads(progress.read_text())["step"] == 4
    assert {"step", "time", "save_blocked_seconds", "interval_seconds", "interval_reason"} <= set(
        json.loads(progress.read_text()))
    assert [p.name for p in control.iterdir()] == ["progress.json"]


@pytest.fixture
def waits(monkeypatch) -> list[float]:
    """What the SDK waits for after an emergency save (the wall-clock time it sleeps until), recorded; the wait
    itself still happens."""
    recorded: list[float] = []
    real = sdk._wait_until

    def recording(epoch_seconds: float) -> None:
        recorded.append(epoch_seconds)
        real(epoch_seconds)

    monkeypatch.setattr(sdk, "_wait_until", recording)
    return recorded


def test_notice_makes_the_next_save_an_emergency_that_waits_out_the_deadline(agent, monkeypatch, waits):
    staging, control = agent
    monkeypatch.setenv("VL_CHECKPOINT_EVERY", "1000")
    assert not vaultlayer.should_save(1)
    deadline = time.time() - 4.0  # the SDK waits until deadline + 5 s: about a second from now
    write_notice(control, "notice-1", deadline)
    assert vaultlayer.should_save(2), "a pending notice asks for a save at once"
    with vaultlayer.save(2) as directory:
        (directory / "model.pt").write_bytes(b"weights")
    assert time.time() >= deadline + sdk.EMERGENCY_GRACE_SECONDS
    assert waits == [deadline + sdk.EMERGENCY_GRACE_SECONDS], "it waits out the deadline and its grace, no longer"
    [checkpoint] = committed(staging)
    assert save_record(checkpoint) | {"created_at": None, "files": None} == {
        "files": None,
        "step": 2,
        "emergency": True,
        "notice_id": "notice-1",
        "created_at": None,
        "world_size": 1,
    }
    assert save_record(checkpoint)["created_at"] < deadline + 5.0, "committed before the wait, not after"
    # A false alarm: the host is still here, training goes on and the same notice asks for nothing more.
    assert not vaultlayer.should_save(3)

    write_notice(control, "notice-2", time.time() - 5.0)
    assert vaultlayer.should_save(4), "a new notice asks again"
    with vaultlayer.save(4):
        pass
    assert save_record(committed(staging)[-1])["notice_id"] == "notice-2"


def test_a_notice_long_past_its_deadline_does_not_block(agent, waits):
    staging, control = agent
    deadline = time.time() - 60
    write_notice(control, "stale", deadline)
    with vaultlayer.save(7):
        pass
    assert waits == [deadline + sdk.EMERGENCY_GRACE_SECONDS] and waits[0] < time.time(), "a time already past"
    assert save_record(committed(staging)[0])["emergency"] is True


def test_a_half_written_notice_is_read_again(agent):
    _, control = agent
    (control / "notice.json").write_text('{"id": "notice-1", "dead')
    assert not vaultlayer.should_save(1)
    write_notice(control, "notice-1", time.time() + 60)
    assert vaultlayer.should_save(2)


def test_a_committed_save_records_each_files_size_mtime_and_blake3(agent):
    import blake3

    staging, _ = agent
    with vaultlayer.save(10) as directory:
        (directory / "model.pt").write_bytes(b"weights" * 1000)
        (directory / "nested").mkdir()
        (directory / "nested" / "rng.bin").write_bytes(b"")
    [saved] = committed(staging)
    files = save_record(saved)["files"]
    assert sorted(files) == ["model.pt", "nested/rng.bin"]
    for relative, entry in files.items():
        stat = (saved / relative).stat()
        assert (entry["size"], entry["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns)
        assert entry["blake3"] == blake3.blake3((saved / relative).read_bytes()).hexdigest()


def test_the_sdk_reads_the_environment_the_agent_writes(tmp_path, monkeypatch):
    """Both sides of the contract go through vaultlayer/protocol.py: what ScriptEnv sets is what the SDK reads."""
    restore = tmp_path / "restore"
    contract = protocol.ScriptEnv(run_id="run-1", attempt=2, staging_dir=tmp_path / "staging",
                                  control_dir=tmp_path / "control", restore_dir=restore, restore_step=40,
                                  checkpoint_every="30s", mtbf_seconds=3600.0)
    for name, value in contract.to_environ().items():
        monkeypatch.setenv(name, value)
    assert vaultlayer.resume() == sdk.Restored(step=40, path=restore)
    session = sdk._session()
    assert session.interval_seconds() == (30.0, "--checkpoint-every") and session.mtbf_seconds == 3600.0


def test_zero_code_mode_sets_only_the_run_the_attempt_and_the_directory():
    contract = protocol.ScriptEnv(run_id="run-1", attempt=1, checkpoint_dir="/ckpt", staging_dir=Path("/s"))
    assert contract.to_environ() == {"VL_RUN_ID": "run-1", "VL_ATTEMPT": "1", "VL_CHECKPOINT_DIR": "/ckpt"}
    assert protocol.without_contract_variables({"VL_STAGING_DIR": "/old", "PATH": "/bin"}) == {"PATH": "/bin"}


def test_agent_documents_read_back_as_written(tmp_path):
    protocol.write_notice(tmp_path, protocol.NoticeDocument(id="n-1", deadline=12.5, kind="spot-termination"))
    assert json.loads((tmp_path / "notice.json").read_text()) == {"id": "n-1", "deadline": 12.5,
                                                                 "kind": "spot-termination"}
    assert protocol.read_notice(tmp_path) == protocol.NoticeDocument(id="n-1", deadline=12.5, kind="spot-termination")
    assert protocol.read_progress(tmp_path) is None
    protocol.write_progress(tmp_path, protocol.Progress(step=7, time=1.0, interval_seconds=60.0,
                                                        interval_reason="auto"), ".progress.tmp")
    assert protocol.read_progress(tmp_path) == protocol.Progress(step=7, time=1.0, interval_seconds=60.0,
                                                                 interval_reason="auto")
    record = protocol.SaveRecord(step=3, emergency=True, notice_id="n-1", created_at=2.0)
    protocol.write_save_record(tmp_path, record)
    assert protocol.read_save_record(tmp_path) == record


def test_a_process_group_the_script_left_up_is_destroyed_at_exit_before_the_interpreters_teardown(tmp_path):
    """The HF Trainer never destroys its group; left to the interpreter's teardown, a gloo group's destructor can
    abort the process (a rank of the HF sample did so once in CI). The observer, registered first, runs last."""
    script = f"""
import atexit, torch.distributed as dist
from vaultlayer import sdk
atexit.register(lambda: print("up at the end:", dist.is_initialized(), flush=True))
dist.init_process_group("gloo", init_method="file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
sdk._find_ranks(None)
print("up after init:", dist.is_initialized(), flush=True)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:2] == ["up after init: True", "up at the end: False"], done.stdout
