"""The TrainingRun workflow: a loop over attempts until the script finishes or a limit stops it.

Thin and deterministic: decisions come from `workflows.policy`; everything that touches a host, a
cloud or storage is an activity. The whole run state lives in one `RunStatus`, carried over by
continue-as-new when the server suggests it.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    FailureError,
    TimeoutError,
    TimeoutType,
    is_cancelled_exception,
)

with workflow.unsafe.imports_passed_through():
    from activities.control import ControlActivities
    from vaultlayer.models import (
        AttemptInput,
        AttemptOutcome,
        AttemptProgress,
        AttemptRecord,
        AttemptResult,
        CheckpointRef,
        Host,
        HostState,
        InjectReclaimInput,
        Placement,
        ProvisionInput,
        ReapInput,
        ReclaimAck,
        ReclaimRequest,
        RunInput,
        RunState,
        RunStatus,
        VerifyInput,
    )
    from workflows import policy

WORKFLOW_NAME = "TrainingRun"
CONTROL_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30),
                            maximum_attempts=10)


@workflow.defn(name=WORKFLOW_NAME)
class TrainingRun:
    def __init__(self) -> None:
        self.status: RunStatus | None = None
        self.spec = None
        self.injections: list[asyncio.Task] = []

    @workflow.query(name="status")
    def get_status(self) -> RunStatus:
        return self.status

    @workflow.update(name="reclaim")
    async def reclaim(self, request: ReclaimRequest) -> ReclaimAck:
        """Operator command (`vl reclaim RUN`): the provider takes the current host back now."""
        host = self.status.current_host
        self._inject(host, request.with_notice)
        return ReclaimAck(host=host.host_id)

    @reclaim.validator
    def validate_reclaim(self, request: ReclaimRequest) -> None:
        if self.status is None or self.status.current_host is None:
            state = self.status.state.value if self.status else "starting"
            raise ApplicationError(f"the run has no host to reclaim right now (state: {state})",
                                   type="NoHost", non_retryable=True)

    @workflow.run
    async def run(self, inp: RunInput) -> RunStatus:
        spec = self.spec = inp.spec
        status = self.status = inp.carried or RunStatus(run_id=spec.run_id, started_at=workflow.now())
        try:
            while True:
                decision = policy.next_placement(spec, status, workflow.now())
                if isinstance(decision, policy.Stop):
                    status.state, status.stop_reason = decision.state, decision.reason
                    status.exit_code = decision.exit_code
                    break
                if decision.delay_seconds:
                    await workflow.sleep(decision.delay_seconds)
                await self._attempt(decision.placement)
                if workflow.info().is_continue_as_new_suggested():
                    await workflow.wait_condition(workflow.all_handlers_finished)
                    status.continued_as_new += 1
                    workflow.continue_as_new(RunInput(spec=spec, carried=status))
        except asyncio.CancelledError:
            status.state, status.stop_reason = RunState.CANCELLED, "cancelled by request"
            await self._finish()
            raise
        except FailureError as err:
            if is_cancelled_exception(err):
                status.state, status.stop_reason = RunState.CANCELLED, "cancelled by request"
            else:
                # An activity that exhausted its retries: fail the run, but leave no host behind.
                status.state, status.stop_reason = RunState.FAILED, f"control plane error: {err}"
            await self._finish()
            raise
        await self._finish()
        if status.state == RunState.FAILED:
            raise ApplicationError(status.stop_reason, status, type="RunFailed", non_retryable=True)
        return status

    async def _finish(self) -> None:
        """Whatever the ending, no host of this run outlives it."""
        self.status.current_host = None
        self.status.ended_at = workflow.now()
        providers = sorted({pool.provider for pool in self.spec.pools})
        await workflow.execute_activity_method(
            ControlActivities.reap_run, ReapInput(run_id=self.spec.run_id, providers=providers),
            start_to_close_timeout=timedelta(minutes=5), retry_policy=CONTROL_RETRY,
        )

    async def _choose_checkpoint(self) -> CheckpointRef | None:
        status = self.status
        result = await workflow.execute_activity_method(
            ControlActivities.verify_checkpoint,
            VerifyInput(run_id=self.spec.run_id, storage_url=self.spec.storage_url, fences=status.fences),
            start_to_close_timeout=timedelta(minutes=30), heartbeat_timeout=None, retry_policy=CONTROL_RETRY,
        )
        known = {bad.name for bad in status.bad_checkpoints}
        status.bad_checkpoints += [bad for bad in result.rejected if bad.name not in known]
        return result.chosen

    async def _attempt(self, placement: Placement) -> None:
        spec, status = self.spec, self.status
        checkpoint = await self._choose_checkpoint()
        record = AttemptRecord(
            attempt=placement.attempt, pool=placement.pool.key,
            start_step=checkpoint.step if checkpoint else 0, started_at=workflow.now(),
        )
        self._account_previous_loss(record.start_step)
        status.attempts.append(record)
        status.state = RunState.PROVISIONING
        provisioned = await workflow.execute_activity_method(
            ControlActivities.provision, ProvisionInput(run_id=spec.run_id, placement=placement,
                                                        notice_seconds=spec.notice_seconds),
            start_to_close_timeout=timedelta(minutes=15), retry_policy=CONTROL_RETRY,
        )
        if provisioned.host is None:
            self._close(record, AttemptResult(outcome=AttemptOutcome.REFUSED,
                                              reason=f"{provisioned.refusal}: {provisioned.message}"))
            return
        host = provisioned.host
        record.host, status.current_host, status.state = host.host_id, host, RunState.RUNNING
        try:
            result = await self._run_on_host(host, record, checkpoint)
        finally:
            for task in self.injections:
                task.cancel()
            self.injections = []
            status.current_host = None
            await workflow.execute_activity_method(
                ControlActivities.release, host, start_to_close_timeout=timedelta(minutes=5),
                retry_policy=CONTROL_RETRY,
            )
        self._close(record, result)

    async def _run_on_host(self, host: Host, record: AttemptRecord,
                           checkpoint: CheckpointRef | None) -> AttemptResult:
        spec = self.spec
        attempt = workflow.start_activity(
            "run_attempt",
            AttemptInput(
                run_id=spec.run_id, attempt=record.attempt, host=host, command=spec.command,
                workdir=spec.workdir, env=spec.env, storage_url=spec.storage_url,
                checkpoint=checkpoint, checkpoint_every=spec.checkpoint_every,
                heartbeat_interval_seconds=min(1.0, spec.heartbeat_timeout_seconds / 4),
            ),
            result_type=AttemptResult,
            task_queue=host.task_queue,
            schedule_to_start_timeout=timedelta(seconds=spec.start_timeout_seconds),
            start_to_close_timeout=timedelta(days=30),
            heartbeat_timeout=timedelta(seconds=spec.heartbeat_timeout_seconds),
            retry_policy=RetryPolicy(maximum_attempts=1),
        )
        if spec.reclaim_every_seconds:
            self.injections.append(asyncio.create_task(self._reclaim_on_schedule(host)))
        try:
            return await attempt
        except ActivityError as err:
            if is_cancelled_exception(err):
                raise
            return await self._diagnose(host, record, err)

    async def _reclaim_on_schedule(self, host: Host) -> None:
        await workflow.sleep(self.spec.reclaim_every_seconds)
        self._inject(host, with_notice=True)

    def _inject(self, host: Host, with_notice: bool) -> None:
        self.injections.append(asyncio.create_task(self._reclaim_host(host, with_notice)))

    async def _reclaim_host(self, host: Host, with_notice: bool) -> None:
        try:
            await workflow.execute_activity_method(
                ControlActivities.inject_reclaim,
                InjectReclaimInput(host=host, notice_seconds=self.spec.notice_seconds, with_notice=with_notice),
                start_to_close_timeout=timedelta(seconds=self.spec.notice_seconds + 60),
                heartbeat_timeout=timedelta(seconds=30), retry_policy=CONTROL_RETRY,
            )
        except ActivityError as err:
            if not is_cancelled_exception(err):  # cancelled: the attempt ended first, nothing to do
                workflow.logger.warning("reclaim injection failed: %s", err)

    async def _diagnose(self, host: Host, record: AttemptRecord, err: ActivityError) -> AttemptResult:
        """Heartbeats stopped or the agent failed: ask the provider whether the host was taken."""
        cause = err.cause
        progress = AttemptProgress(start_step=record.start_step)
        if isinstance(cause, TimeoutError) and cause.last_heartbeat_details:
            progress = AttemptProgress.model_validate(cause.last_heartbeat_details[0])
        base = dict(start_step=record.start_step, end_step=progress.step, durable_step=progress.durable_step)
        if isinstance(cause, TimeoutError) and cause.type == TimeoutType.SCHEDULE_TO_START:
            return AttemptResult(outcome=AttemptOutcome.HOST_FAULT, reason="the host agent never started", **base)
        if not isinstance(cause, TimeoutError):
            return AttemptResult(outcome=AttemptOutcome.HOST_FAULT,
                                 reason=f"the host agent failed: {cause.message if cause else err}", **base)
        described = await workflow.execute_activity_method(
            ControlActivities.describe_host, host, start_to_close_timeout=timedelta(minutes=2),
            retry_policy=CONTROL_RETRY,
        )
        if described.state == HostState.GONE:
            return AttemptResult(outcome=AttemptOutcome.RECLAIMED,
                                 reason=f"heartbeats stopped; host gone ({described.reason})", **base)
        return AttemptResult(outcome=AttemptOutcome.HOST_FAULT,
                             reason=f"heartbeats stopped while the host is {described.state.value}", **base)

    def _close(self, record: AttemptRecord, result: AttemptResult) -> None:
        status = self.status
        record.outcome, record.reason = result.outcome, result.reason
        record.end_step, record.durable_step = result.end_step, result.durable_step
        record.exit_code, record.ended_at = result.exit_code, workflow.now()
        record.log_tail = result.log_tail
        if result.durable_step is not None:
            status.durable_step = max(status.durable_step or 0, result.durable_step)
        # Fence: nothing this attempt publishes from now on can be newer than what we accepted.
        status.fences[record.attempt] = result.durable_step if result.durable_step is not None else -1
        if result.outcome == AttemptOutcome.RECLAIMED:
            status.reclaims += 1
        elif result.outcome == AttemptOutcome.HOST_FAULT:
            status.host_faults += 1
            if record.host:
                status.excluded_hosts.append(record.host)
        elif result.outcome == AttemptOutcome.FAILED:
            status.script_failures += 1

    def _account_previous_loss(self, resume_step: int) -> None:
        """Steps the previous attempt computed beyond the step this attempt resumes from are lost."""
        previous = next((a for a in reversed(self.status.attempts) if a.end_step is not None), None)
        if previous is not None and previous.outcome != AttemptOutcome.COMPLETED:
            previous.steps_lost = max(0, previous.end_step - resume_step)
            self.status.steps_lost = sum(a.steps_lost for a in self.status.attempts)
