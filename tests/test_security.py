"""Security: payload encryption on a real run (history holds ciphertext only), the codec server over real
HTTP, Temporal TLS/API-key settings, host agents that refuse foreign work, and run ids that cannot escape
the storage root."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from temporalio import workflow
from temporalio.api.common.v1 import Payload
from temporalio.client import Client
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from activities.providers.local import LocalProvider
from tests.conftest import REPO, TRAIN_TINY, make_spec
from tests.helpers import FOREGROUND_VL, free_port
from vaultlayer import checkpoint
from vaultlayer import client as vl_client
from vaultlayer.codec import ENCODING, AesGcmCodec, EncryptionKeyError, data_converter, key_id, load_keys
from vaultlayer.codec_server import make_server
from vaultlayer.models import AttemptInput, AttemptResult, Placement, Pool, ProvisionInput, RunState, RunSpec
from vaultlayer.run_ids import new_run_id, run_id_problem
from worker.control import create_worker


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def history_payloads(node, path: str = "") -> list[tuple[str, dict]]:
    """(where, payload) for every Payload in a history's JSON, except search attributes and patch markers,
    which Temporal keeps readable by design (they hold no run data: patch ids, VlState, VlGpu...)."""
    if any(plain in path for plain in ("searchAttributes", "patch-data")):
        return []
    found = []
    if isinstance(node, dict):
        if "metadata" in node and "data" in node:
            found.append((path, node))
        for name, value in node.items():
            found += history_payloads(value, f"{path}/{name}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += history_payloads(value, f"{path}[{index}]")
    return found


async def test_encrypted_run_leaves_only_ciphertext_in_history(temporal_env, temporal_address, vl_home, tmp_path,
                                                               monkeypatch):
    key, api_key, canary = new_key(), f"api-{uuid.uuid4().hex}", f"canary-{uuid.uuid4().hex}"
    monkeypatch.setenv("VL_ENCRYPTION_KEY", key)
    # An API key travels like TLS settings, through Temporal's environment config (the dev server ignores it).
    monkeypatch.setenv("TEMPORAL_API_KEY", api_key)
    monkeypatch.setenv("TEMPORAL_TLS", "false")
    client = await vl_client.connect(temporal_address)
    assert client.service_client.config.api_key == api_key
    queue = f"vl-test-{uuid.uuid4().hex[:8]}"
    # The script prints its whole environment into the host's log: the canary must be there, no key may be.
    spec = make_spec(tmp_path, steps=1, out=tmp_path / "w.pt", env={"CANARY": canary},
                     command=[sys.executable, "-c", "import os; print(dict(os.environ))"])
    async with create_worker(client, task_queue=queue, home=vl_home):
        await vl_client.submit(client, spec, queue=queue)
        await asyncio.wait_for(client.get_workflow_handle(spec.run_id).result(), 120)
        status = await vl_client.status(client, spec.run_id)  # the client with the key reads the run
        assert status.state == RunState.SUCCEEDED

        stranger = await vl_client.connect(temporal_address, env={"VL_ENCRYPTION_KEY": new_key(),
                                                                  "TEMPORAL_TLS": "false"})
        with pytest.raises(EncryptionKeyError, match=f"encrypted with key {key_id(base64.b64decode(key))}"):
            await vl_client.status(stranger, spec.run_id)
        keyless = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "cli.main", "status", spec.run_id], cwd=REPO, capture_output=True,
            text=True, timeout=60, env={**{k: v for k, v in os.environ.items() if not k.startswith("VL_")},
                                        "TEMPORAL_ADDRESS": temporal_address, "VL_TASK_QUEUE": queue})
        assert keyless.returncode == 1 and keyless.stderr.strip().splitlines() == [
            f"vl: error: a payload is encrypted with key {key_id(base64.b64decode(key))} and this process has no "
            "key; set VL_ENCRYPTION_KEY or VL_ENCRYPTION_KEY_FILE as the workers have it"], keyless.stderr

    plain = temporal_env.client  # no codec: what the server, its UI and `temporal workflow show` hold
    executions = [e async for e in plain.list_workflows(f'WorkflowId = "{spec.run_id}"')]
    assert executions, "the run left no executions"
    for execution in executions:
        history = await plain.get_workflow_handle(spec.run_id, run_id=execution.run_id).fetch_history()
        started = history.events[0].workflow_execution_started_event_attributes
        [run_input] = started.input.payloads
        assert run_input.metadata["encoding"] == ENCODING
        assert spec.run_id.encode() not in run_input.data and b"os.environ" not in run_input.data
        text = history.to_json()
        for secret in (canary, api_key, key, "os.environ"):
            assert secret not in text, f"{secret[:12]}... is in the history of {execution.run_id}"
        payloads = history_payloads(json.loads(text))
        assert payloads, "found no payloads to check"
        for where, payload in payloads:
            assert base64.b64decode(payload["metadata"]["encoding"]) == ENCODING, where
    logs = {path: path.read_text(errors="replace") for path in vl_home.rglob("*.log")}
    assert any(canary in text for text in logs.values()), "the script's environment was not logged"
    for path, text in logs.items():
        assert api_key not in text and key not in text, f"a secret is in {path}"


async def test_codec_keys_rotate_and_refuse_clearly():
    old, new = os.urandom(32), os.urandom(32)
    [sealed] = await AesGcmCodec([old]).encode([Payload(metadata={"encoding": b"json/plain"}, data=b'"hello"')])
    rotated = AesGcmCodec([new, old])  # the new key encrypts; the old one still decrypts
    [opened] = await rotated.decode([sealed])
    assert opened.data == b'"hello"' and opened.metadata["encoding"] == b"json/plain"
    [resealed] = await rotated.encode([opened])
    assert resealed.metadata["encryption-key-id"] == key_id(new).encode()
    with pytest.raises(EncryptionKeyError, match=f"key {key_id(old)}.*add that key"):
        await AesGcmCodec([new]).decode([sealed])
    tampered = Payload(metadata=sealed.metadata, data=sealed.data[:-1] + bytes([sealed.data[-1] ^ 1]))
    with pytest.raises(EncryptionKeyError, match="fails authentication"):
        await rotated.decode([tampered])
    with pytest.raises(EncryptionKeyError, match="is 16 bytes, AES-256 needs 32"):
        load_keys({"VL_ENCRYPTION_KEY": base64.b64encode(os.urandom(16)).decode()})
    with pytest.raises(EncryptionKeyError, match="cannot read it"):
        load_keys({"VL_ENCRYPTION_KEY_FILE": "/no/such/key"})
    keyless = data_converter({}).payload_codec  # no key: nothing encrypted, and a clear refusal of ciphertext
    assert await keyless.encode([opened]) == [opened]
    with pytest.raises(EncryptionKeyError, match=f"encrypted with key {key_id(old)} and this process has no key"):
        await keyless.decode([sealed])


def post(url: str, body: bytes, headers: dict[str, str], method: str = "POST") -> tuple[int, dict, dict]:
    request = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read()
            return response.status, dict(response.headers), json.loads(text) if text else {}
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read() or b"{}")


def test_codec_server_round_trips_over_http():
    codec = AesGcmCodec([os.urandom(32)])
    server = make_server(codec, port=0, cors_origins=["http://localhost:8233"], namespaces=["default"])
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        plain = {"payloads": [{"metadata": {"encoding": base64.b64encode(b"json/plain").decode()},
                               "data": base64.b64encode(b'{"run_id": "r-1"}').decode()}]}
        headers = {"Content-Type": "application/json", "X-Namespace": "default", "Origin": "http://localhost:8233"}
        code, reply_headers, encoded = post(f"{base}/encode", json.dumps(plain).encode(), headers)
        assert code == 200 and reply_headers["Access-Control-Allow-Origin"] == "http://localhost:8233"
        [sealed] = encoded["payloads"]
        assert base64.b64decode(sealed["metadata"]["encoding"]) == ENCODING and b"r-1" not in base64.b64decode(
            sealed["data"])
        code, _, decoded = post(f"{base}/default/decode", json.dumps(encoded).encode(),
                                {"Content-Type": "application/json"})  # the CLI's /{namespace}/ form
        assert code == 200 and decoded == plain

        code, preflight, _ = post(f"{base}/decode", b"", {"Origin": "http://localhost:8233",
                                                          "Access-Control-Request-Method": "POST"}, "OPTIONS")
        assert code == 204 and "X-Namespace" in preflight["Access-Control-Allow-Headers"]
        code, _, refused = post(f"{base}/decode", b"", {"Origin": "https://evil.example"}, "OPTIONS")
        assert code == 403 and "--cors-origin" in refused["error"]
        code, _, refused = post(f"{base}/decode", json.dumps(encoded).encode(), {**headers, "X-Namespace": "prod"})
        assert code == 403 and "'prod' is not served here" in refused["error"]
        code, _, refused = post(f"{base}/decode", b"not json", headers)
        assert code == 400 and "payloads" in refused["error"]
        raw = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
        # A negative length would read until the client hangs up: refused before reading.
        raw.request("POST", "/decode", body=b"", headers={"Content-Length": "-1", "X-Namespace": "default"})
        assert raw.getresponse().status == 413
        raw.close()
        stranger = AesGcmCodec([os.urandom(32)])
        foreign = {"payloads": [json.loads(json.dumps(sealed))]}
        foreign_server = make_server(stranger, port=0)
        threading.Thread(target=foreign_server.serve_forever, daemon=True).start()
        try:
            code, _, refused = post(f"http://127.0.0.1:{foreign_server.server_address[1]}/decode",
                                    json.dumps(foreign).encode(), {"Content-Type": "application/json"})
            assert code == 422 and "add that key" in refused["error"]
        finally:
            foreign_server.shutdown()
    finally:
        server.shutdown()


def test_vl_codec_server_serves_with_the_shells_key(tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text(new_key() + "\n")
    # As a terminal starts it: SIGINT at its default, not ignored as a runner started in the background by a
    # non-interactive shell would pass it on (Python then ignores Ctrl-C; tests/helpers.py FOREGROUND_VL).
    server = subprocess.Popen([*FOREGROUND_VL, "codec-server", "--port", "0"], cwd=REPO,
                              env={**os.environ, "VL_ENCRYPTION_KEY_FILE": str(key_file)}, stdout=subprocess.PIPE,
                              text=True)
    try:
        banner = server.stdout.readline()
        assert banner.startswith("codec server on http://127.0.0.1:"), banner
        base = banner.split()[3]
        plain = {"payloads": [{"metadata": {"encoding": base64.b64encode(b"json/plain").decode()},
                               "data": base64.b64encode(b'"x"').decode()}]}
        code, _, sealed = post(f"{base}/encode", json.dumps(plain).encode(), {"Content-Type": "application/json"})
        assert code == 200
        key = base64.b64decode(key_file.read_text())
        assert base64.b64decode(sealed["payloads"][0]["metadata"]["encryption-key-id"]).decode() == key_id(key)
        assert post(f"{base}/decode", json.dumps(sealed).encode(), {"Content-Type": "application/json"})[2] == plain
        server.send_signal(signal.SIGINT)  # Ctrl-C stops it cleanly
        assert server.wait(timeout=10) == 0
    finally:
        if server.poll() is None:
            server.kill()


async def test_connection_settings_come_from_temporal_env_config(tmp_path):
    cert, private, ca = (tmp_path / name for name in ("client.pem", "client.key", "ca.pem"))
    for path in (cert, private, ca):
        path.write_bytes(f"-----{path.name}-----".encode())
    mtls = vl_client.connect_config(env={
        "TEMPORAL_ADDRESS": "temporal.example:7233", "TEMPORAL_NAMESPACE": "training",
        "TEMPORAL_TLS_CLIENT_CERT_PATH": str(cert), "TEMPORAL_TLS_CLIENT_KEY_PATH": str(private),
        "TEMPORAL_TLS_SERVER_CA_CERT_PATH": str(ca), "TEMPORAL_TLS_SERVER_NAME": "temporal.internal",
    })
    assert mtls["target_host"] == "temporal.example:7233" and mtls["namespace"] == "training"
    assert mtls["tls"].client_cert == cert.read_bytes() and mtls["tls"].client_private_key == private.read_bytes()
    assert mtls["tls"].server_root_ca_cert == ca.read_bytes() and mtls["tls"].domain == "temporal.internal"

    profile = tmp_path / "temporal.toml"
    profile.write_text(f'[profile.cloud]\naddress = "ns.acct.tmprl.cloud:7233"\nnamespace = "ns.acct"\n'
                       f'api_key = "from-profile"\n')
    # As a cloud host's agent reads them: the settings secret's JSON is its whole environment.
    cloud = vl_client.connect_config(env={"TEMPORAL_CONFIG_FILE": str(profile), "TEMPORAL_PROFILE": "cloud",
                                          "VL_ENCRYPTION_KEY": new_key()})
    assert cloud["target_host"] == "ns.acct.tmprl.cloud:7233" and cloud["api_key"] == "from-profile"
    assert cloud["tls"] is True  # an API key implies TLS
    [sealed] = await cloud["data_converter"].payload_codec.encode([Payload(data=b"x")])
    assert sealed.metadata["encoding"] == ENCODING


@workflow.defn(name="SendAttempt")
class SendAttempt:
    """Schedules one run_attempt on a host's queue, as a workflow of any run could."""

    @workflow.run
    async def run(self, inp: AttemptInput) -> str:
        try:
            result = await workflow.execute_activity(
                "run_attempt", inp, result_type=AttemptResult, task_queue=inp.host.task_queue,
                schedule_to_close_timeout=timedelta(seconds=60), retry_policy=RetryPolicy(maximum_attempts=1))
        except ActivityError as err:
            return f"refused: {err.cause.message}"
        return f"ran: {result.outcome.value}"


async def test_host_agent_refuses_other_runs_and_hosts(temporal_env, temporal_address, vl_home, tmp_path):
    run_id = f"t-{uuid.uuid4().hex[:10]}"
    provider = LocalProvider(vl_home, {"TEMPORAL_ADDRESS": temporal_address, "TEMPORAL_NAMESPACE": "default"})
    host = provider.provision(ProvisionInput(run_id=run_id, placement=Placement(pool=Pool(), attempt=1))).host
    marker = Path(host.handle["dir"]) / "a1" / "kept"
    marker.parent.mkdir(parents=True)
    marker.touch()
    mine = AttemptInput(run_id=run_id, attempt=1, host=host, command=[sys.executable, "-c", "pass"],
                        workdir=str(tmp_path), storage_url=(tmp_path / "storage").as_uri())
    other_host = host.model_copy(update={"host_id": "h-9"})
    queue = f"vl-test-{uuid.uuid4().hex[:8]}"
    client: Client = temporal_env.client
    try:
        async with Worker(client, task_queue=queue, workflows=[SendAttempt],
                          workflow_runner=UnsandboxedWorkflowRunner()):
            async def send(workflow_id: str, inp: AttemptInput) -> str:
                return await client.execute_workflow(SendAttempt.run, inp, id=workflow_id, task_queue=queue)

            spoofed = await send(f"t-other-{uuid.uuid4().hex[:6]}", mine)  # another run claims this run's id
            assert spoofed.startswith(f"refused: host agent h-1 of run {run_id} refused the attempt: workflow"), spoofed
            assert marker.exists(), "a refused attempt must not touch the host's directories"
            forged = await send(run_id, mine.model_copy(update={"run_id": "t-other"}))
            assert "run 't-other' is not this agent's" in forged
            misrouted = await send(run_id, mine.model_copy(update={"host": other_host}))
            assert "host 'h-9' is not this agent's 'h-1'" in misrouted
            assert await send(run_id, mine) == "ran: completed"  # its own work it does
    finally:
        provider.release(host)


def test_a_shell_with_another_key_setting_is_refused_by_the_embedded_worker(tmp_path):
    """The embedded worker holds the key of the `vl` that started it; a `vl` without that key is told so,
    on one line, instead of starting runs that worker could not read (or reading runs sealed for it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VL_", "TEMPORAL_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(VL_HOME=str(tmp_path / "home"), VL_TEMPORAL_PORT=str(free_port()), VL_UI_PORT=str(free_port()))
    keyed = {**env, "VL_ENCRYPTION_KEY": new_key()}

    def vl(environment: dict[str, str], *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cli.main", *args], env=environment, cwd=REPO,
                              capture_output=True, text=True, timeout=120)

    try:
        started = vl(keyed, "ls")
        assert started.returncode == 0 and "started control-plane worker" in started.stderr, started.stderr
        refused = vl(env, "ls")
        key = key_id(base64.b64decode(keyed["VL_ENCRYPTION_KEY"]))
        assert refused.returncode == 1 and refused.stderr.strip().splitlines() == [
            f"vl: error: the background worker runs with keys {key} and this shell has no encryption key; set "
            "VL_ENCRYPTION_KEY or VL_ENCRYPTION_KEY_FILE as it was when the worker started, or vl down to restart "
            "it with this shell's"], refused.stderr
        again = vl(keyed, "ls")
        assert again.returncode == 0 and "started" not in again.stderr, "the same key reuses the worker"
    finally:
        vl(env, "down")


def test_run_ids_cannot_escape_the_storage_root(tmp_path):
    assert run_id_problem(new_run_id()) is None and run_id_problem("t-688e08a17c") is None  # generated, recorded
    for bad in ("../x", "/etc", "a/b", "a\\b", "a\x00b", "..", "a..b", "", "Upper", "x" * 64, ".hidden"):
        with pytest.raises(ValueError, match="run id .* is not allowed; use 1-63 of a-z"):
            RunSpec(run_id=bad, command=["x"], workdir="/", storage_url="file:///s")
        with pytest.raises(ValueError, match="is not allowed"):
            checkpoint.list_checkpoints((tmp_path / "s").as_uri(), bad)
    result = subprocess.run([sys.executable, "-m", "cli.main", "run", "--run-id", "../../etc", "--", "python",
                             str(TRAIN_TINY)], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "VL_HOME": str(tmp_path / "home")})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "vl: error: --run-id: run id '../../etc' is not allowed; use 1-63 of a-z 0-9 - _ . starting with a "
        "letter or digit, without '..', such as my-run-1"]
    assert not (tmp_path / "home").exists()
