"""Test-only pause points: where a test must act at a precise moment of the agent's work (between "host
provisioned" and "restore started"), the agent holds there until the test releases it, so the order is
forced rather than hoped for.

`VL_FAILPOINTS` (protocol.ENV_FAILPOINTS) names a directory. A point holds only when the test armed it by
creating `<name>.hold` there; the agent then writes `<name>.reached` and waits for `<name>.release`. Without
the variable (every real run) a point costs one environment lookup. tests/helpers.py's `Failpoints` drives it.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from vaultlayer import protocol

HOLD, REACHED, RELEASE = ".hold", ".reached", ".release"
# How often a held point looks for its release file: a test's step, not a hot loop.
RELEASE_POLL_SECONDS = 0.02


def before_restore(attempt: int) -> str:
    """The point after the host is provisioned and its attempt accepted, before the restore begins."""
    return f"a{attempt}-before-restore"


def before_poll(host_id: str) -> str:
    """The point where a host's agent has started and not yet polled its task queue: its host exists, and the
    workflow's attempt waits unstarted (a host lost here is a host whose agent never started)."""
    return f"{host_id}-before-poll"


def provisioning_node(attempt: int, node_rank: int) -> str:
    """The point in a gang's provisioning where its hosts before `node_rank` exist and this one does not yet."""
    return f"a{attempt}-provisioning-node-{node_rank}"


def _armed(name: str) -> Path | None:
    """The failpoint directory when the test armed `name` (and marks it reached), else None."""
    directory = os.environ.get(protocol.ENV_FAILPOINTS)
    if not directory or not (Path(directory) / f"{name}{HOLD}").exists():
        return None
    (Path(directory) / f"{name}{REACHED}").touch()
    return Path(directory)


async def reach(name: str) -> None:
    """Hold here while the test has the point armed and has not released it."""
    directory = _armed(name)
    while directory is not None and not (directory / f"{name}{RELEASE}").exists():
        await asyncio.sleep(RELEASE_POLL_SECONDS)


def reach_blocking(name: str) -> None:
    """`reach` for code on a thread of its own (a provider's provisioning)."""
    directory = _armed(name)
    while directory is not None and not (directory / f"{name}{RELEASE}").exists():
        time.sleep(RELEASE_POLL_SECONDS)
