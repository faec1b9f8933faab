"""Heartbeats for the control plane's sync activities, from a side thread while the body runs.

A task the server recorded as started can be lost on its way to the worker (an overloaded server times out
the poll's answer), and a worker can die holding one. Without heartbeats either costs the activity's whole
start-to-close timeout (up to 30 min) before the retry; with them, the workflow's heartbeat timeout
(workflows/training_run.py CONTROL_HEARTBEAT_TIMEOUT) notices in a minute (docs/load.md).
"""

from __future__ import annotations

import contextvars
import functools
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import structlog
from temporalio import activity

log = structlog.get_logger(__name__)

HEARTBEAT_EVERY_SECONDS = 5.0  # the SDK sends at most one per 0.8 x the heartbeat timeout

P = ParamSpec("P")
R = TypeVar("R")


def heartbeating(body: Callable[P, R]) -> Callable[P, R]:
    """`body` (a sync activity) heartbeats every few seconds until it returns or raises."""

    @functools.wraps(body)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        done = threading.Event()
        context = contextvars.copy_context()  # the activity's context: heartbeat() needs it

        def beat() -> None:
            while not done.wait(HEARTBEAT_EVERY_SECONDS):
                try:
                    context.run(activity.heartbeat)
                except Exception as err:  # noqa: BLE001 - a missed heartbeat is retried by the next one
                    log.warning("control activity heartbeat failed", error=str(err))

        threading.Thread(target=beat, name=f"heartbeat-{body.__name__}", daemon=True).start()
        try:
            return body(*args, **kwargs)
        finally:
            done.set()

    return run
