"""A gang (vl run --nodes N) in pieces: the command each host runs, the checkpoint its hosts store together, and
what the gang's attempt ended as. The whole of it under the real workflow is in tests/test_multinode.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from vaultlayer import checkpoint, protocol
from vaultlayer.checkpoint import CheckpointError, Standing
from vaultlayer.models import AttemptOutcome, AttemptResult, FailureCause, Host, Pool
from vaultlayer.request import RunRequest, RunRequestError, build_spec, gang_command
from workflows import gang

TORCHRUN = "/venv/bin/torchrun"


def test_a_torchrun_command_gets_the_gangs_rendezvous_from_the_hosts_variables():
    command = gang_command([TORCHRUN, "--nproc_per_node", "2", "train.py", "--steps", "3"], 4)
    assert command == [TORCHRUN, "--nnodes", "4", "--node_rank", "$VL_NODE_RANK", "--master_addr", "$VL_MASTER_ADDR",
                       "--master_port", "$VL_MASTER_PORT", "--nproc_per_node", "2", "train.py", "--steps", "3"]
    spelled = gang_command(["/venv/bin/python", "-m", "torch.distributed.run", "--nnodes=2", "--node-rank",
                            "$VL_NODE_RANK", "train.py"], 2)
    assert spelled[3:] == ["--master_addr", "$VL_MASTER_ADDR", "--master_port", "$VL_MASTER_PORT", "--nnodes=2",
                           "--node-rank", "$VL_NODE_RANK", "train.py"], "what the user gave is kept, not doubled"
    assert gang_command([TORCHRUN, "--nproc_per_node", "2", "train.py"], 1) == [TORCHRUN, "--nproc_per_node", "2",
                                                                                "train.py"]


@pytest.mark.parametrize("command, problem", [
    ([TORCHRUN, "--nnodes", "3", "train.py"], "--nnodes 3 but --nodes 2"),
    ([TORCHRUN, "--nnodes=1:4", "train.py"], "a gang is a fixed number of hosts"),
    ([TORCHRUN, "--standalone", "--nproc_per_node", "2", "train.py"], "standalone is one host"),
])
def test_a_torchrun_command_that_contradicts_the_gang_is_refused_before_any_host(command, problem):
    with pytest.raises(RunRequestError, match=problem):
        gang_command(command, 2)


def test_a_gang_refuses_zero_code_checkpoints_and_a_plain_command_is_warned_about(tmp_path):
    warned = []
    with pytest.raises(RunRequestError, match="--checkpoint-dir with --nodes 2"):
        build_spec(RunRequest(command=["python", "train.py"], workdir=str(tmp_path), nodes=2, checkpoint_dir="ckpt",
                              storage=(tmp_path / "s").as_uri()), warn=warned.append)
    spec = build_spec(RunRequest(command=["python", "train.py"], workdir=str(tmp_path), nodes=2,
                                 storage=(tmp_path / "s").as_uri()), warn=warned.append)
    assert spec.nodes == 2 and any("names no $VL_NODE_RANK" in line for line in warned), warned
    with pytest.raises(RunRequestError, match="--nodes 0: must be at least 1"):
        build_spec(RunRequest(command=["python"], workdir=str(tmp_path), nodes=0, storage=(tmp_path / "s").as_uri()))


def test_the_agent_expands_only_the_gang_variables_in_the_command():
    env = protocol.gang_environ(1, ["10.0.0.5", "10.0.0.6"], 29400)
    assert env == {"VL_NODE_RANK": "1", "VL_NUM_NODES": "2", "VL_NODE_ADDRS": "10.0.0.5,10.0.0.6",
                   "VL_MASTER_ADDR": "10.0.0.5", "VL_MASTER_PORT": "29400"}
    assert protocol.expand_gang_variables(
        ["--node_rank", "$VL_NODE_RANK", "--rdzv=${VL_MASTER_ADDR}:$VL_MASTER_PORT", "$HOME", "$VL_RUN_ID"], env) == \
        ["--node_rank", "1", "--rdzv=10.0.0.5:29400", "$HOME", "$VL_RUN_ID"]


# ---------------------------------------------------------------- one checkpoint, stored by every host


def staged(tmp_path: Path, name: str, files: dict[str, bytes]) -> Path:
    directory = tmp_path / name
    for relative, data in files.items():
        (directory / relative).parent.mkdir(parents=True, exist_ok=True)
        (directory / relative).write_bytes(data)
    return directory


def test_a_gang_checkpoint_is_complete_only_once_node_zero_merged_every_nodes_part(tmp_path):
    url, run = (tmp_path / "storage").as_uri(), "r-gang"
    node0 = staged(tmp_path, "n0", {"model.pt": b"weights", "rng/rank-00000.pt": b"r0", "rng/rank-00001.pt": b"r1"})
    node1 = staged(tmp_path, "n1", {"rng/rank-00002.pt": b"r2", "rng/rank-00003.pt": b"r3"})

    def standing() -> list[Standing]:
        return [entry.standing for entry in checkpoint.classify_checkpoints(url, run, {})]

    assert checkpoint.upload_checkpoint(node0, url, run, 1, 40, world_size=4, node=(0, 2)) is None
    assert checkpoint.gang_nodes_missing(url, run, 1, 40, 2) == [1]
    assert standing() == [Standing.PARTIAL], "one node's part is not a checkpoint"
    checkpoint.upload_checkpoint(node1, url, run, 1, 40, world_size=4, node=(1, 2))
    assert checkpoint.gang_nodes_missing(url, run, 1, 40, 2) == []
    assert standing() == [Standing.PARTIAL], "nothing is resumed before node 0 commits"

    ref = checkpoint.commit_gang_checkpoint(url, run, 1, 40, 2)
    assert checkpoint.choose_checkpoint(url, run, {}).chosen == ref
    restored = tmp_path / "restored"
    manifest = checkpoint.restore_checkpoint(ref, restored)
    assert manifest.world_size == 4
    assert sorted(p.relative_to(restored).as_posix() for p in restored.rglob("*") if p.is_file()) == [
        "model.pt", "rng/rank-00000.pt", "rng/rank-00001.pt", "rng/rank-00002.pt", "rng/rank-00003.pt"]
    stored = json.loads(Path(ref.url.removeprefix("file://"), "MANIFEST.json").read_text())
    assert [entry["path"] for entry in stored["files"]][0] == "model.pt"


def test_two_nodes_that_wrote_the_same_file_never_make_a_checkpoint(tmp_path):
    url, run = (tmp_path / "storage").as_uri(), "r-clash"
    for rank in (0, 1):
        part = staged(tmp_path, f"n{rank}", {"model.pt": f"node {rank}".encode()})
        checkpoint.upload_checkpoint(part, url, run, 1, 10, world_size=2, node=(rank, 2))
    with pytest.raises(CheckpointError, match="two nodes of the gang wrote model.pt"):
        checkpoint.commit_gang_checkpoint(url, run, 1, 10, 2)
    assert checkpoint.choose_checkpoint(url, run, {}).chosen is None


async def test_a_node_other_than_0_calls_its_emergency_save_stored_only_once_node_0_committed_the_step(tmp_path):
    """Its own part stored is not a checkpoint: "saved" ends the gang's attempt and stops node 0, so reporting it
    before node 0's commit lost the save (CI, stop 32: the step pruned as partial, the gang resumed one step back)."""
    from activities import host as agent
    from vaultlayer.models import AttemptInput, GangRole

    url, run = (tmp_path / "storage").as_uri(), "r-gang"
    staging = tmp_path / "staging"
    save = staging / protocol.committed_name(21, "n1")
    save.mkdir(parents=True)
    (save / "rng").mkdir()
    (save / "rng" / "rank-00001.pt").write_bytes(b"r1")
    protocol.write_save_record(save, protocol.SaveRecord(step=21, emergency=True, notice_id="notice-1", world_size=2))
    inp = AttemptInput(run_id=run, attempt=1, command=["true"], workdir=str(tmp_path), storage_url=url,
                       host=HOSTS[1], gang=GangRole(node_rank=1, addresses=["10.0.0.1", "10.0.0.2"], master_port=29400))
    uploader = agent.Uploader(inp, staging, durable_step=20)
    [staged_save] = agent.staged_saves(staging)
    assert await uploader.upload(staged_save)
    assert checkpoint.gang_nodes_missing(url, run, 1, 21, 2) == [0]
    assert not await uploader.emergency_durable("notice-1"), "node 0's part is not even in"

    node0 = staged(tmp_path, "n0", {"model.pt": b"weights", "rng/rank-00000.pt": b"r0"})
    checkpoint.upload_checkpoint(node0, url, run, 1, 21, world_size=2, node=(0, 2))
    uploader.commit_checked_at = -math.inf  # the next poll asks storage
    assert not await uploader.emergency_durable("notice-1"), "every part is in, but node 0 has not committed"

    checkpoint.commit_gang_checkpoint(url, run, 1, 21, 2)
    uploader.commit_checked_at = -math.inf
    assert await uploader.emergency_durable("notice-1")
    assert not await uploader.emergency_durable("another notice")


def test_a_file_named_like_a_node_manifest_is_refused():
    from vaultlayer.checkpoint.format import unsafe_path_reason

    assert "node manifest" in unsafe_path_reason("MANIFEST.node-00001.json")


# ---------------------------------------------------------------- what the gang's attempt ended as


HOSTS = [Host(host_id=f"h-1-n{rank}", provider="local", pool=Pool(), task_queue=f"q{rank}") for rank in range(2)]
STOPPED = AttemptResult(outcome=AttemptOutcome.CANCELLED, durable_step=30, end_step=34, reason="stopped with its gang")


def test_a_node_reclaimed_explains_the_script_error_its_peer_hit_after():
    reclaimed = AttemptResult(outcome=AttemptOutcome.RECLAIMED, durable_step=20, end_step=33, reason="reclaim notice",
                              emergency_save="saved")
    broken = AttemptResult(outcome=AttemptOutcome.FAILED, exit_code=1, cause=FailureCause.SCRIPT, durable_step=30,
                           end_step=33, reason="the script exited with code 1")
    result = gang.combine(HOSTS, [(1, reclaimed), (0, broken)], start_step=10)
    assert result.outcome == AttemptOutcome.RECLAIMED and result.emergency_save == "saved"
    assert result.reason == "node 1 (h-1-n1): reclaim notice"
    assert (result.durable_step, result.end_step, result.start_step) == (30, 33, 10), "node 0 commits checkpoints"
    assert not result.host_gone, "node 0 may still publish: the attempt is fenced"


def test_a_host_fault_names_the_faulty_host_and_a_script_failure_is_the_first_one():
    fault = AttemptResult(outcome=AttemptOutcome.HOST_FAULT, reason="heartbeats stopped while the host is running")
    result = gang.combine(HOSTS, [(0, STOPPED), (1, fault)], start_step=0)
    assert (result.outcome, result.faulty_host, result.durable_step) == (AttemptOutcome.HOST_FAULT, "h-1-n1", 30)
    first = AttemptResult(outcome=AttemptOutcome.FAILED, exit_code=3, cause=FailureCause.SCRIPT, reason="exit 3")
    second = AttemptResult(outcome=AttemptOutcome.FAILED, exit_code=1, cause=FailureCause.SCRIPT, reason="exit 1")
    assert gang.combine(HOSTS, [(1, first), (0, second)], 0).exit_code == 3


def test_a_gang_completes_only_when_every_node_did():
    done = AttemptResult(outcome=AttemptOutcome.COMPLETED, exit_code=0, durable_step=60, end_step=60)
    assert gang.combine(HOSTS, [(1, done), (0, done)], 0).outcome == AttemptOutcome.COMPLETED
    assert not gang.first_ending_stops_the_gang(done)
    assert gang.combine(HOSTS, [(0, done), (1, STOPPED)], 0).outcome == AttemptOutcome.CANCELLED


def test_vl_status_json_shows_the_gangs_hosts_per_attempt_and_now():
    from datetime import UTC, datetime

    from cli.render import attempt_line, status_json
    from vaultlayer.models import AttemptRecord, RunStatus

    record = AttemptRecord(attempt=1, pool="local/local/cpu/spot", host="h-1-n0", hosts=["h-1-n0", "h-1-n1"],
                           nodes=2, started_at=datetime.now(UTC))
    shown = status_json(RunStatus(run_id="r", attempts=[record], current_host=HOSTS[0], current_hosts=HOSTS))
    assert shown["attempts"][0]["hosts"] == ["h-1-n0", "h-1-n1"] and shown["hosts"] == ["h-1-n0", "h-1-n1"]
    assert shown["host"] == "h-1-n0" and "current_hosts" not in shown
    assert "hosts h-1-n0,h-1-n1" in attempt_line(record)


def test_a_local_rendezvous_port_is_free_below_the_ephemeral_range_and_never_picked_twice():
    """A port from a bind to port 0 lies in the ephemeral range, where any connection the machine opens may take
    it before the rendezvous listens (a loaded test run saw that happen to a Temporal port)."""
    import socket

    from activities.providers.local import free_port
    from activities.providers.local.provider import LISTEN_PORTS_FROM, _ephemeral_low

    picked = [free_port() for _ in range(50)]
    assert len(set(picked)) == len(picked)
    assert all(LISTEN_PORTS_FROM <= port < _ephemeral_low() for port in picked)
    with socket.socket() as taken:  # one already listened on is passed over
        taken.bind(("127.0.0.1", picked[-1] + 1))
        taken.listen()
        assert free_port() != picked[-1] + 1
