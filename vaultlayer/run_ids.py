"""Run ids name a workflow, a host task queue, cloud instances and a storage directory, so one rule
keeps every use safe: lowercase letters, digits, '-', '_' and '.', starting with a letter or digit, at most
63 characters (a DNS label, a GCE instance name part), and never '..'. Nothing built from one can
leave the storage root or clash with another run's directory."""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime

RUN_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
RUN_ID_RULE = "1-63 of a-z 0-9 - _ . starting with a letter or digit, without '..'"


def run_id_problem(run_id: str) -> str | None:
    """Why `run_id` is not a valid run id, with the fix; None when it is valid."""
    if RUN_ID_PATTERN.fullmatch(run_id) is None or ".." in run_id:
        return f"run id {run_id!r} is not allowed; use {RUN_ID_RULE}, such as my-run-1"
    return None


def check_run_id(run_id: str) -> str:
    """`run_id` itself, or ValueError naming the rule (pydantic reports it as the field's error)."""
    problem = run_id_problem(run_id)
    if problem is not None:
        raise ValueError(problem)
    return run_id


def new_run_id() -> str:
    """A fresh id under the rule: `r-<UTC date>-<time>-<4 hex>`, so ids sort by when they were made."""
    return f"r-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
