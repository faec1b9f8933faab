"""Determinism guard: recorded TrainingRun histories must replay on the current workflow code.

A change to the workflow that would break runs in flight (a new activity before an old one, a removed
timer) fails here. Changes go through `workflow.patched`. To add histories, run the end-to-end tests with
VL_RECORD_HISTORIES=tests/histories: each finished run's history (every continued-as-new run of it) is
written there as JSON.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from workflows.training_run import TrainingRun

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))


def test_there_are_histories_to_replay():
    assert len(HISTORIES) >= 3, "record histories: VL_RECORD_HISTORIES=tests/histories pytest tests/test_run_e2e.py"


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_recorded_history_replays_on_the_current_code(path: Path):
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    # debug_mode: no deadlock detector, which fails an activation that takes 2 s of wall time; a loaded 2-core
    # machine stretched the validation of a long carried status past that. A replay checks determinism.
    replayer = Replayer(workflows=[TrainingRun], data_converter=pydantic_data_converter, debug_mode=True)
    await replayer.replay_workflow(history)
