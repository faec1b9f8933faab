"""Secret references for a run's environment: `env:NAME`, `file:/path`, `aws-sm:<id or ARN>` and
`gcp-sm:projects/P/secrets/S[/versions/V]`.

Only the reference travels through Temporal (workflow input, history, activity inputs); the host agent
reads the value when an attempt starts (activities/env_secrets.py). Parsing lives here, on the ground
floor, so that the CLI and the config file check references before anything is provisioned.
"""

from __future__ import annotations

import re
from pathlib import Path

SCHEMES = ("env", "file", "aws-sm", "gcp-sm")
REFERENCE_FORMS = "env:NAME, file:/path, aws-sm:<secret id or ARN> or gcp-sm:projects/P/secrets/S"
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_GCP_NAME = re.compile(r"projects/[^/]+/secrets/[^/]+(/versions/[^/]+)?")
# Whole words of a variable name that usually mean its value is a credential.
_SECRET_WORDS = re.compile(r"(^|_)(KEY|APIKEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?)(_|$)", re.IGNORECASE)


def parse_reference(text: str, base: Path | None = None) -> str:
    """The reference in its stored form (a relative `file:` path made absolute against `base`), or a
    ValueError that says what is wrong and how to write it."""
    scheme, sep, rest = str(text).partition(":")
    if not sep or scheme not in SCHEMES:
        raise ValueError(f"{text!r} is not a secret reference; fix: write one of {REFERENCE_FORMS}")
    if not rest:
        raise ValueError(f"{text!r} names no secret after {scheme}:; fix: write one of {REFERENCE_FORMS}")
    if scheme == "env" and not ENV_NAME.fullmatch(rest):
        raise ValueError(f"{text!r}: {rest!r} is not an environment variable name; fix: write env:NAME, "
                         "such as env:HF_TOKEN")
    if scheme == "file":
        path = Path(rest).expanduser()
        if not path.is_absolute():
            path = (base or Path.cwd()) / path
        return f"file:{path.resolve()}"
    if scheme == "gcp-sm":
        if not _GCP_NAME.fullmatch(rest):
            raise ValueError(f"{text!r}: expected gcp-sm:projects/P/secrets/S or "
                             "gcp-sm:projects/P/secrets/S/versions/V")
        return text if "/versions/" in rest else f"{text}/versions/latest"
    return text


def looks_secret(name: str) -> bool:
    """Whether a variable's name suggests a credential (HF_TOKEN, WANDB_API_KEY, DB_PASSWORD)."""
    return _SECRET_WORDS.search(name) is not None
