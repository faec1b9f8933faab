"""Many processes, one checkpoint: torchrun (DDP, FSDP2) under the SDK and under `vl run`, on CPU with gloo.

The SDK-level tests run torchrun with the agent's variables set by hand (a staging directory, a restore
directory); the end-to-end ones run `vl`'s real workflow and host agents on the real dev server. Every
comparison is against a plain, uninterrupted torchrun of the same example.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from temporalio.client import WorkflowFailureError

from tests.conftest import REPO, assert_same_weights, group_alive, host_pgids, make_spec
from tests.helpers import made_once, wait_for_progress
from tests.test_run_e2e import result_of
from vaultlayer import client as vl_client
from vaultlayer import protocol
from vaultlayer.models import AttemptOutcome, FailureCause, RunState

EXAMPLES = {"ddp": REPO / "examples" / "train_ddp.py", "fsdp": REPO / "examples" / "train_fsdp.py"}
RANKS_APART = REPO / "tests" / "samples" / "ranks_apart.py"


def torchrun(ranks: int, script: Path, *args: str) -> list[str]:
    # --standalone: a rendezvous on a free local port, so runs side by side never share one.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
            str(script), *args]


def plain_env(**contract: str) -> dict[str, str]:
    return protocol.without_contract_variables(os.environ) | {"OMP_NUM_THREADS": "1"} | contract


def rank_errors(stderr: str) -> str:
    """Each rank's own traceback lines first (torchrun prefixes them) and any native abort's reason, then the tail:
    the first rank to fail is the one to read, and its lines may sit far above torchrun's summary."""
    ranks = [line for line in stderr.splitlines() if (line.startswith("[rank") and "Warning" not in line)
             or any(native in line for native in ("terminate called", "what():", "Fatal Python error", "Aborted"))]
    return "\n".join(ranks[-80:]) + "\n...\n" + stderr[-2000:]


def run_torchrun(ranks: int, script: Path, *args: str, cwd: Path = REPO,
                 **contract: str) -> subprocess.CompletedProcess:
    """`cwd`: where a script that writes beside itself (the HF Trainer's output_dir) may write."""
    done = subprocess.run(torchrun(ranks, script, *args), env=plain_env(**contract), cwd=cwd, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + rank_errors(done.stderr)
    return done


@pytest.fixture(scope="session")
def torchrun_reference(tmp_path_factory):
    """The --out of a plain, uninterrupted torchrun of an example (no vl at all)."""

    def reference(example: str, steps: int, ranks: int = 2) -> Path:
        return made_once(tmp_path_factory, f"{example}-{steps}-{ranks}.pt", lambda out: run_torchrun(
            ranks, EXAMPLES[example], "--steps", str(steps), "--out", str(out)))

    return reference


def committed(staging: Path) -> list[Path]:
    return sorted(p for p in staging.iterdir() if not protocol.is_being_written(p.name))


def sdk_contract(place: Path, every: str = "20") -> dict[str, str]:
    return {protocol.ENV_STAGING_DIR: str(place / "staging"), protocol.ENV_CONTROL_DIR: str(place / "control"),
            protocol.ENV_CHECKPOINT_EVERY: every}


def restore_contract(save: Path) -> dict[str, str]:
    record = protocol.read_save_record(save)
    return {protocol.ENV_RESTORE_DIR: str(save), protocol.ENV_RESTORE_STEP: str(record.step),
            protocol.ENV_RESTORE_WORLD_SIZE: str(record.world_size)}


def test_a_notice_one_rank_has_not_seen_is_one_save_of_every_rank_at_the_same_step(tmp_path):
    done = run_torchrun(2, RANKS_APART, str(tmp_path), **{protocol.ENV_STAGING_DIR: str(tmp_path / "staging")})
    decisions = [json.loads((tmp_path / f"decisions-{rank}.json").read_text()) for rank in (0, 1)]
    assert decisions == [{"rank": 0, "saved": [1]}, {"rank": 1, "saved": [1]}], done.stdout
    [save] = committed(tmp_path / "staging")
    record = protocol.read_save_record(save)
    assert (record.step, record.emergency, record.notice_id, record.world_size) == (1, True, "n-1", 2)
    assert {p.name for p in save.iterdir() if not protocol.is_save_bookkeeping(p.name)} == {"rank-0.txt", "rank-1.txt"}


def test_a_save_is_committed_only_when_every_rank_has_written_its_part(tmp_path):
    from vaultlayer.sdk import _commit_part, _Slot

    staging = tmp_path / "staging"
    path, final = staging / protocol.staging_name(5, "abc"), staging / protocol.committed_name(5, "abc")
    path.mkdir(parents=True)
    record = protocol.SaveRecord(step=5, world_size=3)
    for rank in (0, 2):
        (path / f"part-{rank}").write_text("x")
        _commit_part(_Slot(step=5, path=path, final=final, notice=None, rank=rank, world_size=3), record)
    assert not committed(staging), "two of three ranks' parts are no checkpoint"
    _commit_part(_Slot(step=5, path=path, final=final, notice=None, rank=1, world_size=3), record)
    assert committed(staging) == [final]
    assert protocol.read_save_record(final).world_size == 3


def test_on_a_gang_each_host_commits_the_save_once_its_own_ranks_parts_are_in(tmp_path):
    """Ranks 2 and 3 of 4 on node 1: their host's staging directory only ever gets their parts (the other host's
    agent uploads ranks 0 and 1), so the host's save is committed from those two, and says the world was 4."""
    from vaultlayer.sdk import _commit_part, _Slot

    staging = tmp_path / "staging"
    path, final = staging / protocol.staging_name(5, "abc"), staging / protocol.committed_name(5, "abc")
    path.mkdir(parents=True)
    record = protocol.SaveRecord(step=5, world_size=4)
    _commit_part(_Slot(step=5, path=path, final=final, notice=None, rank=3, world_size=4, node_ranks=range(2, 4)),
                 record)
    assert not committed(staging)
    _commit_part(_Slot(step=5, path=path, final=final, notice=None, rank=2, world_size=4, node_ranks=range(2, 4)),
                 record)
    assert committed(staging) == [final] and protocol.read_save_record(final).world_size == 4


@pytest.mark.parametrize("example", ["ddp", "fsdp"])
def test_every_rank_resumes_from_one_save_bit_identically(example, tmp_path, torchrun_reference):
    out = tmp_path / "resumed.pt"
    run_torchrun(2, EXAMPLES[example], "--steps", "40", "--out", str(tmp_path / "first.pt"),
                 **sdk_contract(tmp_path / "first"))
    saves = committed(tmp_path / "first" / "staging")
    assert [protocol.read_save_record(s).step for s in saves] == [20, 40]
    assert all(protocol.read_save_record(s).world_size == 2 for s in saves)
    layout = {p.relative_to(saves[0]).as_posix() for p in saves[0].rglob("*") if p.is_file()}
    assert {"rng/rank-00000.pt", "rng/rank-00001.pt", "scheduler.pt"} <= layout
    if example == "fsdp":  # each rank its shard, rank 0 the metadata
        assert {"sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp"} <= layout
    else:
        assert {"model.pt", "optimizer.pt"} <= layout
    done = run_torchrun(2, EXAMPLES[example], "--steps", "60", "--out", str(out),
                        **sdk_contract(tmp_path / "second", every="1000"), **restore_contract(saves[0]))
    assert "resuming at step 20" in done.stdout
    assert_same_weights(out, torchrun_reference(example, 60))


def test_a_sharded_save_of_two_ranks_resumes_on_one(tmp_path, torchrun_reference):
    run_torchrun(2, EXAMPLES["fsdp"], "--steps", "40", "--out", str(tmp_path / "first.pt"),
                 **sdk_contract(tmp_path / "first"))
    step_20 = committed(tmp_path / "first" / "staging")[0]
    out = tmp_path / "one-rank.pt"
    done = run_torchrun(1, EXAMPLES["fsdp"], "--steps", "20", "--out", str(out),
                        **sdk_contract(tmp_path / "second", every="1000"), **restore_contract(step_20))
    assert "resuming at step 20 on 1 ranks" in done.stdout
    assert "written by 2 ranks and 1 resume it" in done.stdout  # the RNG caveat, said
    assert_same_weights(out, torchrun_reference("fsdp", 20))  # the 2-rank model at step 20, gathered on 1


def test_a_sharded_checkpoint_does_not_load_into_a_replicated_model(tmp_path):
    import vaultlayer.sdk
    from vaultlayer.pytorch import Checkpointer, RestoreError

    saved = tmp_path / "save"
    (saved / "sharded").mkdir(parents=True)
    env = {protocol.ENV_STAGING_DIR: str(tmp_path / "staging"), protocol.ENV_RESTORE_DIR: str(saved),
           protocol.ENV_RESTORE_STEP: "7"}
    vaultlayer.sdk._session.cache_clear()
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            with pytest.raises(RestoreError, match="sharded .* which this replicated model cannot load"):
                Checkpointer(torch.nn.Linear(2, 2)).resume()
    finally:
        vaultlayer.sdk._session.cache_clear()


@pytest.mark.parametrize("example", ["ddp", "fsdp"])
async def test_torchrun_under_vl_finishes_through_two_reclaims_identically(
        example, temporal_env, control, vl_home, tmp_path, torchrun_reference):
    out = tmp_path / "w.pt"
    steps = 200
    spec = make_spec(tmp_path, steps=steps, out=out, checkpoint_every="10",
                     command=torchrun(2, EXAMPLES[example], "--steps", str(steps), "--step-time", "0.05",
                                      "--out", str(out)))
    client = temporal_env.client
    await vl_client.submit(client, spec, queue=control)
    for attempt in (1, 2):
        await wait_for_progress(client, spec.run_id, steps=30, attempt=attempt, timeout=180)
        await vl_client.reclaim(client, spec.run_id)  # with a notice: every rank saves the same step
    status = await result_of(client, spec.run_id, timeout=300)

    assert status.state == RunState.SUCCEEDED, status.stop_reason
    reclaimed = [a for a in status.attempts if a.outcome == AttemptOutcome.RECLAIMED]
    assert len(reclaimed) == 2 and all(a.emergency_save == "saved" for a in reclaimed), status.attempts
    for record, following in zip(status.attempts, status.attempts[1:]):
        assert following.start_step == record.durable_step == record.end_step, status.attempts
    assert status.steps_lost == 0
    manifests = [json.loads(p.read_text()) for p in (tmp_path / "storage" / spec.run_id / "checkpoints").glob(
        "*/MANIFEST.json")]
    assert manifests and all(m["world_size"] == 2 for m in manifests), "the manifests say how many ranks wrote them"
    assert_same_weights(out, torchrun_reference(example, steps))
    assert not any(group_alive(pgid) for pgid in host_pgids(vl_home)), "a host outlived its run"


async def test_a_rank_that_crashes_fails_the_attempt_and_stops_the_other_ranks(temporal_env, control, vl_home,
                                                                              tmp_path):
    out = tmp_path / "w.pt"
    spec = make_spec(tmp_path, steps=200, out=out,
                     command=torchrun(2, EXAMPLES["ddp"], "--steps", "200", "--out", str(out),
                                      "--crash-rank", "1", "--crash-step", "30"))
    client = temporal_env.client
    await vl_client.submit(client, spec, queue=control)
    with pytest.raises(WorkflowFailureError):
        await asyncio.wait_for(client.get_workflow_handle(spec.run_id).result(), 240)
    status = await vl_client.status(client, spec.run_id)

    assert status.state == RunState.FAILED
    [attempt] = status.attempts  # torchrun stopped rank 0 and exited non-zero: no hang, no host fault
    assert attempt.outcome == AttemptOutcome.FAILED and attempt.cause == FailureCause.SCRIPT, attempt
    assert status.exit_code not in (None, 0) and "exited with code" in status.stop_reason, status.stop_reason
    assert not out.exists()
    assert not any(group_alive(pgid) for pgid in host_pgids(vl_home)), "a rank outlived the failed attempt"


OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
FRAMEWORKS = {"hf": "hf_trainer.py", "lightning": "lightning_fit.py"}


@pytest.mark.parametrize("framework", list(FRAMEWORKS))
def test_framework_callbacks_agree_on_the_save_step_across_two_ranks_and_resume_identically(framework, tmp_path):
    """The HF Trainer and Lightning samples with the lines `vl init` inserts, under torchrun (DDP, gloo)."""
    from vaultlayer.snippet import propose

    sample = REPO / "tests" / "samples" / FRAMEWORKS[framework]
    script = tmp_path / sample.name
    script.write_text(propose(sample.read_text(), sample.name).source)
    steps = "24"
    reference = tmp_path / "plain.pt"
    run_torchrun(2, sample, "--steps", steps, "--out", str(reference), cwd=tmp_path, **OFFLINE)

    first = tmp_path / "first"
    (first / "work").mkdir(parents=True)
    done = subprocess.run(torchrun(2, script, "--steps", steps, "--out", str(tmp_path / "first.pt")),
                          env=plain_env(**OFFLINE, **sdk_contract(first, every="5")), cwd=first / "work",
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, rank_errors(done.stderr)
    saves = committed(first / "staging")
    records = [protocol.read_save_record(save) for save in saves]
    assert [r.step for r in records][:3] == [5, 10, 15] and all(r.world_size == 2 for r in records), records
    middle = saves[1]  # step 10: both ranks' parts in one save
    files = {p.relative_to(middle).as_posix() for p in middle.rglob("*") if p.is_file()}
    if framework == "hf":
        assert {"rng_state_0.pth", "rng_state_1.pth", "model.safetensors", "optimizer.pt"} <= files, files
    else:
        assert {"lightning.ckpt", "rng/rank-00000.pt", "rng/rank-00001.pt"} <= files, files

    second = tmp_path / "second"
    (second / "work").mkdir(parents=True)
    out = tmp_path / "resumed.pt"
    done = subprocess.run(torchrun(2, script, "--steps", steps, "--out", str(out)),
                          env=plain_env(**OFFLINE, **sdk_contract(second, every="1000"), **restore_contract(middle)),
                          cwd=second / "work", capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, rank_errors(done.stderr)
    assert "at step 10" in done.stdout, done.stdout[-2000:]
    assert_same_weights(out, reference)
