"""`vl` as a person reads it: the live panel on a terminal (plain lines elsewhere), `vl ui RUN`, and expected
errors on one line with `--verbose` for their traceback."""

from __future__ import annotations

import asyncio
import io
import os
from datetime import UTC, datetime, timedelta

from rich.console import Console

from cli import render
from tests.conftest import TRAIN_TINY, make_spec
from tests.test_cli import cli_env, vl  # noqa: F401 - cli_env is a fixture
from vaultlayer import client as vl_client
from vaultlayer.models import AttemptOutcome, AttemptRecord, RunState, RunStatus

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def running_status() -> RunStatus:
    reclaimed = AttemptRecord(attempt=1, pool="local/local/cpu/spot", host="h-1", outcome=AttemptOutcome.RECLAIMED,
                              started_at=NOW - timedelta(hours=2), cost_usd=0.40)
    current = AttemptRecord(attempt=2, pool="aws/us-east-1a/A10G:1/spot", host="h-2", start_step=1200,
                            started_at=NOW - timedelta(minutes=31), running_at=NOW - timedelta(minutes=30),
                            price_per_hour=0.60)
    return RunStatus(run_id="r-1", state=RunState.RUNNING, attempts=[reclaimed, current], step=1500,
                     durable_step=1450, reclaims=1, steps_lost=40, cost_usd=0.40)


def text_of(table) -> str:
    console = Console(file=io.StringIO(), width=100, record=True)
    console.print(table)
    return console.export_text()


def test_the_panel_shows_attempt_pool_host_step_rate_durable_step_reclaims_cost_and_eta():
    text = " ".join(text_of(render.panel(running_status(), rate=2.5, total_steps=3000, now=NOW)).split())
    assert text == ("r-1 · running "
                    "attempt 2 · pool aws/us-east-1a/A10G:1/spot · host h-2 "
                    "step 1500 / 3000 · 2.5 steps/s "
                    "durable step 1450 "
                    "reclaims 1 · steps lost 40 "
                    "cost so far $0.70 "  # $0.40 closed + 30 minutes at $0.60/h
                    "ETA 10m00s")  # 1500 steps left at 2.5 steps/s


def test_the_panel_says_why_there_is_no_eta():
    status = running_status()
    assert "vl run --total-steps N gives one" in text_of(render.panel(status, rate=2.5, total_steps=None, now=NOW))
    assert "measuring the rate" in text_of(render.panel(status, rate=None, total_steps=3000, now=NOW))
    fresh = RunStatus(run_id="r-2", state=RunState.PROVISIONING)
    assert "waiting for a placement" in text_of(render.panel(fresh, rate=None, total_steps=None, now=NOW))


def stalled_status() -> RunStatus:
    """Three hosts in a row lost before any checkpoint, a fourth running."""
    lost = [AttemptRecord(attempt=n, pool="local", host=f"h-{n}", outcome=AttemptOutcome.RECLAIMED,
                          started_at=NOW - timedelta(minutes=10 - n), ended_at=NOW - timedelta(minutes=9 - n))
            for n in (1, 2, 3)]
    current = AttemptRecord(attempt=4, pool="local", host="h-4", started_at=NOW)
    return RunStatus(run_id="r-3", state=RunState.RUNNING, attempts=[*lost, current], reclaims=3)


def test_the_panel_and_the_event_lines_say_when_attempts_end_without_durable_progress(capsys):
    warning = "3 attempts in a row ended without durable progress"
    assert warning in " ".join(text_of(render.panel(stalled_status(), rate=None, total_steps=None, now=NOW)).split())
    render.LiveView().update(stalled_status())
    assert f"warning: {warning}" in capsys.readouterr().out
    assert render.no_progress_line(running_status()) is None


def test_step_rate_is_per_attempt():
    rate = render.StepRate(window=20)
    rate.add(0.0, 1, 100)
    assert rate.per_second() is None
    rate.add(4.0, 1, 120)
    assert rate.per_second() == 5.0
    rate.add(5.0, 2, 90)  # resumed from a checkpoint: the old attempt's samples no longer count
    assert rate.per_second() is None
    rate.add(7.0, 2, 100)
    assert rate.per_second() == 5.0


def test_live_panel_only_on_a_terminal(monkeypatch):
    plain = object()
    with render.view_for(io.StringIO(), plain) as view:
        assert view is plain
    main, secondary = os.openpty()
    with open(secondary, "w") as terminal, open(main, "rb", buffering=0):
        monkeypatch.setenv("TERM", "xterm")
        assert render.wants_live(terminal)
        monkeypatch.setenv("TERM", "dumb")
        assert not render.wants_live(terminal)


async def test_vl_ui_prints_the_runs_link(cli_env, temporal_env, temporal_address, tmp_path):
    run = make_spec(tmp_path, steps=1, out=tmp_path / "w.pt")
    await vl_client.submit(temporal_env.client, run, queue="no-worker-polls-this-queue")
    try:
        cli_env.update(TEMPORAL_ADDRESS=temporal_address, VL_UI_URL="https://temporal.example.com/")
        shown = await asyncio.to_thread(vl, cli_env, "ui", run.run_id)
        assert shown.returncode == 0, shown.stderr
        execution = (await temporal_env.client.get_workflow_handle(run.run_id).describe()).run_id
        assert shown.stdout == (f"https://temporal.example.com/namespaces/default/workflows/{run.run_id}/{execution}"
                                f"/user-metadata\n")

        missing = await asyncio.to_thread(vl, cli_env, "ui", "no-such-run")
        assert missing.returncode == 1
        assert missing.stderr.startswith("vl: error: no run 'no-such-run'") and missing.stderr.count("\n") == 1

        del cli_env["VL_UI_URL"]
        unknown = await asyncio.to_thread(vl, cli_env, "ui", run.run_id)
        assert unknown.returncode == 1 and "set VL_UI_URL" in unknown.stderr
    finally:
        await temporal_env.client.get_workflow_handle(run.run_id).terminate("test over")


async def test_expected_errors_are_one_line_and_verbose_shows_the_traceback(cli_env, temporal_address):
    bad_input = ["run", "--provider", "nimbus", "--", "python", str(TRAIN_TINY), "--steps", "1", "--out", "x"]
    cases = [
        ({}, bad_input, 2, "unknown provider 'nimbus'", "RunRequestError"),
        ({"TEMPORAL_ADDRESS": "127.0.0.1:1"}, ["ls"], 1, "cannot reach the Temporal server at 127.0.0.1:1 "
                                                        "(Connection refused)", "RuntimeError: Failed client connect"),
        ({"TEMPORAL_ADDRESS": temporal_address}, ["status", "no-such-run"], 1, "no run 'no-such-run'", "RPCError"),
    ]
    for extra, args, code, message, exception in cases:
        env = {**cli_env, **extra}
        quiet, verbose = await asyncio.gather(asyncio.to_thread(vl, env, *args),
                                              asyncio.to_thread(vl, env, "--verbose", *args))
        assert quiet.returncode == verbose.returncode == code, (quiet.stderr, verbose.stderr)
        assert quiet.stderr.startswith("vl: error: ") and message in quiet.stderr, quiet.stderr
        assert quiet.stderr.count("\n") == 1 and "Traceback" not in quiet.stderr
        assert verbose.stderr.startswith("Traceback (most recent call last):"), verbose.stderr
        assert exception in verbose.stderr
        assert verbose.stderr.splitlines()[-1] == quiet.stderr.strip()
