"""Secret references for a run's environment: `env:NAME`, `file:/path`, `aws-sm:<id or ARN>` and
`gcp-sm:projects/P/secrets/S[/versions/V]`.

Only the reference travels through Temporal (workflow input, history, activity inputs); the host agent
reads the value when an attempt starts (activities/env_secrets.py). Parsing lives here, on the ground
floor, so that the CLI and the config file check references before anything is provisioned.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

from vaultlayer import protocol
from vaultlayer.home import vl_home

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


def hand_over(run_id: str, references: Mapping[str, str], providers: set[str],
              environ: Mapping[str, str]) -> Path | None:
    """For a run on the local provider: the submitter's values of its `env:` secrets, in a 0600 file under
    VL_HOME that the local host agent reads (activities/env_secrets.py) and the run's end deletes, so that
    `env:NAME` means the submitter's shell, not a worker's started earlier. Values never enter Temporal."""
    names = {ref.partition(":")[2] for ref in references.values() if ref.startswith("env:")}
    if "local" not in providers or not names:
        return None
    path = protocol.handed_over_path(vl_home(), run_id)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        json.dump({name: environ[name] for name in sorted(names) if name in environ}, file)
    return path


def looks_secret(name: str) -> bool:
    """Whether a variable's name suggests a credential (HF_TOKEN, WANDB_API_KEY, DB_PASSWORD)."""
    return _SECRET_WORDS.search(name) is not None
