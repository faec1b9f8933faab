"""The Python client as a notebook uses it, stored logs, `vl logs`, `vl resume` and `vl run --detach`, on the
real dev server with real host agents and the real tiny PyTorch run."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import fsspec
import pytest
from temporalio import workflow
from temporalio.client import Client as TemporalClient
from temporalio.client import WorkflowQueryFailedError
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from activities.attempt_logs import LogShipper
from tests.conftest import REPO, TRAIN_TINY_IN_REPO, assert_same_weights, group_alive, make_spec
from tests.helpers import wait_until
from vaultlayer import checkpoint, seed, ui
from vaultlayer import client as vl_client
from vaultlayer.logs_store import LogCursor, read_logs, write_chunk
from vaultlayer.models import AttemptOutcome, RunInput, RunSpec, RunState, RunStatus
from vaultlayer.runs import AsyncClient, Client, ClientError, RunNotFound

T = TypeVar("T")


def in_notebook(cell: Callable[[], T]) -> T:
    """Run `cell` as a Jupyter cell runs: plain calls, on a thread whose event loop is running."""

    async def kernel() -> T:
        return cell()

    return asyncio.run(kernel())


async def notebook(cell: Callable[[], T]) -> T:
    # A thread of its own: the control-plane worker runs on this test's loop and must keep running.
    return await asyncio.to_thread(in_notebook, cell)


def host_pgids(vl_home: Path, run_id: str) -> list[int]:
    import json

    return [json.loads(p.read_text())["pgid"] for p in (vl_home / "hosts" / run_id).glob("*/host.json")]


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def vl(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def vl_env(temporal_address: str, control: str, vl_home: Path) -> dict[str, str]:
    """`vl` against this test's server and control-plane worker: with TEMPORAL_ADDRESS it starts nothing."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VL_", "TEMPORAL_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(TEMPORAL_ADDRESS=temporal_address, VL_TASK_QUEUE=control, VL_HOME=str(vl_home))
    return env


async def test_notebook_session_reads_status_checkpoints_and_logs_that_outlive_the_hosts(
        temporal_env, temporal_address, control, vl_home, tmp_path, reference_weights):
    out = tmp_path / "w.pt"
    spec = make_spec(tmp_path, steps=150, out=out, step_time=0.08)  # 8 s from step 50 to the end: time to reclaim
    client = await notebook(lambda: Client(address=temporal_address, task_queue=control))
    try:
        run = await notebook(lambda: client.submit(spec))

        async def checkpoint_at_50():  # the script printed "step 50/150" before it saved step 50
            status = await vl_client.status(temporal_env.client, spec.run_id)
            return status.current_host if (status.durable_step or 0) >= 50 else None

        await wait_until(checkpoint_at_50, 90, "a checkpoint at step 50")
        await vl_client.reclaim(temporal_env.client, spec.run_id)
        status = await notebook(lambda: run.wait(timeout=240))

        assert status.state == RunState.SUCCEEDED
        assert [a.outcome for a in status.attempts] == [AttemptOutcome.RECLAIMED, AttemptOutcome.COMPLETED]
        assert_same_weights(out, reference_weights(150))
        attributes = (await temporal_env.client.get_workflow_handle(spec.run_id).describe()).typed_search_attributes
        assert attributes.get(ui.VL_STATE) == "succeeded"  # the notebook's runs are searchable like vl run's
        # The hosts and every file they had are gone; what follows comes from the run's storage.
        assert not any(group_alive(pgid) for pgid in host_pgids(vl_home, spec.run_id))
        shutil.rmtree(vl_home / "hosts" / spec.run_id)

        listed = await notebook(lambda: [listed.run_id for listed in client.list_runs(limit=10)])  # newest first
        assert spec.run_id in listed
        again = await notebook(lambda: client.get_run(spec.run_id))
        assert (await notebook(again.status)).state == RunState.SUCCEEDED
        listings = await notebook(lambda: again.checkpoints(verify=True))
        assert listings and all(item.state == checkpoint.CheckpointState.COMPLETE for item in listings), listings
        assert listings[0].step == status.durable_step > status.attempts[1].start_step

        first = await notebook(lambda: again.logs(attempt=1))
        second = await notebook(lambda: again.logs(attempt=2))
        assert "step 50/150" in first and "done:" not in first
        assert f"resuming at step {status.attempts[1].start_step}\n" in second
        assert "done: 150 steps" in second and f"model saved to {out}" in second
        every = await notebook(again.logs)
        assert every == f"==> attempt 1 <==\n{first}==> attempt 2 <==\n{second}"
        assert "".join(await notebook(lambda: list(again.follow_logs()))) == every  # finished: ends at once
        with pytest.raises(RunNotFound, match="no run 'no-such-run'"):
            await notebook(lambda: client.get_run("no-such-run"))
    finally:
        client.close()


async def test_cancel_keeps_checkpoints_and_vl_resume_continues_bit_identically(
        temporal_env, control, vl_env, vl_home, tmp_path, reference_weights):
    out = tmp_path / "w.pt"
    command = ["python", TRAIN_TINY_IN_REPO, "--steps", "150", "--step-time", "0.05", "--out", str(out)]
    result = await asyncio.to_thread(vl, vl_env, "run", "--detach", "--checkpoint-every", "10", "--notice-seconds",
                                     "10", "--heartbeat-timeout", "5s", "--", *command)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("code: ")
    run_id = result.stdout.splitlines()[1].removeprefix("run ")
    assert f"vl logs {run_id} -f" in result.stdout.splitlines()[-1]
    run = await AsyncClient(temporal_env.client, task_queue=control).get_run(run_id)

    async def checkpoint_at_20():
        status = await run.status()
        return status.current_host if (status.durable_step or 0) >= 20 else None

    await wait_until(checkpoint_at_20, 90, "a checkpoint at step 20")
    with pytest.raises(ClientError, match=f"run {run_id} is still running; resume it once it has finished"):
        await run.client.resume(run_id)
    await run.cancel()
    cancelled = await run.wait(timeout=60)

    assert cancelled.state == RunState.CANCELLED
    assert not any(group_alive(pgid) for pgid in host_pgids(vl_home, run_id)), "cancel must release the hosts"
    kept = [item for item in await run.checkpoints() if item.state == checkpoint.CheckpointState.COMPLETE]
    assert kept and kept[0].step >= 20
    old_storage = vl_home / "storage" / run_id
    before = tree_digest(old_storage)

    resumed = await asyncio.to_thread(vl, vl_env, "resume", run_id, timeout=240)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    lines = resumed.stdout.splitlines()
    new_id = lines[0].removeprefix("run ")
    assert lines[1].startswith(f"resuming {run_id} from step {kept[0].step} ")
    assert lines[-1].startswith("succeeded: 1 attempts")
    status = await vl_client.status(temporal_env.client, new_id)
    old_code = (await vl_client.spec(temporal_env.client, run_id)).code
    assert old_code is not None and (await vl_client.spec(temporal_env.client, new_id)).code == old_code
    assert status.attempts[0].start_step == kept[0].step
    assert status.attempts[0].resumed_from == checkpoint.checkpoint_name(kept[0].step, 0)
    assert_same_weights(out, reference_weights(150))
    assert tree_digest(old_storage) == before, "the old run's storage must not change"

    logs = await asyncio.to_thread(vl, vl_env, "logs", new_id, "--attempt", "1", "-f")  # finished: -f ends
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout == await (await run.client.get_run(new_id)).logs(attempt=1)
    assert logs.stdout.startswith(f"resuming at step {kept[0].step}\n") and "done: 150 steps" in logs.stdout


@pytest.mark.parametrize("storage_url", ["file", "s3", "gs"], indirect=True)
async def test_log_shipper_masks_credentials_and_sends_whole_lines_until_the_end(tmp_path, storage_url):
    log_file = tmp_path / "a1.log"
    log_file.write_bytes(b"from an earlier attempt on this host\n")
    shipper = LogShipper(storage_url, "r-1", 1, log_file, start=log_file.stat().st_size)
    shipper.start({"HF_TOKEN": "hf_s3cr3t_value", "HOME": "/home/me", "DB": "pw42"}, secrets=["pw42"])
    cursor = LogCursor(storage_url, "r-1", attempt=1)
    with open(log_file, "ab") as script:
        script.write(b"step 1 token hf_s3cr3t_value home /home/me db pw42\nhalf a li")
        script.flush()
        shipper.ship(final=False)
        assert cursor.read_new() == "step 1 token *** home /home/me db ***\n"
        script.write(b"ne\nno newline at the end")
    await shipper.finish()
    assert cursor.read_new() == "half a line\nno newline at the end"
    assert read_logs(storage_url, "r-1") == ("==> attempt 1 <==\nstep 1 token *** home /home/me db ***\n"
                                        "half a line\nno newline at the end")


@pytest.mark.parametrize("storage_url", ["file", "s3", "gs"], indirect=True)
def test_resume_copies_the_newest_verified_checkpoint_and_reads_the_old_run_only(tmp_path, storage_url):
    fs, root = fsspec.core.url_to_fs(storage_url)
    for step, attempt in ((10, 1), (20, 1), (30, 2)):
        staged = tmp_path / f"staged-{step}"
        staged.mkdir()
        (staged / "model.pt").write_bytes(f"weights at {step}".encode() * 1000)
        checkpoint.upload_checkpoint(staged, storage_url, "r-old", attempt, step)
    fs.rm(f"{root}/r-old/checkpoints/000000000030-a2/model.pt")  # the newest is broken
    before = fs.find(f"{root}/r-old", detail=True)

    source = seed.newest_verified(storage_url, "r-old", fences={})
    assert source.name == "000000000020-a1"
    assert seed.newest_verified(storage_url, "r-old", fences={1: 10}).name == "000000000010-a1"  # fenced past 10
    copied = seed.copy_checkpoint(source, storage_url, "r-new")

    assert (copied.name, copied.step, copied.attempt) == ("000000000020-a0", 20, 0)
    assert checkpoint.choose_checkpoint(storage_url, "r-new", fences={1: -1}).chosen == copied
    restored = tmp_path / "restored"
    checkpoint.restore_checkpoint(copied, restored)
    assert (restored / "model.pt").read_bytes() == b"weights at 20" * 1000
    manifest = checkpoint.Manifest.model_validate_json(fs.cat_file(f"{copied.url.split('://')[1]}/MANIFEST.json"))
    assert (manifest.run_id, manifest.copied_from) == ("r-new", source.url)
    after = fs.find(f"{root}/r-old", detail=True)
    assert {path: info["size"] for path, info in after.items()} == {path: info["size"] for path, info in before.items()}
    assert not checkpoint.quarantine_records(storage_url, "r-old"), "the old run's storage is only read"
    with pytest.raises(checkpoint.CheckpointError, match="changed since it was verified"):
        seed.copy_checkpoint(source.model_copy(update={"manifest_sha256": "0" * 64}), storage_url, "r-other")


async def test_a_run_without_a_worker_still_has_its_spec_and_stored_logs(temporal_env, vl_env, tmp_path):
    spec = make_spec(tmp_path, steps=1, out=tmp_path / "w.pt")
    run = await AsyncClient(temporal_env.client, task_queue=f"no-worker-{spec.run_id}").submit(spec)
    try:
        write_chunk(spec.storage_url, spec.run_id, 1, 0, b"stored before the control plane went away\n")
        assert await run.spec() == spec.model_copy(update={"search_attributes": True})  # from its history: no worker
        assert await run.logs() == "==> attempt 1 <==\nstored before the control plane went away\n"
        printed = await asyncio.to_thread(vl, vl_env, "logs", spec.run_id, "--attempt", "1")
        assert (printed.returncode, printed.stdout) == (0, "stored before the control plane went away\n")
    finally:
        await temporal_env.client.get_workflow_handle(spec.run_id).terminate("test over")


def test_following_reads_each_chunk_once_in_attempt_order(tmp_path):
    storage = (tmp_path / "storage").as_uri()
    cursor = LogCursor(storage, "r-1")
    write_chunk(storage, "r-1", 1, 0, b"one\n")
    write_chunk(storage, "r-1", 1, 4, b"two\n")
    assert cursor.read_new() == "==> attempt 1 <==\none\ntwo\n"
    assert cursor.read_new() == ""
    write_chunk(storage, "r-1", 1, 8, b"three\n")
    write_chunk(storage, "r-1", 2, 0, b"resumed\n")
    assert cursor.read_new() == "three\n==> attempt 2 <==\nresumed\n"
    write_chunk(storage, "r-1", 1, 14, b"from a written-off host\n")
    write_chunk(storage, "r-1", 2, 8, b"done\n")
    assert cursor.read_new() == "done\n"  # attempt 1 was read in full once attempt 2 had begun
    assert read_logs(storage, "r-1", attempt=1) == "one\ntwo\nthree\nfrom a written-off host\n"


def test_a_config_file_becomes_the_spec_vl_run_would_submit(tmp_path, vl_home, monkeypatch):
    from vaultlayer.config import load_file
    from vaultlayer.request import RunRequest, RunRequestError
    from vaultlayer.runs import spec_of

    (tmp_path / "train.py").write_text("")
    (tmp_path / "vl.yaml").write_text("command: python train.py --steps 10\ncheckpoint: {every: 5, keep: 2}\n")
    monkeypatch.chdir(vl_home)
    spec = spec_of(load_file(tmp_path / "vl.yaml").request(RunRequest(max_cost=3)))  # as `vl run -f .. --max-cost 3`
    assert spec.command[1:] == ["train.py", "--steps", "10"] and spec.workdir == str(tmp_path)
    assert (spec.checkpoint_every, spec.keep_checkpoints, spec.limits.max_cost) == ("5", 2, 3)
    assert spec.run_id.startswith("r-") and spec.storage_url == (vl_home / "storage").as_uri()
    assert spec_of(tmp_path / "vl.yaml").limits.max_cost is None
    from_dict = spec_of({"command": f"python {tmp_path / 'train.py'}", "limits": {"max_cost": 4}})
    assert from_dict.workdir == str(vl_home) and from_dict.limits.max_cost == 4
    (tmp_path / "bad.yaml").write_text("checkpoint: {keep: lots}\n")
    with pytest.raises(RunRequestError, match="checkpoint.keep"):
        spec_of(str(tmp_path / "bad.yaml"))
    with pytest.raises(RunRequestError, match="^config: limits.max_cost: 0 is too small"):
        spec_of({"limits": {"max_cost": 0}})


async def test_connect_waits_out_a_server_that_is_starting_and_fails_at_once_otherwise(temporal_env, monkeypatch):
    """A dev server answers "Frontend is not healthy yet" for a moment after it opens its port; `vl` and the
    workers it starts connect right then. Any other failure (a refused port) is reported at once."""
    real_connect = TemporalClient.connect
    answers = [RuntimeError('Failed client connect: `get_system_info` call error after connection: Status { code: '
                            'Unavailable, message: "Frontend is not healthy yet" }')] * 2

    async def starting(*args, **kwargs):
        if answers:
            raise answers.pop()
        return await real_connect(*args, **kwargs)

    monkeypatch.setattr(TemporalClient, "connect", starting)
    target = temporal_env.client.service_client.config.target_host
    client = await vl_client.connect(target)
    assert not answers and client.service_client.config.target_host == target

    answers[:] = [RuntimeError("Failed client connect: tcp connect error: Connection refused")]
    with pytest.raises(RuntimeError, match="Connection refused"):
        await vl_client.connect(target)
    assert not answers


# What the next status queries meet: a thread that stalls past the SDK's deadlock detector, then answers late
# failures that carry the detector's code without a stall.
STALLED_QUERIES = {"stall": 0, "late": 0}
# The failure the SDK gives a query whose thread did not yield in time (temporalio.worker._workflow).
DETECTOR_FAILURE = "[TMPRL1101] Potential deadlock detected: workflow didn't yield within 2 second(s)."


@workflow.defn(name=vl_client.WORKFLOW_NAME)
class StallingRun:
    """A stand-in for TrainingRun whose worker is starved of CPU for the first query (the thread spins past the
    SDK's 2 s deadlock detector, as a loaded machine's worker did), then answers as usual."""

    def __init__(self) -> None:
        self.finished = False

    @workflow.run
    async def run(self, started: RunInput) -> None:
        self.spec = started.spec
        await workflow.wait_condition(lambda: self.finished)

    @workflow.query(name="status")
    def status(self) -> RunStatus:
        if STALLED_QUERIES["stall"] > 0:
            STALLED_QUERIES["stall"] -= 1
            # Spin until the detector interrupts: past its 2 s the SDK fails the query and raises an exception
            # into this thread. A fixed 2.5 s spin raced it: on a loaded machine a detector that fired later
            # than that met a handler that had returned.
            began = time.monotonic()
            while time.monotonic() - began < 120:
                pass
            raise AssertionError("the SDK's deadlock detector never interrupted a query spinning for 120 s")
        if STALLED_QUERIES["late"] > 0:
            STALLED_QUERIES["late"] -= 1
            raise RuntimeError(DETECTOR_FAILURE)
        return RunStatus(run_id=self.spec.run_id, started_at=workflow.now(), state=RunState.RUNNING)

    @workflow.query(name="spec")
    def run_spec(self) -> RunSpec:
        return self.spec

    @workflow.signal
    def finish(self) -> None:
        self.finished = True


async def test_status_asks_again_when_a_starved_worker_answered_too_late(temporal_env, tmp_path, monkeypatch):
    client = temporal_env.client
    queue = f"vl-stall-{uuid.uuid4().hex[:8]}"
    spec = make_spec(tmp_path, steps=1, out=tmp_path / "w.pt")
    async with Worker(client, task_queue=queue, workflows=[StallingRun], workflow_runner=UnsandboxedWorkflowRunner()):
        handle = await client.start_workflow(vl_client.WORKFLOW_NAME, RunInput(spec=spec), id=spec.run_id,
                                             task_queue=queue)
        assert (await vl_client.spec(client, spec.run_id)).run_id == spec.run_id  # the run is up, its worker too
        STALLED_QUERIES["stall"] = 1
        status = await vl_client.status(client, spec.run_id)
        assert STALLED_QUERIES["stall"] == 0, "the query did not reach the stalling handler"
        assert status.run_id == spec.run_id and status.state == RunState.RUNNING

        # A worker that stays starved still fails, after its retries. These failures are raised, not real stalls:
        # a second real one on the same run once left the worker unable to shut down (run 34, docs/testing.md).
        monkeypatch.setattr(vl_client, "QUERY_STALL_RETRIES", 1)
        STALLED_QUERIES["late"] = 2
        with pytest.raises(WorkflowQueryFailedError, match="TMPRL1101"):
            await vl_client.status(client, spec.run_id)
        assert STALLED_QUERIES["late"] == 0, "the retry did not reach the worker"
        await handle.signal(StallingRun.finish)
        await asyncio.wait_for(handle.result(), 30)
