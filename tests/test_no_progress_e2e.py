"""Hosts lost before their first save, through the real workflow: the next attempts save early, and a run
that stores nothing over `max_attempts_without_progress` attempts in a row stops and says what to change."""

from __future__ import annotations

import asyncio
import sys

import pytest
from temporalio.client import WorkflowFailureError

from tests.conftest import assert_same_weights, make_spec
from tests.test_run_e2e import record_histories, result_of
from vaultlayer import client as vl_client
from vaultlayer.models import AttemptOutcome, Limits, RunState


async def test_hosts_taken_without_notice_before_the_first_save_bring_it_forward(
        temporal_env, control, vl_home, tmp_path, reference_weights):
    out = tmp_path / "w.pt"
    # No notice and the automatic interval (first save after 60 s): the first host dies with nothing stored.
    # 30 steps of 0.25 s take 7.5 s, more than one 6 s host: only saves earlier than the minimum finish it.
    spec = make_spec(tmp_path, steps=30, out=out, step_time=0.25, reclaim_every_seconds=6.0, notice_seconds=0.0,
                     checkpoint_every=None, heartbeat_timeout_seconds=3.0, limits=Limits(max_reclaims=60))
    await vl_client.submit(temporal_env.client, spec, queue=control)
    status = await result_of(temporal_env.client, spec.run_id, timeout=480)
    assert status.state == RunState.SUCCEEDED, status.stop_reason
    first = status.attempts[0]
    assert first.outcome == AttemptOutcome.RECLAIMED and first.emergency_save is None and first.durable_step is None
    # Every host lived 6 s, far less than the 60 s minimum: each step kept was saved early.
    assert status.reclaims >= 1 and status.attempts[-1].start_step > 0
    assert_same_weights(out, reference_weights(30))


async def test_attempts_in_a_row_without_durable_progress_stop_the_run_with_the_limit(
        temporal_env, control, vl_home, tmp_path):
    # A command that never saves, on hosts taken without notice: no attempt can store a checkpoint.
    spec = make_spec(tmp_path, steps=1, out=tmp_path / "w.pt", command=[sys.executable, "-c",
                                                                         "import time; time.sleep(600)"],
                     reclaim_every_seconds=5.0, notice_seconds=0.0, heartbeat_timeout_seconds=3.0,
                     limits=Limits(max_reclaims=30, max_attempts_without_progress=2))
    await vl_client.submit(temporal_env.client, spec, queue=control)
    with pytest.raises(WorkflowFailureError):
        await asyncio.wait_for(temporal_env.client.get_workflow_handle(spec.run_id).result(), 120)
    await record_histories(temporal_env.client, spec.run_id)
    status = await vl_client.status(temporal_env.client, spec.run_id)
    assert status.state == RunState.FAILED and len(status.attempts) == 2, status.attempts
    assert all(a.outcome in (AttemptOutcome.RECLAIMED, AttemptOutcome.HOST_FAULT) for a in status.attempts)
    assert status.stop_reason.startswith("no durable progress over 2 attempts in a row")
