"""Open the link `vl ui RUN` prints in a headless Chromium and see the run's step in the Temporal UI.

The test starts its own dev server with the UI (the session server has none). Without Chromium it is
skipped, except on CI (CI=true), where .ci/run installs it and a missing browser fails the test.
"""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from tests.browser import Browser, chromium
from tests.conftest import make_counter_spec, temporal_binary
from tests.helpers import free_port, wait_until
from tests.test_cli import cli_env, vl  # noqa: F401 - cli_env is a fixture
from vaultlayer import client as vl_client
from vaultlayer import ui


@pytest.fixture
def browser_path() -> str:
    found = chromium()
    if found is None:
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail("chromium is not installed; .ci/run installs it (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium); CI runs this test")
    return found


async def test_the_ui_link_shows_the_runs_step(browser_path, cli_env, vl_home, tmp_path):
    from worker.control import create_worker

    ui_port = free_port()
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_binary(), data_converter=pydantic_data_converter, ui=True, ui_port=ui_port,
        dev_server_extra_args=ui.dev_server_args())
    client, queue = env.client, f"vl-test-{uuid.uuid4().hex[:8]}"
    spec = make_counter_spec(tmp_path, steps=2000, out=tmp_path / "out.json", search_attributes=True)
    try:
        async with create_worker(client, task_queue=queue, home=vl_home):  # the UI's details query needs it
            await vl_client.submit(client, spec, queue=queue)

            async def durable_and_past(step: int):
                status = await vl_client.status(client, spec.run_id)
                return status.durable_step and status.step and status.step >= step and status

            await wait_until(lambda: durable_and_past(15), 60, "a durable checkpoint")
            await vl_client.reclaim(client, spec.run_id)  # attempt 2 resumes from it: a step the workflow knows

            async def resumed():
                status = await vl_client.status(client, spec.run_id)
                return len(status.attempts) == 2 and status.current_host is not None and status

            status = await wait_until(resumed, 60, "attempt 2 running")
            step = status.attempts[-1].start_step
            assert step >= 10

            cli_env.update(TEMPORAL_ADDRESS=client.service_client.config.target_host,
                           VL_UI_URL=f"http://127.0.0.1:{ui_port}")
            shown = await asyncio.to_thread(vl, cli_env, "ui", spec.run_id)
            assert shown.returncode == 0, shown.stderr
            link = shown.stdout.strip()

            def look() -> tuple[str, str]:
                browser = Browser(browser_path, tmp_path / "profile")
                try:
                    page = browser.open(link)
                    text = browser.wait_for_text(page, f"step {step} · durable step {step}", timeout=30)
                    browser.screenshot(page, tmp_path / "run-page.png")
                    # The link `vl run` prints opens the timeline: the attempt's bar says where it resumed.
                    timeline = browser.open(f"http://127.0.0.1:{ui_port}/namespaces/default/workflows/{spec.run_id}")
                    shown = browser.wait_for_text(timeline, f"attempt 2 on host h-2 from step {step}", timeout=30)
                    browser.screenshot(timeline, tmp_path / "timeline.png")
                    return text, shown
                finally:
                    browser.close()

            text, timeline = await asyncio.to_thread(look)
            assert f"attempt 2 on host h-2 from step {step}" in timeline, timeline[-2000:]
            assert f"running · step {step} · durable step {step}" in text, text[-2000:]
            assert "attempt 2 on host h-2 (local/local/cpu/spot)" in text and "reclaims 1" in text
            assert "cost $0.00" in text
            assert "--steps 2000 --step-time 0.05" in text  # the summary: the command, its flags intact
            await client.get_workflow_handle(spec.run_id).cancel()
            await wait_until(lambda: _finished(client, spec.run_id), 60, "the cancelled run to end")
    finally:
        await env.shutdown()


async def _finished(client, run_id: str) -> bool:
    return (await vl_client.status(client, run_id)).state.finished
