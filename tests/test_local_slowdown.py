"""Slowed local zones (`[slowdown]` in VL_HOME/local.toml): the throttle that duty-cycles a host's process group
with SIGSTOP/SIGCONT (activities/providers/local/throttle.py), the checks on the settings, and a real host of a
slowed zone provisioned and taken back. Nothing here measures speed (that is a benchmark's business): each test
waits on a process state it can observe, with a deadline that only bounds a broken run."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.control import ControlActivities
from activities.providers.base import ProviderConfigError
from activities.providers.local import LocalProvider, group_alive, group_members, kill_group, throttle
from tests.conftest import host_pgids, make_counter_spec
from tests.helpers import Failpoints, wait_for_progress, wait_until
from tests.test_run_e2e import record_histories
from vaultlayer import client as vl_client
from vaultlayer import failpoints
from vaultlayer.models import AttemptOutcome, Placement, Pool, ProvisionInput, RunState
from workflows.speed import speeds

GUARD_SECONDS = 60  # bounds a broken run; nothing is asserted on how long a wait took


def until(check: Callable[[], object], what: str, timeout: float = GUARD_SECONDS) -> object:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)  # a poll of /proc, not a wait for anything to happen
    return value


def state(pid: int) -> str | None:
    """The process's state letter (/proc/<pid>/stat): T stopped, Z zombie, None gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def all_stopped(pids: list[int]) -> bool:
    return all(state(pid) == "T" for pid in pids)


def none_stopped(pids: list[int]) -> bool:
    return all(state(pid) != "T" for pid in pids)


def throttles_of(pgid: int) -> list[int]:
    """Throttle processes of group `pgid` still on this machine, found by their command line."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if any(arg.endswith(b"throttle.py") for arg in argv) and str(pgid).encode() in argv:
            found.append(int(cmdline.parent.name))
    return found


@pytest.fixture
def group() -> Iterator[tuple[subprocess.Popen, list[int]]]:
    """A process group as a host is one: a leader (a shell, as the agent) in a session of its own and a child
    (as the script). Yields the leader and the pids of both."""
    leader = subprocess.Popen(["sh", "-c", "sleep 600 & wait"], start_new_session=True)
    try:
        members = until(lambda: len(found := group_members(leader.pid)) == 2 and found, "the shell's child")
        yield leader, sorted(pid for pid, _ in members)
    finally:
        kill_group(leader.pid)
        leader.wait()


def test_a_throttled_group_is_stopped_and_runs_again(group, tmp_path):
    leader, pids = group
    slower = throttle.start(leader.pid, 4.0, tmp_path / "throttle.log")
    try:
        until(lambda: all_stopped(pids), "the whole group stopped at once")
        until(lambda: none_stopped(pids), "the whole group running again")
        until(lambda: all_stopped(pids), "the group stopped again: the throttle goes on")
    finally:
        slower.terminate()
        slower.wait(GUARD_SECONDS)
    assert none_stopped(pids)


@pytest.mark.parametrize("reaped", [True, False], ids=["gone", "zombies-left"])
def test_the_throttle_ends_once_its_group_is_gone_and_leaves_nothing_stopped(group, tmp_path, reaped):
    """Gone means gone from /proc, or only zombies left (PID 1 in a container may never reap them)."""
    leader, pids = group
    slower = throttle.start(leader.pid, 4.0, tmp_path / "throttle.log")
    until(lambda: all_stopped(pids), "the throttle at work")
    os.killpg(leader.pid, signal.SIGKILL)  # as release, reap, a reclaim and `vl down` end a host; stopped, it dies too
    if reaped:
        leader.wait()  # the child, orphaned, is init's to reap
    assert slower.wait(GUARD_SECONDS) == 0, (tmp_path / "throttle.log").read_text()
    assert none_stopped(pids)
    assert not group_alive(leader.pid)


def test_a_sigterm_to_the_throttle_leaves_the_group_running(group, tmp_path):
    leader, pids = group
    # Runs 0.1 s of every 600 s: once seen stopped, the group stays stopped until the throttle lets it go.
    slower = throttle.start(leader.pid, 6000.0, tmp_path / "throttle.log", period=600.0)
    until(lambda: all_stopped(pids), "the group stopped")
    slower.terminate()
    assert slower.wait(GUARD_SECONDS) == 128 + signal.SIGTERM
    assert none_stopped(pids), "the throttle must send SIGCONT before it exits"
    assert group_alive(leader.pid)


def provision_input(zone: str, run_id: str = "r") -> ProvisionInput:
    return ProvisionInput(run_id=run_id, placement=Placement(pool=Pool(zone=zone), attempt=1))


@pytest.mark.parametrize("value", ["1", "1.0", "0.5", "-4", '"fast"', "true", "nan", "inf", "[4.0]"])
def test_a_bad_slowdown_is_refused_before_any_host_starts(vl_home, value):
    settings = vl_home / "local.toml"
    settings.write_text(f"[slowdown]\nslow = {value}\n")
    provider = LocalProvider(vl_home=vl_home, temporal_env={})
    with pytest.raises(ProviderConfigError) as refused:
        provider.provision(provision_input("slow"))
    message = str(refused.value)
    assert str(settings) in message and "[slowdown] slow" in message and "number above 1" in message, message
    assert not (vl_home / "hosts").exists(), "no host may start on bad settings"


@pytest.mark.parametrize("text, named", [
    ('[capacity]\na = "two"\n', "[capacity] a"),
    ("[capacity]\na = -1\n", "[capacity] a"),
    ("[slowdonw]\nslow = 4.0\n", "'slowdonw'"),
    ("slowdown = 4.0\n", "slowdown must be a table"),
    ("[slowdown\n", "cannot be read as TOML"),
])
def test_other_mistakes_in_local_toml_are_refused_by_name(vl_home, text, named):
    (vl_home / "local.toml").write_text(text)
    with pytest.raises(ProviderConfigError) as refused:
        LocalProvider(vl_home=vl_home, temporal_env={}).provision(provision_input("a"))
    assert named in str(refused.value) and str(vl_home / "local.toml") in str(refused.value)
    assert not (vl_home / "hosts").exists()


def test_the_provision_activity_fails_for_good_on_a_bad_slowdown(vl_home):
    """A retry cannot mend a file: the run fails with the reason rather than retrying it."""
    (vl_home / "local.toml").write_text("[slowdown]\nslow = 0.25\n")
    control = ControlActivities(vl_home, {})
    with pytest.raises(ApplicationError) as failed:
        ActivityEnvironment().run(control.provision, provision_input("slow"))
    assert failed.value.non_retryable and "[slowdown] slow = 0.25" in str(failed.value)


@pytest.mark.parametrize("taken_back_by", ["release", "reap"])
def test_a_host_of_a_slowed_zone_is_throttled_and_leaves_nothing_behind(vl_home, temporal_address, taken_back_by):
    """A real `vl agent` host (it polls the test server's task queue, so it stays up until taken back)."""
    (vl_home / "local.toml").write_text("[slowdown]\nslow = 4.0\n[capacity]\nslow = 2\n")
    provider = LocalProvider(vl_home=vl_home, temporal_env={"TEMPORAL_ADDRESS": temporal_address})
    host = provider.provision(provision_input("slow", run_id="slowed")).host
    pgid = int(host.handle["pgid"])
    tag = provider.host_dir("slowed", host.host_id) / "host.json"
    recorded = json.loads(tag.read_text())
    assert recorded["slowdown"] == 4.0, recorded
    # The tag names the throttle the moment it is spawned; /proc shows it as one once its interpreter runs.
    until(lambda: recorded["throttle_pid"] in throttles_of(pgid), "the recorded throttle running for the group")
    until(lambda: state(pgid) == "T", "the host's agent stopped by its throttle")
    until(lambda: state(pgid) not in ("T", None), "the host's agent running again")

    if taken_back_by == "release":
        provider.release(host)  # waits for the group to be gone, then for its throttle
        assert not group_alive(pgid) and throttles_of(pgid) == []
    else:
        assert provider.reap("slowed") == [host.host_id]  # kills the group without waiting, as it always did
        until(lambda: not group_alive(pgid), "the host gone")
        until(lambda: throttles_of(pgid) == [], "its throttle gone by itself")
    assert json.loads(tag.read_text())["released"]


def test_a_zone_without_a_slowdown_gets_no_throttle(vl_home):
    (vl_home / "local.toml").write_text("[slowdown]\nslow = 4.0\n")
    provider = LocalProvider(vl_home=vl_home, temporal_env={"TEMPORAL_ADDRESS": "127.0.0.1:1"})  # no server needed
    host = provider.provision(provision_input("fast", run_id="fast")).host
    try:
        recorded = json.loads((provider.host_dir("fast", host.host_id) / "host.json").read_text())
        assert "throttle_pid" not in recorded and throttles_of(int(host.handle["pgid"])) == []
    finally:
        provider.release(host)



async def test_a_run_moves_to_the_pool_with_the_lower_cost_per_step(temporal_env, control, vl_home, tmp_path,
                                                                    monkeypatch):
    """Two local pools that no prior tells apart: "slow" (1.0 an hour, its hosts throttled 10x) and "fast" (1.2 an
    hour). The run starts on the cheaper per hour; once it has trained on both (each left by a reclaim with notice),
    the policy knows "fast" costs less per step, and moves the run there from the "slow" host it was given while
    "fast" cooled down. That third host's agent is held before it polls (a failpoint), so the move always leaves a host
    whose agent never started: the run waits for it a bounded while (notice, heartbeat timeout, a grace), not its whole
    start timeout, and the provider's word that it is gone makes it a move, not a host fault. The slowed hosts keep
    their heartbeats (no host fault), and a cancel leaves no host, no throttle. The script has far more steps than
    the test waits for, so no step of it races the test."""
    points = Failpoints(tmp_path / "failpoints").install(monkeypatch)
    unstarted = failpoints.before_poll("h-3")
    points.arm(unstarted)
    (vl_home / "local.toml").write_text("[slowdown]\nslow = 10.0\n")
    out = tmp_path / "out.json"
    slow, fast = Pool(zone="slow", price_per_hour=1.0), Pool(zone="fast", price_per_hour=1.2)
    spec = make_counter_spec(tmp_path, steps=100_000, out=out, step_time=0.01,
                             pools=[slow, fast], total_steps=100_000, changeover_seconds=2.0, notice_seconds=5.0,
                             speed_prior_seconds=0.0,  # seconds of measurement are all the policy goes by
                             # the product's start timeout: a move that waited it out would outlast the guard
                             start_timeout_seconds=300.0)
    client = temporal_env.client
    handle = client.get_workflow_handle(spec.run_id)
    await vl_client.submit(client, spec, queue=control)

    for attempt in (1, 2):  # slow, then fast while slow cools: each measured, then reclaimed
        await wait_for_progress(client, spec.run_id, steps=20, durable=10, attempt=attempt)
        await vl_client.reclaim(client, spec.run_id)

    async def moved():
        status = await vl_client.status(client, spec.run_id)
        current = status.current_attempt
        return status if current is not None and current.attempt == 4 and status.current_host else None
    try:
        # Whether its agent reached the point or was still starting when its host was taken, it never polled.
        status = await wait_until(moved, GUARD_SECONDS, "the fourth attempt running, the third ended")
    except AssertionError as err:
        status = await vl_client.status(client, spec.run_id)
        seen = [(r.pool, r.outcome, r.reason, r.trained_steps, r.trained_seconds) for r in status.attempts]
        raise AssertionError(f"{err}: {seen}") from None
    finally:
        points.release(unstarted)  # its host is gone by now; the point must not outlive the test
    pools = [record.pool for record in status.attempts]
    assert pools == [slow.key, fast.key, slow.key, fast.key], status.attempts
    detour = status.attempts[2]
    assert detour.outcome == AttemptOutcome.VACATED and "less per unit of work" in detour.reason, detour
    assert detour.end_step is None and detour.trained_steps is None, "the third host's agent never ran the attempt"
    measured = speeds(spec, status)
    assert measured.measured_steps_per_second(fast) > 1.5 * measured.measured_steps_per_second(slow)

    await vl_client.cancel(client, spec.run_id)
    with pytest.raises(WorkflowFailureError):
        await asyncio.wait_for(handle.result(), GUARD_SECONDS)
    await record_histories(client, spec.run_id)  # VL_RECORD_HISTORIES: the replay guard covers a move for speed
    status = await vl_client.status(client, spec.run_id)
    assert status.state == RunState.CANCELLED
    # No heartbeat went missing on the slowed hosts: a lost one would be a host fault.
    assert (status.host_faults, status.reclaims) == (0, 2), status.attempts
    tags = [json.loads(path.read_text()) for path in (vl_home / "hosts" / spec.run_id).glob("*/host.json")]
    assert sorted(tag.get("slowdown") or 1.0 for tag in tags) == [1.0, 1.0, 10.0, 10.0], tags
    pgids = host_pgids(vl_home)
    assert not any(group_alive(pgid) for pgid in pgids), "a host outlived its run"
    assert not any(throttles_of(pgid) for pgid in pgids), "a throttle outlived its host"
