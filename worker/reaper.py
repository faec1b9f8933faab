"""The sweep: hosts still alive for a run that has ended are released.

A run reaps its own hosts when it ends; the sweep catches what that missed (a worker that died before
the reap, a run terminated from the Temporal UI, a host whose provision result never reached the
workflow). It runs when a control-plane worker starts, and by hand as `vl reap`.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from activities.providers import make_provider
from vaultlayer.catalog import configured_providers

log = structlog.get_logger(__name__)


async def run_finished(client: Client, run_id: str) -> bool | None:
    """Whether the run's workflow has closed; None when this namespace has no such run."""
    try:
        description = await client.get_workflow_handle(run_id).describe()
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            return None
        raise
    return description.status != WorkflowExecutionStatus.RUNNING


async def sweep(client: Client, vl_home: Path, run_ids: list[str] | None = None) -> dict[str, list[str]]:
    """Release the live hosts of finished runs, in every provider configured here: of `run_ids`, or of
    every run that has a live host. A run this namespace does not know (another cluster's, or one
    whose history is gone) is swept only when named. Returns run id -> released hosts."""
    released: dict[str, list[str]] = {}
    for name in configured_providers(vl_home):
        provider = make_provider(name, vl_home, {})
        runs = run_ids if run_ids is not None else sorted(await asyncio.to_thread(provider.live_runs))
        for run_id in runs:
            finished = await run_finished(client, run_id)
            if finished is False or (finished is None and run_ids is None):
                continue
            hosts = await asyncio.to_thread(provider.reap, run_id)
            if hosts:
                released.setdefault(run_id, []).extend(hosts)
    return released


async def sweep_at_start(client: Client, vl_home: Path) -> None:
    """The worker's start-up sweep: a failure is logged, never fatal to the worker."""
    try:
        released = await sweep(client, vl_home)
    except Exception as err:  # noqa: BLE001 - a provider or the cluster unreachable: the next start sweeps
        log.error("sweep of finished runs failed", error=str(err))
        return
    if released:
        log.warning("released hosts of finished runs", runs=released)
