"""The framework callbacks and the resume snippet, end to end: real dev server, real local hosts, a real reclaim.

Each sample script in tests/samples/ knows nothing of VaultLayer. `vaultlayer.snippet` adds its lines (the
Lightning or Hugging Face callback, or the Checkpointer for a plain loop); the result runs under the workflow,
is reclaimed with a notice mid-run, resumes on a second host from the emergency save, and must finish with
weights equal, tensor for tensor, to a plain uninterrupted run of the original sample.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, assert_same_weights, make_spec
from tests.helpers import wait_until
from vaultlayer import client as vl_client
from vaultlayer.models import AttemptOutcome, RunState
from vaultlayer.snippet import propose

SAMPLES = REPO / "tests" / "samples"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

# sample, steps, step time: a few seconds of training, so that the reclaim lands mid-run (and, for Lightning,
# mid-epoch in a later epoch: 8 batches an epoch).
CASES = {
    "lightning": ("lightning_fit.py", 40, 0.2),
    "hf": ("hf_trainer.py", 40, 0.2),
    "pytorch": ("plain_loop.py", 60, 0.15),
}
RECLAIM_AT_STEP = 12


def plain_run(sample: Path, steps: int, out: Path, workdir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VL_")} | OFFLINE
    subprocess.run([sys.executable, str(sample), "--steps", str(steps), "--out", str(out)],
                   check=True, env=env, cwd=workdir, capture_output=True)


@pytest.mark.parametrize("framework", list(CASES))
async def test_inserted_lines_resume_bit_identically_after_a_reclaim(temporal_env, control, vl_home, tmp_path,
                                                                    framework):
    sample_name, steps, step_time = CASES[framework]
    sample = SAMPLES / sample_name
    script = tmp_path / sample_name
    script.write_text(propose(sample.read_text(), sample_name).source)
    reference = tmp_path / "plain.pt"
    (tmp_path / "plain").mkdir()
    plain = asyncio.create_task(asyncio.to_thread(plain_run, sample, steps, reference, tmp_path / "plain"))

    out = tmp_path / "w.pt"
    spec = make_spec(tmp_path, steps=steps, out=out, checkpoint_every="5", notice_seconds=8.0, env=OFFLINE,
                     workdir=str(tmp_path))
    spec.command = [sys.executable, str(script), "--steps", str(steps), "--step-time", str(step_time),
                    "--out", str(out)]
    client = temporal_env.client
    await vl_client.submit(client, spec, queue=control)

    async def training_on_first_host():
        status = await vl_client.status(client, spec.run_id)
        host = status.current_host
        return status if (status.step or 0) >= RECLAIM_AT_STEP and host and host.host_id == "h-1" else None

    await wait_until(training_on_first_host, 120, f"step {RECLAIM_AT_STEP} on the first host")
    await vl_client.reclaim(client, spec.run_id)
    await asyncio.wait_for(client.get_workflow_handle(spec.run_id).result(), 120)
    status = await vl_client.status(client, spec.run_id)

    assert status.state == RunState.SUCCEEDED, status.stop_reason
    first, second = status.attempts
    assert first.outcome == AttemptOutcome.RECLAIMED and first.emergency_save == "saved", first
    assert RECLAIM_AT_STEP <= first.durable_step == first.end_step < steps, first
    assert second.start_step == first.durable_step and second.outcome == AttemptOutcome.COMPLETED, second
    await plain
    assert_same_weights(out, reference)
