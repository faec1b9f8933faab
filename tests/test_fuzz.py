"""Bad input, fuzzed: run specs and config files, checkpoint manifests and reclaim notices either validate
or get their one documented error, never another exception; and garbage sent into a real run on the dev
server (malformed updates, malformed heartbeat details) is refused without failing a workflow task."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import PurePosixPath

import fsspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from temporalio import activity
from temporalio.client import WorkflowFailureError, WorkflowUpdateFailedError
from temporalio.worker import Worker

import worker.control
from activities.notices import NoticeError, parse_instance_action
from activities.providers.aws import ImdsNoticeSource
from activities.providers.gcp import GceMetadataNoticeSource
from activities.providers.local import MetadataDirNoticeSource
from tests.conftest import make_counter_spec
from vaultlayer import checkpoint
from vaultlayer import client as vl_client
from vaultlayer.config import ConfigError, load_file
from vaultlayer.models import AttemptOutcome, CheckpointRef, Notice, RunSpec, RunState
from vaultlayer.run_ids import run_id_problem

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
DANGEROUS_PATHS = ["../x", "/etc/passwd", "a/../../b", "a\\b", "a\x00b", "", ".", "a//b", "C:evil", "MANIFEST.json",
                   "model.pt", "nested/rng.bin"]

# ---------------------------------------------------------------- run specs and config files

VALID_SPEC = {"run_id": "r-1", "command": ["python", "train.py"], "workdir": "/w", "storage_url": "file:///s"}


@st.composite
def spec_inputs(draw) -> tuple[dict, str | None]:
    """A valid spec with one field replaced by anything (that field's name), or an arbitrary mapping (None)."""
    if draw(st.booleans()):
        name = draw(st.sampled_from(sorted(RunSpec.model_fields)))
        value = draw(JSON | st.text(alphabet="../\\\x00aZ-_", max_size=70))
        return {**VALID_SPEC, name: value}, name
    return draw(st.dictionaries(st.sampled_from(sorted(RunSpec.model_fields)) | st.text(max_size=6), JSON,
                                max_size=10)), None


@FUZZ
@given(spec_inputs())
def test_run_specs_validate_or_name_the_bad_field(case):
    data, replaced = case
    try:
        spec = RunSpec.model_validate(data)
    except ValidationError as err:
        errors = err.errors()
        assert errors and all(error["loc"] and error["msg"] for error in errors)
        if replaced is not None:
            assert {error["loc"][0] for error in errors} == {replaced}, errors
        return
    assert run_id_problem(spec.run_id) is None
    run_dir = checkpoint.storage.run_url("file:///storage/root", spec.run_id)
    relative = PurePosixPath(run_dir.removeprefix("file://")).relative_to("/storage/root")
    assert relative.parts == (spec.run_id,) and spec.run_id not in ("..", ".")


@FUZZ
@given(st.binary(max_size=300) | JSON.map(lambda value: json.dumps(value).encode()))
def test_run_spec_json_from_the_wire_is_only_a_validation_error(body):
    with pytest.raises(ValidationError):
        RunSpec.model_validate_json(body)


@FUZZ
@given(st.text(max_size=200) | JSON.map(json.dumps) | st.dictionaries(
    st.sampled_from(["command", "workdir", "env", "setup", "resources", "checkpoint", "limits", "comand"]),
    JSON, max_size=5).map(json.dumps))
def test_run_config_files_load_or_list_one_line_problems(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("config") / "vl.yaml"
    path.write_text(text)
    try:
        loaded = load_file(path)
    except ConfigError as err:
        assert err.problems and all(problem and "\n" not in problem for problem in err.problems), err.problems
        return
    assert loaded.config is not None


# ---------------------------------------------------------------- checkpoint manifests

RUN = "r-fuzz"
STORED = b"stored bytes"


@st.composite
def manifests(draw) -> bytes:
    """Manifest bytes: arbitrary bytes or JSON, or a manifest of this checkpoint with hostile fields."""
    kind = draw(st.sampled_from(["bytes", "json", "manifest"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "json":
        return json.dumps(draw(JSON)).encode()
    entry = st.fixed_dictionaries({
        "path": st.sampled_from(DANGEROUS_PATHS) | st.text(max_size=10),
        "size": st.sampled_from([len(STORED), 0, -1, 2**70]) | JSON,
        "sha256": st.sampled_from([hashlib.sha256(STORED).hexdigest(), "0" * 64]) | JSON,
    })
    document = {
        "format_version": draw(st.sampled_from([checkpoint.FORMAT_VERSION, 99, "1"])),
        "run_id": draw(st.sampled_from([RUN, "other", "../x"])),
        "attempt": draw(st.sampled_from([1, 2, -1, "1"])),
        "step": draw(st.sampled_from([10, 11, None])),
        "created_at": draw(st.sampled_from(["2026-11-27T10:00:00Z", "yesterday", 0])),
        "files": draw(st.lists(entry, max_size=4) | JSON),
    }
    for name in draw(st.lists(st.sampled_from(sorted(document)), max_size=2)):
        document.pop(name, None)
    return json.dumps(document).encode()


@FUZZ
@given(manifests())
def test_manifests_verify_or_are_rejected_and_restore_only_raises_checkpoint_error(tmp_path_factory, body):
    root = f"memory://fuzz-{uuid.uuid4().hex[:8]}"
    name = checkpoint.checkpoint_name(10, 1)
    directory = f"{root}/{RUN}/checkpoints/{name}"
    fs = fsspec.filesystem("memory")
    for stored in ("model.pt", "nested/rng.bin"):
        fs.pipe_file(f"{directory}/{stored}", STORED)
    fs.pipe_file(f"{directory}/{checkpoint.MANIFEST_NAME}", body)
    try:
        check, ref = checkpoint.verify_checkpoint(root, RUN, name)
        assert check.ok == (ref is not None) and (check.ok or check.reason)
        destination = tmp_path_factory.mktemp("restore")
        ref = ref or CheckpointRef(name=name, step=10, attempt=1, url=directory,
                                   manifest_sha256=hashlib.sha256(body).hexdigest())
        try:
            checkpoint.restore_checkpoint(ref, destination)
        except checkpoint.CheckpointError as err:
            assert str(err) and not check.ok, f"a verified checkpoint failed to restore: {err}"
        else:
            restored = [path for path in destination.rglob("*") if path.is_file()]
            assert all(path.resolve().is_relative_to(destination.resolve()) for path in restored)
            assert all(path.read_bytes() == STORED for path in restored)
    finally:
        fs.rm(root.removeprefix("memory:/"), recursive=True)


# ---------------------------------------------------------------- reclaim notices

NOTICE_BODIES = (st.text(max_size=80) | JSON.map(json.dumps) | st.fixed_dictionaries(
    {"action": JSON | st.sampled_from(["terminate", "stop"]),
     "time": JSON | st.sampled_from(["2026-11-27T10:00:00Z", "2026-13-40T99:00:00Z", "2026-11-27"])}).map(json.dumps))


@FUZZ
@given(NOTICE_BODIES)
def test_instance_action_parses_or_is_a_notice_error(body):
    try:
        notice = parse_instance_action(body, datetime.now(UTC))
    except NoticeError as err:
        assert "spot/instance-action" in str(err)
        return
    assert isinstance(notice, Notice) and notice.deadline.tzinfo is not None


@FUZZ
@given(st.binary(max_size=120) | NOTICE_BODIES.map(str.encode))
def test_metadata_dir_notices_never_raise(tmp_path_factory, body):
    metadata = tmp_path_factory.mktemp("metadata")
    (metadata / "spot").mkdir()
    (metadata / "spot" / "instance-action").write_bytes(body)
    notice = asyncio.run(MetadataDirNoticeSource(metadata).poll())
    assert notice is None or isinstance(notice, Notice)


class FakeMetadata:
    """An instance-metadata server (AWS IMDSv2 and GCE paths) answering with whatever a test sets."""

    def __init__(self) -> None:
        self.bodies: dict[str, bytes | None] = {}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:  # noqa: N802 - IMDSv2 token
                self._send(200, b"token")

            def do_GET(self) -> None:  # noqa: N802
                body = fake.bodies.get(self.path.split("?")[0].rsplit("/", 1)[-1])
                self._send(404, b"") if body is None else self._send(200, body)

            def _send(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def metadata_server():
    fake = FakeMetadata()
    yield fake
    fake.server.shutdown()


@FUZZ
@given(st.binary(max_size=120) | NOTICE_BODIES.map(str.encode) | st.none(),
       st.binary(max_size=60) | JSON.map(lambda value: json.dumps(value).encode()) | st.none())
def test_imds_notices_never_raise(metadata_server, action, rebalance):
    metadata_server.bodies = {"instance-action": action, "rebalance": rebalance}
    notice = asyncio.run(ImdsNoticeSource(endpoint=f"http://{metadata_server.host}", interval=0).poll())
    assert notice is None or isinstance(notice, Notice)


@FUZZ
@given(st.binary(max_size=60) | st.sampled_from([b"TRUE", b"FALSE", b"NONE", b"TERMINATE_ON_HOST_MAINTENANCE"]))
def test_gce_metadata_values_always_read_as_text(metadata_server, value):
    """What the watcher threads read: any bytes come back as text (a decode error would end the watch)."""
    metadata_server.bodies = {"preempted": value}
    text, _ = GceMetadataNoticeSource(host=metadata_server.host)._get("preempted", None)
    assert isinstance(text, str) and (text == "TRUE") == (value.strip() == b"TRUE")


# ---------------------------------------------------------------- garbage into a real run


class GarbageHost:
    """Plays the run's hosts: attempt 1 heartbeats malformed details and goes silent; attempt 2 completes."""

    def __init__(self) -> None:
        self.garbage_sent = asyncio.Event()

    @activity.defn(name="run_attempt")
    async def run_attempt(self, inp: dict) -> dict:
        if inp["attempt"] == 1:
            activity.heartbeat({"step": "not a step", "phase": ["?"], "notice": 7, "durable_step": {}})
            self.garbage_sent.set()
            # Silent until its worker shuts down (which cancels it): the heartbeat timeout, not a guess at how
            # long that takes, ends the attempt, and the workflow diagnoses from the details above.
            await asyncio.Event().wait()
        return {"outcome": "completed", "start_step": 0, "end_step": 3}


async def test_garbage_into_a_run_fails_no_workflow_task(temporal_env, vl_home, tmp_path, monkeypatch):
    # The local provider's agents get an address that answers nothing, so only GarbageHost serves the hosts.
    monkeypatch.setattr(worker.control, "agent_connection_env",
                        lambda client: {"TEMPORAL_ADDRESS": "127.0.0.1:9", "TEMPORAL_NAMESPACE": "default"})
    client = temporal_env.client
    queue = f"vl-test-{uuid.uuid4().hex[:8]}"
    spec = make_counter_spec(tmp_path, steps=3, out=tmp_path / "out.json", heartbeat_timeout_seconds=2.0)
    host = GarbageHost()
    hosts = [Worker(client, task_queue=f"vl-host-{spec.run_id}-h-{n}", activities=[host.run_attempt])
             for n in (1, 2)]
    async with worker.control.create_worker(client, task_queue=queue, home=vl_home), hosts[0], hosts[1]:
        handle = await vl_client.submit(client, spec, queue=queue)
        await asyncio.wait_for(host.garbage_sent.wait(), 60)
        status = await vl_client.status(client, spec.run_id)  # `vl status` reads the malformed heartbeat
        assert status.state == RunState.RUNNING and status.step is None
        for name, argument in (("reclaim", "not a request"), ("reclaim", {"with_notice": "perhaps"}),
                               ("drop-everything", {})):
            with pytest.raises(WorkflowUpdateFailedError):
                await handle.execute_update(name, argument)
        result = await asyncio.wait_for(handle.result(), 60)
    assert RunState(result["state"]) == RunState.SUCCEEDED
    first = result["attempts"][0]
    assert first["outcome"] in (AttemptOutcome.RECLAIMED, AttemptOutcome.HOST_FAULT)
    assert first["reason"].startswith("heartbeats stopped"), first
    async for execution in client.list_workflows(f'WorkflowId = "{spec.run_id}"'):
        history = await client.get_workflow_handle(spec.run_id, run_id=execution.run_id).fetch_history()
        failed = [event for event in history.events if event.HasField("workflow_task_failed_event_attributes")]
        assert not failed, failed[0].workflow_task_failed_event_attributes.failure.message


@pytest.mark.parametrize(("raw", "where"), [
    ({"spec": {**VALID_SPEC, "run_id": "../escape"}}, "spec.run_id"),
    ({"spec": {**VALID_SPEC, "pools": "all of them"}}, "spec.pools"),
    ("not a run", "input"),
])
async def test_a_run_started_with_bad_input_fails_with_the_reason_not_a_workflow_task(temporal_env, control, raw,
                                                                                     where):
    """As a start from the Temporal UI or `temporal workflow start` could send it."""
    client = temporal_env.client
    handle = await client.start_workflow("TrainingRun", raw, id=f"t-bad-{uuid.uuid4().hex[:8]}", task_queue=control)
    with pytest.raises(WorkflowFailureError) as failed:
        await asyncio.wait_for(handle.result(), 30)
    cause = failed.value.cause
    assert cause.type == "BadInput" and cause.message.startswith(f"TrainingRun input {where}: "), cause.message
    history = await handle.fetch_history()
    assert not [event for event in history.events if event.HasField("workflow_task_failed_event_attributes")]
