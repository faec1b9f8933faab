"""Hosts lost before their first save, through the real workflow: the next attempts save early, and a run
that stores nothing over `max_attempts_without_progress` attempts in a row stops and says what to change.

The test takes the hosts back itself, without a notice, once each attempt reached a given point (events, not a
wall-clock schedule such as reclaim_every_seconds, which a loaded machine may spend starting a host)."""

from __future__ import annotations

import asyncio
import sys

import pytest
from temporalio.client import WorkflowFailureError

from tests.conftest import make_counter_spec, make_spec
from tests.helpers import control_dir, wait_for_progress, wait_until
from tests.test_run_e2e import record_histories, result_of
from vaultlayer import client as vl_client
from vaultlayer.models import AttemptOutcome, Limits, RunState

STEPS = 120
STEPS_BEFORE_RECLAIM = 3  # of training past the attempt's start before its host is taken
RECLAIMS = 3


async def test_hosts_taken_without_notice_before_the_first_save_bring_it_forward(
        temporal_env, control, vl_home, tmp_path, counter_reference):
    out = tmp_path / "out.json"
    # No notice and the automatic interval (first save after 60 s): the first host, taken a few steps in, dies
    # with nothing stored. 120 steps of 0.25 s take 30 s, less than the 60 s minimum: an attempt stores progress
    # before it ends only with the early saves the lost host brings forward.
    # A 10 s heartbeat timeout: a loaded machine's agent may be heard from late by more than 3 s, and a host
    # lost that the test did not take would be an attempt more than the test counts on.
    spec = make_counter_spec(tmp_path, steps=STEPS, out=out, step_time=0.25, notice_seconds=0.0, checkpoint_every=None,
                             heartbeat_timeout_seconds=10.0, limits=Limits(max_reclaims=60))
    client = temporal_env.client
    await vl_client.submit(client, spec, queue=control)

    await wait_for_progress(client, spec.run_id, steps=STEPS_BEFORE_RECLAIM, attempt=1)
    await vl_client.reclaim(client, spec.run_id, with_notice=False)
    for attempt in range(2, RECLAIMS + 1):
        # The early save of this attempt is stored and reported first (its durable step passed its start), and
        # the script trains on a little past it: the next attempt resumes from it, whatever the timing.
        current = await wait_for_progress(client, spec.run_id, steps=0, attempt=attempt)
        start = current.current_attempt.start_step

        async def saved_early(attempt=attempt, start=start):
            status = await vl_client.status(client, spec.run_id)
            now = status.current_attempt
            return status if (now is not None and now.attempt == attempt and (status.durable_step or 0) > start
                              and (status.step or 0) >= status.durable_step + 2) else None

        status = await wait_until(saved_early, 120, f"an early save of attempt {attempt} and 2 steps past it")
        assert "early saves" in status.checkpoint_interval, status.checkpoint_interval
        await vl_client.reclaim(client, spec.run_id, with_notice=False)

    status = await result_of(client, spec.run_id, timeout=480)
    assert status.state == RunState.SUCCEEDED, status.stop_reason
    first = status.attempts[0]
    assert first.outcome == AttemptOutcome.RECLAIMED and first.emergency_save is None and first.durable_step is None
    assert status.attempts[1].start_step == 0, status.attempts  # nothing of the first host was kept
    assert status.reclaims == RECLAIMS, status.attempts
    # Each later host was taken as suddenly, yet kept its steps: saved early, long before the 60 s minimum.
    for record, following in zip(status.attempts[1:RECLAIMS], status.attempts[2:]):
        assert record.outcome == AttemptOutcome.RECLAIMED and record.emergency_save is None, record
        assert following.start_step > record.start_step, status.attempts
    assert status.attempts[-1].outcome == AttemptOutcome.COMPLETED
    assert out.read_text() == counter_reference(STEPS)


async def test_attempts_in_a_row_without_durable_progress_stop_the_run_with_the_limit(
        temporal_env, control, vl_home, tmp_path):
    # A command that never saves, on hosts taken without notice once running: no attempt can store a checkpoint.
    spec = make_spec(tmp_path, steps=1, out=tmp_path / "w.pt", command=[sys.executable, "-c",
                                                                         "import time; time.sleep(600)"],
                     notice_seconds=0.0, heartbeat_timeout_seconds=3.0,
                     limits=Limits(max_reclaims=30, max_attempts_without_progress=2))
    client = temporal_env.client
    await vl_client.submit(client, spec, queue=control)
    for attempt in (1, 2):
        # Taken once its agent runs the attempt (the script's control directory is there): a host taken before
        # would be found only by the start timeout, not by its silence.
        async def running(attempt=attempt):
            status = await vl_client.status(client, spec.run_id)
            now, host = status.current_attempt, status.current_host
            return (now is not None and now.attempt == attempt and host is not None
                    and control_dir(vl_home, spec.run_id, host.host_id, attempt).is_dir())

        await wait_until(running, 120, f"attempt {attempt} to run on its host")
        await vl_client.reclaim(client, spec.run_id, with_notice=False)
    with pytest.raises(WorkflowFailureError):
        await asyncio.wait_for(client.get_workflow_handle(spec.run_id).result(), 120)
    await record_histories(client, spec.run_id)
    status = await vl_client.status(client, spec.run_id)
    assert status.state == RunState.FAILED and len(status.attempts) == 2, status.attempts
    assert all(a.outcome in (AttemptOutcome.RECLAIMED, AttemptOutcome.HOST_FAULT) for a in status.attempts)
    assert status.stop_reason.startswith("no durable progress over 2 attempts in a row")
