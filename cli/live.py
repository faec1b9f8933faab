"""`vl run` on a terminal: a compact live panel (attempt, pool, host, step and rate, durable step, reclaims,
cost so far, ETA) under the same event lines the plain view prints. Not a terminal: plain lines only."""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TextIO

from rich.console import Console
from rich.live import Live
from rich.table import Table

from vaultlayer.models import RunStatus


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
    current = status.attempts[-1] if status.attempts else None
    running = 0.0
    if current is not None and current.outcome is None and current.price_per_hour and current.running_at:
        running = current.price_per_hour * max(0.0, (now - current.running_at).total_seconds()) / 3600
    return status.cost_usd + running


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def render(status: RunStatus, rate: float | None, total_steps: int | None, now: datetime) -> Table:
    """The panel for one status: pure, so it is tested without a terminal or a server."""
    current = status.attempts[-1] if status.attempts else None
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.title = f"{status.run_id} · {status.state.value}"
    table.title_justify = "left"
    if current is None:
        table.add_row("attempt", "waiting for a placement")
    else:
        table.add_row("attempt", f"{current.attempt} · pool {current.pool} · host {current.host or '-'}")
    step = "-" if status.step is None else str(status.step)
    if total_steps:
        step += f" / {total_steps}"
    table.add_row("step", step + (f" · {rate:.1f} steps/s" if rate else ""))
    table.add_row("durable step", "-" if status.durable_step is None else str(status.durable_step))
    table.add_row("reclaims", f"{status.reclaims} · steps lost {status.steps_lost}")
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
        current = status.attempts[-1] if status.attempts else None
        self.rate.add(time.monotonic(), current.attempt if current else 0, status.step)
        self.live.update(render(status, self.rate.per_second(), self.total_steps, datetime.now(UTC)))

    def finish(self, status: RunStatus) -> None:
        self.live.stop()
        self.events.finish(status)

    def close(self) -> None:
        """Leave the terminal clean when following stops early (Ctrl-C)."""
        if self.live.is_started:
            self.live.stop()
