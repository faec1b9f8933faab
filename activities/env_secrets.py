"""On the host, at attempt start: the values of a run's secret env references (vaultlayer/secrets.py).

`env:NAME` reads the host agent's own environment (for the local provider, the environment the control-
plane worker was started with), `file:/path` a file on the host, `aws-sm:` AWS Secrets Manager with the
instance role, `gcp-sm:` Secret Manager with the VM's service account. Values go only into the script's
environment; errors name the variable and the reference, never a value.
"""

from __future__ import annotations

import os
from pathlib import Path


class SecretUnavailable(Exception):
    """A reference could not be read on this host: the attempt fails with this message."""


def resolve_secrets(references: dict[str, str]) -> dict[str, str]:
    """NAME -> value for every reference, read now."""
    values = {}
    for name, reference in references.items():
        try:
            values[name] = _read(reference)
        except SecretUnavailable as err:
            raise SecretUnavailable(f"secret env {name} ({reference}): {err}") from None
    return values


def _read(reference: str) -> str:
    scheme, _, rest = reference.partition(":")
    if scheme == "env":
        if rest not in os.environ:
            raise SecretUnavailable(f"{rest} is not set in the host agent's environment; fix: export it where "
                                    "the worker (local provider) or the host agent starts")
        return os.environ[rest]
    if scheme == "file":
        try:
            return Path(rest).read_text().removesuffix("\n")
        except OSError as err:
            raise SecretUnavailable(f"cannot read the file on the host ({err.strerror}); fix: put it there, "
                                    "readable by the agent") from None
    if scheme == "aws-sm":
        return _aws_secret(rest)
    if scheme == "gcp-sm":
        return _gcp_secret(rest)
    raise SecretUnavailable("unknown scheme; fix: use env:, file:, aws-sm: or gcp-sm:")


def _aws_secret(secret_id: str) -> str:
    from activities.providers.aws import call, error_code, new_client

    region = secret_id.split(":")[3] if secret_id.startswith("arn:") else None
    try:
        client = new_client("secretsmanager", region)
    except ValueError as err:  # boto3 is missing
        raise SecretUnavailable(str(err)) from None
    try:
        answer = call(client.get_secret_value, SecretId=secret_id)
    except Exception as err:  # noqa: BLE001 - botocore's errors, after retries: name the code only
        raise SecretUnavailable(f"Secrets Manager refused ({error_code(err) or type(err).__name__}); fix: check "
                                "the secret id and the host role's secretsmanager:GetSecretValue") from None
    if "SecretString" not in answer:
        raise SecretUnavailable("the secret is binary; fix: store it as a string")
    return answer["SecretString"]


def _gcp_secret(name: str) -> str:
    try:
        from google.api_core.exceptions import GoogleAPICallError
        from google.cloud import secretmanager
    except ImportError:
        raise SecretUnavailable("needs google-cloud-secret-manager; fix: pip install 'vaultlayer[gcp]'") from None

    from activities.providers.gcp import _retry, client_kwargs

    client = secretmanager.SecretManagerServiceClient(transport="rest", **client_kwargs())
    try:
        payload = client.access_secret_version(name=name, retry=_retry()).payload
    except GoogleAPICallError as err:
        raise SecretUnavailable(f"Secret Manager refused ({err.code}); fix: check the name and the host service "
                                "account's secretmanager.versions.access") from None
    try:
        return payload.data.decode()
    except UnicodeDecodeError:
        raise SecretUnavailable("the secret is not UTF-8 text; fix: store it as text") from None
