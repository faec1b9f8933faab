"""How `vl` shows a run: the status, attempt and cost lines, `--json`, and the live view `vl run` and
`vl resume` follow a run with. On a terminal that is a compact live panel (attempt, pool, host, step and
rate, durable step, reclaims, cost so far, ETA) under the same event lines the plain view prints; not on a
terminal, plain lines only."""

from __future__ import annotations

import asyncio
import math
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TextIO

from rich.console import Console
from rich.live import Live
from rich.table import Table

from cli.context import EXIT_CANCELLED, Connection
from vaultlayer.models import AttemptOutcome, AttemptRecord, FailureCause, RunSpec, RunState, RunStatus
from workflows.accounting import running_cost
from workflows.policy import attempts_without_progress
from workflows.speed import speeds

# ---------------------------------------------------------------- lines


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def status_json(status: RunStatus, with_attempts: bool = True) -> dict:
    exclude = {"fences", "current_host", "current_hosts"} | (set() if with_attempts else {"attempts", "bad_checkpoints"})
    return status.model_dump(mode="json", exclude=exclude) | {
        "host": status.current_host.host_id if status.current_host else None,
        "hosts": [host.host_id for host in status.current_hosts],  # a gang's, in node-rank order
    }


def cost_line(status: RunStatus) -> str:
    """What the run paid, and what the same host-hours would have cost on demand (closed attempts)."""
    line = f"cost ${status.cost_usd:.2f}, on demand ${status.on_demand_cost_usd:.2f}"
    if status.on_demand_cost_usd > 0:
        line += f" ({status.cost_usd / status.on_demand_cost_usd:.0%} of on-demand)"
    return line


def pool_speeds(spec: RunSpec, status: RunStatus) -> dict[str, dict]:
    """`vl status --json`: per pool, the steps per second measured there (None: never trained there), the seconds
    they were measured over, the policy's estimate and the prior."""
    rates = speeds(spec, status)
    return {pool.key: {"measured_steps_per_second": rates.measured_steps_per_second(pool),
                       "measured_seconds": rates.measured.get(pool.key, (0.0, 0.0))[1],
                       "estimated_steps_per_second": rates.steps_per_second(pool), "prior_speed": pool.speed}
            for pool in spec.pools}


def pool_speed_lines(spec: RunSpec, status: RunStatus) -> list[str]:
    """Each pool's speed as the policy sees it: measured on the run's attempts there, else its prior."""
    rates = speeds(spec, status)
    lines = []
    for pool in spec.pools:
        measured = rates.measured.get(pool.key)
        prior = f"prior {pool.speed:g}x a V100" if pool.speed else "no prior"
        if measured:
            steps, seconds = measured
            lines.append(f"  {pool.key}: {steps / seconds:.3g} steps/s measured over {format_seconds(seconds)} "
                         f"({prior})")
        else:
            estimate = rates.steps_per_second(pool)
            guess = f"about {estimate:.3g} steps/s, " if estimate else ""
            lines.append(f"  {pool.key}: not measured ({guess}{prior})")
    return lines


def attempt_line(record: AttemptRecord) -> str:
    outcome = record.outcome.value if record.outcome else "running"
    cost = f" ${record.cost_usd:.2f}" if record.cost_usd is not None else ""
    return (f"  attempt {record.attempt} {record.pool} {hosts_of(record)} {outcome}: steps {record.start_step}"
            f"..{record.end_step if record.end_step is not None else '?'} durable {record.durable_step} "
            f"lost {record.steps_lost}{cost}{setup_part(record)} {record.reason}")


def hosts_of(record: AttemptRecord) -> str:
    """`host h-3`, or a gang's `hosts h-3-n0,h-3-n1` in node-rank order."""
    return f"hosts {','.join(record.hosts)}" if record.hosts else f"host {record.host or '-'}"


def setup_part(record: AttemptRecord) -> str:
    """How long the attempt's setup took, and what the run's setup cache did for it."""
    if record.setup_seconds is None:
        return ""
    cache = f", cache {record.setup_cache}" if record.setup_cache else ""
    return f" setup {record.setup_seconds:.1f}s{cache}"


def ended_line(record: AttemptRecord) -> str:
    if record.outcome == AttemptOutcome.RECLAIMED and record.emergency_save == "missed":
        return (f"reclaimed at step {record.end_step}; the emergency save missed the notice deadline, "
                f"durable step {record.durable_step}")
    if record.outcome == AttemptOutcome.RECLAIMED:
        return f"reclaimed at step {record.end_step}, durable step {record.durable_step}"
    if record.outcome == AttemptOutcome.HOST_FAULT:
        return f"host {record.faulty_host or record.host} failed ({record.reason}) at step {record.end_step}"
    if record.outcome == AttemptOutcome.REFUSED:
        return f"no capacity in {record.pool} ({record.reason})"
    if record.outcome == AttemptOutcome.FAILED and record.cause not in (None, FailureCause.SCRIPT):
        return f"attempt {record.attempt} failed: {record.reason}"
    if record.outcome == AttemptOutcome.FAILED:
        return f"the script failed with exit code {record.exit_code} at step {record.end_step}"
    return f"attempt {record.attempt} {record.outcome.value if record.outcome else 'ended'}"


def no_progress_line(status: RunStatus) -> str | None:
    """A warning once two attempts in a row stored no checkpoint: the run is heading for the
    max_attempts_without_progress limit; None while it makes progress."""
    streak = attempts_without_progress(status)
    if streak < 2:
        return None
    return (f"{streak} attempts in a row ended without durable progress: hosts are lost before a checkpoint "
            "is stored (limit: max_attempts_without_progress)")


def exit_code_of(status: RunStatus) -> int:
    if status.state == RunState.SUCCEEDED:
        return 0
    if status.state == RunState.CANCELLED:
        return EXIT_CANCELLED
    return status.exit_code if status.exit_code else 1


# ---------------------------------------------------------------- following a run


async def follow(conn: Connection, run_id: str, total_steps: int | None = None) -> int:
    """Show the run until it finishes; its exit code (`exit_code_of`)."""
    from vaultlayer import client as vl_client

    with view_for(sys.stdout, LiveView(), total_steps) as view:
        while True:
            status = await vl_client.status(conn.client, run_id)
            view.update(status)
            if status.state.finished:
                view.finish(status)
                return exit_code_of(status)
            await asyncio.sleep(1.0)


class LiveView:
    """Plain lines: one per event, and a progress line every few seconds while steps advance."""

    PROGRESS_EVERY = 3.0

    def __init__(self) -> None:
        self.announced: set[int] = set()
        self.ended: set[int] = set()
        self.last_progress = (0.0, None)

    def update(self, status: RunStatus) -> None:
        for index, record in enumerate(status.attempts):
            previous = status.attempts[index - 1] if index else None
            if record.host and record.attempt not in self.announced:
                self.announced.add(record.attempt)
                if previous is not None and previous.attempt not in self.ended:
                    self.ended.add(previous.attempt)
                    print(f"{ended_line(previous)}, resuming on {hosts_of(record)}", flush=True)
                    if stalled := no_progress_line(status):
                        print(f"warning: {stalled}", flush=True)
                resume = f"resuming from step {record.start_step}" if record.start_step else "starting at step 0"
                print(f"attempt {record.attempt} on {hosts_of(record)} ({record.pool}), {resume}", flush=True)
        current = status.current_attempt
        if current and status.step is not None:
            now = time.monotonic()
            shown_at, shown = self.last_progress
            key = (current.attempt, status.step, status.durable_step, status.waiting_on)
            if key != shown and now - shown_at >= self.PROGRESS_EVERY:
                self.last_progress = (now, key)
                durable = status.durable_step if status.durable_step is not None else "-"
                waiting = f" · waiting on {status.waiting_on}" if status.waiting_on else ""
                print(f"attempt {current.attempt} · {hosts_of(current)} · step {status.step} · "
                      f"durable step {durable}{waiting}", flush=True)

    def finish(self, status: RunStatus) -> None:
        for record in status.attempts:
            if record.outcome not in (None, AttemptOutcome.COMPLETED) and record.attempt not in self.ended:
                self.ended.add(record.attempt)
                print(ended_line(record), flush=True)
        wall = (status.ended_at - status.started_at).total_seconds() if status.ended_at and status.started_at else 0
        print(f"{status.state.value}: {len(status.attempts)} attempts, {status.reclaims} reclaims, "
              f"{status.steps_lost} steps lost to reclaims, wall time {format_seconds(wall)}, "
              f"{cost_line(status)}", flush=True)
        if status.bad_checkpoints:
            print(f"skipped {len(status.bad_checkpoints)} bad checkpoint(s): "
                  + "; ".join(f"{c.name}: {c.reason}" for c in status.bad_checkpoints), flush=True)
        if status.state != RunState.SUCCEEDED and status.stop_reason:
            print(f"reason: {status.stop_reason}", flush=True)
            last = status.last_ended_attempt
            if last is not None and last.log_tail:
                print("the end of the script's output:", flush=True)
                print(last.log_tail.rstrip(), flush=True)


@contextmanager
def view_for(stream: TextIO, plain, total_steps: int | None = None) -> Iterator:
    """The view `vl run` follows a run with: the live panel on a terminal, else `plain` itself."""
    if not wants_live(stream):
        yield plain
        return
    view = RichView(plain, total_steps)
    try:
        yield view
    finally:
        view.close()


def wants_live(stream: TextIO) -> bool:
    """A live panel only where a person watches a terminal; pipes, files and CI logs get plain lines."""
    return stream.isatty() and os.environ.get("TERM") != "dumb"


class StepRate:
    """Steps per second over the last `window` seconds of the current attempt."""

    def __init__(self, window: float = 20.0) -> None:
        self.window = window
        self.samples: deque[tuple[float, int, int]] = deque()  # (time, attempt, step)

    def add(self, now: float, attempt: int, step: int | None) -> None:
        if step is None:
            return
        if self.samples and self.samples[-1][1] != attempt:
            self.samples.clear()  # a new attempt restarts from a checkpoint: its steps are not comparable
        self.samples.append((now, attempt, step))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window:
            self.samples.popleft()

    def per_second(self) -> float | None:
        if len(self.samples) < 2:
            return None
        (t0, _, s0), (t1, _, s1) = self.samples[0], self.samples[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 >= s0 else None


def cost_so_far(status: RunStatus, now: datetime) -> float:
    """Closed attempts' cost plus the running host's price times its time so far."""
    return status.cost_usd + running_cost(status.current_attempt, now)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def panel(status: RunStatus, rate: float | None, total_steps: int | None, now: datetime) -> Table:
    """The panel for one status: pure, so it is tested without a terminal or a server."""
    current = status.current_attempt or status.last_ended_attempt
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.title = f"{status.run_id} · {status.state.value}"
    table.title_justify = "left"
    if current is None:
        table.add_row("attempt", "waiting for a placement")
    else:
        table.add_row("attempt", f"{current.attempt} · pool {current.pool} · {hosts_of(current)}")
    step = "-" if status.step is None else str(status.step)
    if total_steps:
        step += f" / {total_steps}"
    table.add_row("step", step + (f" · {rate:.1f} steps/s" if rate else ""))
    table.add_row("durable step", "-" if status.durable_step is None else str(status.durable_step))
    if status.waiting_on:
        table.add_row("waiting on", f"{status.waiting_on} (saves are retried)")
    table.add_row("reclaims", f"{status.reclaims} · steps lost {status.steps_lost}")
    if stalled := no_progress_line(status):
        table.add_row("no progress", stalled)
    table.add_row("cost so far", f"${cost_so_far(status, now):.2f}")
    if not total_steps:
        eta = "- (vl run --total-steps N gives one)"
    elif status.step is not None and status.step >= total_steps:
        eta = "finishing"
    elif rate and status.step is not None:
        eta = _duration((total_steps - status.step) / rate)
    else:
        eta = "- (measuring the rate)"
    table.add_row("ETA", eta)
    return table


class RichView:
    """The panel, redrawn in place; `events` (the plain view) still prints attempts and reclaims above it."""

    def __init__(self, events, total_steps: int | None = None, console: Console | None = None) -> None:
        self.events = events
        self.events.PROGRESS_EVERY = math.inf  # the panel shows progress: no progress lines
        self.total_steps = total_steps
        self.rate = StepRate()
        self.live = Live(console=console or Console(), refresh_per_second=4, transient=True)

    def update(self, status: RunStatus) -> None:
        if not self.live.is_started:
            self.live.start()
        self.events.update(status)
        current = status.current_attempt
        self.rate.add(time.monotonic(), current.attempt if current else 0, status.step)
        self.live.update(panel(status, self.rate.per_second(), self.total_steps, datetime.now(UTC)))

    def finish(self, status: RunStatus) -> None:
        self.live.stop()
        self.events.finish(status)

    def close(self) -> None:
        """Leave the terminal clean when following stops early (Ctrl-C)."""
        if self.live.is_started:
            self.live.stop()
