"""Background saves: training blocks only for the snapshot; one save in flight; notices go first;
the interval follows Young/Daly unless the user fixes it."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch

import vaultlayer
from tests.test_sdk import agent, committed, fresh_session, save_record, write_notice  # noqa: F401 - fixtures
from vaultlayer import interval
from vaultlayer.models import AttemptOutcome, AttemptRecord, RunStatus
from vaultlayer.pytorch import Checkpointer, snapshot


class GatedWriter:
    """A `write` that waits for the test to let it finish, so a save can be held in flight."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()

    def __call__(self, state: dict, directory: Path) -> None:
        self.started.set()
        assert self.release.wait(30)
        (directory / "state.json").write_text(json.dumps(state))


def wait_for(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.01)


def test_a_save_requested_while_one_is_in_flight_is_coalesced(agent, monkeypatch):
    staging, control = agent
    monkeypatch.setenv("VL_CHECKPOINT_EVERY", "10")
    writer = GatedWriter()
    assert vaultlayer.save_async(10, lambda: {"step": 10}, writer) == "started"
    writer.started.wait(5)
    assert vaultlayer.should_save(25) is False, "no new save is asked for while one is in flight"
    snapshots = []
    assert vaultlayer.save_async(20, lambda: snapshots.append(20) or {"step": 20}, writer) == "coalesced"
    assert snapshots == [], "a coalesced request takes no snapshot: at most one is held in memory"
    assert committed(staging) == []
    writer.release.set()
    vaultlayer.wait_for_saves()
    [only] = committed(staging)
    assert save_record(only)["step"] == 10 and json.loads((only / "state.json").read_text()) == {"step": 10}
    time.sleep(0.25)  # progress is written at most every 0.2 s
    assert vaultlayer.should_save(25) is True, "once written, the interval asks for the next save"
    assert json.loads((control / "progress.json").read_text())["saves_coalesced"] == 1


def test_an_emergency_save_preempts_a_periodic_one_in_flight(agent):
    staging, control = agent
    periodic = GatedWriter()
    assert vaultlayer.save_async(10, lambda: {"step": 10}, periodic) == "started"
    periodic.started.wait(5)
    write_notice(control, "n-1", deadline=time.time() - 10)  # deadline passed: the SDK does not wait after
    assert vaultlayer.should_save(12) is True

    def emergency_write(state: dict, directory: Path) -> None:
        (directory / "state.json").write_text(json.dumps(state))

    assert vaultlayer.save_async(12, lambda: {"step": 12}, emergency_write) == "saved"
    [emergency] = committed(staging)
    assert save_record(emergency) | {"created_at": 0, "files": {}} == {
        "step": 12, "emergency": True, "notice_id": "n-1", "created_at": 0, "files": {}, "world_size": 1}
    periodic.release.set()
    vaultlayer.wait_for_saves()
    assert committed(staging) == [emergency], "the preempted periodic save must not land after the emergency one"
    assert not list(staging.glob(".tmp-*"))


def test_background_save_writes_the_state_of_its_step_while_training_goes_on(agent, monkeypatch):
    staging, _ = agent
    monkeypatch.setenv("VL_CHECKPOINT_EVERY", "1")
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = Checkpointer(model, optimizer)
    expected = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    assert ckpt.save(1) == "started"
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)  # training continues while the save is written
    vaultlayer.wait_for_saves()
    [saved] = committed(staging)
    state = torch.load(saved / "model.pt", weights_only=True)
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor)


def test_snapshot_copies_tensors_and_nested_state():
    state = {"weights": torch.ones(3), "nested": [{"m": torch.zeros(2)}], "lr": 0.1}
    copied = snapshot(state)
    state["weights"].add_(1)
    state["nested"][0]["m"].add_(1)
    assert torch.equal(copied["weights"], torch.ones(3)) and torch.equal(copied["nested"][0]["m"], torch.zeros(2))
    assert copied["lr"] == 0.1


def test_auto_interval_follows_young_daly_and_is_reported(agent, monkeypatch):
    _, control = agent
    monkeypatch.setenv("VL_CHECKPOINT_EVERY", "auto")
    monkeypatch.setenv("VL_MTBF_SECONDS", "7200")
    monkeypatch.setenv("VL_CHECKPOINT_MIN", "1s")
    monkeypatch.setenv("VL_CHECKPOINT_MAX", "1h")
    vaultlayer.should_save(1)
    progress = json.loads((control / "progress.json").read_text())
    assert progress["interval_seconds"] == 1.0 and "measure its cost" in progress["interval_reason"]
    with vaultlayer.save(2) as directory:
        (directory / "x").write_bytes(b"x")
        time.sleep(0.2)
    progress = json.loads((control / "progress.json").read_text())
    cost = progress["save_blocked_seconds"]
    assert cost >= 0.2
    assert progress["interval_seconds"] == pytest.approx((2 * cost * 7200) ** 0.5)
    assert progress["interval_reason"].startswith("Young/Daly")


def test_choose_interval_bounds_and_reasons():
    seconds, why = interval.choose_interval(None, 3600, 60, 1800)
    assert seconds == 60 and "measure its cost" in why
    seconds, why = interval.choose_interval(2.0, 3600, 60, 1800)
    assert seconds == pytest.approx(120.0) and "Young/Daly" in why and "bounded" not in why
    seconds, why = interval.choose_interval(0.001, 3600, 60, 1800)
    assert seconds == 60 and "bounded to [60, 1800]" in why
    seconds, _ = interval.choose_interval(500, 36000, 60, 1800)
    assert seconds == 1800


def test_mtbf_estimate_learns_from_the_pool_and_ignores_others():
    start = datetime(2026, 11, 27, tzinfo=UTC)
    status = RunStatus(run_id="r")
    prior = interval.estimate_mtbf_seconds(status, "pool-a", start)
    assert prior == interval.PRIOR_HOURS / interval.PRIOR_RECLAIMS * 3600
    for number in range(4):  # four reclaims after 15 minutes each in pool-a
        began = start + timedelta(minutes=15 * number)
        status.attempts.append(AttemptRecord(attempt=number + 1, host=f"h-{number}", pool="pool-a",
                                             outcome=AttemptOutcome.RECLAIMED, started_at=began,
                                             ended_at=began + timedelta(minutes=15)))
    status.attempts.append(AttemptRecord(attempt=9, host="h-9", pool="pool-b", outcome=AttemptOutcome.RECLAIMED,
                                         started_at=start, ended_at=start + timedelta(minutes=1)))
    learned = interval.estimate_mtbf_seconds(status, "pool-a", start + timedelta(hours=1))
    assert learned == pytest.approx((interval.PRIOR_HOURS + 1.0) / (interval.PRIOR_RECLAIMS + 4) * 3600)
    assert learned < prior


def test_hosts_lost_before_their_first_save_bring_the_first_save_forward(agent, monkeypatch):
    _, control = agent
    monkeypatch.setenv("VL_CHECKPOINT_EVERY", "auto")
    monkeypatch.setenv("VL_CHECKPOINT_MIN", "60s")
    monkeypatch.setenv("VL_SHORTEST_HOST_LIFE", "9")
    vaultlayer.should_save(1)
    progress = json.loads((control / "progress.json").read_text())
    assert progress["interval_seconds"] == 4.5 and "early saves every 4.5 s" in progress["interval_reason"]


def test_the_early_first_save_counts_from_the_hosts_start_not_the_scripts(agent, monkeypatch):
    """Imports and a restore use part of a short host life: the early save is due that much sooner."""
    _, control = agent
    monkeypatch.setenv("VL_CHECKPOINT_EVERY", "auto")
    monkeypatch.setenv("VL_SHORTEST_HOST_LIFE", "9")
    monkeypatch.setenv("VL_HOST_SINCE", str(time.time() - 5))
    assert vaultlayer.should_save(1)
