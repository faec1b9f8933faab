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
import os
import shutil
import signal
import time
import uuid
from pathlib import Path

import structlog
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities import setup_commands
from activities.attempt_logs import LogShipper, mask
from activities.env_secrets import SecretUnavailable, resolve_secrets
from activities.notices import NoticeSource
from activities.snapshots import SETTLE_SECONDS, DirectorySnapshots, restore_directory
from vaultlayer import checkpoint
from vaultlayer.models import AttemptInput, AttemptOutcome, AttemptProgress, AttemptResult, Notice

log = structlog.get_logger(__name__)

POLL_SECONDS = 0.2
# Report a notice as reclaimed this long before its deadline even when no emergency save came.
DEADLINE_MARGIN_SECONDS = 3.0
# Waits between tries of a failing upload: a storage outage delays checkpoints, it never loses them.
UPLOAD_BACKOFF_SECONDS = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)


class StagedSave:
    def __init__(self, directory: Path, meta: dict) -> None:
        self.directory = directory
        self.step = int(meta["step"])
        self.emergency = bool(meta.get("emergency"))
        self.notice_id = meta.get("notice_id")


def staged_saves(staging: Path) -> list[StagedSave]:
    """Complete saves the SDK committed (renamed out of `.tmp-*`), oldest first."""
    saves = []
    for entry in staging.iterdir():
        if entry.name.startswith(".tmp-") or not entry.is_dir():
            continue
        meta_file = entry / "vl-save.json"
        if meta_file.exists():
            saves.append(StagedSave(entry, json.loads(meta_file.read_text())))
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
        self.busy = False

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
                    await asyncio.wait_for(stop.wait(), POLL_SECONDS)

    def idle(self) -> bool:
        """Nothing in flight and nothing staged."""
        return not self.busy and not staged_saves(self.staging)

    async def upload(self, save: StagedSave) -> bool:
        """Whether the save is done with (stored, or older than what is stored); False: try again later."""
        if self.durable_step is not None and save.step <= self.durable_step and not save.emergency:
            shutil.rmtree(save.directory, ignore_errors=True)  # older than what is stored
            return True
        self.busy = True
        try:
            await asyncio.to_thread(
                checkpoint.upload_checkpoint,
                save.directory,
                self.inp.storage_url,
                self.inp.run_id,
                self.inp.attempt,
                save.step,
            )
        except checkpoint.CheckpointError as err:  # the save itself is unusable: no retry can store it
            log.error("checkpoint cannot be stored; dropped", step=save.step, error=str(err))
            shutil.rmtree(save.directory, ignore_errors=True)
            return True
        except Exception as err:  # noqa: BLE001 - storage errors (retried inside already): retry the save
            self.failures += 1
            log.warning("checkpoint upload failed; retrying", step=save.step, failures=self.failures,
                        error=str(err))
            return False
        finally:
            self.busy = False
        self.failures = 0
        self.durable_step = max(save.step, self.durable_step or 0)
        if save.emergency and save.notice_id:
            self.emergency_stored.add(save.notice_id)
        shutil.rmtree(save.directory, ignore_errors=True)
        log.info("checkpoint stored", step=save.step, attempt=self.inp.attempt)
        return True


def tail(path: Path, max_bytes: int = 2000) -> str:
    with open(path, "rb") as file:
        file.seek(max(0, path.stat().st_size - max_bytes))
        return file.read().decode(errors="replace")


def read_progress(control: Path) -> int | None:
    try:
        return int(json.loads((control / "progress.json").read_text())["step"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError, ValueError):
        return None


def read_interval(control: Path) -> str:
    """The SDK's checkpoint interval and why, as `vl status` shows it."""
    try:
        progress = json.loads((control / "progress.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return ""
    seconds, why = progress.get("interval_seconds"), progress.get("interval_reason") or ""
    return f"every {seconds:.0f} s: {why}" if seconds else why


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

    @activity.defn(name="run_attempt")
    async def run_attempt(self, inp: AttemptInput) -> AttemptResult:
        if (reason := self._foreign(inp)) is not None:
            log.error("refused an attempt that is not this host's", reason=reason, host=self.host_id)
            raise ApplicationError(f"host agent {self.host_id} of run {self.run_id} refused the attempt: {reason}",
                                   type="ForeignAttempt", non_retryable=True)
        bound = log.bind(run_id=inp.run_id, attempt=inp.attempt, host=self.host_id)
        attempt_dir = self.host_dir / f"a{inp.attempt}"
        shutil.rmtree(attempt_dir, ignore_errors=True)
        restore, staging, control = (attempt_dir / name for name in ("restore", "staging", "control"))
        for directory in (restore, staging, control):
            directory.mkdir(parents=True)

        start_step = inp.checkpoint.step if inp.checkpoint else 0
        progress = AttemptProgress(phase="restoring", start_step=start_step, step=start_step,
                                   durable_step=inp.checkpoint.step if inp.checkpoint else None)
        heartbeats = asyncio.create_task(self._heartbeat(progress, inp.heartbeat_interval_seconds))
        try:
            if inp.checkpoint:
                try:
                    if inp.checkpoint_dir:
                        await asyncio.to_thread(restore_directory, inp.checkpoint, Path(inp.checkpoint_dir))
                    else:
                        await asyncio.to_thread(checkpoint.restore_checkpoint, inp.checkpoint, restore)
                except checkpoint.CheckpointError as err:
                    raise ApplicationError(f"restore of {inp.checkpoint.name} failed: {err}",
                                           type="RestoreFailed", non_retryable=True) from err
                bound.info("checkpoint restored", step=inp.checkpoint.step)
            return await self._supervise(inp, progress, restore, staging, control, bound)
        finally:
            heartbeats.cancel()

    async def _heartbeat(self, progress: AttemptProgress, interval: float) -> None:
        while True:
            activity.heartbeat(progress.model_copy())
            await asyncio.sleep(interval)

    def _script_env(self, inp: AttemptInput, restore: Path, staging: Path, control: Path) -> dict:
        # The agent's Temporal connection (an API key, a client key) is not the script's: it never talks to Temporal.
        env = {name: value for name, value in os.environ.items() if not name.startswith("TEMPORAL_")} | inp.env
        for name in [k for k in env if k.startswith("VL_")]:
            del env[name]
        env.update(VL_RUN_ID=inp.run_id, VL_ATTEMPT=str(inp.attempt))
        if inp.checkpoint_dir:  # zero-code mode: the script keeps its own checkpoints; the SDK stays inactive
            env["VL_CHECKPOINT_DIR"] = inp.checkpoint_dir
            return env
        env.update(VL_STAGING_DIR=str(staging), VL_CONTROL_DIR=str(control))
        if inp.checkpoint:
            env.update(VL_RESTORE_DIR=str(restore), VL_RESTORE_STEP=str(inp.checkpoint.step))
        env.update(VL_CHECKPOINT_EVERY=inp.checkpoint_every or "auto", VL_CHECKPOINT_MIN=inp.checkpoint_min,
                   VL_CHECKPOINT_MAX=inp.checkpoint_max)
        if inp.mtbf_seconds:
            env["VL_MTBF_SECONDS"] = str(inp.mtbf_seconds)
        return env

    async def _supervise(self, inp, progress, restore, staging, control, bound) -> AttemptResult:
        snapshots = None
        if inp.checkpoint_dir:
            snapshots = DirectorySnapshots(Path(inp.checkpoint_dir), staging, progress.start_step,
                                           restored=inp.checkpoint is not None)
        try:  # read here, on the host: only the references crossed Temporal
            secrets = await asyncio.to_thread(resolve_secrets, inp.env_secrets)
        except SecretUnavailable as err:
            bound.error("secret env unavailable", error=str(err))
            return AttemptResult(outcome=AttemptOutcome.FAILED, start_step=progress.start_step,
                                 durable_step=progress.durable_step, reason=str(err))
        notice_id = uuid.uuid4().hex
        if (early := await self.notices.poll()) is not None:
            # It came while the host was restoring: in place before the script starts, its first save check
            # sees it, however fast the script's steps are.
            self._forward_notice(control, early, notice_id)
        log_file = open(self.host_dir / f"a{inp.attempt}.log", "ab")  # noqa: SIM115 - closed below
        shipper = LogShipper(inp.storage_url, inp.run_id, inp.attempt, Path(log_file.name), start=log_file.tell())
        try:
            process = await asyncio.create_subprocess_exec(
                *setup_commands.wrap(inp.setup, inp.command, control / "setup-failed"),
                cwd=inp.workdir,
                env=(script_env := self._script_env(inp, restore, staging, control) | secrets),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
            )
        except OSError as err:
            log_file.close()
            raise ApplicationError(f"cannot start {inp.command[0]!r}: {err}", type="CommandFailed",
                                   non_retryable=True) from err
        bound.info("script started", pid=process.pid, command=inp.command[0])
        shipper.start(script_env, secrets.values())  # the output goes to storage too, so it outlives the host
        progress.phase = "running"
        uploader = Uploader(inp, staging, progress.durable_step)
        stop_uploads = asyncio.Event()
        uploads = asyncio.create_task(uploader.run(stop_uploads))
        notice: Notice | None = None
        try:
            while True:
                step = read_progress(control)
                if step is not None:
                    progress.step = step
                    progress.checkpoint_interval = read_interval(control)
                if snapshots is not None and snapshots.covered_notice is None:
                    # After a notice: as soon as the directory holds still, and tagged with the notice.
                    settle = POLL_SECONDS if notice is not None else SETTLE_SECONDS
                    await asyncio.to_thread(snapshots.snapshot_if_settled, settle, notice_id if notice else None)
                    progress.step = snapshots.step
                progress.durable_step = uploader.durable_step
                if process.returncode is not None:
                    break
                if notice is None and (notice := await self.notices.poll()):
                    self._forward_notice(control, notice, notice_id)
                    progress.notice, progress.phase = notice, "emergency-save"
                    bound.warning("reclaim notice", deadline=notice.deadline.isoformat())
                if notice is not None:
                    if snapshots is None:
                        stored = notice_id in uploader.emergency_stored
                    else:  # the directory as of the notice, and every snapshot before it, is in storage
                        stored = snapshots.covered_notice == notice_id and uploader.idle()
                    too_late = time.time() > notice.deadline.timestamp() - DEADLINE_MARGIN_SECONDS
                    if stored or too_late:
                        progress.durable_step = uploader.durable_step
                        step = read_progress(control)
                        return AttemptResult(
                            outcome=AttemptOutcome.RECLAIMED,
                            start_step=progress.start_step,
                            end_step=step if step is not None else progress.step,
                            durable_step=uploader.durable_step,
                            notice=notice,
                            emergency_save="saved" if stored else "missed",
                            reason="reclaim notice" + ("" if stored else "; emergency save missed the deadline"),
                        )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(process.wait(), POLL_SECONDS)
            progress.phase = "uploading"
            if snapshots is not None and snapshots.covered_notice is None:
                await asyncio.to_thread(snapshots.snapshot_if_settled, 0.0)  # the script is done writing
                progress.step = snapshots.step
            stop_uploads.set()
            await uploads
            exit_code = process.returncode
            bound.info("script exited", exit_code=exit_code)
            step = read_progress(control)
            return AttemptResult(
                outcome=AttemptOutcome.COMPLETED if exit_code == 0 else AttemptOutcome.FAILED,
                start_step=progress.start_step,
                end_step=step if step is not None else progress.step,
                durable_step=uploader.durable_step,
                exit_code=exit_code,
                reason="" if exit_code == 0 else (setup_commands.failure(control / "setup-failed")
                                                  or f"the script exited with code {exit_code}"),
                # The tail goes into history: masked like the stored log, so a secret printed is not kept.
                log_tail="" if exit_code == 0 else mask(tail(self.host_dir / f"a{inp.attempt}.log").encode(),
                                                        shipper.secrets).decode(errors="replace"),
            )
        finally:
            uploads.cancel()
            if process.returncode is None and notice is None:
                # Cancelled: the script must not outlive its attempt.
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGKILL)
            log_file.close()
            await shipper.finish()

    @staticmethod
    def _forward_notice(control: Path, notice: Notice, notice_id: str) -> None:
        body = {"id": notice_id, "deadline": notice.deadline.timestamp(), "kind": notice.kind}
        tmp = control / "notice.json.tmp"
        tmp.write_text(json.dumps(body))
        tmp.replace(control / "notice.json")
