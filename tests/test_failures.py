"""Failures that are not the script's say what failed (issue 14 items 3, 4 and 6).

A missing secret, a failing setup command, a command the host lacks and a checkpoint that cannot be restored
end the run with their own reason and exit code 1 (never "exit code None"); `env:` secrets of a local run come
from the submitter's environment; the host's raw attempt log never holds a secret value; and storage that
cannot be written is refused at submit, before anything is provisioned.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import secrets
import stat
import sys
from datetime import UTC, datetime

import pytest

from activities.masking import MaskedLog
from cli.render import ended_line, exit_code_of
from tests.conftest import REPO, TRAIN_TINY_IN_REPO, make_spec
from tests.test_cli import cli_env, vl  # noqa: F401 - cli_env is a fixture
from vaultlayer import checkpoint, protocol
from vaultlayer import client as vl_client
from vaultlayer.models import AttemptOutcome, AttemptRecord, FailureCause, RunSpec, RunState, RunStatus
from vaultlayer.runs import AsyncClient, ClientError
from vaultlayer.secrets import hand_over
from workflows.policy import limit_reached

READER = REPO / "tests" / "secret_reader.py"


async def finished(client, spec: RunSpec, control: str, **submit) -> RunStatus:
    await vl_client.submit(client, spec, queue=control, **submit)
    await asyncio.wait_for(asyncio.gather(client.get_workflow_handle(spec.run_id).result(), return_exceptions=True), 90)
    return await vl_client.status(client, spec.run_id)


# ---------------------------------------------------------------- item 3: failures that are not the script's


@pytest.mark.parametrize(("case", "cause", "reason"), [
    ("secret", FailureCause.SECRET, "was not set in the environment of the `vl run` that submitted the run"),
    ("setup", FailureCause.SETUP, "setup command 'exit 1' failed with exit code 1"),
    ("missing command", FailureCause.COMMAND, "cannot start 'vl-no-such-command-x' on the host"),
    ("missing after setup", FailureCause.COMMAND, "command 'vl-no-such-command-x' not found on the host after setup"),
])
async def test_a_failure_that_is_not_the_scripts_ends_the_run_with_its_reason_and_exit_code_1(
        temporal_env, control, tmp_path, case, cause, reason):
    fields = {
        "secret": dict(command=[sys.executable, "-c", "pass"],
                       env_secrets={"HF_TOKEN": f"env:NOT_SET_{secrets.token_hex(4).upper()}"}),
        "setup": dict(command=[sys.executable, "-c", "pass"], setup=["exit 1"]),
        "missing command": dict(command=["vl-no-such-command-x"]),
        "missing after setup": dict(command=["vl-no-such-command-x"], setup=["true"]),
    }[case]
    spec = make_spec(tmp_path, steps=1, out=tmp_path / "unused", **fields)
    spec.limits.script_retries = 2  # retrying elsewhere cannot help: the run ends at once all the same
    status = await finished(temporal_env.client, spec, control)

    assert status.state == RunState.FAILED
    [attempt] = status.attempts
    assert attempt.outcome == AttemptOutcome.FAILED and attempt.cause == cause
    assert reason in attempt.reason and status.stop_reason == attempt.reason
    assert status.exit_code == 1 and exit_code_of(status) == 1
    assert "None" not in ended_line(attempt) and reason in ended_line(attempt)


@pytest.mark.parametrize("cause", [c for c in FailureCause if c not in (FailureCause.SCRIPT, FailureCause.RESTORE)])
def test_each_cause_that_is_not_the_scripts_stops_the_run_at_once(cause):
    now = datetime.now(UTC)
    record = AttemptRecord(attempt=1, pool="local", outcome=AttemptOutcome.FAILED, cause=cause,
                           reason=f"the {cause.value} failed", started_at=now, ended_at=now)
    spec = make_spec(REPO, steps=1, out=REPO / "unused")
    spec.limits.script_retries = 5
    stop = limit_reached(spec, RunStatus(run_id=spec.run_id, attempts=[record], script_failures=1), now)
    assert stop is not None and (stop.state, stop.reason, stop.exit_code) == (RunState.FAILED, record.reason, 1)
    script = record.model_copy(update={"cause": FailureCause.SCRIPT, "exit_code": 3})
    assert limit_reached(spec, RunStatus(run_id=spec.run_id, attempts=[script], script_failures=1), now) is None


def test_a_failed_restore_is_tried_once_more_and_the_same_checkpoint_failing_twice_stops_the_run():
    now = datetime.now(UTC)
    spec = make_spec(REPO, steps=1, out=REPO / "unused")

    def failed(attempt: int, checkpoint: str) -> AttemptRecord:
        return AttemptRecord(attempt=attempt, pool="local", outcome=AttemptOutcome.FAILED, cause=FailureCause.RESTORE,
                             reason=f"restore of {checkpoint} failed: bytes changed", resumed_from=checkpoint,
                             started_at=now, ended_at=now)

    once = RunStatus(run_id=spec.run_id, attempts=[failed(1, "000000000150-a1")])
    assert limit_reached(spec, once, now) is None, "verified again, a changed checkpoint is passed over"
    stop = limit_reached(spec, once, now, restore_retry=False)  # a history recorded before the retry replays its stop
    assert stop is not None and stop.reason == "restore of 000000000150-a1 failed: bytes changed"

    another = once.model_copy(update={"attempts": [failed(1, "000000000150-a1"), failed(2, "000000000140-a1")]})
    assert limit_reached(spec, another, now) is None, "each checkpoint gets its own retry"
    twice = once.model_copy(update={"attempts": [failed(1, "000000000150-a1"), failed(2, "000000000150-a1")]})
    stop = limit_reached(spec, twice, now)
    assert stop is not None and (stop.state, stop.exit_code) == (RunState.FAILED, 1)


async def test_local_env_secrets_come_from_the_submitters_environment_not_the_workers(
        temporal_env, control, vl_home, tmp_path):
    planted = f"planted-{secrets.token_hex(16)}"
    source = f"SUBMITTER_ONLY_{secrets.token_hex(4).upper()}"
    assert source not in os.environ  # the worker, and the host agents it starts, never had it
    spec = make_spec(tmp_path, steps=2, out=tmp_path / "unused",
                     command=[sys.executable, str(READER), "MY_API_TOKEN", hashlib.sha256(planted.encode()).hexdigest()],
                     env_secrets={"MY_API_TOKEN": f"env:{source}"})
    status = await finished(temporal_env.client, spec, control, environ={source: planted})
    assert status.state == RunState.SUCCEEDED, status.attempts  # the script saw the submitter's value
    assert not protocol.handed_over_path(vl_home, spec.run_id).exists(), "the run's end deletes the values"


def test_handed_over_values_are_readable_only_by_their_owner(vl_home):
    path = hand_over("r-1", {"A": "env:SRC", "B": "file:/x"}, {"local"}, {"SRC": "v1", "OTHER": "v2"})
    assert path == protocol.handed_over_path(vl_home, "r-1")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == '{"SRC": "v1"}'
    assert hand_over("r-2", {"A": "env:SRC"}, {"aws"}, {"SRC": "v1"}) is None  # read on the cloud's own host


# ---------------------------------------------------------------- item 4: the raw attempt log


def test_the_masked_log_catches_a_secret_split_between_reads():
    file = io.BytesIO()
    file.close = lambda: None  # keep the buffer readable after MaskedLog closes it
    log = MaskedLog(file, [b"hunter2-secret", b"s3cr3t"])
    for chunk in (b"token=hunt", b"er2-se", b"cret and s3c", b"r3t; hun", b"ting ok\npartial s3c"):
        log.write(chunk)
        assert b"hunter2-secret" not in file.getvalue() and b"s3cr3t" not in file.getvalue()
    log.close()
    assert file.getvalue() == b"token=*** and ***; hunting ok\npartial s3c"


_AGENT = """
import asyncio, os, sys
from pathlib import Path
from activities.host import _start_masker

async def main():
    output_read, output_write = os.pipe()
    await _start_masker(Path(sys.argv[1]), [b"hunter2-value"], output_read)
    writer = await asyncio.create_subprocess_exec(sys.executable, "-c", sys.argv[2], stdout=output_write,
                                                  stderr=output_write)
    os.close(output_write)
    print(writer.pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""
_WRITER = """
import itertools, pathlib, sys, time
for n in itertools.count():
    print(f"line {n} token hunter2-value", flush=True)
    if pathlib.Path(sys.argv[1]).exists():
        break
    time.sleep(0.05)
"""


async def test_a_script_outlives_its_killed_agent_and_its_output_stays_masked(tmp_path):
    """The masker is a process of its own: when the agent is SIGKILLed, the script's writes do not break (an
    agent-held pipe would kill it with EPIPE, and a host that still runs its script would look reclaimed)."""
    import subprocess

    from tests.helpers import wait_until

    log_path, stop = tmp_path / "a1.log", tmp_path / "stop"
    writer_code = _WRITER.replace("sys.argv[1]", repr(str(stop)))
    agent = subprocess.Popen([sys.executable, "-c", _AGENT, str(log_path), writer_code], cwd=REPO,
                             stdout=subprocess.PIPE, text=True)
    writer_pid = int(agent.stdout.readline())
    try:
        async def lines_at_least(count):
            return log_path.exists() and log_path.read_text().count("\n") >= count

        await wait_until(lambda: lines_at_least(2), 60, "the first lines")
        agent.kill()
        agent.wait()
        written = log_path.read_text().count("\n")
        # The script writes on after its agent died, and what it writes still reaches the file, masked.
        await wait_until(lambda: lines_at_least(written + 5), 60, "lines after the agent died")
        assert os.path.exists(f"/proc/{writer_pid}")
    finally:
        stop.touch()
    text = log_path.read_text()
    assert "hunter2-value" not in text and "token ***" in text


async def test_a_printed_secret_never_reaches_the_hosts_raw_log(temporal_env, control, vl_home, tmp_path):
    planted = f"planted-{secrets.token_hex(16)}"
    source = f"RAW_LOG_{secrets.token_hex(4).upper()}"
    spec = make_spec(tmp_path, steps=1, out=tmp_path / "unused",
                     command=[sys.executable, str(READER), "RUN_CONFIG_BLOB", hashlib.sha256(planted.encode()).hexdigest(),
                              "print-and-fail"], env_secrets={"RUN_CONFIG_BLOB": f"env:{source}"})
    status = await finished(temporal_env.client, spec, control, environ={source: planted})
    assert status.state == RunState.FAILED and status.exit_code == 3  # the script's own failure keeps its code
    [raw_log] = (vl_home / "hosts" / spec.run_id).glob("*/a1.log")
    text = raw_log.read_text()
    assert "debugging: RUN_CONFIG_BLOB=***" in text and planted not in text


# ---------------------------------------------------------------- item 6: storage proven at submit


@pytest.fixture
def no_aws_credentials(monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_a_good_bucket_passes_and_the_check_leaves_nothing(s3_server):
    from tests.object_storage import storage_fs

    url = s3_server.new_bucket_url()
    checkpoint.check_writable(url)
    fs, path = storage_fs(url.split("/checkpoints")[0])
    assert fs.find(path) == []


def test_a_missing_bucket_is_refused_naming_it(s3_server):
    with pytest.raises(checkpoint.StorageUnusable, match="bucket 'vl-no-such-bucket' does not exist.*fix: create it"):
        checkpoint.check_writable("s3://vl-no-such-bucket/x")


def test_missing_credentials_are_refused_naming_the_fix(no_aws_credentials):
    with pytest.raises(checkpoint.StorageUnusable, match="no credentials found.*fix: export AWS_ACCESS_KEY_ID"):
        checkpoint.check_writable("s3://vl-no-such-bucket/x")


def test_a_directory_that_cannot_be_made_is_refused(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(checkpoint.StorageUnusable, match="cannot write the directory"):
        checkpoint.check_writable((blocker / "storage").as_uri())
    checkpoint.check_writable((tmp_path / "new" / "storage").as_uri())  # made when missing


def test_vl_run_refuses_unwritable_storage_on_one_line_before_anything_starts(tmp_path, s3_server, cli_env):
    env = cli_env
    done = vl(env, "run", "--storage", "s3://vl-no-such-bucket/x", "--detach", "--", "python", TRAIN_TINY_IN_REPO,
              "--steps", "5", "--out", "x.pt")
    assert done.returncode != 0 and done.stdout == ""
    [line] = done.stderr.strip().splitlines()
    assert "bucket 'vl-no-such-bucket' does not exist" in line and "fix:" in line
    assert not (tmp_path / "vlhome" / "hosts").exists()


async def test_the_client_refuses_unwritable_storage_before_submitting(temporal_env, s3_server, tmp_path):
    spec = make_spec(tmp_path, steps=1, out=tmp_path / "unused", storage_url="s3://vl-no-such-bucket/x")
    with pytest.raises(ClientError, match="storage_url: storage s3://vl-no-such-bucket/x cannot be written: bucket"):
        await AsyncClient(temporal_env.client, task_queue="no-worker").submit(spec)
    assert not await AsyncClient(temporal_env.client)._exists(spec.run_id)


async def test_a_storage_outage_during_the_run_is_retried_and_shown_as_what_the_run_waits_on(tmp_path):
    from activities.host import Uploader, staged_saves
    from cli import render
    from tests.test_cli_live import NOW, running_status, text_of
    from vaultlayer.models import AttemptInput, Host, Pool

    staging, blocker = tmp_path / "staging", tmp_path / "blocker"
    save = staging / protocol.committed_name(5, "abc")
    save.mkdir(parents=True)
    (save / "model.bin").write_bytes(b"weights")
    protocol.write_save_record(save, protocol.SaveRecord(step=5))
    blocker.write_text("")  # storage goes away: its directory cannot be made
    inp = AttemptInput(run_id="r-1", attempt=1, command=["true"], workdir=str(tmp_path),
                       storage_url=(blocker / "storage").as_uri(),
                       host=Host(host_id="h-1", provider="local", pool=Pool(), task_queue="q"))
    uploader = Uploader(inp, staging, durable_step=None)
    [staged] = staged_saves(staging)
    assert not await uploader.upload(staged) and uploader.failures == 1 and uploader.last_error
    status = running_status().model_copy(update={"waiting_on": f"storage: {uploader.last_error}"})
    assert "waiting on storage: " in " ".join(text_of(render.panel(status, rate=None, total_steps=None, now=NOW)).split())

    blocker.unlink()  # storage is back: the same save is stored, nothing was lost
    assert await uploader.upload(staged) and uploader.failures == 0 and uploader.durable_step == 5


async def test_a_checkpoint_that_cannot_be_restored_fails_the_attempt_with_its_cause(tmp_path):
    import structlog

    from activities.host import AttemptContext, HostAgentActivities
    from vaultlayer.models import AttemptInput, AttemptProgress, CheckpointRef, Host, Pool

    stored = tmp_path / "ck"
    stored.mkdir()
    (stored / "MANIFEST.json").write_text("{}")
    ref = CheckpointRef(name="ck", step=3, attempt=1, url=stored.as_uri(), manifest_sha256="0" * 64)
    inp = AttemptInput(run_id="r-1", attempt=2, command=["true"], workdir=str(tmp_path), checkpoint=ref,
                       storage_url=tmp_path.as_uri(), host=Host(host_id="h-1", provider="local", pool=Pool(),
                                                                 task_queue="q"))
    ctx = AttemptContext(inp=inp, progress=AttemptProgress(start_step=3), workdir=tmp_path, checkpoint_dir=None,
                         restore=tmp_path / "restore",
                         staging=tmp_path / "staging", control=tmp_path / "control", log_path=tmp_path / "a2.log",
                         log=structlog.get_logger())
    agent = HostAgentActivities("h-1", tmp_path, notices=None, run_id="r-1", task_queue="q")
    result = await agent._restore(ctx)
    assert result.outcome == AttemptOutcome.FAILED and result.cause == FailureCause.RESTORE
    assert result.reason.startswith("restore of ck failed: ") and result.exit_code is None
