"""A gang under `vl run --nodes 2`: two local hosts (process groups on 127.0.0.1) running one torchrun job of 2x2 ranks
(DDP on CPU, gloo), through the real workflow and host agents on the real dev server. A node reclaimed with notice
makes the whole gang save and move; a node killed without notice stops the other; a pool that gives only part of a
gang is released; a cancel while a gang is being provisioned leaves no host. The final weights are compared with a
plain, uninterrupted 2x2 torchrun."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from temporalio.client import WorkflowFailureError

from tests.conftest import REPO, assert_same_weights, group_alive, host_pgids, make_spec
from tests.helpers import (
    Failpoints,
    HeldScript,
    cancel_taken,
    control_dir,
    free_port,
    hold_script,
    made_once,
    thaw,
    wait_for_progress,
    wait_until,
)
from tests.test_distributed import plain_env, rank_errors
from tests.test_run_e2e import record_histories, result_of
from vaultlayer import client as vl_client
from vaultlayer import failpoints, protocol
from vaultlayer.models import AttemptOutcome, Host, Pool, RunState

TRAIN_DDP = REPO / "examples" / "train_ddp.py"
STEPS = 60


def gang_torchrun(ranks_per_node: int, *args: str, node_rank: str = "$VL_NODE_RANK",
                  master_addr: str = "$VL_MASTER_ADDR", master_port: str = "$VL_MASTER_PORT") -> list[str]:
    """The command of every host: torchrun's static rendezvous from the variables the agent sets and expands."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", node_rank,
            "--master_addr", master_addr, "--master_port", master_port, f"--nproc_per_node={ranks_per_node}",
            str(TRAIN_DDP), *args]


def run_plain_gang(out: Path) -> None:
    port = str(free_port())
    nodes = [subprocess.Popen(gang_torchrun(2, "--steps", str(STEPS), "--out", str(out), node_rank=str(rank),
                                            master_addr="127.0.0.1", master_port=port),
                              env=plain_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    for node in nodes:
        stdout, stderr = node.communicate(timeout=300)
        assert node.returncode == 0, stdout[-2000:] + rank_errors(stderr)


@pytest.fixture(scope="session")
def gang_reference(tmp_path_factory) -> Path:
    """The --out of a plain 2x2 torchrun of train_ddp.py: two torchrun processes, one per node, no vl at all."""
    return made_once(tmp_path_factory, f"gang-ddp-{STEPS}.pt", run_plain_gang)


def gang_spec(tmp_path: Path, out: Path, ranks_per_node: int = 2, steps: int = STEPS, **overrides):
    command = gang_torchrun(ranks_per_node, "--steps", str(steps), "--step-time", "0.05", "--out", str(out))
    return make_spec(tmp_path, steps=steps, out=out, nodes=2, command=command, **overrides)


async def hold_gang(client, vl_home: Path, run_id: str, attempt: int, steps: int) -> tuple[list[Host], HeldScript]:
    """The attempt's hosts, with node 0's script frozen once the attempt made `steps` steps (so every rank of the
    gang waits in its next collective): the test acts before the run can move on or end; `thaw` lets it go."""
    status = await wait_for_progress(client, run_id, steps=0, attempt=attempt, timeout=180)
    hosts = status.current_hosts
    assert len({host.host_id for host in hosts}) == 2, "one attempt holds both hosts"
    control = control_dir(vl_home, run_id, hosts[0].host_id, attempt)
    return hosts, await hold_script(control, status.current_attempt.start_step + steps)


def assert_no_host_left(vl_home: Path) -> None:
    assert not any(group_alive(pgid) for pgid in host_pgids(vl_home)), "a host outlived its gang"


async def test_a_gang_reclaimed_on_node_1_then_node_0_saves_and_moves_as_one_and_ends_identically(
        temporal_env, control, vl_home, tmp_path, gang_reference):
    out = tmp_path / "w.pt"
    spec = gang_spec(tmp_path, out)
    client = temporal_env.client
    await vl_client.submit(client, spec, queue=control)
    for attempt, node in ((1, 1), (2, 0)):
        hosts, held = await hold_gang(client, vl_home, spec.run_id, attempt, steps=15)
        try:
            ack = await vl_client.reclaim(client, spec.run_id, node=node)  # with a notice, on that node only
            assert ack.host == hosts[node].host_id
            noticed = control_dir(vl_home, spec.run_id, ack.host, attempt) / protocol.NOTICE_FILE

            async def notice_forwarded():
                return noticed.exists()

            await wait_until(notice_forwarded, 60, f"the notice to reach node {node}'s script")
        finally:
            thaw(held.pids)
    status = await result_of(client, spec.run_id, timeout=300)

    assert status.state == RunState.SUCCEEDED, status.stop_reason
    reclaimed = [a for a in status.attempts if a.outcome == AttemptOutcome.RECLAIMED]
    assert [a.reason.split(" (")[0] for a in reclaimed] == ["node 1", "node 0"], status.attempts
    assert all(a.emergency_save == "saved" and len(a.hosts) == 2 and a.nodes == 2 for a in reclaimed)
    for record, following in zip(status.attempts, status.attempts[1:]):
        # Every rank of both nodes saved the same step, and held there: nothing trained is lost.
        assert following.start_step == record.durable_step == record.end_step, status.attempts
    assert status.steps_lost == 0
    manifests = [json.loads(p.read_text()) for p in (tmp_path / "storage" / spec.run_id / "checkpoints").glob(
        "*/MANIFEST.json")]
    assert manifests and all(m["world_size"] == 4 for m in manifests)
    assert all(any(f["path"] == "rng/rank-00003.pt" for f in m["files"]) for m in manifests), \
        "a checkpoint holds node 1's ranks' parts too"
    assert_same_weights(out, gang_reference)
    assert_no_host_left(vl_home)


async def test_a_node_killed_without_notice_stops_the_other_and_the_gang_resumes_identically(
        temporal_env, control, vl_home, tmp_path, gang_reference):
    out = tmp_path / "w.pt"
    spec = gang_spec(tmp_path, out)
    client = temporal_env.client
    await vl_client.submit(client, spec, queue=control)
    hosts, held = await hold_gang(client, vl_home, spec.run_id, 1, steps=25)
    try:
        await wait_for_progress(client, spec.run_id, steps=0, durable=10, attempt=1)
        os.killpg(int(hosts[1].handle["pgid"]), signal.SIGKILL)  # node 1 vanishes: no notice
    finally:
        thaw(held.pids)
    survivor = int(hosts[0].handle["pgid"])

    async def survivor_stopped():
        return not group_alive(survivor)

    await wait_until(survivor_stopped, 60, "node 0 to be stopped with its gang")  # not left hanging, not billing
    status = await result_of(client, spec.run_id, timeout=300)

    assert status.state == RunState.SUCCEEDED, status.stop_reason
    first = status.attempts[0]
    assert first.outcome == AttemptOutcome.RECLAIMED and first.reason.startswith("node 1"), first
    assert status.attempts[1].start_step == first.durable_step >= 10
    assert_same_weights(out, gang_reference)
    assert_no_host_left(vl_home)


async def test_a_pool_that_can_give_only_part_of_the_gang_is_released_and_the_run_moves(
        temporal_env, control, vl_home, tmp_path):
    (vl_home / "local.toml").write_text("[capacity]\na = 1\n")  # zone a holds one host, the gang needs two
    out = tmp_path / "w.pt"
    spec = gang_spec(tmp_path, out, ranks_per_node=1, steps=10,
                     pools=[Pool(zone="a", price_per_hour=36.0), Pool(zone="b", price_per_hour=36.0)])
    client = temporal_env.client
    await vl_client.submit(client, spec, queue=control)
    status = await result_of(client, spec.run_id, timeout=240)

    assert status.state == RunState.SUCCEEDED, status.stop_reason
    refused, ran = status.attempts
    assert refused.outcome == AttemptOutcome.REFUSED and "could give 1 of 2 hosts" in refused.reason, refused
    assert refused.pool.startswith("local/a/") and ran.pool.startswith("local/b/")
    assert refused.cost_usd and refused.cost_usd > 0, "the host it held while the gang was incomplete is paid for"
    [held] = [json.loads(p.read_text()) for p in (vl_home / "hosts" / spec.run_id).glob("*/host.json")
              if json.loads(p.read_text())["attempt"] == 1]
    assert held["released"], held
    assert ran.outcome == AttemptOutcome.COMPLETED and len(ran.hosts) == 2
    assert_no_host_left(vl_home)


async def test_a_cancel_while_a_gang_is_provisioned_leaves_no_host(temporal_env, control, vl_home, tmp_path,
                                                                  monkeypatch):
    points = Failpoints(tmp_path / "failpoints").install(monkeypatch)
    between = failpoints.provisioning_node(1, 1)
    points.arm(between)  # node 0's host exists, node 1's not yet
    spec = gang_spec(tmp_path, tmp_path / "w.pt")
    client = temporal_env.client
    handle = client.get_workflow_handle(spec.run_id)

    try:
        await vl_client.submit(client, spec, queue=control)
        await points.wait_reached(between, timeout=60)
        assert len(host_pgids(vl_home)) == 1
        await vl_client.cancel(client, spec.run_id)
        await wait_until(lambda: cancel_taken(handle), 60, "the workflow to take the cancel")
    finally:
        points.release(between)  # node 1's host is made after the cancel: the reap must find it too
    with pytest.raises(WorkflowFailureError):
        await asyncio.wait_for(handle.result(), 60)
    assert (await vl_client.status(client, spec.run_id)).state == RunState.CANCELLED
    assert len(host_pgids(vl_home)) == 2
    assert_no_host_left(vl_home)


async def test_a_gang_node_taken_before_its_agent_started_is_a_reclaim_and_the_gang_is_released(
        temporal_env, control, vl_home, tmp_path, monkeypatch):
    """Node 1's agent is held before it polls (a failpoint) and its host taken there, while node 0's agent has
    answered the roll call: the start watch finds node 1 gone and gives its call up rather than waiting out the
    5-minute start timeout, and the attempt is a reclaim (no host fault, nothing excluded) with both hosts released.
    The run is cancelled once the next attempt has its hosts: no script of this test need run."""
    points = Failpoints(tmp_path / "failpoints").install(monkeypatch)
    held = failpoints.before_poll("h-1-n1")
    points.arm(held)
    spec = gang_spec(tmp_path, tmp_path / "w.pt", ranks_per_node=1, steps=10,
                     start_timeout_seconds=300.0)  # the product's: waited out, the test would outlast its guard
    client = temporal_env.client
    handle = client.get_workflow_handle(spec.run_id)
    await vl_client.submit(client, spec, queue=control)
    try:
        await points.wait_reached(held)
        await vl_client.reclaim(client, spec.run_id, with_notice=False, node=1)

        async def next_attempt():
            status = await vl_client.status(client, spec.run_id)
            return status if len(status.attempts) >= 2 and status.attempts[0].outcome is not None else None

        status = await wait_until(next_attempt, 150, "the first attempt given up on and the next one begun")
    finally:
        points.release(held)
    first = status.attempts[0]
    assert first.outcome == AttemptOutcome.RECLAIMED, first
    assert "node 1 (h-1-n1): host gone before its agent started" in first.reason, first
    assert status.host_faults == 0 and status.excluded_hosts == [], status
    await vl_client.cancel(client, spec.run_id)
    with pytest.raises(WorkflowFailureError):
        await asyncio.wait_for(handle.result(), 120)
    await record_histories(client, spec.run_id)  # VL_RECORD_HISTORIES: the replay guard covers the gang's watch
    assert_no_host_left(vl_home)
