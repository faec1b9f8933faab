"""Secret env references: only the reference crosses Temporal; the host reads the value at attempt start.

The planted-secret test runs a real run whose script needs a secret, then greps everything the run left
behind (histories of every continue-as-new run, search attributes and memo, the worker's and the agent's
logs, the attempt logs, every file in checkpoint storage) for the value.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import secrets
import sys
from pathlib import Path

import pytest

from activities.env_secrets import SecretUnavailable, resolve_secrets
from tests.conftest import REPO, make_spec
from vaultlayer import client as vl_client
from vaultlayer.models import AttemptOutcome, RunState
from vaultlayer.secrets import looks_secret, parse_reference

READER = REPO / "tests" / "secret_reader.py"


def decoded_strings(node: object) -> list[str]:
    """Every string in a history's JSON, with each payload's base64 `data` decoded as well."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "data" and isinstance(value, str):
                try:
                    found.append(base64.b64decode(value, validate=True).decode(errors="replace"))
                except binascii.Error:
                    pass
            found += decoded_strings(value)
    elif isinstance(node, list):
        for item in node:
            found += decoded_strings(item)
    elif isinstance(node, str):
        found.append(node)
    return found


async def temporal_haystack(client, run_id: str) -> str:
    """Histories of every run of the workflow (continue-as-new included), search attributes and memo."""
    texts, executions = [], 0
    async for execution in client.list_workflows(f'WorkflowId = "{run_id}"'):
        executions += 1
        handle = client.get_workflow_handle(run_id, run_id=execution.run_id)
        history = await handle.fetch_history()
        texts += decoded_strings(json.loads(history.to_json()))
        described = await handle.describe()
        texts += [str(described.raw_description), repr(described.typed_search_attributes),
                  json.dumps(await described.memo(), default=str)]
    assert executions >= 1
    return "\n".join(texts)


def files_haystack(root: Path) -> tuple[str, list[Path]]:
    paths = [path for path in root.rglob("*") if path.is_file()]
    return "\n".join(path.read_bytes().decode(errors="replace") for path in paths), paths


async def test_a_planted_secret_appears_in_no_history_log_or_checkpoint(temporal_env, control, vl_home, tmp_path,
                                                                          monkeypatch, capfd, caplog):
    planted = f"planted-{secrets.token_hex(16)}"
    source = f"PLANTED_SOURCE_{secrets.token_hex(4).upper()}"
    plain = f"plain-{secrets.token_hex(8)}"  # a plain env value does cross Temporal: proof the grep sees payloads
    monkeypatch.setenv(source, planted)  # the local agent inherits the worker's environment
    digest = hashlib.sha256(planted.encode()).hexdigest()
    spec = make_spec(tmp_path, steps=2, out=tmp_path / "unused",
                     command=[sys.executable, str(READER), "MY_API_TOKEN", digest],
                     env={"RUN_LABEL": plain}, env_secrets={"MY_API_TOKEN": f"env:{source}"})
    client = temporal_env.client
    await vl_client.submit(client, spec, queue=control)
    await asyncio.wait_for(client.get_workflow_handle(spec.run_id).result(), 60)
    status = await vl_client.status(client, spec.run_id)
    assert status.state == RunState.SUCCEEDED, status.attempts  # the script saw the value: the hashes matched
    assert status.durable_step == 2

    in_temporal = await temporal_haystack(client, spec.run_id)
    hosts, host_files = files_haystack(vl_home)
    stored, stored_files = files_haystack(tmp_path / "storage")
    captured = capfd.readouterr()
    worker_logs = "\n".join([captured.out, captured.err, caplog.text])

    for where, text in (("Temporal", in_temporal), ("host files and agent logs", hosts),
                        ("checkpoint storage", stored), ("worker logs", worker_logs)):
        assert planted not in text, f"the planted secret leaked into {where}"
    # Controls: each haystack holds what it should, so the greps above could have found the secret.
    assert f"env:{source}" in in_temporal and plain in in_temporal
    assert "secret check ok for MY_API_TOKEN" in hosts and any(p.name == "agent.log" for p in host_files)
    assert sum(p.name == "MANIFEST.json" for p in stored_files) >= 1 and spec.run_id in stored
    assert spec.run_id in worker_logs


async def test_a_secret_the_script_prints_is_masked_in_the_failure_tail_and_the_stored_log(
        temporal_env, control, tmp_path, monkeypatch):
    planted = f"planted-{secrets.token_hex(16)}"
    source = f"PLANTED_SOURCE_{secrets.token_hex(4).upper()}"
    monkeypatch.setenv(source, planted)
    digest = hashlib.sha256(planted.encode()).hexdigest()
    spec = make_spec(tmp_path, steps=1, out=tmp_path / "unused",
                     command=[sys.executable, str(READER), "RUN_CONFIG_BLOB", digest, "print-and-fail"],
                     env_secrets={"RUN_CONFIG_BLOB": f"env:{source}"})  # masked though its name looks harmless
    client = temporal_env.client
    await vl_client.submit(client, spec, queue=control)
    await asyncio.wait_for(asyncio.gather(client.get_workflow_handle(spec.run_id).result(), return_exceptions=True), 60)
    status = await vl_client.status(client, spec.run_id)
    assert status.state == RunState.FAILED and status.exit_code == 3
    assert "debugging: RUN_CONFIG_BLOB=***" in status.attempts[-1].log_tail
    assert planted not in await temporal_haystack(client, spec.run_id)
    stored, _ = files_haystack(tmp_path / "storage")
    assert "debugging: RUN_CONFIG_BLOB=***" in stored and planted not in stored


async def test_a_secret_the_host_cannot_read_fails_the_attempt_naming_the_reference(temporal_env, control, tmp_path):
    missing = f"NOT_SET_{secrets.token_hex(4).upper()}"
    spec = make_spec(tmp_path, steps=1, out=tmp_path / "unused", command=[sys.executable, "-c", "pass"],
                     env_secrets={"HF_TOKEN": f"env:{missing}"})
    client = temporal_env.client
    await vl_client.submit(client, spec, queue=control)
    await asyncio.wait_for(asyncio.gather(client.get_workflow_handle(spec.run_id).result(), return_exceptions=True), 60)
    status = await vl_client.status(client, spec.run_id)
    assert status.state == RunState.FAILED
    assert [a.outcome for a in status.attempts] == [AttemptOutcome.FAILED]
    assert status.attempts[0].reason == (f"secret env HF_TOKEN (env:{missing}): {missing} was not set in the "
                                         "environment of the `vl run` that submitted the run; fix: export it in "
                                         "that shell and submit again")


# ---------------------------------------------------------------- references and their resolution


@pytest.mark.parametrize(("text", "problem"), [
    ("HF_TOKEN", "'HF_TOKEN' is not a secret reference; fix: write one of env:NAME, file:/path"),
    ("vault:x", "'vault:x' is not a secret reference"),
    ("env:", "'env:' names no secret after env:"),
    ("env:1X", "'env:1X': '1X' is not an environment variable name; fix: write env:NAME"),
    ("gcp-sm:my-secret", "'gcp-sm:my-secret': expected gcp-sm:projects/P/secrets/S"),
])
def test_bad_references_say_how_to_write_them(text, problem):
    with pytest.raises(ValueError) as refused:
        parse_reference(text)
    assert str(refused.value).startswith(problem)


def test_references_are_stored_in_a_host_independent_form(tmp_path):
    assert parse_reference("env:HF_TOKEN") == "env:HF_TOKEN"
    assert parse_reference("file:tok", base=tmp_path) == f"file:{tmp_path / 'tok'}"
    assert parse_reference("gcp-sm:projects/p/secrets/s") == "gcp-sm:projects/p/secrets/s/versions/latest"
    assert parse_reference("aws-sm:arn:aws:secretsmanager:eu-west-1:1:secret:x") == \
        "aws-sm:arn:aws:secretsmanager:eu-west-1:1:secret:x"
    names = ("HF_TOKEN", "WANDB_API_KEY", "DB_PASSWORD", "MY_SECRET", "EPOCHS", "KEYBOARD_LAYOUT", "MONKEY")
    assert [name for name in names if looks_secret(name)] == ["HF_TOKEN", "WANDB_API_KEY", "DB_PASSWORD", "MY_SECRET"]


def test_env_and_file_references_resolve_and_errors_never_show_a_value(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_OF_TOKEN", "value-from-env")
    (tmp_path / "db").write_text("value-from-file\n")
    assert resolve_secrets({"A": "env:SOURCE_OF_TOKEN", "B": f"file:{tmp_path / 'db'}"}) == {
        "A": "value-from-env", "B": "value-from-file"}
    with pytest.raises(SecretUnavailable) as missing:
        resolve_secrets({"A": "env:SOURCE_OF_TOKEN", "B": f"file:{tmp_path / 'nope'}"})
    assert str(missing.value).startswith(f"secret env B (file:{tmp_path / 'nope'}): cannot read the file on the host")
    assert "value-from" not in str(missing.value)


def test_aws_secrets_manager_reference(monkeypatch):
    import boto3
    from moto import mock_aws

    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        arn = boto3.client("secretsmanager").create_secret(Name="wandb", SecretString="value-from-aws")["ARN"]
        assert resolve_secrets({"WANDB_API_KEY": f"aws-sm:{arn}", "B": "aws-sm:wandb"}) == {
            "WANDB_API_KEY": "value-from-aws", "B": "value-from-aws"}
        with pytest.raises(SecretUnavailable, match=r"secret env C \(aws-sm:nope\): Secrets Manager refused "
                                                    r"\(ResourceNotFoundException\)"):
            resolve_secrets({"C": "aws-sm:nope"})


def test_gcp_secret_manager_reference(gce):
    gce.secrets["hf"] = b"value-from-gcp"
    version = f"projects/{gce.project}/secrets/hf/versions/latest"
    assert resolve_secrets({"HF_TOKEN": f"gcp-sm:{version}"}) == {"HF_TOKEN": "value-from-gcp"}
    with pytest.raises(SecretUnavailable, match=r"secret env X \(gcp-sm:projects/.*/secrets/nope/versions/1\): "
                                                r"Secret Manager refused \(404\)"):
        resolve_secrets({"X": f"gcp-sm:projects/{gce.project}/secrets/nope/versions/1"})
