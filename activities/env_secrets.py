"""On the host, at attempt start: the values of a run's secret env references (vaultlayer/secrets.py).

`env:NAME` reads the host agent's own environment (for the local provider, the environment the control-
plane worker was started with), `file:/path` a file on the host; every other scheme is a cloud's, read by
that cloud's host side with the host's own role (`aws-sm:` Secrets Manager, `gcp-sm:` Secret Manager).
Values go only into the script's environment; errors name the variable and the reference, never a value.
"""

from __future__ import annotations

import os
from pathlib import Path

from activities import providers
from activities.providers.base import SecretUnavailable


def resolve_secrets(references: dict[str, str]) -> dict[str, str]:
    """NAME -> value for every reference, read now."""
    readers = {"env": _from_environment, "file": _from_file, **providers.secret_readers()}
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


def _from_file(path: str) -> str:
    try:
        return Path(path).read_text().removesuffix("\n")
    except OSError as err:
        raise SecretUnavailable(f"cannot read the file on the host ({err.strerror}); fix: put it there, "
                                "readable by the agent") from None
