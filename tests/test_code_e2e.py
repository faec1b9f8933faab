"""The code travels with the run (issue 15, docs/code-and-outputs.md): `vl run` packs the workdir once, every
attempt runs that snapshot whatever happens to the live directory, and `vl pull` brings the outputs back.

The end-to-end test plays the user of the issue: a project with a script, a `.gitignore`d data folder and a
`.env`; the refusal, the run through a reclaim while `train.py` is edited, the pull. The rest check the
pieces the way a run uses them: the spec's paths, the agent's verified unpack, the outputs on a cancel.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import structlog
from temporalio.client import WorkflowFailureError

from tests.conftest import TRAIN_TINY, assert_same_weights, group_alive, make_spec
from tests.helpers import wait_for_progress, wait_until
from tests.test_client import vl_env  # noqa: F401 - fixture: `vl` against this test's server and worker
from tests.test_run_e2e import live_status, result_of
from vaultlayer import client as vl_client
from vaultlayer.models import AttemptOutcome, FailureCause, Host, Pool, RunState
from vaultlayer.request import RunRequest, RunRequestError, build_spec, pack_code, select_code
from vaultlayer.checkpoint.format import local_blake3
from vaultlayer.runs import AsyncClient, AsyncRun
from vaultlayer.workdir import CODE_DIR, select_files, stored_outputs
from vaultlayer.workdir.snapshot import blob_path

STEPS = 150


def vl_in(env: dict[str, str], cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def new_project(root: Path) -> Path:
    """What the issue's user has: a script, data that .gitignore leaves out, and a .env of secrets."""
    project = root / "project"
    (project / "data").mkdir(parents=True)
    shutil.copy(TRAIN_TINY, project / "train.py")
    (project / "data" / "shard-0.bin").write_bytes(os.urandom(1 << 20))
    (project / ".gitignore").write_text("data/\noutputs/\n")
    (project / ".env").write_text("HF_TOKEN=hf_not_for_the_cloud\n")
    return project


RUN_ARGS = ["run", "--detach", "--output-dir", "outputs", "--checkpoint-every", "10", "--notice-seconds", "10",
            "--heartbeat-timeout", "5s", "--", "python", "train.py", "--steps", str(STEPS), "--step-time", "0.05",
            "--out", "outputs/w.pt"]


async def test_a_run_keeps_the_code_it_was_submitted_with_and_vl_pull_brings_its_outputs_back(
        temporal_env, control, vl_env, vl_home, tmp_path, reference_weights):  # noqa: F811 - vl_env
    project = new_project(tmp_path)
    storage = vl_home / "storage"

    refused = await asyncio.to_thread(vl_in, vl_env, project, *RUN_ARGS)
    assert refused.returncode == 2 and refused.stdout == "", refused.stdout + refused.stderr
    [line] = refused.stderr.strip().splitlines()
    assert line.startswith("vl: error: workdir ") and "likely secrets" in line and ".env" in line
    assert "--allow-secret-file" in line and ".vlignore" in line and "--env-secret" in line
    assert not storage.exists() and not (vl_home / "hosts").exists(), "nothing may be written for bad input"

    (project / ".vlignore").write_text(".env\n")
    started = await asyncio.to_thread(vl_in, vl_env, project, *RUN_ARGS)
    assert started.returncode == 0, started.stdout + started.stderr
    code_line, run_line = started.stdout.splitlines()[:2]
    run_id = run_line.removeprefix("run ")
    spec = await vl_client.spec(temporal_env.client, run_id)
    assert code_line == f"code: 3 files, {spec.code.total_bytes / 1000:.1f} KB (snapshot {spec.code.short}), " \
                        ".gitignore and .vlignore applied"
    assert spec.command[1:3] == ["train.py", "--steps"] and spec.output_dir == "outputs"

    # The user edits the script while the run goes on: the next attempt must still run the code it started with.
    await wait_for_progress(temporal_env.client, run_id, steps=20, durable=10, attempt=1)
    (project / "train.py").write_text("raise SystemExit('the edited script ran')\n")
    await vl_client.reclaim(temporal_env.client, run_id)
    status = await result_of(temporal_env.client, run_id)
    assert status.state == RunState.SUCCEEDED, status.stop_reason
    assert [a.outcome for a in status.attempts] == [AttemptOutcome.RECLAIMED, AttemptOutcome.COMPLETED]
    assert status.steps_lost == 0 and status.outputs is not None and status.outputs.file_count == 1
    assert not (project / "outputs").exists(), "the script ran in the snapshot, not in the live directory"

    pulled = await asyncio.to_thread(vl_in, vl_env, tmp_path, "pull", run_id, "back")
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.startswith(f"pulled the outputs of {run_id} into {tmp_path / 'back'} (1 files")
    assert_same_weights(tmp_path / "back" / "w.pt", reference_weights(STEPS))

    listed = await asyncio.to_thread(vl_in, vl_env, tmp_path, "code", run_id)
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[-1] for line in listed.stdout.splitlines()] == [".gitignore", ".vlignore", "train.py"]
    shown = await asyncio.to_thread(vl_in, vl_env, tmp_path, "status", run_id)
    assert f"code: snapshot {spec.code.short}, 3 files" in shown.stdout and "outputs: 1 files" in shown.stdout
    assert json.loads((await asyncio.to_thread(vl_in, vl_env, tmp_path, "status", run_id, "--json")).stdout)[
        "code"]["digest"] == spec.code.digest

    # `vl resume --fresh-code` packs the workdir again: the edited script is what the new run runs.
    resumed = await asyncio.to_thread(vl_in, vl_env, project, "resume", run_id, "--fresh-code", "--detach")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    new_id = resumed.stdout.splitlines()[0].removeprefix("run ")
    assert (await vl_client.spec(temporal_env.client, new_id)).code.digest != spec.code.digest
    with pytest.raises(WorkflowFailureError):
        await asyncio.wait_for(temporal_env.client.get_workflow_handle(new_id).result(), 120)
    edited = await vl_client.status(temporal_env.client, new_id)
    assert edited.state == RunState.FAILED and "the edited script ran" in edited.attempts[-1].log_tail

    # The same tree submitted again is stored once: only a new manifest would be written, and none is.
    (project / "train.py").write_bytes(TRAIN_TINY.read_bytes())
    objects = sorted(p.relative_to(storage) for p in (storage / CODE_DIR).rglob("*") if p.is_file())
    again = pack_code(select_files(project, exclude_paths=[project / "outputs"]), spec)
    assert again.code == spec.code
    assert sorted(p.relative_to(storage) for p in (storage / CODE_DIR).rglob("*") if p.is_file()) == objects


def test_the_spec_names_places_inside_the_snapshot_and_refuses_what_cannot_travel(tmp_path):
    project = tmp_path / "project"
    (project / "bin").mkdir(parents=True)
    (project / "bin" / "train.sh").write_text("#!/bin/sh\nexit 0\n")
    (project / "bin" / "train.sh").chmod(0o755)
    (project / "config.yaml").write_text("lr: 0.1\n")
    warned: list[str] = []
    request = RunRequest(workdir=str(project), command=["bin/train.sh", str(project / "config.yaml")],
                         checkpoint_dir="ckpt", output_dir=str(project / "outputs"), storage=tmp_path.as_uri())
    spec = build_spec(request, warn=warned.append)
    assert spec.checkpoint_dir == "ckpt" and spec.output_dir == "outputs"  # relative: resolved on the host
    selection = select_code(request, spec, warn=warned.append)
    [warning] = warned
    assert warning.startswith(f"argument {project / 'config.yaml'} names a file of the workdir by its absolute path")
    packed = pack_code(selection, spec)
    assert packed.command[0] == "./bin/train.sh"  # the copy in the snapshot, not the live one
    python = build_spec(request.model_copy(update={"command": ["python", "bin/train.sh"]}), warn=warned.append)
    assert pack_code(selection, python).command[0] == shutil.which("python")  # the environment stays as it is

    for update, expected in (({"output_dir": "../elsewhere"}, "--output-dir '../elsewhere': give a folder inside"),
                             ({"output_dir": "/tmp"}, "--output-dir '/tmp': give a folder inside")):
        with pytest.raises(RunRequestError, match=expected):
            build_spec(request.model_copy(update=update))
    with pytest.raises(RunRequestError, match="--workdir-max-size 'huge': not a size"):
        select_code(request.model_copy(update={"workdir_max_size": "huge"}), spec)
    with pytest.raises(RunRequestError, match="over the 10 B limit; nothing was uploaded"):
        select_code(request.model_copy(update={"workdir_max_size": "10"}), spec)
    (project / "id_rsa").write_text("key")
    with pytest.raises(RunRequestError, match="likely secrets, not shipped by default: id_rsa"):
        select_code(request, spec)
    allowed = request.model_copy(update={"allow_secret_files": ["id_rsa"]})
    assert select_code(allowed, spec, warn=warned.append).file_count == 3
    unshipped = request.model_copy(update={"code": False})
    assert select_code(unshipped, build_spec(unshipped)) is None


async def test_a_tampered_snapshot_fails_the_attempt_with_its_cause_and_runs_nothing(tmp_path):
    from activities.host import AttemptContext, HostAgentActivities
    from vaultlayer.models import AttemptInput, AttemptProgress

    project = new_project(tmp_path)
    (project / ".env").unlink()
    spec = pack_code(select_files(project), make_spec(tmp_path, steps=1, out=tmp_path / "w.pt"))
    blob = Path(blob_path(str(tmp_path / "storage" / CODE_DIR), local_blake3(project / "train.py")))
    blob.write_bytes(blob.read_bytes().replace(b"import torch", b"import os  "))
    inp = AttemptInput(run_id=spec.run_id, attempt=1, command=["python", "train.py"], workdir=spec.workdir,
                       code=spec.code, storage_url=spec.storage_url,
                       host=Host(host_id="h-1", provider="local", pool=Pool(), task_queue="q"))
    workdir = tmp_path / "host" / "a1" / "code"
    ctx = AttemptContext(inp=inp, progress=AttemptProgress(), workdir=workdir, checkpoint_dir=None,
                         restore=tmp_path / "restore", staging=tmp_path / "staging", control=tmp_path / "control",
                         log_path=tmp_path / "a1.log", log=structlog.get_logger())
    agent = HostAgentActivities("h-1", tmp_path / "host", notices=None, run_id=spec.run_id, task_queue="q")
    result = await agent._unpack_code(ctx)
    assert result.outcome == AttemptOutcome.FAILED and result.cause == FailureCause.CODE
    assert result.reason.startswith(f"code snapshot {spec.code.short} cannot be used: train.py: the stored content")
    assert not workdir.exists(), "no part of a snapshot that failed its check may be left to run"


def select_blake3(path: Path) -> str:
    from vaultlayer.checkpoint.format import local_blake3

    return local_blake3(path)


def test_a_config_file_says_what_travels_and_what_comes_back(tmp_path):
    from vaultlayer.config import load_mapping

    (tmp_path / "train.py").write_text("print('hi')\n")
    loaded = load_mapping({"command": "python train.py", "outputs": "results",
                           "code": {"max_size": "1MB", "allow_secret_files": [".env"]}}, "vl.yaml", tmp_path)
    request = loaded.request()
    assert (request.output_dir, request.workdir_max_size, request.allow_secret_files, request.code) == (
        "results", "1MB", [".env"], True)
    assert build_spec(request).output_dir == "results"
    assert load_mapping({"command": "python train.py", "code": {"ship": False}}, "vl.yaml", tmp_path
                        ).request().code is False
    flagged = load_mapping({"command": "python train.py", "outputs": "results"}, "vl.yaml", tmp_path).request(
        RunRequest(output_dir="elsewhere"))
    assert flagged.output_dir == "elsewhere"  # the flag wins, as everywhere


def test_outputs_keep_every_file_and_drop_links_that_leave_the_folder(tmp_path):
    from vaultlayer.workdir import restore_snapshot, store_outputs, stored_outputs

    out, storage_url = tmp_path / "outputs", (tmp_path / "storage").as_uri()
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "model.pt").write_bytes(b"weights")
    (out / ".env").write_text("not refused: the script wrote it into the run's own storage")
    os.symlink("sub/model.pt", out / "best.pt")
    os.symlink("/etc/hostname", out / "escape")
    os.symlink("escape", out / "via")  # to a link that is dropped: dropped in turn
    assert stored_outputs(storage_url, "r-1") is None
    ref, skipped = store_outputs(out, storage_url, "r-1")
    assert (ref.file_count, ref.link_count) == (2, 1)
    assert [entry.split(" ")[0] for entry in skipped] == ["escape", "via"]
    assert stored_outputs(storage_url, "r-1") == ref
    restore_snapshot(ref, tmp_path / "back")
    assert (tmp_path / "back" / "sub" / "model.pt").read_bytes() == b"weights"
    assert os.readlink(tmp_path / "back" / "best.pt") == "sub/model.pt"
    assert not (tmp_path / "back" / "escape").exists() and not (tmp_path / "back" / "via").is_symlink()


# Writes its outputs as it goes, as a real script writes a checkpoint of its model per epoch, then trains until
# stopped. On SIGTERM it writes one more file: the agent's grace before SIGKILL is what lets it.
CANCELLED_SCRIPT = """
import signal, sys, time
from pathlib import Path

def stop(*_):
    Path("outputs/stopped.txt").write_text("stopped on SIGTERM")
    sys.exit(143)

signal.signal(signal.SIGTERM, stop)
Path("outputs/epoch-1.pt").write_bytes(b"weights after one epoch")
while True:
    time.sleep(0.05)
"""


async def test_a_cancelled_run_stores_its_outputs_on_the_way_out_and_vl_pull_brings_them(
        temporal_env, control, vl_home, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text(CANCELLED_SCRIPT)
    spec = make_spec(tmp_path, steps=1, out=tmp_path / "unused", workdir=str(project),
                     command=[sys.executable, "train.py"], output_dir="outputs")
    spec = pack_code(select_files(project), spec)
    client = temporal_env.client
    await vl_client.submit(client, spec, queue=control)

    async def wrote_an_epoch():
        status = await live_status(client, spec.run_id)
        if status.current_host is None:
            return None
        written = vl_home / "hosts" / spec.run_id / status.current_host.host_id / "a1" / "code" / "outputs"
        return status if (written / "epoch-1.pt").exists() else None

    status = await wait_until(wrote_an_epoch, 90, "the script's first output")
    assert stored_outputs(spec.storage_url, spec.run_id) is None, "outputs are stored on the way out, not before"
    await vl_client.cancel(client, spec.run_id)
    with pytest.raises(WorkflowFailureError):
        await asyncio.wait_for(client.get_workflow_handle(spec.run_id).result(), 90)
    ended = await live_status(client, spec.run_id)
    assert ended.state == RunState.CANCELLED
    assert not group_alive(int(status.current_host.handle["pgid"])), "the host is released after the outputs"

    run = AsyncRun(AsyncClient(client), spec.run_id)
    assert (await run.outputs()).file_count == 2
    back = await run.pull(tmp_path / "back")
    assert (back / "epoch-1.pt").read_bytes() == b"weights after one epoch"
    assert (back / "stopped.txt").read_text() == "stopped on SIGTERM", "the script had its grace before SIGKILL"
