"""Checkpoints that can be trusted on real object storage, end to end: a real Temporal dev server, real host
agents, real PyTorch (and Lightning), S3 and GCS over HTTP on loopback.

Corruption of every kind is reported, quarantined and skipped; a host killed mid-upload leaves nothing that is
resumed from, and retention cleans it up; a superseded attempt cannot win with a newer-looking checkpoint; a
script that keeps its own checkpoints resumes from a synced directory. (A storage outage: tests/faults/.)
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cli.cmd_run import request_from_args
from cli.main import parser
from tests.conftest import REPO, assert_same_weights, group_members, make_counter_spec, make_spec
from tests.helpers import wait_until
from tests.object_storage import ManifestHoldingProxy, storage_fs
from tests.test_checkpoint_storage import CORRUPTIONS
from tests.test_run_e2e import live_status, result_of
from vaultlayer import checkpoint
from vaultlayer import client as vl_client
from vaultlayer.checkpoint import MANIFEST_NAME, CheckpointState, describe_checkpoints, list_checkpoints
from vaultlayer.models import AttemptOutcome, RunState
from vaultlayer.request import RunRequestError, build_spec

S3 = pytest.mark.parametrize("storage_url", ["s3"], indirect=True)


async def vl(temporal_address: str, *args: str) -> subprocess.CompletedProcess:
    """`vl` as a person runs it, against the test's Temporal server (TEMPORAL_ADDRESS: nothing is started).
    In a thread: the control-plane worker that answers its queries runs on this test's event loop."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VL_")} | {"TEMPORAL_ADDRESS": temporal_address}
    return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "cli.main", *args], env=env, cwd=REPO,
                                   capture_output=True, text=True, timeout=120)


def staged_saves_left(vl_home: Path, run_id: str, host: str, attempt: int) -> list[str]:
    staging = vl_home / "hosts" / run_id / host / f"a{attempt}" / "staging"
    return [p.name for p in staging.iterdir() if not p.name.startswith(".tmp-")]


def corrupt(storage_url: str, run_id: str, name: str, case: str) -> None:
    fs, root = storage_fs(storage_url)
    directory = f"{root}/{run_id}/checkpoints/{name}"
    if case == "truncated file":
        fs.pipe_file(f"{directory}/model.pt", fs.cat_file(f"{directory}/model.pt")[:100])
    elif case == "flipped byte":
        data = bytearray(fs.cat_file(f"{directory}/model.pt"))
        data[len(data) // 2] ^= 0x01
        fs.pipe_file(f"{directory}/model.pt", bytes(data))
    elif case == "missing file":
        fs.rm_file(f"{directory}/rng.pt")
    elif case == "missing manifest":
        fs.rm_file(f"{directory}/{MANIFEST_NAME}")
    elif case == "unparsable manifest":
        fs.pipe_file(f"{directory}/{MANIFEST_NAME}", b"{not json")
    elif case == "manifest of another run":
        manifest = json.loads(fs.cat_file(f"{directory}/{MANIFEST_NAME}"))
        fs.pipe_file(f"{directory}/{MANIFEST_NAME}", json.dumps(manifest | {"run_id": "other-run"}).encode())


E2E_REASONS = CORRUPTIONS | {"truncated file": "model.pt: size 100 bytes", "missing file": "rng.pt: missing"}


@S3
async def test_each_corruption_is_reported_quarantined_and_the_run_resumes_from_the_newest_good(
        temporal_env, temporal_address, control, vl_home, tmp_path, reference_weights, storage_url):
    out = tmp_path / "w.pt"
    spec = make_spec(tmp_path, steps=150, out=out, heartbeat_timeout_seconds=3.0, storage_url=storage_url,
                     keep_checkpoints=50)
    client = temporal_env.client
    await vl_client.submit(client, spec, queue=control)

    async def seven_stored():
        status = await live_status(client, spec.run_id)
        return status if len(list_checkpoints(storage_url, spec.run_id)) >= 7 and status.current_host else None

    status = await wait_until(seven_stored, 120, "seven checkpoints")
    pgid = int(status.current_host.handle["pgid"])
    for pid in [pid for pid, _ in group_members(pgid) if pid != pgid]:
        os.kill(pid, signal.SIGSTOP)  # freeze training; the agent stores what is staged and keeps heartbeating

    async def settled():
        status = await live_status(client, spec.run_id)
        newest = list_checkpoints(storage_url, spec.run_id)[0][1]
        return not staged_saves_left(vl_home, spec.run_id, "h-1", 1) and status.durable_step == newest

    await wait_until(settled, 60, "the last staged save to be stored and reported")
    names = [name for name, _, _ in list_checkpoints(storage_url, spec.run_id)]
    damaged = dict(zip(names, E2E_REASONS))  # the six newest, each damaged its own way
    good = names[len(damaged)]
    for name, case in damaged.items():
        corrupt(storage_url, spec.run_id, name, case)
    os.killpg(pgid, signal.SIGKILL)

    status = await result_of(client, spec.run_id)
    assert status.state == RunState.SUCCEEDED
    second = status.attempts[1]
    assert second.resumed_from == good and second.start_step == checkpoint.parse_checkpoint_name(good)[0]
    reported = {bad.name: bad.reason for bad in status.bad_checkpoints}
    for name, case in damaged.items():
        assert E2E_REASONS[case] in reported[name], (case, reported)
    assert_same_weights(out, reference_weights(150))

    # `vl checkpoints RUN --json`: each damaged one is bad with its reason (from its quarantine record).
    listed = await vl(temporal_address, "checkpoints", spec.run_id, "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {row["url"].rsplit("/", 1)[1]: row for row in json.loads(listed.stdout)}
    for name, case in damaged.items():
        assert rows[name]["state"] == "bad" and E2E_REASONS[case] in rows[name]["reason"], rows[name]
        assert {"step", "attempt", "url", "state", "reason", "size", "age_seconds"} <= rows[name].keys()
    assert rows[good]["state"] == "complete" and rows[good]["reason"] == ""
    # --verify re-reads every byte of the others, and the table says the same in words.
    table = await vl(temporal_address, "checkpoints", spec.run_id, "--verify")
    assert table.returncode == 0, table.stderr
    assert table.stdout.count("complete") == sum(row["state"] == "complete" for row in rows.values())
    assert "bad: model.pt: blake3" in table.stdout and "bad: no MANIFEST.json" in table.stdout


@S3
async def test_a_host_killed_mid_upload_leaves_a_partial_that_is_never_resumed_and_is_removed(
        temporal_env, control, vl_home, tmp_path, counter_reference, storage_url, s3_server, monkeypatch):
    proxy = ManifestHoldingProxy(s3_server.port)
    proxy.start()
    # fsspec reads this when imported, so only hosts started from now on reach storage through the proxy.
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", proxy.url)
    try:
        out = tmp_path / "out.json"
        # Retention every second while attempts run, keeping 2: what an attempt resumed from must survive it.
        spec = make_counter_spec(tmp_path, steps=150, out=out, heartbeat_timeout_seconds=3.0, storage_url=storage_url,
                                 keep_checkpoints=2, prune_every_seconds=1.0)
        client = temporal_env.client
        await vl_client.submit(client, spec, queue=control)

        async def stored_some():
            status = await live_status(client, spec.run_id)
            return status if (status.durable_step or 0) >= 30 and status.current_host else None

        status = await wait_until(stored_some, 120, "three checkpoints")
        proxy.hold_manifests = True

        async def stuck_in_commit():
            # Newer than every complete one: an older checkpoint without a manifest is one that retention is
            # removing (manifest first), and the heartbeat that said 30 may lag what is stored by several saves.
            listed = describe_checkpoints(storage_url, spec.run_id, {})
            complete = [item for item in listed if item.state == CheckpointState.COMPLETE]
            uploading = [item for item in listed if item.state == CheckpointState.UPLOADING and item.size > 0
                         and complete and item.step > complete[0].step]
            return (uploading[0], complete[0]) if uploading and proxy.held else None

        partial, last_complete = await wait_until(stuck_in_commit, 60, "an upload stored but for its manifest")
        os.killpg(int(status.current_host.handle["pgid"]), signal.SIGKILL)
        proxy.hold_manifests = False

        status = await result_of(client, spec.run_id)
    finally:
        proxy.stop()
    assert status.state == RunState.SUCCEEDED
    first, second = status.attempts[0], status.attempts[1]
    assert first.outcome == AttemptOutcome.RECLAIMED and "heartbeats stopped" in first.reason
    assert first.durable_step < partial.step
    # The host is gone for sure, so what it completed counts; what it did not is never resumed from.
    assert second.resumed_from == last_complete.name and second.start_step < partial.step
    assert partial.name not in [name for name, _, _ in list_checkpoints(storage_url, spec.run_id)], \
        "the partial upload of the dead host is still there"
    assert out.read_text() == counter_reference(150)

    # Retention: the newest two complete checkpoints, and the one the last attempt resumed from.
    ended = [record.attempt for record in status.attempts]
    complete = [item.name for item in describe_checkpoints(storage_url, spec.run_id, status.fences, ended)
                if item.state == CheckpointState.COMPLETE]
    assert status.attempts[-1].resumed_from in complete
    assert set(complete) == set(complete[:2]) | {status.attempts[-1].resumed_from}, complete


async def test_a_superseded_attempt_that_publishes_a_newer_step_is_ignored(
        temporal_env, control, vl_home, tmp_path, counter_reference, storage_url):
    out = tmp_path / "out.json"
    spec = make_counter_spec(tmp_path, steps=300, out=out, heartbeat_timeout_seconds=3.0, storage_url=storage_url)
    client = temporal_env.client
    await vl_client.submit(client, spec, queue=control)

    async def on_host(host_id: str):
        status = await live_status(client, spec.run_id)
        host = status.current_host
        return status if host and host.host_id == host_id and (status.durable_step or 0) >= 20 else None

    await wait_until(lambda: on_host("h-1"), 120, "checkpoints on the first host")
    await vl_client.reclaim(client, spec.run_id)
    status = await wait_until(lambda: on_host("h-2"), 120, "the second attempt")
    fence = status.fences[1]

    # Attempt 1, written off at `fence`, comes back (a partitioned host) and publishes a valid checkpoint of
    # its real state, labelled with a step far ahead. Chosen, it would skip almost the whole run.
    zombie_state = tmp_path / "zombie"
    _, ref = checkpoint.verify_checkpoint(storage_url, spec.run_id, checkpoint.checkpoint_name(fence, 1))
    checkpoint.restore_checkpoint(ref, zombie_state)
    stale = checkpoint.upload_checkpoint(zombie_state, storage_url, spec.run_id, attempt=1, step=299)
    await vl_client.reclaim(client, spec.run_id)

    status = await result_of(client, spec.run_id)
    assert status.state == RunState.SUCCEEDED
    third = status.attempts[2]
    assert third.start_step == status.attempts[1].durable_step < stale.step
    assert {bad.name: bad.reason for bad in status.bad_checkpoints}[stale.name] == \
        f"fenced: attempt 1 ended at step {fence}"
    assert out.read_text() == counter_reference(300)


async def test_zero_code_lightning_script_resumes_from_its_synced_directory(
        temporal_env, control, vl_home, tmp_path, storage_url):
    """A Lightning script that knows nothing of VaultLayer: ModelCheckpoint into a directory and
    `fit(ckpt_path="last")`. Reclaimed with a notice, then without one after its disk is gone, it resumes each
    time from the directory vl restored, and reaches its last step."""
    ckpt_dir, result = tmp_path / "ckpts", tmp_path / "result.json"
    steps = 160  # 16 s of training, a save every 2 s
    spec = make_spec(tmp_path, steps=steps, out=tmp_path / "unused", storage_url=storage_url, checkpoint_every=None,
                     checkpoint_dir=str(ckpt_dir))
    spec.command = [sys.executable, str(REPO / "examples" / "train_lightning.py"), "--steps", str(steps),
                    "--ckpt-dir", str(ckpt_dir), "--save-every", "20", "--step-time", "0.1", "--result", str(result)]
    client = temporal_env.client
    await vl_client.submit(client, spec, queue=control)

    def snapshot_beyond(step: int, host_id: str):
        async def check():
            status = await live_status(client, spec.run_id)
            host = status.current_host
            return status if (status.durable_step or 0) > step and host and host.host_id == host_id else None
        return check

    await wait_until(snapshot_beyond(0, "h-1"), 120, "a snapshot of the script's directory in storage")
    await vl_client.reclaim(client, spec.run_id)  # with a notice: the directory is snapshotted at once

    status = await wait_until(snapshot_beyond(0, "h-2"), 120, "the second attempt")
    status = await wait_until(snapshot_beyond(status.attempts[0].durable_step, "h-2"), 120,
                              "a snapshot made by the second attempt")
    pgid = int(status.current_host.handle["pgid"])
    for pid in [pid for pid, _ in group_members(pgid) if pid != pgid]:
        os.kill(pid, signal.SIGSTOP)
    shutil.rmtree(ckpt_dir)  # the host's disk goes with it: only storage can bring the directory back
    await vl_client.reclaim(client, spec.run_id, with_notice=False)

    status = await result_of(client, spec.run_id)
    assert status.state == RunState.SUCCEEDED
    first, second, last = status.attempts
    assert first.outcome == AttemptOutcome.RECLAIMED and first.emergency_save == "saved", first
    assert second.start_step == first.durable_step and second.outcome == AttemptOutcome.RECLAIMED
    assert last.resumed_from is not None and last.start_step > first.durable_step
    finished = json.loads(result.read_text())
    assert finished["global_step"] == steps
    assert finished["start_step"] > 0, "Lightning started over: the directory was not restored"


@pytest.mark.parametrize(("flags", "message"), [
    (["--checkpoint-dir", "."], "holds"),
    (["--checkpoint-dir", "~"], "holds"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints 0"),
])
def test_zero_code_and_retention_flags_refuse_what_would_lose_data(flags, message, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    args = parser().parse_args(["run", "--run-id", "r-test", *flags, "--", sys.executable, "-c", "pass"])
    with pytest.raises(RunRequestError, match=message):
        build_spec(request_from_args(args))


def test_checkpoint_dir_resolves_inside_the_code_that_travels(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    args = ["run", "--run-id", "r-test", "--checkpoint-dir", "ckpts", "--keep-checkpoints", "5"]
    command = ["--", sys.executable, "-c", "pass"]
    spec = build_spec(request_from_args(parser().parse_args([*args, *command])))
    assert (spec.checkpoint_dir, spec.keep_checkpoints) == ("ckpts", 5)  # in the snapshot each host unpacks
    unshipped = build_spec(request_from_args(parser().parse_args([*args, "--no-code", *command])))
    assert unshipped.checkpoint_dir == str(REPO / "ckpts")  # the host's own workdir, as given
    outside = build_spec(request_from_args(parser().parse_args(
        ["run", "--checkpoint-dir", str(tmp_path / "ckpts"), *command])))
    assert outside.checkpoint_dir == str(tmp_path / "ckpts")
