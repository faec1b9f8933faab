"""The trace simulator and the goodput benchmark: the world model on hand-made traces (exact figures),
the policy the workflow runs driven through it, and the issue's targets on traces no constant was
chosen on (synthetic) and on the real ones in ../shared/traces when they are there."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from bench import goodput, policy_slices
from tests.conftest import REPO
from vaultlayer.models import AttemptOutcome, RunState, RunStatus
from workflows import baselines, policy, simulate

GAP = 100.0
REAL_TRACES = REPO.parent / "shared" / "traces" / "aws-p3-v100-2023-02"
GANG_TRACES = REPO.parent / "shared" / "traces" / "aws-4node-v100-2023-08"


def trace(zone: str, pattern: str, gap: float = GAP) -> simulate.Trace:
    """'#' has one host, '.' has none, a digit that many; one character per tick."""
    return simulate.Trace(zone=zone, gap_seconds=gap,
                          counts=tuple(1 if c == "#" else 0 if c == "." else int(c) for c in pattern))


def write_traces(directory: Path, traces: list[simulate.Trace]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for t in traces:
        document = {"metadata": {"gap_seconds": t.gap_seconds}, "data": list(t.counts)}
        (directory / f"{t.zone}_v100_1.json").write_text(json.dumps(document))
    return directory


def test_capacity_is_lost_at_the_first_empty_tick_and_the_traces_repeat():
    world = simulate.World([trace("a", "##..#")])
    assert world.available("a", 150, nodes=1) and not world.available("a", 250, nodes=1)
    assert world.lost_at("a", 0, nodes=1) == 200
    assert world.back_at("a", 250, nodes=1) == 400 and world.back_at("a", 50, nodes=1) == 50
    assert world.lost_at("a", 450, nodes=1) == 700  # tick 4, then round to ticks 5 (#) and 7 (.)
    assert simulate.World([trace("b", "###")]).lost_at("b", 0, nodes=1) == float("inf")


def test_a_gang_holds_a_zone_while_its_count_is_at_least_its_size():
    world = simulate.World([trace("a", "4432104")])
    assert world.available("a", 0, nodes=4) and not world.available("a", 250, nodes=4)
    assert world.available("a", 250, nodes=2)
    assert world.lost_at("a", 0, nodes=4) == 200  # down to 3 of 4: the gang of 4 is lost with any host
    assert world.lost_at("a", 0, nodes=3) == 300 and world.lost_at("a", 0, nodes=1) == 500
    assert world.back_at("a", 250, nodes=4) == 600 and world.back_at("a", 250, nodes=3) == 250


def test_traces_load_from_any_folder_in_the_shared_format(tmp_path):
    write_traces(tmp_path / "nested" / "deeper", [trace("us-east-1a", "#.#"), trace("us-west-2b", "..#", gap=195)])
    loaded = simulate.load_traces(tmp_path)
    assert [(t.zone, t.gap_seconds, t.counts) for t in loaded] == [
        ("us-east-1a", GAP, (1, 0, 1)), ("us-west-2b", 195.0, (0, 0, 1))]
    (tmp_path / "broken.json").write_text('{"data": [1]}')
    with pytest.raises(ValueError, match="not a trace file"):
        simulate.load_traces(tmp_path)
    with pytest.raises(ValueError, match="no trace files"):
        simulate.load_traces(tmp_path / "empty")


def test_the_simulator_runs_the_policy_the_workflow_runs():
    assert simulate.VaultLayer.next_placement is policy.next_placement
    assert simulate.VaultLayer.review is policy.review


# A 2 h job, 6 min changeover, 120 s notice, a 6 s save every 30 min; 100 s ticks.
MODEL = simulate.Model(work_hours=2, deadline_hours=4)


def test_a_reclaim_with_notice_loses_no_work_and_the_run_fails_over_to_the_other_zone():
    world = simulate.World([trace("a", "#" * 36 + "." * 200), trace("b", "#" * 236)])
    result = simulate.simulate_run(simulate.VaultLayer(), world, MODEL, start=0)
    # a: trains from 360 s; the notice at 3480 s keeps 3114 s of work (1800 + 1314, one 6 s save between);
    # released after the 6 s save, b trains from 3846 s, the 4086 s left need two more saves: 7944 s.
    assert result.reclaims == 1 and result.finished_hours == pytest.approx(7944 / 3600)
    assert result.cost == pytest.approx(0.3 * 7944 / 3600)  # spot price for every second a host was held
    assert result.on_demand_hours == 0


def test_restart_from_zero_loses_everything_and_same_zone_keeps_its_last_checkpoint():
    world = simulate.World([trace("a", "#" * 36 + "." * 18 + "#" * 400)])
    restart = simulate.simulate_run(baselines.OneZone(world, 0, 0, checkpoints=False), world, MODEL, start=0)
    assert restart.finished_hours == pytest.approx((5400 + 360 + 7200) / 3600)  # from step 0 at 5400 s
    same_zone = simulate.simulate_run(baselines.OneZone(world, 0, 0, checkpoints=True), world, MODEL, start=0)
    assert same_zone.finished_hours == pytest.approx((5400 + 360 + 5400 + 12) / 3600)  # from its 1800 s save


def test_a_gang_is_reclaimed_when_its_zone_drops_below_its_size_and_pays_for_every_host():
    """The count goes from 2 to 1 at 3600 s: one host runs on, a gang of 2 is lost and fails over, exactly as one
    host on a zone that drops to 0 (the reclaim test above)."""
    world = simulate.World([trace("a", "2" * 36 + "1" * 200), trace("b", "2" * 236)])
    single = simulate.simulate_run(simulate.VaultLayer(), world, MODEL, start=0)
    assert single.reclaims == 0 and single.finished_hours == pytest.approx((360 + 7200 + 18) / 3600)
    gang_model = replace(MODEL, nodes=2)
    gang, status = simulate.simulate(simulate.VaultLayer(), world, gang_model, start=0)
    assert gang.reclaims == 1 and gang.finished_hours == pytest.approx(7944 / 3600)
    assert [(r.pool.split("/")[1], r.nodes) for r in status.attempts] == [("a", 2), ("b", 2)]
    assert gang.cost == pytest.approx(2 * 0.3 * 7944 / 3600)  # both hosts, every second they were held
    [summary] = simulate.compare({"vaultlayer": baselines.STRATEGIES["vaultlayer"]}, list(world.traces.values()),
                                 gang_model, starts=1)
    assert summary.cost_vs_ondemand == pytest.approx(gang.cost / (2 * 2 * 1.0))  # against 2 on-demand hosts


def test_a_gang_waits_for_room_for_all_its_hosts_in_the_baselines_too():
    world = simulate.World([trace("a", "2" * 36 + "1" * 18 + "2" * 400)])
    gang_model = replace(MODEL, nodes=2)
    same_zone = simulate.simulate_run(baselines.OneZone(world, 0, 0, checkpoints=True), world, gang_model, start=0)
    assert same_zone.reclaims == 1 and same_zone.finished_hours == pytest.approx((5400 + 360 + 5400 + 12) / 3600)
    alone = simulate.simulate_run(baselines.OneZone(world, 0, 0, checkpoints=True), world, MODEL, start=0)
    assert alone.reclaims == 0
    next_zone = baselines.NextZone(world, 0)
    gang_spec = gang_model.spec(list(world.traces.values()), checkpoints=True)
    later = simulate.EPOCH + timedelta(seconds=3700)  # the count is 1
    waited = next_zone.next_placement(gang_spec, RunStatus(run_id="r"), later)
    assert isinstance(waited, policy.Wait) and waited.seconds == pytest.approx(5400 - 3700)
    placed = next_zone.next_placement(gang_spec, RunStatus(run_id="r"), simulate.EPOCH)
    assert placed.placement.nodes == 2
    on_demand = simulate.simulate_run(baselines.OnDemand(world, 0), world, gang_model, start=0)
    one_host = simulate.simulate_run(baselines.OnDemand(world, 0), world, MODEL, start=0)
    assert on_demand.cost == pytest.approx(2 * one_host.cost)


def test_traces_of_smaller_clusters_are_refused_for_a_gang_with_what_to_do(tmp_path, capsys):
    folder = write_traces(tmp_path / "single", [trace("us-east-1a", "#.#"), trace("us-east-1b", "...")])
    assert len(simulate.load_traces(folder, nodes=1)) == 2
    with pytest.raises(ValueError, match=r"--nodes 4: .* never have 4 hosts up in us-east-1a \(at most 1\)") as err:
        simulate.load_traces(folder, nodes=4)
    assert "us-east-1b" not in str(err.value)  # a zone with no host at all says nothing about its cluster
    assert "or --nodes 1" in str(err.value) and "clusters of 4 or more hosts" in str(err.value)
    assert goodput.main(["--traces", str(folder), "--nodes", "4", "--starts", "1"]) == 2
    assert "never have 4 hosts up" in capsys.readouterr().err
    assert goodput.main(["--traces", str(folder), "--nodes", "0", "--starts", "1"]) == 2
    assert "--nodes 0: must be more than zero" in capsys.readouterr().err


def test_synthetic_gangs_count_hosts_and_single_hosts_are_the_traces_they_were():
    single, gangs = simulate.synthetic_traces(3, days=5), simulate.synthetic_traces(3, days=5, nodes=4)
    assert {c for t in single for c in t.counts} == {0, 1}
    assert {c for t in gangs for c in t.counts} == {0, 1, 2, 3, 4}
    assert [t.zone for t in gangs] == [t.zone for t in single]


def test_the_simulator_closes_attempts_as_the_workflow_does():
    """Through the workflow's accounting (workflows/accounting.py): a reclaimed attempt is fenced at its stored
    step and charged the steps past it when the next one resumes; a refusal keeps its kind and is fenced too."""
    world = simulate.World([trace("a", "#" * 36 + "." * 18 + "#" * 400)])
    result, status = simulate.simulate(baselines.OneZone(world, 0, 0, checkpoints=True), world, MODEL, start=0)
    reclaimed, completed = status.attempts
    # Trains from 360 s, lost at 3600 s without an emergency save: 3234 s computed (one 6 s save), 1800 s stored.
    assert (reclaimed.outcome, reclaimed.end_step, reclaimed.durable_step) == (AttemptOutcome.RECLAIMED, 3234, 1800)
    assert reclaimed.steps_lost == status.steps_lost == 1434 and completed.start_step == 1800
    assert status.fences == {1: 1800, 2: 7200} and (status.reclaims, status.durable_step) == (1, 7200)
    assert status.state == RunState.SUCCEEDED
    assert result.cost == status.cost_usd == pytest.approx(reclaimed.cost_usd + completed.cost_usd)

    refused_first = simulate.World([trace("a", "." * 10 + "#" * 226), trace("b", "#" * 236)])
    _, status = simulate.simulate(simulate.VaultLayer(), refused_first, MODEL, start=0)
    refused, placed = status.attempts
    assert (refused.outcome, refused.refusal, refused.cost_usd) == (AttemptOutcome.REFUSED, "no-capacity", None)
    assert f"{refused.pool} refused" in placed.placement_reason and status.fences == {1: -1, 2: 7200}


def test_on_demand_takes_over_when_spot_cannot_meet_the_deadline_and_the_deadline_holds():
    world = simulate.World([trace("a", "#" * 20 + "." * 400)])  # spot for 2000 s, then none for hours
    result = simulate.simulate_run(simulate.VaultLayer(), world, simulate.Model(work_hours=2, deadline_hours=3), 0)
    assert result.finished_hours <= 3 and result.on_demand_hours > 0


def test_a_deadline_that_cannot_be_met_stops_the_run_at_the_deadline():
    world = simulate.World([trace("a", "." * 1000)])
    spec = MODEL.spec(list(world.traces.values()), checkpoints=True)
    spot_only = spec.model_copy(update={"pools": spec.pools[:1]})
    result = simulate.simulate_run(simulate.VaultLayer(), world, MODEL, 0, spec=spot_only)
    assert result.finished_hours is None and result.stop_reason.startswith("limit deadline=")


def test_starts_fall_at_every_point_of_a_tick_not_on_its_boundary():
    """Traces change at tick boundaries only: a policy that asks once a tick from a start on a boundary would see
    each change the moment it happens. The starts' phases within the tick must cover it instead."""
    world = simulate.World(simulate.synthetic_traces(1, market="choppy"))
    tick = world.tick_seconds
    starts = simulate.start_offsets(world, 40)
    phases = sorted(start % tick for start in starts)
    assert len(set(round(p, 6) for p in phases)) == 40
    widest_gap = max(b - a for a, b in zip(phases, [*phases[1:], phases[0] + tick]))
    assert widest_gap < tick / 10
    assert all(0 <= b - a < world.seconds / 40 + tick for a, b in zip(starts, starts[1:]))  # still spread evenly


def test_the_slice_table_tells_a_gap_from_the_noise_of_its_starts():
    """bench/policy_slices.py marks a dearer slice "beyond 2 SE" only past two standard errors of the mean of the
    per-start differences (both policies run from the same starts)."""
    assert policy_slices.paired_standard_error([1.0, 2.0, 3.0, 4.0]) == pytest.approx((5 / 3 / 4) ** 0.5)
    assert policy_slices.paired_standard_error([0.2] * 10) == pytest.approx(0.0, abs=1e-12)
    assert policy_slices.paired_standard_error([0.2]) == float("inf")  # one start says nothing of the noise


def test_targets_hold_on_traces_no_constant_was_chosen_on():
    """36 h deadline, 24 h job: every run meets it, at no more than 40% of on-demand."""
    model = simulate.Model(deadline_hours=36)
    for seed in (1001, 1002, 1003):
        [summary] = simulate.compare({"vaultlayer": baselines.STRATEGIES["vaultlayer"]},
                                     simulate.synthetic_traces(seed), model, starts=12)
        assert summary.attainment == 1.0 and summary.cost_vs_ondemand <= 0.40, (seed, summary)


@pytest.mark.skipif(not REAL_TRACES.exists(), reason="../shared/traces is not beside this clone")
def test_targets_hold_on_the_real_spot_traces():
    """The benchmark's claim: every run meets the 36 h deadline at no more than 40% of on-demand, and
    costs less than Uniform Progress, which meets it too."""
    model = simulate.Model(deadline_hours=36)
    ours, uniform = simulate.compare({name: baselines.STRATEGIES[name] for name in ("vaultlayer", "uniform_progress")},
                                     simulate.load_traces(REAL_TRACES), model, starts=200)
    assert ours.attainment == uniform.attainment == 1.0
    assert ours.cost_vs_ondemand <= 0.40 and ours.cost_vs_ondemand < uniform.cost_vs_ondemand


@pytest.mark.skipif(not GANG_TRACES.exists(), reason="../shared/traces is not beside this clone")
def test_gangs_of_four_run_on_the_real_four_node_traces(capsys):
    assert goodput.main(["--traces", str(GANG_TRACES), "--nodes", "4", "--starts", "4", "--deadlines", "36"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("3 pools from") and "gangs of 4 hosts" in out and "uniform_progress" in out
    assert goodput.main(["--traces", str(REAL_TRACES), "--nodes", "4", "--starts", "1"]) == 2
    assert "never have 4 hosts up" in capsys.readouterr().err


def test_goodput_prints_every_policy_for_both_deadlines_as_json(capsys):
    assert goodput.main(["--synthetic", "7", "--starts", "3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(row["policy"], row["deadline_h"]) for row in rows] == [
        (name, deadline) for deadline in (36.0, 28.0) for name in baselines.POLICY_NAMES]
    for row in rows:
        assert {"policy", "deadline_h", "attainment", "cost_vs_ondemand", "p95_completion_h"} <= row.keys()
    on_demand = next(row for row in rows if row["policy"] == "on_demand")
    assert on_demand["attainment"] == 1.0 and on_demand["cost_vs_ondemand"] == pytest.approx(1.0, abs=0.01)


def test_vl_simulate_reads_a_folder_of_traces(tmp_path):
    folder = write_traces(tmp_path / "traces", simulate.synthetic_traces(5, regions=2, zones_per_region=1, days=5))

    def vl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cli.main", "simulate", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=120)

    result = vl("--traces", str(folder), "--work", "6", "--deadline", "9", "--starts", "4", "--policy", "all", "--json")
    assert result.returncode == 0, result.stderr
    assert [row["policy"] for row in json.loads(result.stdout)] == list(baselines.POLICY_NAMES)
    table = vl("--traces", str(folder), "--work", "6", "--deadline", "9", "--starts", "4")
    assert table.returncode == 0 and "vaultlayer" in table.stdout and "attainment" in table.stdout
    bad = vl("--traces", str(folder), "--work", "6", "--deadline", "5")
    assert bad.returncode == 2 and "must be at least the work" in bad.stderr
    too_few = vl("--traces", str(folder), "--work", "6", "--deadline", "9", "--nodes", "2")
    assert too_few.returncode == 2 and "never have 2 hosts up" in too_few.stderr and "--nodes 1" in too_few.stderr
    gangs = write_traces(tmp_path / "gangs", simulate.synthetic_traces(5, regions=2, zones_per_region=1, days=5,
                                                                       nodes=2))
    table = vl("--traces", str(gangs), "--work", "6", "--deadline", "9", "--starts", "4", "--nodes", "2")
    assert table.returncode == 0 and "gangs of 2 hosts" in table.stdout and "vaultlayer" in table.stdout
