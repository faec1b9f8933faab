"""Control-plane load benchmark: many concurrent TrainingRuns on one control-plane worker.

Starts its own Temporal dev server (SQLite file in a temporary directory), ONE control-plane worker
(`python -m worker.control`, the process `vl` runs) and ONE load-harness process, submits the runs and
waits for them. The harness plays every host: a Temporal worker on the `harness` provider's task queue
that serves `run_attempt` with the real input and output models, advances steps on a clock, heartbeats
AttemptProgress like the host agent, stores a real (tiny) checkpoint every --save-every steps, and is
reclaimed at random (--reclaim-prob per attempt, at a random step): it records the notice, stores the
emergency save and reports `reclaimed`, so the workflow's own release/verify/provision/resume path runs.

    python bench/load.py                     # 1,000 runs: a table
    python bench/load.py --runs 5 --json     # one JSON object

It prints runs completed, the control-plane worker's CPU seconds and peak RSS (from /proc), history events
per run (all executions of a run, continue-as-new included), and p50/p99 of the time from a notice to the
replacement attempt starting on the harness (both timestamps taken by the harness's clock). How to read
the figures and the dev server's limits: docs/load.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from temporalio import activity
from temporalio.exceptions import ApplicationError
from temporalio.worker import PollerBehaviorAutoscaling, Worker

from activities.providers.harness import QUEUE_VARIABLE, HarnessProvider
from vaultlayer import checkpoint
from vaultlayer import client as vl_client
from vaultlayer.models import (
    AttemptInput,
    AttemptOutcome,
    AttemptProgress,
    AttemptResult,
    Limits,
    Notice,
    Pool,
    RunSpec,
    RunState,
    RunStatus,
)
from worker.local_server import SQLITE_PRAGMAS, port_open, temporal_binary

REPO = Path(__file__).resolve().parents[1]
CONTROL_QUEUE = "vl-load"
HARNESS_QUEUE = "vl-load-harness"
SUBMIT_CONCURRENCY = 50
NOTICE_SECONDS = 30.0  # the runs' notice_seconds: the deadline a harness notice announces
SERVER_START_SECONDS = 30.0
# The dev server's defaults, raised where 1,000 runs hit them (docs/load.md): the namespace's and the
# frontend's request rates (2,400/s), and the visibility rate the final listing needs.
SERVER_DYNAMIC_CONFIG = (
    "frontend.namespaceRPS=20000",
    "frontend.rps=20000",
    "frontend.namespaceRPS.visibility=1000",
)


# ---------------------------------------------------------------- the harness (its own process)


@dataclass(frozen=True)
class Script:
    """What a harness "script" does; the run's command carries it, as a real run's command does."""

    steps: int
    step_time: float
    save_every: int


def harness_command(steps: int, step_time: float, save_every: int) -> list[str]:
    return ["vl-load-harness", "--steps", str(steps), "--step-time", str(step_time), "--save-every", str(save_every)]


def parse_script(command: list[str]) -> Script:
    parser = argparse.ArgumentParser(prog="vl-load-harness", add_help=False, exit_on_error=False)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--step-time", type=float, required=True)
    parser.add_argument("--save-every", type=int, required=True)
    try:
        args = parser.parse_args(command[1:])
    except (argparse.ArgumentError, SystemExit) as err:
        raise ApplicationError(f"not a harness command: {command}", type="CommandFailed", non_retryable=True) \
            from err
    return Script(args.steps, args.step_time, args.save_every)


def store_checkpoint(inp: AttemptInput, step: int) -> None:
    """A real checkpoint (a tiny state file and its manifest), so verify and retention do their real work."""
    with tempfile.TemporaryDirectory(prefix="vl-load-save-") as directory:
        Path(directory, "state.bin").write_bytes(step.to_bytes(8, "little") * 8)
        checkpoint.upload_checkpoint(Path(directory), inp.storage_url, inp.run_id, inp.attempt, step)


class Harness:
    """Every host's agent at once: one `run_attempt` per running attempt, on one task queue."""

    def __init__(self, reclaim_prob: float, seed: int, events: Path) -> None:
        self.reclaim_prob = reclaim_prob
        self.seed = seed
        self.events = open(events, "a", buffering=1)  # noqa: SIM115 - one line per event, closed at exit

    def record(self, inp: AttemptInput, event: str, **fields: object) -> None:
        line = {"run": inp.run_id, "attempt": inp.attempt, "event": event, "t": time.time(), **fields}
        self.events.write(json.dumps(line) + "\n")

    @activity.defn(name="run_attempt")
    async def run_attempt(self, inp: AttemptInput) -> AttemptResult:
        script = parse_script(inp.command)
        start = inp.checkpoint.step if inp.checkpoint else 0
        self.record(inp, "start", start_step=start)
        progress = AttemptProgress(phase="running", start_step=start, step=start,
                                   durable_step=start if inp.checkpoint else None)
        # Whether and where this attempt is reclaimed depends only on the seed, the run and the attempt.
        rng = random.Random(f"{self.seed}/{inp.run_id}/{inp.attempt}")
        reclaim_at = None
        if start + 1 < script.steps and rng.random() < self.reclaim_prob:
            reclaim_at = rng.randint(start + 1, script.steps - 1)
        step = start
        while step < script.steps:
            await asyncio.sleep(script.step_time)
            step += 1
            progress.step = step
            if step == reclaim_at:
                return await self._reclaimed(inp, progress)
            if step % script.save_every == 0:
                await asyncio.to_thread(store_checkpoint, inp, step)
                progress.durable_step = step
            activity.heartbeat(progress.model_copy())  # throttled by the worker, as the agent's are
        return AttemptResult(outcome=AttemptOutcome.COMPLETED, start_step=start, end_step=step,
                             durable_step=progress.durable_step, exit_code=0)

    async def _reclaimed(self, inp: AttemptInput, progress: AttemptProgress) -> AttemptResult:
        """A notice: the emergency save is stored, then `reclaimed` is reported while the host is alive."""
        now = datetime.now(UTC)
        notice = Notice(deadline=now + timedelta(seconds=NOTICE_SECONDS), received_at=now)
        self.record(inp, "notice", step=progress.step)
        progress.notice, progress.phase = notice, "emergency-save"
        activity.heartbeat(progress.model_copy())
        await asyncio.to_thread(store_checkpoint, inp, progress.step)
        return AttemptResult(outcome=AttemptOutcome.RECLAIMED, start_step=progress.start_step,
                             end_step=progress.step, durable_step=progress.step, notice=notice,
                             emergency_save="saved", reason="reclaim notice")


async def serve_harness(args: argparse.Namespace) -> None:
    client = await vl_client.connect(address=args.address)
    harness = Harness(args.reclaim_prob, args.seed, args.events)
    worker = Worker(
        client, task_queue=args.harness_queue, activities=[harness.run_attempt],
        max_concurrent_activities=args.runs + 10, activity_task_poller_behavior=PollerBehaviorAutoscaling(),
        # As the host agent's throttle (worker/agent.py): one heartbeat RPC per host every 2 s by default.
        max_heartbeat_throttle_interval=timedelta(seconds=args.heartbeat_every),
        default_heartbeat_throttle_interval=timedelta(seconds=args.heartbeat_every),
        graceful_shutdown_timeout=timedelta(seconds=2),
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    async with worker:
        await stop.wait()
    harness.events.close()


# ---------------------------------------------------------------- measuring a process


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a live process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def peak_rss_mb(pid: int) -> float:
    """The process's high-water resident set (VmHWM), from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def percentile(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile; None when there is nothing to rank."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))]


# ---------------------------------------------------------------- the benchmark


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Processes:
    """The children this benchmark starts; all of them stopped at the end, whatever happened."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: dict[str, subprocess.Popen] = {}

    def start(self, name: str, command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "ab") as log_file:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                       env=env, cwd=REPO)
        self.started[name] = process
        return process

    def stop(self, name: str, wait_seconds: float = 10.0) -> None:
        process = self.started.pop(name, None)
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(wait_seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def stop_all(self) -> None:
        for name in list(self.started):
            self.stop(name)

    def check_alive(self) -> None:
        for name, process in self.started.items():
            if process.poll() is not None:
                raise RuntimeError(f"the {name} process exited with {process.returncode}; see {self.logs / name}.log")


def make_spec(args: argparse.Namespace, storage_url: str, index: int) -> RunSpec:
    return RunSpec(
        run_id=f"load-{index:05d}",  # a fresh server each time: ids need only be unique within it
        command=harness_command(args.steps, args.step_time, args.save_every),
        workdir=str(REPO),
        pools=[Pool(provider="harness", region="harness")],
        storage_url=storage_url,
        notice_seconds=NOTICE_SECONDS,
        heartbeat_timeout_seconds=args.heartbeat_timeout,
        start_timeout_seconds=args.timeout,
        limits=Limits(max_reclaims=200, max_host_faults=3),
    )


async def submit_all(client, specs: list[RunSpec]) -> None:
    gate = asyncio.Semaphore(SUBMIT_CONCURRENCY)

    async def one(spec: RunSpec) -> None:
        async with gate:
            await vl_client.submit(client, spec, queue=CONTROL_QUEUE)

    await asyncio.gather(*(one(spec) for spec in specs))


async def wait_results(client, specs: list[RunSpec], timeout: float) -> dict[str, RunStatus | str]:
    """run id -> its final status, or why there is none (failed, or still running at the timeout)."""

    async def one(spec: RunSpec) -> RunStatus:
        return await client.get_workflow_handle(spec.run_id, result_type=RunStatus).result()

    tasks = {spec.run_id: asyncio.create_task(one(spec)) for spec in specs}
    await asyncio.wait(tasks.values(), timeout=timeout)
    results: dict[str, RunStatus | str] = {}
    for run_id, task in tasks.items():
        if not task.done():
            task.cancel()
            results[run_id] = "still running at the timeout"
        elif task.exception() is not None:
            results[run_id] = f"failed: {task.exception()}"
        else:
            results[run_id] = task.result()
    return results


async def history_events(client, run_ids: set[str]) -> dict[str, int]:
    """run id -> events over every execution of the run (continue-as-new starts a new one)."""
    events: dict[str, int] = dict.fromkeys(run_ids, 0)
    async for execution in client.list_workflows(f'WorkflowType = "{vl_client.WORKFLOW_NAME}"'):
        if execution.id in events:
            events[execution.id] += execution.history_length
    return events


def notice_latencies(events_file: Path) -> tuple[list[float], int]:
    """Seconds from each notice to the run's next attempt starting, and how many of those started from the
    step the notice's emergency save stored (the resume the workflow must pick)."""
    by_run: dict[str, list[dict]] = {}
    lines = events_file.read_text().splitlines() if events_file.exists() else []
    for line in lines:
        event = json.loads(line)
        by_run.setdefault(event["run"], []).append(event)
    latencies, resumed_at_save = [], 0
    for run_events in by_run.values():
        run_events.sort(key=lambda e: (e["attempt"], e["event"] != "start"))
        for notice, following in zip(run_events, run_events[1:]):
            if notice["event"] == "notice" and following["event"] == "start":
                latencies.append(following["t"] - notice["t"])
                resumed_at_save += following["start_step"] == notice["step"]
    return latencies, resumed_at_save


async def benchmark(args: argparse.Namespace, workdir: Path) -> dict:
    home, logs = workdir / "home", workdir / "logs"
    home.mkdir()
    logs.mkdir()
    storage_url = (workdir / "storage").as_uri()
    events_file = workdir / "harness-events.jsonl"
    port = free_port()
    address = f"127.0.0.1:{port}"
    processes = Processes(logs)
    try:
        dynamic = [arg for value in SERVER_DYNAMIC_CONFIG for arg in ("--dynamic-config-value", value)]
        processes.start("server", [temporal_binary(), "server", "start-dev", "--headless", "--ip", "127.0.0.1",
                                   "--port", str(port), "--db-filename", str(workdir / "temporal.db"),
                                   "--log-level", "error", *dynamic, *SQLITE_PRAGMAS])
        deadline = time.monotonic() + SERVER_START_SECONDS
        while not port_open(port):
            processes.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"the dev server did not open port {port}; see {logs / 'server.log'}")
            await asyncio.sleep(0.1)
        env = {**os.environ, "TEMPORAL_ADDRESS": address, "VL_HOME": str(home), "VL_TASK_QUEUE": CONTROL_QUEUE,
               QUEUE_VARIABLE: HARNESS_QUEUE}
        env.pop("TEMPORAL_NAMESPACE", None)
        control = processes.start("control", [sys.executable, "-m", "worker.control"], env=env)
        processes.start("harness", [sys.executable, str(Path(__file__).resolve()), "--serve-harness",
                                    "--address", address, "--harness-queue", HARNESS_QUEUE,
                                    "--reclaim-prob", str(args.reclaim_prob), "--seed", str(args.seed),
                                    "--runs", str(args.runs), "--heartbeat-every", str(args.heartbeat_every),
                                    "--events", str(events_file)], env=env)
        client = await vl_client.connect(address=address)
        specs = [make_spec(args, storage_url, index) for index in range(args.runs)]
        began = time.monotonic()
        await submit_all(client, specs)
        submitted_s = time.monotonic() - began
        results = await wait_results(client, specs, args.timeout)
        wall_s = time.monotonic() - began
        processes.check_alive()
        control_cpu, control_rss = cpu_seconds(control.pid), peak_rss_mb(control.pid)
        server = processes.started["server"]
        server_cpu = cpu_seconds(server.pid)
        harness_cpu = cpu_seconds(processes.started["harness"].pid)
        statuses = [result for result in results.values() if isinstance(result, RunStatus)]
        completed = [status for status in statuses if status.state == RunState.SUCCEEDED]
        events = await history_events(client, {status.run_id for status in statuses})
        leaked = sorted(HarnessProvider(home, {}).live_runs())
        processes.stop("harness")
        latencies, resumed_at_save = notice_latencies(events_file)
        per_run = list(events.values())
        problems = sorted({result for result in results.values() if isinstance(result, str)}
                          | {f"{s.state.value}: {s.stop_reason}" for s in statuses if s.state != RunState.SUCCEEDED})
        return {
            "runs": args.runs,
            "runs_completed": len(completed),
            "runs_not_completed": args.runs - len(completed),
            "problems": problems[:10],
            "wall_s": round(wall_s, 1),
            "submit_s": round(submitted_s, 1),
            "control_cpu_seconds": round(control_cpu, 1),
            "control_peak_rss_mb": round(control_rss, 1),
            "server_cpu_seconds": round(server_cpu, 1),
            "harness_cpu_seconds": round(harness_cpu, 1),
            "attempts": sum(len(status.attempts) for status in statuses),
            "reclaims": sum(status.reclaims for status in statuses),
            "host_faults": sum(status.host_faults for status in statuses),
            "continued_as_new": sum(status.continued_as_new for status in statuses),
            "history_events_per_run": {"mean": round(statistics.mean(per_run), 1) if per_run else None,
                                       "max": max(per_run, default=None)},
            "notices": len(latencies),
            "replacements_resumed_at_emergency_save": resumed_at_save,
            "notice_to_replacement_p50_s": _rounded(percentile(latencies, 0.50)),
            "notice_to_replacement_p99_s": _rounded(percentile(latencies, 0.99)),
            "notice_to_replacement_max_s": _rounded(max(latencies, default=None)),
            "hosts_leaked": len(leaked),
            "settings": {"steps": args.steps, "step_time_s": args.step_time, "save_every": args.save_every,
                         "reclaim_prob": args.reclaim_prob, "heartbeat_timeout_s": args.heartbeat_timeout,
                         "heartbeat_every_s": args.heartbeat_every,
                         "cpus": os.cpu_count(), "load_average_1m_at_end": round(os.getloadavg()[0], 2)},
        }
    finally:
        processes.stop_all()


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def print_table(result: dict) -> None:
    width = max(len(key) for key in result)
    for key, value in result.items():
        shown = ", ".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else value
        if isinstance(value, list):
            shown = "; ".join(value) or "-"
        print(f"{key:<{width}}  {shown}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000, help="concurrent runs (default 1000)")
    parser.add_argument("--steps", type=int, default=40, help="steps per run (default 40)")
    parser.add_argument("--step-time", type=float, default=0.5, help="seconds per step on the harness (default 0.5)")
    parser.add_argument("--save-every", type=int, default=10, help="a durable checkpoint every N steps (default 10)")
    parser.add_argument("--reclaim-prob", type=float, default=0.3,
                        help="chance that an attempt is reclaimed, at a random step (default 0.3)")
    parser.add_argument("--heartbeat-timeout", type=float, default=30.0, help="the runs' heartbeat timeout, s")
    parser.add_argument("--heartbeat-every", type=float, default=2.0,
                        help="seconds between a host's heartbeats (default 2, the host agent's throttle)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="give up on runs not done after this many s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="work in DIR and keep it (logs, database, events)")
    # The harness process: started by the benchmark itself.
    parser.add_argument("--serve-harness", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--harness-queue", help=argparse.SUPPRESS)
    parser.add_argument("--events", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_harness:
        asyncio.run(serve_harness(args))
        return 0
    for name in ("runs", "steps", "save_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.reclaim_prob < 1:
        parser.error("--reclaim-prob must be in [0, 1): at 1 no attempt could finish")
    if args.step_time < 0 or min(args.timeout, args.heartbeat_timeout, args.heartbeat_every) <= 0:
        parser.error("--step-time must be >= 0; --timeout, --heartbeat-timeout and --heartbeat-every > 0")
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=False)
        result = asyncio.run(benchmark(args, args.keep))
    else:
        with tempfile.TemporaryDirectory(prefix="vl-load-") as workdir:
            result = asyncio.run(benchmark(args, Path(workdir)))
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0 if result["runs_completed"] == result["runs"] and not result["hosts_leaked"] else 1


if __name__ == "__main__":
    sys.exit(main())
