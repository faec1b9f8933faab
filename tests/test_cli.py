"""The `vl` command as a person uses it: the embedded default, live output, JSON status, `vl down`,
and bad input that is refused on one line before anything starts."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, TRAIN_TINY_IN_REPO, assert_same_weights, group_alive
from tests.helpers import FOREGROUND_VL, control_dir, free_port, hold_script, thaw, wait_until
from vaultlayer import protocol


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VL_", "TEMPORAL_"))}
    # As in an activated virtual environment: `python` is the one with this project installed.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(VL_HOME=str(tmp_path / "vlhome"), VL_TEMPORAL_PORT=str(free_port()), VL_UI_PORT=str(free_port()),
               VL_TASK_QUEUE="vaultlayer")
    return env


def vl(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


BAD_INPUT = [
    (["run", "--provider", "nimbus", "--", "python", TRAIN_TINY_IN_REPO, "--steps", "1", "--out", "x"],
     "unknown provider 'nimbus'"),
    (["run", "--", "no-such-program-vl", "--steps", "1"], "'no-such-program-vl' not found on PATH"),
    (["run", "--reclaim-every", "0", "--", "python", TRAIN_TINY_IN_REPO, "--steps", "1", "--out", "x"],
     "--reclaim-every '0'"),
    (["run", "--storage", "nosuchproto://bucket/x", "--", "python", TRAIN_TINY_IN_REPO, "--steps", "1", "--out", "x"],
     "nosuchproto"),
    (["run", "--checkpoint-every", "soon", "--", "python", TRAIN_TINY_IN_REPO, "--steps", "1", "--out", "x"],
     "--checkpoint-every 'soon'"),
]


@pytest.mark.parametrize(("args", "expected"), BAD_INPUT, ids=["provider", "command", "reclaim-every",
                                                               "storage", "checkpoint-every"])
def test_bad_input_is_one_clear_line_and_starts_nothing(cli_env, args, expected):
    result = vl(cli_env, *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vl: error: ") and expected in lines[0]
    home = Path(cli_env["VL_HOME"])
    assert not (home / "run").exists(), "no server or worker may start for bad input"
    assert not (home / "hosts").exists(), "no host may be provisioned for bad input"


def reclaim_first_host_once_it_trained(env: dict[str, str], following: subprocess.Popen, timeout: float = 240) -> None:
    """`vl reclaim` the run's first host once it has stored a checkpoint and trained past it, as a user would (`vl
    ls`, `vl status`, `vl reclaim`). The script is frozen from step 30 until the notice has reached it, so the run
    cannot end before the reclaim however slow each `vl` call is (tests/helpers.py `reclaim_after_checkpoint`)."""
    deadline = time.monotonic() + timeout
    started = [Path(env["VL_HOME"]) / "run" / f"{name}.json" for name in ("server", "worker")]
    runs = []
    while not runs:
        assert time.monotonic() < deadline, f"no run listed within {timeout} s"
        assert following.poll() is None, "vl run ended before its first host was reclaimed"
        if all(path.exists() for path in started):  # `vl run` starts them: this test must not, first
            listing = vl(env, "ls", "--json")
            runs = json.loads(listing.stdout) if listing.returncode == 0 and listing.stdout.strip() else []
        time.sleep(0.2)
    asyncio.run(reclaim_held(env, runs[0]["run_id"]))


async def reclaim_held(env: dict[str, str], run_id: str) -> None:
    control = control_dir(Path(env["VL_HOME"]), run_id, "h-1", 1)
    held = await hold_script(control, 30, timeout=240)  # --checkpoint-every 25: the save at 25 is committed
    try:
        async def stored():
            status = await asyncio.to_thread(vl, env, "status", run_id, "--json")
            return status.returncode == 0 and (json.loads(status.stdout).get("durable_step") or 0) >= 25

        await wait_until(stored, 120, "the checkpoint at step 25 to be stored")
        reclaimed = await asyncio.to_thread(vl, env, "reclaim", run_id)
        assert reclaimed.returncode == 0, reclaimed.stderr

        async def notice_forwarded():
            return (control / protocol.NOTICE_FILE).exists()

        await wait_until(notice_forwarded, 60, "the notice to reach the script")
    finally:
        thaw(held.pids)


def test_embedded_default_runs_through_reclaims_and_vl_down_stops_it(cli_env, tmp_path, reference_weights):
    out = tmp_path / "w.pt"
    try:
        # `vl run` follows the run in the foreground while this test reclaims its first host once it has stored a
        # checkpoint and trained on: an event, where a schedule (--reclaim-every) may take every host of a loaded
        # machine before its first step.
        following = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "run", "--notice-seconds", "10", "--checkpoint-every", "25", "--",
             "python", TRAIN_TINY_IN_REPO, "--steps", "150", "--step-time", "0.05", "--out", str(out)],
            env=cli_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            reclaim_first_host_once_it_trained(cli_env, following)
            stdout, stderr = following.communicate(timeout=300)
        finally:
            following.kill()
        result = subprocess.CompletedProcess(following.args, following.returncode, stdout, stderr)
        assert result.returncode == 0, result.stdout + result.stderr
        lines = result.stdout.splitlines()
        assert lines[0].startswith("code: ") and " (snapshot " in lines[0] and "gitignore (git) applied" in lines[0]
        run_id = lines[1].removeprefix("run ")
        assert lines[1].startswith("run r-")
        assert lines[2] == (f"Temporal UI: http://localhost:{cli_env['VL_UI_PORT']}/namespaces/default/"
                            f"workflows/{run_id}")
        assert any(line.startswith("reclaimed at step ") and ", resuming on host h-2" in line for line in lines)
        assert "started temporal dev server" in result.stderr
        summary = lines[-1]
        assert summary.startswith("succeeded: ") and "reclaims" in summary and "wall time" in summary
        assert_same_weights(out, reference_weights(150))

        status = vl(cli_env, "status", run_id, "--json")
        assert status.returncode == 0, status.stderr
        assert "started" not in status.stderr, "the second call must reuse the server and worker"
        document = json.loads(status.stdout)
        assert document["run_id"] == run_id and document["state"] == "succeeded"
        assert document["durable_step"] >= 25 and len(document["attempts"]) >= 2
        for attempt in document["attempts"]:
            assert {"host", "outcome", "start_step", "end_step"} <= attempt.keys()
            # A 6 s host that a loaded machine spends importing torch may reach its first step too near the
            # notice's deadline to save it (or be heard from): steps are lost only where no emergency save was stored.
            assert attempt["steps_lost"] == 0 or attempt["emergency_save"] != "saved", attempt
        assert document["steps_lost"] == sum(attempt["steps_lost"] for attempt in document["attempts"])
        assert document["attempts"][0]["outcome"] == "reclaimed"

        listing = vl(cli_env, "ls", "--json")
        runs = json.loads(listing.stdout)
        assert runs[0]["run_id"] == run_id and runs[0]["state"] == "succeeded"

        refused = vl(cli_env, "reclaim", run_id)
        assert refused.returncode == 1 and "no host to reclaim" in refused.stderr
    finally:
        home = Path(cli_env["VL_HOME"])
        pids = [json.loads((home / "run" / f"{name}.json").read_text())["pid"]
                for name in ("server", "worker") if (home / "run" / f"{name}.json").exists()]
        down = vl(cli_env, "down")
    assert down.returncode == 0 and "temporal dev server" in down.stdout and "control-plane worker" in down.stdout
    assert len(pids) == 2
    assert not any(group_alive(pid) for pid in pids), "vl down must stop the server and the worker"
    assert vl(cli_env, "down").stdout.strip() == "nothing to stop"


async def test_with_temporal_address_vl_starts_nothing(cli_env, temporal_env, temporal_address, tmp_path):
    """`vl` uses the configured cluster, starts nothing, and lists a run whose worker is gone without hanging."""
    from tests.conftest import make_spec
    from vaultlayer import client as vl_client

    orphan = make_spec(tmp_path, steps=10, out=tmp_path / "w.pt")
    await vl_client.submit(temporal_env.client, orphan, queue="no-worker-polls-this-queue")
    try:
        cli_env["TEMPORAL_ADDRESS"] = temporal_address
        result = await asyncio.to_thread(vl, cli_env, "ls", "--json")
        assert result.returncode == 0, result.stderr
        runs = {run["run_id"]: run for run in json.loads(result.stdout)}
        assert runs[orphan.run_id]["state"] == "running"
        assert "started" not in result.stderr
        assert not (Path(cli_env["VL_HOME"]) / "run").exists()
    finally:
        await temporal_env.client.get_workflow_handle(orphan.run_id).terminate("test over")


def test_ctrl_c_detaches_and_cancel_releases_the_host(cli_env, tmp_path):
    import signal
    import time

    run = subprocess.Popen(
        [*FOREGROUND_VL, "run", "--checkpoint-every", "10", "--", "python", TRAIN_TINY_IN_REPO,
         "--steps", "5000", "--step-time", "0.05", "--out", str(tmp_path / "w.pt")],
        env=cli_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert run.stdout.readline().startswith("code: ")
        run_id = run.stdout.readline().strip().removeprefix("run ")
        while "attempt 1 on host h-1" not in run.stdout.readline():
            pass
        run.send_signal(signal.SIGINT)
        _, stderr = run.communicate(timeout=30)
        assert run.returncode == 130 and "detached; the run goes on" in stderr

        status = json.loads(vl(cli_env, "status", run_id, "--json").stdout)
        assert status["state"] == "running", "Ctrl-C must not stop the run"
        pgid = json.loads((Path(cli_env["VL_HOME"]) / "hosts" / run_id / "h-1" / "host.json").read_text())["pgid"]
        assert group_alive(pgid)

        cancelled = vl(cli_env, "cancel", run_id)
        assert cancelled.returncode == 0, cancelled.stderr
        deadline = time.monotonic() + 60
        while json.loads(vl(cli_env, "status", run_id, "--json").stdout)["state"] != "cancelled":
            assert time.monotonic() < deadline, "the run did not cancel"
            time.sleep(0.5)
        assert not group_alive(pgid), "cancel must release the host"
    finally:
        run.kill()
        vl(cli_env, "down")


def test_a_stale_background_worker_is_replaced(cli_env):
    """After an upgrade the embedded worker must not keep running the old control-plane code."""
    try:
        assert vl(cli_env, "ls").returncode == 0
        record_file = Path(cli_env["VL_HOME"]) / "run" / "worker.json"
        record = json.loads(record_file.read_text())
        record_file.write_text(json.dumps(record | {"code": "older-code"}))
        again = vl(cli_env, "ls")
        assert again.returncode == 0 and "started control-plane worker" in again.stderr
        assert not group_alive(record["pid"])
        assert json.loads(record_file.read_text())["code"] != "older-code"
    finally:
        vl(cli_env, "down")
