"""`run_attempt`: what the host agent does for one attempt of a run.

Restore the verified checkpoint, start the user's command, and supervise it: heartbeat progress,
upload what the script stages, watch for a reclaim notice. On a notice the script is asked for an
emergency save (through the SDK's control directory); once that is stored, or the deadline is too
close, the attempt reports `reclaimed` while the host is still alive. In zero-code mode
(`checkpoint_dir`) the agent restores and snapshots the script's own checkpoint directory instead
(activities/snapshots.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import structlog
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities import setup_commands
from activities.attempt_logs import LogShipper, secret_values
from activities.masking import mask
from activities.env_secrets import SecretUnavailable, handed_over, resolve_secrets
from activities.notices import NoticeSource
from activities.snapshots import SETTLE_SECONDS, DirectorySnapshots, restore_directory
from vaultlayer import checkpoint, failpoints, protocol
from vaultlayer.models import (
    AttemptInput,
    AttemptOutcome,
    AttemptProgress,
    AttemptResult,
    FailureCause,
    Host,
    Notice,
    SnapshotRef,
)
from vaultlayer.workdir import WorkdirError, restore_snapshot, store_outputs

log = structlog.get_logger(__name__)

POLL_SECONDS = 0.2
# After a notice every moment counts: look for the emergency save this often (a directory listing and a set
# lookup per look), so a reclaim costs the save and its upload, not a polling period.
NOTICE_POLL_SECONDS = 0.02
# How long the end of an attempt waits for the script's last output to reach the log file (a child the script
# left behind may hold its output open).
OUTPUT_DRAIN_SECONDS = 5.0
# Report a notice as reclaimed a margin before its deadline even when no emergency save came: a quarter of
# the notice, so a notice of a few seconds (a container marketplace's SIGTERM to SIGKILL) still leaves most
# of it to the save, within bounds that leave time to report and never wait on a long notice for nothing.
MARGIN_SHARE = 0.25
MIN_MARGIN_SECONDS = 0.5
MAX_MARGIN_SECONDS = 3.0
SETUP_CACHE_DIR = "setup-cache"  # in the host's directory: what setup's package managers cache (setup_commands.py)
# A cancelled run (`vl cancel`): the script gets SIGTERM and this long to exit before SIGKILL, then its outputs are
# stored (best effort) for as long as the second bound allows, while the workflow waits for the attempt to end.
CANCEL_GRACE_SECONDS = 5.0
OUTPUTS_ON_CANCEL_SECONDS = 60.0
# How long an attempt waits for its storage client before it starts the script anyway (_connect_storage).
STORAGE_CONNECT_SECONDS = 15.0
# Waits between tries of a failing upload: a storage outage delays checkpoints, it never loses them.
UPLOAD_BACKOFF_SECONDS = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)


class StagedSave:
    """A save the SDK (or a directory snapshot) committed in the staging directory."""

    def __init__(self, directory: Path, record: protocol.SaveRecord) -> None:
        self.directory = directory
        self.step = record.step
        self.emergency = record.emergency
        self.notice_id = record.notice_id
        self.world_size = record.world_size


def staged_saves(staging: Path) -> list[StagedSave]:
    """Complete saves the SDK committed (renamed out of its staging prefix), oldest first."""
    saves = []
    for entry in staging.iterdir():
        if protocol.is_being_written(entry.name) or not entry.is_dir():
            continue
        if (entry / protocol.SAVE_RECORD).exists():
            saves.append(StagedSave(entry, protocol.read_save_record(entry)))
    return sorted(saves, key=lambda s: s.step)


class Uploader:
    """Uploads staged saves in order, in the background; the newest stored step is `durable_step`.

    Files go up in parallel (multipart when big), the manifest last (checkpoint.upload_checkpoint). A save
    that fails is tried again, with backoff, until it is stored; later saves wait, so steps stay in order.
    """

    def __init__(self, inp: AttemptInput, staging: Path, durable_step: int | None) -> None:
        self.inp = inp
        self.staging = staging
        self.durable_step = durable_step
        self.emergency_stored: set[str] = set()
        self.failures = 0  # in a row
        self.last_error = ""  # of the last failed upload, while failures > 0
        self.busy = False
        self.poll_seconds = POLL_SECONDS  # NOTICE_POLL_SECONDS once a notice came
        # A gang: this host's part of each save goes up on its own; node 0 then waits for every other node's part
        # and commits the checkpoint. Steps whose part is stored, so a commit tried again does not upload it twice.
        self.parts_stored: set[int] = set()
        self.stop_waiting_for_nodes = asyncio.Event()  # set when the attempt ends: a part that never came stays out
        # Another node than 0: notice id -> the step of its emergency save, whose part is stored, until node 0's
        # commit of that step is seen (`emergency_durable`); and when storage was last asked.
        self.emergency_parts: dict[str, int] = {}
        self.commit_checked_at = -math.inf

    async def run(self, stop: asyncio.Event) -> None:
        """Upload until `stop` is set and every save staged before it is stored."""
        while True:
            stopping = stop.is_set()
            stored_all = True
            for save in staged_saves(self.staging):
                if not await self.upload(save):
                    stored_all = False
                    break
            if not stored_all:
                await asyncio.sleep(UPLOAD_BACKOFF_SECONDS[min(self.failures, len(UPLOAD_BACKOFF_SECONDS)) - 1])
            elif stopping:
                return
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.poll_seconds)

    async def _commit_gang(self, step: int) -> bool:
        """Node 0 of a gang: once every node's part of `step` is stored, write the checkpoint's manifest. False when
        the attempt ended first (a node died before its part was in: the checkpoint stays partial, never resumed)."""
        gang = self.inp.gang
        while missing := await asyncio.to_thread(checkpoint.gang_nodes_missing, self.inp.storage_url,
                                                 self.inp.run_id, self.inp.attempt, step, gang.nodes):
            if self.stop_waiting_for_nodes.is_set():
                log.warning("gang checkpoint incomplete", step=step, missing_nodes=missing)
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_waiting_for_nodes.wait(), self.poll_seconds)
        await asyncio.to_thread(checkpoint.commit_gang_checkpoint, self.inp.storage_url, self.inp.run_id,
                                self.inp.attempt, step, gang.nodes)
        return True

    async def emergency_durable(self, notice_id: str) -> bool:
        """Whether the save a notice asked for is a checkpoint to resume from. On another node of a gang than 0,
        storing its own part is not enough: node 0 commits the step once every part is in, and this host reporting
        "saved" ends the gang's attempt, so the commit is waited for here (storage asked every POLL_SECONDS)."""
        if notice_id in self.emergency_stored:
            return True
        step = self.emergency_parts.get(notice_id)
        if step is None or time.monotonic() - self.commit_checked_at < POLL_SECONDS:
            return False
        self.commit_checked_at = time.monotonic()
        try:
            committed = await asyncio.to_thread(checkpoint.gang_checkpoint_committed, self.inp.storage_url,
                                                self.inp.run_id, self.inp.attempt, step)
        except Exception as err:  # noqa: BLE001 - storage errors (retried inside already): ask again next poll
            log.warning("gang commit check failed", step=step, error=str(err))
            return False
        if committed:
            self.emergency_stored.add(notice_id)
        return committed

    def idle(self) -> bool:
        """Nothing in flight and nothing staged."""
        return not self.busy and not staged_saves(self.staging)

    async def upload(self, save: StagedSave) -> bool:
        """Whether the save is done with (stored, or older than what is stored); False: try again later."""
        if self.durable_step is not None and save.step <= self.durable_step and not save.emergency:
            shutil.rmtree(save.directory, ignore_errors=True)  # older than what is stored
            return True
        self.busy = True
        gang = self.inp.gang
        began = time.monotonic()
        if save.emergency:  # with its end below, says where a notice's seconds went when a save misses its deadline
            log.info("emergency save upload began", step=save.step, attempt=self.inp.attempt)
        try:
            if save.step not in self.parts_stored:
                await asyncio.to_thread(
                    checkpoint.upload_checkpoint,
                    save.directory,
                    self.inp.storage_url,
                    self.inp.run_id,
                    self.inp.attempt,
                    save.step,
                    world_size=save.world_size,
                    node=(gang.node_rank, gang.nodes) if gang else None,
                )
                self.parts_stored.add(save.step)
            if gang is not None and gang.node_rank == 0 and not await self._commit_gang(save.step):
                log.warning("checkpoint left incomplete: a node's part never came", step=save.step,
                            attempt=self.inp.attempt)
                shutil.rmtree(save.directory, ignore_errors=True)
                return True
        except checkpoint.CheckpointError as err:  # the save itself is unusable: no retry can store it
            log.error("checkpoint cannot be stored; dropped", step=save.step, error=str(err))
            shutil.rmtree(save.directory, ignore_errors=True)
            return True
        except Exception as err:  # noqa: BLE001 - storage errors (retried inside already): retry the save
            self.failures += 1
            self.last_error = str(err) or type(err).__name__
            log.warning("checkpoint upload failed; retrying", step=save.step, failures=self.failures,
                        error=str(err))
            return False
        finally:
            self.busy = False
        self.failures = 0
        self.durable_step = max(save.step, self.durable_step or 0)
        if save.emergency and save.notice_id:
            if gang is None or gang.node_rank == 0:  # node 0 stored it only once the gang's checkpoint was whole
                self.emergency_stored.add(save.notice_id)
            else:
                self.emergency_parts[save.notice_id] = save.step
        shutil.rmtree(save.directory, ignore_errors=True)
        log.info("checkpoint stored", step=save.step, attempt=self.inp.attempt, emergency=save.emergency,
                 upload_seconds=round(time.monotonic() - began, 3))
        return True


def tail(path: Path, max_bytes: int = 2000) -> str:
    with open(path, "rb") as file:
        file.seek(max(0, path.stat().st_size - max_bytes))
        return file.read().decode(errors="replace")


def read_progress(control: Path) -> int | None:
    progress = protocol.read_progress(control)
    return progress.step if progress is not None else None


def read_interval(control: Path) -> str:
    """The SDK's checkpoint interval and why, as `vl status` shows it."""
    progress = protocol.read_progress(control)
    if progress is None:
        return ""
    seconds, why = progress.interval_seconds, progress.interval_reason
    return f"every {seconds:.0f} s: {why}" if seconds else why


def gang_environ(inp: AttemptInput) -> dict[str, str]:
    """VL_NODE_RANK and the other gang variables of a multi-node attempt; none on a single host."""
    gang = inp.gang
    return protocol.gang_environ(gang.node_rank, gang.addresses, gang.master_port) if gang else {}


def deadline_margin(notice_seconds: float) -> float:
    """How long before a notice's deadline the attempt stops waiting for the emergency save: it scales with
    the notice, so a short one is not declared missed the moment it arrives."""
    return min(max(notice_seconds * MARGIN_SHARE, MIN_MARGIN_SECONDS), MAX_MARGIN_SECONDS)


def emergency_save_outcome(stored: bool, notice: Notice, now: float) -> str | None:
    """After a notice: "saved" once the emergency save is stored, "missed" once the deadline is too close to
    wait any longer (`deadline_margin` before it), None while the attempt should keep waiting."""
    if stored:
        return "saved"
    notice_seconds = (notice.deadline - notice.received_at).total_seconds()
    if now > notice.deadline.timestamp() - deadline_margin(notice_seconds):
        return "missed"
    return None


@dataclass
class AttemptContext:
    """One attempt on this host: its input, the progress the heartbeats report, and its local places."""

    inp: AttemptInput
    progress: AttemptProgress
    workdir: Path  # where setup and the command run: the unpacked code, or inp.workdir without a snapshot
    checkpoint_dir: Path | None  # zero-code mode: the script's own directory, resolved against workdir
    restore: Path  # the SDK's restore directory
    staging: Path  # where saves are staged for the uploader
    control: Path  # notices to the SDK, progress from it
    log_path: Path  # the script's output
    log: structlog.typing.FilteringBoundLogger  # bound to the run, the attempt and the host
    setup: setup_commands.SetupOnHost | None = None  # the run's setup commands on this host, once prepared
    restore_world_size: int = 1  # how many ranks wrote the restored checkpoint (its manifest says)
    # (step, monotonic time) when the first step past the restore was seen, and the latest new step: the speed the
    # attempt trained at, with restore, start-up and setup left out (AttemptResult.trained_steps/_seconds).
    first_step_seen: tuple[int, float] | None = None
    last_step_seen: tuple[int, float] | None = None

    def saw_step(self, step: int) -> None:
        if step <= self.progress.start_step or (self.last_step_seen and step <= self.last_step_seen[0]):
            return
        self.last_step_seen = (step, time.monotonic())
        self.first_step_seen = self.first_step_seen or self.last_step_seen

    def speed_sample(self) -> dict[str, float | int | None]:
        if self.first_step_seen is None or self.last_step_seen is None:
            return {"trained_steps": None, "trained_seconds": None}
        seconds = self.last_step_seen[1] - self.first_step_seen[1]
        steps = self.last_step_seen[0] - self.first_step_seen[0]
        return {"trained_steps": steps, "trained_seconds": seconds} if steps > 0 and seconds > 0 else \
            {"trained_steps": None, "trained_seconds": None}


@dataclass
class RunningScript:
    """The started script and what runs beside it until the attempt ends."""

    process: asyncio.subprocess.Process
    output: asyncio.Task  # ends when the masker has the script's output, masked, in the attempt's log file
    shipper: LogShipper
    snapshots: DirectorySnapshots | None  # zero-code mode
    uploader: Uploader
    stop_uploads: asyncio.Event
    uploads: asyncio.Task
    notice_id: str  # the id a notice is forwarded to the script under
    notice: Notice | None = None  # the notice seen while the script ran

    async def drain_output(self) -> None:
        """Once the script exited: its output is all in the log file (bounded)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.output), OUTPUT_DRAIN_SECONDS)

    async def emergency_save_stored(self) -> bool:
        if self.snapshots is None:
            return await self.uploader.emergency_durable(self.notice_id)
        # Zero-code: the directory as of the notice, and every snapshot before it, is in storage.
        return self.snapshots.covered_notice == self.notice_id and self.uploader.idle()


async def _start_masker(log_path: Path, secrets: list[bytes], output: int) -> asyncio.subprocess.Process:
    """activities/log_masker.py reading the script's output from the pipe `output` (closed here once it has
    it); the secret values reach it over a pipe of their own."""
    secrets_read, secrets_write = os.pipe()
    try:
        with os.fdopen(secrets_write, "wb") as sink:
            sink.write(json.dumps([value.decode() for value in secrets]).encode())
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "activities.log_masker", str(log_path), str(secrets_read),
            stdin=output, stdout=asyncio.subprocess.DEVNULL, pass_fds=(secrets_read,))
    finally:
        os.close(secrets_read)
        os.close(output)


class HostAgentActivities:
    """The work one host does. The agent was started for one run, host and task queue: anything else
    scheduled on its queue (a foreign run's workflow, or an input naming another run or host) is refused."""

    def __init__(self, host_id: str, host_dir: Path, notices: NoticeSource, run_id: str, task_queue: str) -> None:
        self.host_id = host_id
        self.host_dir = host_dir
        self.notices = notices
        self.run_id = run_id
        self.task_queue = task_queue

    def _foreign(self, inp: AttemptInput) -> str | None:
        """Why this attempt is not this host's work, if it is not."""
        info = activity.info()
        for what, got, mine in (("workflow", info.workflow_id, self.run_id), ("run", inp.run_id, self.run_id),
                                ("host", inp.host.host_id, self.host_id),
                                ("task queue", inp.host.task_queue, self.task_queue)):
            if got != mine:
                return f"{what} {got!r} is not this agent's {mine!r}"
        return None

    @activity.defn(name="agent_ready")
    async def agent_ready(self, host: Host) -> str:
        """The gang's roll call: a multi-node attempt starts only once every host's agent answers this."""
        if host.host_id != self.host_id or host.task_queue != self.task_queue \
                or activity.info().workflow_id != self.run_id:
            raise ApplicationError(f"host agent {self.host_id} of run {self.run_id} is not {host.host_id}",
                                   type="ForeignAttempt", non_retryable=True)
        return self.host_id

    @activity.defn(name="run_attempt")
    async def run_attempt(self, inp: AttemptInput) -> AttemptResult:
        if (reason := self._foreign(inp)) is not None:
            log.error("refused an attempt that is not this host's", reason=reason, host=self.host_id)
            raise ApplicationError(f"host agent {self.host_id} of run {self.run_id} refused the attempt: {reason}",
                                   type="ForeignAttempt", non_retryable=True)
        attempt_dir = self.host_dir / f"a{inp.attempt}"
        shutil.rmtree(attempt_dir, ignore_errors=True)
        start_step = inp.checkpoint.step if inp.checkpoint else 0
        workdir = attempt_dir / "code" if inp.code else Path(inp.workdir)
        ctx = AttemptContext(
            inp=inp,
            progress=AttemptProgress(phase="restoring", start_step=start_step, step=start_step,
                                     durable_step=inp.checkpoint.step if inp.checkpoint else None,
                                     node_rank=inp.gang.node_rank if inp.gang else 0),
            workdir=workdir, checkpoint_dir=workdir / inp.checkpoint_dir if inp.checkpoint_dir else None,
            restore=attempt_dir / "restore", staging=attempt_dir / "staging", control=attempt_dir / "control",
            log_path=self.host_dir / f"a{inp.attempt}.log",
            log=log.bind(run_id=inp.run_id, attempt=inp.attempt, host=self.host_id),
        )
        for directory in (ctx.restore, ctx.staging, ctx.control):
            directory.mkdir(parents=True)
        heartbeats = asyncio.create_task(self._heartbeat(ctx.progress, inp.heartbeat_interval_seconds))
        storage_connected = asyncio.create_task(_connect_storage(ctx))  # alongside the code and the restore
        try:
            await failpoints.reach(failpoints.before_restore(inp.attempt))
            if (failed := await self._unpack_code(ctx) or await self._restore(ctx)) is not None:
                return failed
            if inp.output_dir:  # there to write into, as on the laptop (where it is often left out of the code)
                (ctx.workdir / inp.output_dir).mkdir(parents=True, exist_ok=True)
            await storage_connected  # before the script: its first save, an emergency one maybe, finds it ready
            return await self._supervise(ctx)
        finally:
            heartbeats.cancel()
            storage_connected.cancel()

    async def _heartbeat(self, progress: AttemptProgress, interval: float) -> None:
        while True:
            activity.heartbeat(progress.model_copy())
            await asyncio.sleep(interval)

    @staticmethod
    def _failed(ctx: AttemptContext, cause: FailureCause, reason: str) -> AttemptResult:
        """An attempt that failed before its script could run: the run ends with `reason`, not an exit code."""
        ctx.log.error("attempt failed", cause=cause.value, reason=reason)
        return AttemptResult(outcome=AttemptOutcome.FAILED, start_step=ctx.progress.start_step,
                             durable_step=ctx.progress.durable_step, reason=reason, cause=cause)

    async def _unpack_code(self, ctx: AttemptContext) -> AttemptResult | None:
        """The run's code, as it was submitted, into the attempt's own directory: every file checked against the
        snapshot's digest before setup runs. A snapshot that fails the check fails the attempt; never other code."""
        ref = ctx.inp.code
        if ref is None:
            return None
        try:
            await asyncio.to_thread(restore_snapshot, ref, ctx.workdir)
        except WorkdirError as err:
            return self._failed(ctx, FailureCause.CODE, f"code snapshot {ref.short} cannot be used: {err}")
        ctx.log.info("code unpacked", snapshot=ref.short, files=ref.file_count, bytes=ref.total_bytes)
        return None

    async def _restore(self, ctx: AttemptContext) -> AttemptResult | None:
        """Put the attempt's checkpoint where the script finds it: the SDK's restore directory, or in zero-code
        mode the script's own checkpoint directory. A checkpoint that cannot be restored fails the attempt."""
        ref = ctx.inp.checkpoint
        if ref is None:
            return None
        try:
            if ctx.checkpoint_dir is not None:
                await asyncio.to_thread(restore_directory, ref, ctx.checkpoint_dir)
            else:
                manifest = await asyncio.to_thread(checkpoint.restore_checkpoint, ref, ctx.restore)
                ctx.restore_world_size = manifest.world_size
        except checkpoint.CheckpointError as err:
            return self._failed(ctx, FailureCause.RESTORE, f"restore of {ref.name} failed: {err}")
        ctx.log.info("checkpoint restored", step=ref.step)
        return None

    @staticmethod
    def _script_env(ctx: AttemptContext) -> dict[str, str]:
        inp = ctx.inp
        # The agent's Temporal connection (an API key, a client key) is not the script's: it never talks to Temporal.
        env = {name: value for name, value in os.environ.items() if not name.startswith("TEMPORAL_")}
        env |= (ctx.setup.env() if ctx.setup else {}) | inp.env  # the run's own PIP_CACHE_DIR, say, wins
        if ctx.checkpoint_dir is not None:  # zero-code mode: the script keeps its own checkpoints; the SDK is inactive
            contract = protocol.ScriptEnv(run_id=inp.run_id, attempt=inp.attempt,
                                          checkpoint_dir=str(ctx.checkpoint_dir))
        else:
            contract = protocol.ScriptEnv(
                run_id=inp.run_id, attempt=inp.attempt, staging_dir=ctx.staging, control_dir=ctx.control,
                restore_dir=ctx.restore if inp.checkpoint else None,
                restore_step=inp.checkpoint.step if inp.checkpoint else None, restore_world_size=ctx.restore_world_size,
                checkpoint_every=inp.checkpoint_every or "auto", checkpoint_min=inp.checkpoint_min,
                checkpoint_max=inp.checkpoint_max, mtbf_seconds=inp.mtbf_seconds,
                shortest_host_life_seconds=inp.shortest_host_life_seconds,
                host_since=inp.host_since.timestamp() if inp.host_since else None,
            )
        return protocol.without_contract_variables(env) | contract.to_environ() | gang_environ(inp)

    async def _supervise(self, ctx: AttemptContext) -> AttemptResult:
        """Start the script and watch it until it exits or a notice ends the attempt."""
        try:  # read here, on the host: only the references crossed Temporal
            secrets = await asyncio.to_thread(resolve_secrets, ctx.inp.env_secrets, handed_over())
        except SecretUnavailable as err:
            return self._failed(ctx, FailureCause.SECRET, str(err))
        notice_id = uuid.uuid4().hex
        if (early := await self.notices.poll()) is not None:
            # It came while the host was restoring: in place before the script starts, its first save check
            # sees it, however fast the script's steps are.
            self._forward_notice(ctx.control, early, notice_id)
        ctx.setup = await setup_commands.prepare(ctx.inp, self.host_dir / SETUP_CACHE_DIR, ctx.log)
        try:
            run = await self._start(ctx, secrets, notice_id)
        except OSError as err:
            return self._failed(ctx, FailureCause.COMMAND, f"cannot start {ctx.inp.command[0]!r} on the host "
                                                           f"({err.strerror}); fix: install it there or with --setup")
        try:
            reclaimed = await self._watch(ctx, run)
            ended = reclaimed if reclaimed is not None else await self._exited(ctx, run)
            if ctx.setup is None:
                return ended
            ctx.setup.observe(ctx.control, ctx.inp, ctx.log, store=False)  # a script that ended at once
            return ended.model_copy(update=ctx.setup.result_fields())
        except asyncio.CancelledError:
            await self._cancelled(ctx, run)
            if ctx.inp.gang is None:
                raise
            # A gang stopped because another node ended: what this host stored is part of the gang's result.
            return AttemptResult(outcome=AttemptOutcome.CANCELLED, start_step=ctx.progress.start_step,
                                 end_step=read_progress(ctx.control), durable_step=run.uploader.durable_step,
                                 reason="stopped with its gang")
        finally:
            run.uploads.cancel()
            if run.process.returncode is None and run.notice is None:
                # Cancelled: the script must not outlive its attempt.
                with contextlib.suppress(ProcessLookupError):
                    run.process.send_signal(signal.SIGKILL)
            if run.process.returncode is not None or run.notice is None:
                await run.drain_output()
            await run.shipper.finish()

    async def _start(self, ctx: AttemptContext, secrets: dict[str, str], notice_id: str) -> RunningScript:
        """Start the script with its output in the attempt's log (shipped to storage too), and the uploader."""
        inp = ctx.inp
        snapshots = None
        if ctx.checkpoint_dir is not None:
            snapshots = DirectorySnapshots(ctx.checkpoint_dir, ctx.staging, ctx.progress.start_step,
                                           restored=inp.checkpoint is not None)
        script_env = self._script_env(ctx) | secrets
        start = ctx.log_path.stat().st_size if ctx.log_path.exists() else 0
        # Masked on its way into the file, by a process of its own that outlives this agent: the raw log on
        # the host never holds a secret value, and a script the agent leaves behind does not die with it.
        output_read, output_write = os.pipe()
        masker = await _start_masker(ctx.log_path, secret_values(script_env, secrets.values()), output_read)
        try:
            command = protocol.expand_gang_variables(inp.command, gang_environ(inp))
            process = await asyncio.create_subprocess_exec(  # OSError: the command cannot start on this host
                *setup_commands.wrap(inp.setup, command, ctx.control),
                cwd=ctx.workdir,
                env=script_env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output_write,
                stderr=output_write,
            )
        finally:
            os.close(output_write)  # the masker ends when the script and its children have closed theirs
        ctx.log.info("script started", pid=process.pid, command=inp.command[0])
        shipper = LogShipper(inp.storage_url, inp.run_id, inp.attempt, ctx.log_path, start=start)
        output = asyncio.create_task(masker.wait())
        shipper.start(script_env, secrets.values())  # the output goes to storage too, so it outlives the host
        ctx.progress.phase = "setup" if ctx.setup else "running"
        uploader = Uploader(inp, ctx.staging, ctx.progress.durable_step)
        stop_uploads = asyncio.Event()
        return RunningScript(process=process, output=output, shipper=shipper, snapshots=snapshots,
                             uploader=uploader, stop_uploads=stop_uploads,
                             uploads=asyncio.create_task(uploader.run(stop_uploads)), notice_id=notice_id)

    async def _watch(self, ctx: AttemptContext, run: RunningScript) -> AttemptResult | None:
        """Poll until the script exits (None) or a notice's emergency save is stored or too late (reclaimed)."""
        while True:
            await self._track_progress(ctx, run)
            if run.process.returncode is not None:
                return None
            if run.notice is None and (notice := await self.notices.poll()):
                run.notice = notice
                self._forward_notice(ctx.control, notice, run.notice_id)
                ctx.progress.notice, ctx.progress.phase = notice, "emergency-save"
                run.uploader.poll_seconds = NOTICE_POLL_SECONDS
                ctx.log.warning("reclaim notice", deadline=notice.deadline.isoformat())
            if run.notice is not None:
                emergency_save = emergency_save_outcome(await run.emergency_save_stored(), run.notice, time.time())
                if emergency_save is not None:
                    return self._reclaimed(ctx, run, run.notice, emergency_save)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(run.process.wait(), NOTICE_POLL_SECONDS if run.notice else POLL_SECONDS)

    @staticmethod
    async def _track_progress(ctx: AttemptContext, run: RunningScript) -> None:
        """The script's step, its checkpoint interval and the durable step into the heartbeat; in zero-code mode,
        a snapshot of the directory once it settled."""
        progress = ctx.progress
        if ctx.setup is not None and ctx.setup.observe(ctx.control, ctx.inp, ctx.log) and progress.phase == "setup":
            progress.phase = "running"
        step = read_progress(ctx.control)
        if step is not None:
            progress.step = step
            progress.checkpoint_interval = read_interval(ctx.control)
            ctx.saw_step(step)
        if run.snapshots is not None and run.snapshots.covered_notice is None:
            # After a notice: as soon as the directory holds still, and tagged with the notice.
            settle = POLL_SECONDS if run.notice is not None else SETTLE_SECONDS
            notice_id = run.notice_id if run.notice else None
            await asyncio.to_thread(run.snapshots.snapshot_if_settled, settle, notice_id)
            progress.step = run.snapshots.step
        progress.durable_step = run.uploader.durable_step
        # A storage outage delays saves, it does not end the attempt: `vl status` and the UI say so meanwhile.
        progress.waiting_on = f"storage: {run.uploader.last_error}" if run.uploader.failures else ""

    @staticmethod
    def _reclaimed(ctx: AttemptContext, run: RunningScript, notice: Notice, emergency_save: str) -> AttemptResult:
        ctx.progress.durable_step = run.uploader.durable_step
        step = read_progress(ctx.control)
        return AttemptResult(
            outcome=AttemptOutcome.RECLAIMED,
            start_step=ctx.progress.start_step,
            end_step=step if step is not None else ctx.progress.step,
            durable_step=run.uploader.durable_step,
            notice=notice,
            emergency_save=emergency_save,
            **ctx.speed_sample(),
            reason="reclaim notice" + ("" if emergency_save == "saved" else "; emergency save missed the deadline"),
        )

    @staticmethod
    async def _exited(ctx: AttemptContext, run: RunningScript) -> AttemptResult:
        """The script exited: store what it left, then report how it ended."""
        ctx.progress.phase = "uploading"
        if run.snapshots is not None and run.snapshots.covered_notice is None:
            await asyncio.to_thread(run.snapshots.snapshot_if_settled, 0.0)  # the script is done writing
            ctx.progress.step = run.snapshots.step
        run.stop_uploads.set()
        await asyncio.shield(run.uploads)  # a cancel meanwhile flushes them (`_cancelled`), it does not drop them
        await run.drain_output()
        exit_code = run.process.returncode
        ctx.log.info("script exited", exit_code=exit_code)
        step = read_progress(ctx.control)
        ended = AttemptResult(outcome=AttemptOutcome.COMPLETED, start_step=ctx.progress.start_step,
                              end_step=step if step is not None else ctx.progress.step,
                              durable_step=run.uploader.durable_step, exit_code=exit_code, **ctx.speed_sample())
        if exit_code != 0:
            cause, reason = setup_commands.failure(ctx.control) or (
                FailureCause.SCRIPT, f"the script exited with code {exit_code}")
            # The tail goes into history: masked like the stored log, so a secret printed is not kept.
            log_tail = mask(tail(ctx.log_path).encode(), run.shipper.secrets).decode(errors="replace")
            return ended.model_copy(update={"outcome": AttemptOutcome.FAILED, "reason": reason, "cause": cause,
                                            "log_tail": log_tail})
        if not ctx.inp.output_dir:
            return ended
        try:
            outputs, note = await _store_outputs(ctx)
        except (WorkdirError, OSError) as err:  # the training is done; `vl resume` redoes only its end
            return ended.model_copy(update={"outcome": AttemptOutcome.FAILED, "cause": FailureCause.OUTPUTS,
                                            "reason": f"the script succeeded, but its outputs were not stored: {err}"})
        return ended.model_copy(update={"outputs": outputs, "reason": note})

    @staticmethod
    async def _cancelled(ctx: AttemptContext, run: RunningScript) -> None:
        """The run was cancelled: stop the script (SIGTERM, then SIGKILL after a grace), then store what it wrote
        to its output directory so far, best effort and bounded: a cancel must not lose the outputs it could keep."""
        if run.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                run.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(run.process.wait(), CANCEL_GRACE_SECONDS)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    run.process.send_signal(signal.SIGKILL)
                await run.process.wait()
        if ctx.inp.gang is not None:
            await _flush_uploads(ctx, run)
        if not ctx.inp.output_dir:
            return
        try:
            _, note = await asyncio.wait_for(_store_outputs(ctx), OUTPUTS_ON_CANCEL_SECONDS)
        except (WorkdirError, OSError, TimeoutError) as err:
            ctx.log.warning("outputs not stored on cancel", error=str(err) or type(err).__name__)
            return
        if note:
            ctx.log.info("outputs on cancel", note=note)

    @staticmethod
    def _forward_notice(control: Path, notice: Notice, notice_id: str) -> None:
        protocol.write_notice(control, protocol.NoticeDocument(id=notice_id, deadline=notice.deadline.timestamp(),
                                                               kind=notice.kind))


async def _connect_storage(ctx: AttemptContext) -> None:
    """Open the storage client before the script starts (checkpoint.connect says why), within a bound: storage
    that does not answer now is no reason to hold the script, whose saves wait and are retried as ever."""
    began = time.monotonic()
    try:
        await asyncio.wait_for(asyncio.to_thread(checkpoint.connect, ctx.inp.storage_url), STORAGE_CONNECT_SECONDS)
    except Exception as err:  # noqa: BLE001 - any backend's error, or the bound: the uploader copes later
        ctx.log.warning("storage not reachable before the script started; its saves will be retried",
                        error=str(err) or type(err).__name__)
        return
    ctx.log.info("storage connected", seconds=round(time.monotonic() - began, 3))


async def _flush_uploads(ctx: AttemptContext, run: RunningScript) -> None:
    """A gang stopped: store what the script staged (bounded, for a storage outage). The workflow stops node 0,
    which commits checkpoints, only once every other host's attempt is over: every part that will ever come is in,
    so node 0 commits the saves that are whole and waits for no other."""
    run.uploader.stop_waiting_for_nodes.set()
    if run.uploads.done():
        run.uploads = asyncio.create_task(run.uploader.run(run.stop_uploads))
    run.stop_uploads.set()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(run.uploads), OUTPUTS_ON_CANCEL_SECONDS)
    ctx.log.info("uploads flushed after the gang stopped", durable_step=run.uploader.durable_step)


async def _store_outputs(ctx: AttemptContext) -> tuple[SnapshotRef | None, str]:
    """The output directory into the run's storage: (its snapshot, a note for the attempt's record)."""
    directory = ctx.workdir / ctx.inp.output_dir
    if not directory.is_dir():
        return None, f"no outputs: the output directory {ctx.inp.output_dir} is gone"
    ref, skipped = await asyncio.to_thread(store_outputs, directory, ctx.inp.storage_url, ctx.inp.run_id)
    ctx.log.info("outputs stored", snapshot=ref.short, files=ref.file_count, bytes=ref.total_bytes)
    return ref, f"outputs stored without {', '.join(skipped)}" if skipped else ""
