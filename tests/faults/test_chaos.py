"""The chaos soak (bench/chaos.py): its schedule and its checkpoint rule, which are pure, and its short mode.

The short mode runs every fault kind against real runs in about four minutes, most of it waiting (about 65 CPU
seconds): xdist hands it out among the first tests, so the rest of the suite runs beside it.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

_spec = importlib.util.spec_from_file_location("bench_chaos", REPO / "bench" / "chaos.py")
chaos = sys.modules["bench_chaos"] = importlib.util.module_from_spec(_spec)  # its dataclasses look it up there
_spec.loader.exec_module(chaos)

# Every kind within 3 minutes of 2 runs (found by scanning seeds for one whose schedule holds all of them).
SHORT_SEED = 723


def test_a_seed_names_one_schedule_and_a_long_soak_draws_every_kind():
    first = chaos.schedule(7, minutes=30, runs=6)
    assert first == chaos.schedule(7, minutes=30, runs=6)
    assert first != chaos.schedule(8, minutes=30, runs=6)
    assert {fault.kind for fault in first} == set(chaos.KINDS)
    assert all(chaos.WARM_UP_SECONDS < fault.at < 30 * 60 and 0 <= fault.slot < 6 for fault in first)
    assert [fault.at for fault in first] == sorted(fault.at for fault in first)
    assert {fault.kind for fault in chaos.schedule(SHORT_SEED, minutes=3, runs=2)} == set(chaos.KINDS)


def test_no_run_outlasts_the_faults_by_more_than_a_minute():
    assert chaos.run_steps(1, seconds_left=600) in chaos.RUN_STEPS
    assert {chaos.run_steps(n, seconds_left=600) for n in range(40)} == set(chaos.RUN_STEPS)
    assert {chaos.run_steps(n, seconds_left=40) for n in range(40)} == {450, 300}  # 90 s and 60 s of steps
    assert {chaos.run_steps(n, seconds_left=-30) for n in range(40)} == {300}  # the shortest, even when late


def test_a_listing_of_s3_judges_removals_only_if_s3_was_up_and_at_full_speed_throughout():
    assert chaos.judged_listing("s3://b/c", (False, 2), (False, 2))
    assert not chaos.judged_listing("s3://b/c", (True, 2), (True, 2))  # down (or slow) all along
    assert not chaos.judged_listing("s3://b/c", (False, 2), (True, 3))  # went down meanwhile
    assert not chaos.judged_listing("s3://b/c", (False, 2), (False, 3))  # down (or slow) and back meanwhile
    assert chaos.judged_listing("file:///tmp/s", (True, 3), (False, 4))  # file storage has no outage


def test_a_complete_checkpoint_may_go_only_for_a_newer_one_or_beyond_its_fence():
    present = {"000000000030-a2": "m"}
    assert chaos.removed_rightly("000000000020-a2", present, fences={})  # retention: a newer one is there
    assert not chaos.removed_rightly("000000000040-a2", present, fences={})  # the newest: lost
    assert not chaos.removed_rightly("000000000020-a2", {}, fences={})
    assert chaos.removed_rightly("000000000040-a1", {}, fences={1: 30})  # written after its attempt's fence
    assert not chaos.removed_rightly("000000000030-a1", {}, fences={1: 30})


@pytest.mark.timeout(900)
def test_the_short_soak_holds_every_invariant(tmp_path):
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "bench/chaos.py", "--seed", str(SHORT_SEED), "--minutes", "3",
                           "--runs", "2", "--json", str(report)], cwd=REPO, capture_output=True, text=True,
                          timeout=840)
    assert report.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(report.read_text())
    broken = [row for row in result["invariants"] if not row["held"]]
    assert not broken and done.returncode == 0, broken or done.stdout[-3000:]
    assert len(result["invariants"]) == 7
    injected = {kind for kind, row in result["faults"].items() if row["injected"]}
    assert len(injected) >= len(chaos.KINDS) - 2, result["faults"]  # a fault whose run just ended is skipped
