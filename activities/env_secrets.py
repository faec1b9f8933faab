"""On the host, at attempt start: the values of a run's secret env references (vaultlayer/secrets.py).

`env:NAME` reads, on the local provider, the environment of the `vl run` (or client) that submitted the run,
handed over in a 0600 file under VL_HOME (vaultlayer/secrets.py `hand_over`); elsewhere the host agent's own
environment. `file:/path` reads a file on the host; every other scheme is a cloud's, read by
that cloud's host side with the host's own role (`aws-sm:` Secrets Manager, `gcp-sm:` Secret Manager).
Values go only into the script's environment; errors name the variable and the reference, never a value.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from activities import providers
from activities.providers.base import SecretUnavailable
from vaultlayer import protocol


def handed_over() -> dict[str, str] | None:
    """The submitter's `env:` values the local provider named to this agent, or None when none were."""
    path = os.environ.get(protocol.ENV_HANDED_OVER)
    if not path:
        return None
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None


def resolve_secrets(references: dict[str, str], submitted: Mapping[str, str] | None = None) -> dict[str, str]:
    """NAME -> value for every reference, read now; `env:` from `submitted` (the submitter's environment,
    `handed_over`) when there is one."""
    from_env = _from_environment if submitted is None else _from_submitter(submitted)
    readers = {"env": from_env, "file": _from_file, **providers.secret_readers()}
    values = {}
    for name, reference in references.items():
        scheme, _, rest = reference.partition(":")
        try:
            if scheme not in readers:
                *others, last = (f"{known}:" for known in readers)
                raise SecretUnavailable(f"unknown scheme; fix: use {', '.join(others)} or {last}")
            values[name] = readers[scheme](rest)
        except SecretUnavailable as err:
            raise SecretUnavailable(f"secret env {name} ({reference}): {err}") from None
    return values


def _from_environment(name: str) -> str:
    if name not in os.environ:
        raise SecretUnavailable(f"{name} is not set in the host agent's environment; fix: export it where "
                                "the worker (local provider) or the host agent starts")
    return os.environ[name]


def _from_submitter(submitted: Mapping[str, str]):
    def read(name: str) -> str:
        if name not in submitted:
            raise SecretUnavailable(f"{name} was not set in the environment of the `vl run` that submitted the "
                                    "run; fix: export it in that shell and submit again")
        return submitted[name]
    return read


def _from_file(path: str) -> str:
    try:
        return Path(path).read_text().removesuffix("\n")
    except OSError as err:
        raise SecretUnavailable(f"cannot read the file on the host ({err.strerror}); fix: put it there, "
                                "readable by the agent") from None
