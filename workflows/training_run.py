"""The TrainingRun workflow: a loop over attempts until the script finishes or a limit stops it.

Thin and deterministic: decisions come from `workflows.policy`, and what an ended attempt leaves in the
status from `workflows.accounting`; everything that touches a host, a cloud or storage is an activity.
The whole run state lives in one `RunStatus`, carried over by continue-as-new when the server suggests it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.workflow import ActivityCancellationType
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
    from pydantic import ValidationError

    from activities.control import ControlActivities
    from vaultlayer.models import (
        AttemptInput,
        AttemptOutcome,
        AttemptProgress,
        AttemptRecord,
        AttemptResult,
        CheckpointRef,
        GangRole,
        Host,
        HostState,
        InjectReclaimInput,
        Placement,
        Pool,
        ProvisionInput,
        ProvisionResult,
        PruneInput,
        QuotePricesInput,
        ReapInput,
        ReclaimAck,
        ReclaimRequest,
        RunInput,
        RunSpec,
        RunState,
        RunStatus,
        VerifyInput,
    )
    from vaultlayer import ui
    from vaultlayer.interval import estimate_mtbf_seconds, shortest_life_without_a_save
    from workflows import accounting, gang, policy

WORKFLOW_NAME = "TrainingRun"
CONTROL_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30),
                            maximum_attempts=10)
# Retention that fails only leaves storage fuller than it should be: retry briefly, never hold the run up.
PRUNE_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=10),
                          maximum_attempts=3)
RETENTION_PATCH = "checkpoint-retention"
# Control activities heartbeat while they work (activities/heartbeats.py): a task lost on its way to the
# worker, or a worker that died holding it, is retried after this instead of the whole start-to-close timeout.
CONTROL_HEARTBEAT_TIMEOUT = timedelta(minutes=1)
SEARCH_ATTRIBUTES_PATCH = "search-attributes"
# A cancel lets a provision in flight return first, so that the reap that follows finds the host it made.
PROVISION_CANCEL_PATCH = "provision-finishes-before-cancel"
NO_PROGRESS_PATCH = "max-attempts-without-progress"
# A cancel asks the attempt to stop and waits for it (bounded by its heartbeat timeout), so the agent can store
# the script's outputs before the host is released.
OUTPUTS_ON_CANCEL_PATCH = "attempt-stops-before-cancel"
# An attempt whose agent never started is diagnosed like one whose heartbeats stopped: the provider says whether
# the host was taken (a reclaim) or is still there (a fault of its own).
UNSTARTED_DIAGNOSIS_PATCH = "diagnose-unstarted-agent"
# A host the run moved off is waited for (its notice, its heartbeat timeout, this grace) and no longer: an agent
# that never started would otherwise hold the run until its start timeout.
VACATE_BOUND_PATCH = "vacated-host-bounded-wait"
VACATE_GRACE_SECONDS = 15.0
# Before each placement the pools' prices now are quoted (`quote_prices`) and kept in the status.
CURRENT_PRICES_PATCH = "current-prices"
# While an attempt may still be waiting for its agent (its start timeout), the provider is asked about the host
# every START_WATCH_SECONDS: a host taken during start-up (a spot VM preempted while it boots) has no agent to
# see a notice or miss a heartbeat, and would otherwise hold the run for the whole start timeout.
START_WATCH_PATCH = "watch-host-during-start"
START_WATCH_SECONDS = 30.0
# The reap at a run's end is shielded from a cancel: a cancel still to be delivered (one that was waiting when a
# continued run took its first task) would otherwise cancel the reap before it is scheduled, leaving the run's
# hosts and its handed-over secrets behind. Found by the chaos soak (seed 3, docs/faults.md).
REAP_SHIELDED_PATCH = "reap-survives-cancel"
# A restore that failed is tried once more, on a checkpoint verified again (policy.restore_may_be_retried);
# asked only after such a failure, so a history recorded before it replays its stop.
RESTORE_RETRY_PATCH = "restore-retried-once"


def control_options(start_to_close: timedelta, retry: RetryPolicy = CONTROL_RETRY) -> dict[str, Any]:
    """The options of a kind of control activity: how long it may take and how it is retried. Every one
    heartbeats, so a task lost on its way is retried after CONTROL_HEARTBEAT_TIMEOUT, not its whole timeout."""
    return {"start_to_close_timeout": start_to_close, "heartbeat_timeout": CONTROL_HEARTBEAT_TIMEOUT,
            "retry_policy": retry}


RELEASE = control_options(timedelta(minutes=5))  # release a host; reap what a run left
DESCRIBE = control_options(timedelta(minutes=2))  # ask the provider about a host
PROVISION = control_options(timedelta(minutes=15))  # capacity can take a while to come up
VERIFY = control_options(timedelta(minutes=30))  # read the manifests and files of the run's checkpoints
PRUNE = control_options(timedelta(minutes=30), retry=PRUNE_RETRY)  # remove checkpoints; never holds the run up
# Price quotes: short, tried twice, and never more than that: a placement goes on with the quotes it has.
QUOTE = {"start_to_close_timeout": timedelta(seconds=60),
         "retry_policy": RetryPolicy(initial_interval=timedelta(seconds=1), maximum_attempts=2)}


def reclaims_in(spec: RunSpec, pool: Pool) -> bool:
    """Whether `--reclaim-every` applies to a host of this pool (`--reclaim-in` narrows it to places)."""
    return not spec.reclaim_only_in or bool({pool.zone, pool.region} & set(spec.reclaim_only_in))


@workflow.defn(name=WORKFLOW_NAME)
class TrainingRun:
    def __init__(self) -> None:
        self.status: RunStatus | None = None
        self.spec = None
        self.injections: list[asyncio.Task] = []
        # Hosts provisioned for a move, not yet used.
        self.moved: tuple[AttemptRecord, ProvisionResult] | None = None

    @workflow.query(name="status")
    def get_status(self) -> RunStatus:
        return self.status

    @workflow.query(name="spec")
    def get_spec(self) -> RunSpec:
        """What the run was asked to do; `vl checkpoints` reads its storage URL here."""
        return self.spec

    @workflow.update(name="reclaim")
    async def reclaim(self, request: ReclaimRequest) -> ReclaimAck:
        """Operator command (`vl reclaim RUN [--node K]`): the provider takes the current host (of a gang, node K)
        back now."""
        host = (self.status.current_hosts or [self.status.current_host])[request.node]
        self._inject(host, request.with_notice)
        return ReclaimAck(host=host.host_id)

    @reclaim.validator
    def validate_reclaim(self, request: ReclaimRequest) -> None:
        if self.status is None or self.status.current_host is None:
            state = self.status.state.value if self.status else "starting"
            raise ApplicationError(f"the run has no host to reclaim right now (state: {state})",
                                   type="NoHost", non_retryable=True)
        nodes = len(self.status.current_hosts) or 1
        if request.node >= nodes:
            raise ApplicationError(f"the run has {nodes} node(s) (0..{nodes - 1}); node {request.node} does not "
                                   "exist", type="NoHost", non_retryable=True)

    @workflow.run
    async def run(self, raw: Any) -> RunStatus:
        """`raw` is validated here rather than by the SDK, so that input which does not validate (a start from
        the UI or `temporal workflow start`) fails the run with the reason instead of every workflow task."""
        try:
            inp = RunInput.model_validate(raw)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "input"
            raise ApplicationError(f"TrainingRun input {where}: {first['msg']}; start runs with vl run or the "
                                   "Python client, which check their input", type="BadInput",
                                   non_retryable=True) from None
        # Each accounting step (workflows/accounting.py) replaces self.status: read it through self, never a local.
        spec = self.spec = inp.spec
        self.status = inp.carried or RunStatus(run_id=spec.run_id, started_at=workflow.now())
        self._show()
        try:
            while True:
                if workflow.cancellation_reason() is not None and workflow.patched(OUTPUTS_ON_CANCEL_PATCH):
                    # The cancel came as an attempt ended on its own (it waits for the attempt): it ends the run.
                    raise asyncio.CancelledError
                if self.moved is not None:
                    await self._run_moved()
                    continue
                retry = self._restore_retry()
                decision = policy.next_placement(spec, self.status, workflow.now(), restore_retry=retry)
                if isinstance(decision, policy.Place) and await self._quote_prices():
                    decision = policy.next_placement(spec, self.status, workflow.now(),  # by the prices now
                                                     restore_retry=retry)
                # Asked only when the limit is reached: a history recorded before it then replays unchanged.
                stalled = None if isinstance(decision, policy.Stop) else policy.no_progress_stop(spec, self.status)
                if stalled is not None and workflow.patched(NO_PROGRESS_PATCH):
                    decision = stalled
                if isinstance(decision, policy.Stop):
                    self.status.state, self.status.stop_reason = decision.state, decision.reason
                    self.status.exit_code = decision.exit_code
                    break
                if isinstance(decision, policy.Wait):
                    workflow.logger.info("waiting %.0fs: %s", decision.seconds, decision.reason)
                    await workflow.sleep(decision.seconds)
                else:
                    self.status.excluded_hosts = list(decision.placement.excluded_hosts)
                    await self._attempt(decision.placement, decision.reason)
                if self.moved is None and workflow.info().is_continue_as_new_suggested():
                    await workflow.wait_condition(workflow.all_handlers_finished)
                    self.status.continued_as_new += 1
                    workflow.continue_as_new(RunInput(spec=spec, carried=self.status))
        except asyncio.CancelledError:
            self.status.state, self.status.stop_reason = RunState.CANCELLED, "cancelled by request"
            await self._finish()
            raise
        except FailureError as err:
            if is_cancelled_exception(err):
                self.status.state, self.status.stop_reason = RunState.CANCELLED, "cancelled by request"
            else:
                # An activity that exhausted its retries: fail the run, but leave no host behind.
                self.status.state, self.status.stop_reason = RunState.FAILED, f"control plane error: {err}"
            await self._finish()
            raise
        await self._finish()
        if self.status.state == RunState.FAILED:
            raise ApplicationError(self.status.stop_reason, self.status, type="RunFailed", non_retryable=True)
        return self.status

    async def _finish(self) -> None:
        """Whatever the ending, no host of this run outlives it."""
        self.status.current_host, self.status.current_hosts = None, []
        self.status.ended_at = workflow.now()
        self._show()
        providers = sorted({pool.provider for pool in self.spec.pools})
        reap_input = ReapInput(run_id=self.spec.run_id, providers=providers)
        if not workflow.patched(REAP_SHIELDED_PATCH):
            await workflow.execute_activity_method(ControlActivities.reap_run, reap_input, **RELEASE)
            return
        reap = workflow.start_activity_method(ControlActivities.reap_run, reap_input, **RELEASE)
        cancelled = False
        while True:
            try:
                await asyncio.shield(reap)
                break
            except asyncio.CancelledError:
                if reap.done():
                    raise
                cancelled = True  # the run's cancel, delivered while it reaps: the reap goes on, then the cancel
                asyncio.current_task().uncancel()
        if cancelled:
            raise asyncio.CancelledError

    def _restore_retry(self) -> bool:
        return policy.restore_may_be_retried(self.status) and workflow.patched(RESTORE_RETRY_PATCH)

    async def _quote_prices(self) -> bool:
        """The pools' prices now (`quote_prices`) into the status, which the policy ranks by, before a placement
        (not before a wait or a stop: nothing is placed then); a pool whose read failed keeps its earlier quote.
        If the activity fails, the run places with the quotes it has. Whether a quote came."""
        if not workflow.patched(CURRENT_PRICES_PATCH):
            return False
        try:
            quotes = await workflow.execute_activity_method(
                ControlActivities.quote_prices, QuotePricesInput(pools=self.spec.pools), **QUOTE)
        except ActivityError as err:
            if is_cancelled_exception(err):
                raise
            workflow.logger.warning("price quotes failed; placing with the last ones: %s", err)
            return False
        if quotes.failed:
            workflow.logger.warning("prices not read, last ones kept: %s", quotes.failed)
        if not quotes.prices:
            return False
        self.status.price_quotes = {**self.status.price_quotes, **quotes.prices}
        self.status.price_quotes_at = workflow.now()
        return True

    async def _release(self, host: Host) -> None:
        await workflow.execute_activity_method(ControlActivities.release, host, **RELEASE)

    async def _choose_checkpoint(self) -> CheckpointRef | None:
        result = await workflow.execute_activity_method(
            ControlActivities.verify_checkpoint,
            VerifyInput(run_id=self.spec.run_id, storage_url=self.spec.storage_url, fences=self.status.fences),
            **VERIFY)
        known = {bad.name for bad in self.status.bad_checkpoints}
        self.status.bad_checkpoints += [bad for bad in result.rejected if bad.name not in known]
        return result.chosen

    async def _attempt(self, placement: Placement, reason: str) -> None:
        checkpoint = await self._choose_checkpoint()
        record = AttemptRecord(
            attempt=placement.attempt, pool=placement.pool.key,
            start_step=checkpoint.step if checkpoint else 0, started_at=workflow.now(), placement_reason=reason,
        )
        record.resumed_from = checkpoint.name if checkpoint else None
        self.status = accounting.charge_lost_steps(self.status, record.start_step)
        self.status.attempts.append(record)
        self.status.state = RunState.PROVISIONING
        provisioned = await self._provision(record, placement)
        if provisioned is not None:
            await self._run(record, provisioned, checkpoint)

    async def _provision(self, record: AttemptRecord, placement: Placement) -> ProvisionResult | None:
        """The attempt's host (a gang's hosts, all of them), or None with the attempt closed as refused."""
        waits = workflow.patched(PROVISION_CANCEL_PATCH)
        provisioning = workflow.start_activity_method(
            ControlActivities.provision, ProvisionInput(run_id=self.spec.run_id, placement=placement,
                                                        notice_seconds=self.spec.notice_seconds,
                                                        agent=self.spec.agent),
            **PROVISION)
        try:
            provisioned = await (asyncio.shield(provisioning) if waits else provisioning)
        except asyncio.CancelledError:
            if waits:  # the run is cancelled while a host is being made: the reap that follows must find it
                with contextlib.suppress(ActivityError):
                    await provisioning
            raise
        if provisioned.host is None:
            self._close(record, AttemptResult(outcome=AttemptOutcome.REFUSED, refusal=provisioned.refusal,
                                              reason=f"{provisioned.refusal}: {provisioned.message}"))
            if provisioned.held_cost_usd:  # part of a gang was had, and released at once
                self.status = accounting.charge(self.status, record.attempt, provisioned.held_cost_usd)
            return None
        host = provisioned.host
        record.host, record.running_at = host.host_id, workflow.now()
        record.price_per_hour, record.on_demand_price_per_hour = host.price_per_hour, host.on_demand_price_per_hour
        if placement.nodes > 1:
            record.nodes, record.hosts = placement.nodes, [node.host_id for node in provisioned.hosts]
        return provisioned

    async def _move_to(self, pool: Pool, reason: str) -> bool:
        """Make before break: provision the next attempt's host while this one runs; False if refused."""
        placement = Placement(pool=pool, attempt=len(self.status.attempts) + 1, nodes=self.spec.nodes,
                              excluded_hosts=policy.excluded_hosts(self.spec, self.status, workflow.now()))
        record = AttemptRecord(attempt=placement.attempt, pool=pool.key, started_at=workflow.now(),
                               placement_reason=reason)
        self.status.attempts.append(record)
        provisioned = await self._provision(record, placement)
        if provisioned is not None:
            self.moved = (record, provisioned)
        return provisioned is not None

    async def _run_moved(self) -> None:
        """Run the attempt a move provisioned, now that the attempt it replaces has saved and ended."""
        (record, provisioned), self.moved = self.moved, None
        if policy.limit_reached(self.spec, self.status, workflow.now(), self._restore_retry()) is not None:
            await self._release_all(provisioned.hosts)
            self._close(record, AttemptResult(outcome=AttemptOutcome.CANCELLED,
                                              reason="the run ended before it moved here"))
            return
        checkpoint = await self._choose_checkpoint()
        record.start_step = checkpoint.step if checkpoint else 0
        record.resumed_from = checkpoint.name if checkpoint else None
        self.status = accounting.charge_lost_steps(self.status, record.start_step)
        await self._run(record, provisioned, checkpoint)

    async def _release_all(self, hosts: list[Host]) -> None:
        """Release every host of a gang together (one host: the same single release as ever)."""
        if len(hosts) == 1:
            await self._release(hosts[0])
        else:
            await asyncio.gather(*(self._release(host) for host in hosts))

    async def _run(self, record: AttemptRecord, provisioned: ProvisionResult, checkpoint: CheckpointRef | None) -> None:
        """Run the attempt on its host (or gang), release the hosts whatever happens, and close the attempt (which
        bills the hosts up to their release)."""
        hosts = provisioned.hosts
        self.status.current_host, self.status.state = hosts[0], RunState.RUNNING
        self.status.current_hosts = hosts if len(hosts) > 1 else []
        self._show()
        result = None
        try:
            if len(hosts) == 1:
                result = await self._run_on_host(hosts[0], record, checkpoint)
            else:
                result = await self._run_gang(provisioned, record, checkpoint)
        finally:
            for task in self.injections:
                task.cancel()
            self.injections = []
            self.status.current_host, self.status.current_hosts = None, []
            await self._release_all(hosts)
            if result is None:  # cancelled: the attempt stays open, its host is paid for all the same
                self.status = accounting.bill(self.status, record.attempt, workflow.now())
        self._close(record, result)
        if workflow.patched(RETENTION_PATCH):
            await self._prune(record)

    def _start_attempt(self, host: Host, record: AttemptRecord, checkpoint: CheckpointRef | None,
                       waits_on_cancel: bool, role: GangRole | None = None) -> asyncio.Task:
        """`run_attempt` on the host's own queue: until the script ends, or heartbeats stop."""
        spec = self.spec
        return workflow.start_activity(
            "run_attempt",
            AttemptInput(
                run_id=spec.run_id, attempt=record.attempt, host=host, command=spec.command,
                workdir=spec.workdir, code=spec.code, output_dir=spec.output_dir, env=spec.env,
                env_secrets=spec.env_secrets, setup=spec.setup, setup_cache=spec.setup_cache,
                storage_url=spec.storage_url,
                checkpoint=checkpoint, checkpoint_every=spec.checkpoint_every,
                checkpoint_min=spec.checkpoint_min, checkpoint_max=spec.checkpoint_max,
                mtbf_seconds=estimate_mtbf_seconds(self.status, host.pool.key, workflow.now()),
                shortest_host_life_seconds=shortest_life_without_a_save(self.status, spec.heartbeat_timeout_seconds),
                host_since=record.running_at,
                heartbeat_interval_seconds=min(1.0, spec.heartbeat_timeout_seconds / 4),
                checkpoint_dir=spec.checkpoint_dir,
                gang=role,
            ),
            result_type=AttemptResult,
            task_queue=host.task_queue,
            schedule_to_start_timeout=timedelta(seconds=spec.start_timeout_seconds),
            start_to_close_timeout=timedelta(days=30),
            heartbeat_timeout=timedelta(seconds=spec.heartbeat_timeout_seconds),
            retry_policy=RetryPolicy(maximum_attempts=1),
            cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED if waits_on_cancel
            else ActivityCancellationType.TRY_CANCEL,
            summary=ui.attempt_summary(record) if workflow.patched(SEARCH_ATTRIBUTES_PATCH) else None,
        )

    async def _run_on_host(self, host: Host, record: AttemptRecord,
                           checkpoint: CheckpointRef | None) -> AttemptResult:
        spec = self.spec
        waits_on_cancel = workflow.patched(OUTPUTS_ON_CANCEL_PATCH)
        attempt = self._start_attempt(host, record, checkpoint, waits_on_cancel)
        if spec.reclaim_every_seconds and reclaims_in(spec, host.pool):
            self.injections.append(asyncio.create_task(self._reclaim_on_schedule(host)))
        pruning = asyncio.create_task(self._prune_while_running(attempt.done, record)) \
            if workflow.patched(RETENTION_PATCH) else None
        watch = asyncio.create_task(self._watch_start(host, attempt)) \
            if workflow.patched(START_WATCH_PATCH) else None
        try:
            vacated = await self._review_until_done(attempt.done, host)
        except asyncio.CancelledError:
            if waits_on_cancel and not attempt.done():  # the agent stores the outputs, then the host is released
                attempt.cancel()
                with contextlib.suppress(ActivityError):
                    await attempt
            raise
        left = False  # the host was vacated and its agent never answered: the attempt was given up on
        try:
            if vacated and workflow.patched(VACATE_BOUND_PATCH):
                # Told to go, a started agent reports within the notice (then the host is taken, and its heartbeats
                # stop); one that never started would hold the run until its start timeout.
                bound = spec.notice_seconds + spec.heartbeat_timeout_seconds + VACATE_GRACE_SECONDS
                try:
                    await workflow.wait_condition(attempt.done, timeout=bound)
                except asyncio.TimeoutError:
                    left = True
                    attempt.cancel()
            result = await attempt
        except ActivityError as err:
            # The watch gave up on it too when the host was gone during start-up and its agent never answered.
            if is_cancelled_exception(err) and not left and not (watch is not None and await watch):
                raise
            result = await self._diagnose(host, record, err)
        if pruning is not None:
            await pruning
        if vacated and result.outcome == AttemptOutcome.RECLAIMED:
            result = result.model_copy(update={"outcome": AttemptOutcome.VACATED, "reason": vacated})
        return result

    async def _run_gang(self, provisioned: ProvisionResult, record: AttemptRecord,
                        checkpoint: CheckpointRef | None) -> AttemptResult:
        """One attempt on N hosts: started once every agent answers the roll call; the first host to end for a
        reason of its own stops the others (no rank is left hanging in a collective, no host left billing); the
        gang's result is the cause (workflows/gang.py)."""
        hosts, spec = provisioned.hosts, self.spec
        absent = await self._roll_call(hosts)
        if absent is not None and workflow.patched(START_WATCH_PATCH):
            described = await workflow.execute_activity_method(ControlActivities.describe_host, hosts[absent],
                                                               **DESCRIBE)
            if described.state == HostState.GONE:  # taken while it booted: a reclaim, not a fault of the host
                return AttemptResult(outcome=AttemptOutcome.RECLAIMED, start_step=record.start_step, host_gone=True,
                                     reason=f"node {absent} ({hosts[absent].host_id}): host gone before its agent "
                                            f"started ({described.reason}); the gang was released")
        if absent is not None:
            return AttemptResult(outcome=AttemptOutcome.HOST_FAULT, start_step=record.start_step,
                                 faulty_host=hosts[absent].host_id,
                                 reason=f"node {absent} ({hosts[absent].host_id}): the host agent never started; "
                                        "the gang was released")
        addresses = [host.address for host in hosts]
        if None in addresses:
            raise ApplicationError(f"provider {hosts[0].provider} gave host {hosts[addresses.index(None)].host_id} "
                                   "no address: a gang's hosts cannot find each other", type="ProviderError",
                                   non_retryable=True)
        attempts = [self._start_attempt(host, record, checkpoint, waits_on_cancel=True,
                                        role=GangRole(node_rank=rank, addresses=addresses,
                                                      master_port=provisioned.master_port))
                    for rank, host in enumerate(hosts)]
        if spec.reclaim_every_seconds and reclaims_in(spec, hosts[0].pool):
            self.injections.append(asyncio.create_task(
                self._reclaim_on_schedule(hosts[record.attempt % len(hosts)])))  # each node in its turn
        ended: list[tuple[int, AttemptResult]] = []
        endings = [asyncio.create_task(self._host_ending(rank, task, host, record, ended))
                   for rank, (task, host) in enumerate(zip(attempts, hosts))]

        def stopping() -> bool:
            return any(gang.first_ending_stops_the_gang(result) for _, result in ended) or len(ended) == len(hosts)

        pruning = asyncio.create_task(self._prune_while_running(stopping, record))
        try:
            vacated = await self._review_until_done(stopping, hosts[0])
            await workflow.wait_condition(stopping)
        except asyncio.CancelledError:
            await self._stop_gang(attempts, endings)
            raise
        await self._stop_gang(attempts, endings)  # the gang stops with the first host that ended for itself
        await pruning
        result = gang.combine(hosts, ended, record.start_step)
        if vacated and result.outcome == AttemptOutcome.RECLAIMED:
            result = result.model_copy(update={"outcome": AttemptOutcome.VACATED, "reason": vacated})
        return result

    @staticmethod
    async def _stop_gang(attempts: list[asyncio.Task], endings: list[asyncio.Task]) -> None:
        """Stop every host's attempt still running, node 0 last: the others store their parts of the gang's last
        save as they stop, so node 0, which commits checkpoints, then finds every part that will ever come."""
        for task in attempts[1:]:
            task.cancel()  # a no-op on an attempt already over
        await asyncio.gather(*endings[1:], return_exceptions=True)
        attempts[0].cancel()
        await asyncio.gather(endings[0], return_exceptions=True)
        for ending in endings:
            if ending.done() and not ending.cancelled() and ending.exception() is not None:
                raise ending.exception()

    async def _roll_call(self, hosts: list[Host]) -> int | None:
        """Every agent of the gang answers before any script starts; the node rank of one that did not (within the
        start timeout, or before its host was found gone), if any."""
        calls = [workflow.start_activity("agent_ready", host, result_type=str, task_queue=host.task_queue,
                                         schedule_to_start_timeout=timedelta(seconds=self.spec.start_timeout_seconds),
                                         start_to_close_timeout=timedelta(minutes=1),
                                         retry_policy=RetryPolicy(maximum_attempts=1))
                 for host in hosts]
        # A host taken while it boots is found during the start timeout, and its call given up on (`_watch_start`).
        watches = [asyncio.create_task(self._watch_start(host, call)) for host, call in zip(hosts, calls)] \
            if workflow.patched(START_WATCH_PATCH) else []
        answers = await asyncio.gather(*calls, return_exceptions=True)
        given_up = [watch.done() and watch.result() for watch in watches] or [False] * len(hosts)
        for answer, gave_up in zip(answers, given_up):
            if isinstance(answer, BaseException) and is_cancelled_exception(answer) and not gave_up:
                raise answer
        return next((rank for rank, answer in enumerate(answers) if isinstance(answer, BaseException)), None)

    async def _host_ending(self, rank: int, attempt: asyncio.Task, host: Host, record: AttemptRecord,
                           ended: list[tuple[int, AttemptResult]]) -> None:
        """How one host's part of a gang attempt ended, appended to `ended` in the order the hosts ended."""
        try:
            result = await attempt
        except ActivityError as err:
            if is_cancelled_exception(err):  # stopped with its gang before it could answer: nothing it stored
                result = AttemptResult(outcome=AttemptOutcome.CANCELLED, start_step=record.start_step,
                                       reason="stopped with its gang")
            else:
                result = await self._diagnose(host, record, err)
        ended.append((rank, result))

    async def _review_until_done(self, done: Callable[[], bool], host: Host) -> str:
        """Ask the policy about the running attempt when it says to. On a move the host gets a notice, so
        the script saves first; returns the policy's reason, or "" when the attempt ended on its own."""
        while not done():
            decision = policy.review(self.spec, self.status, workflow.now())
            if isinstance(decision, policy.Vacate):
                if decision.to is not None and not await self._move_to(decision.to, decision.reason):
                    continue  # refused: recorded, and this attempt runs on
                workflow.logger.info("moving off host %s: %s", host.host_id, decision.reason)
                self._inject(host, with_notice=True)
                return decision.reason
            if decision.until is None:
                return ""
            seconds = max(1.0, (decision.until - workflow.now()).total_seconds())
            try:
                await workflow.wait_condition(done, timeout=seconds)
            except asyncio.TimeoutError:
                pass
        return ""

    async def _watch_start(self, host: Host, attempt: asyncio.Task) -> bool:
        """Ask the provider about the host while its agent may not have started yet (the start timeout). Once it
        is gone, a started agent's attempt ends on its own within its heartbeat timeout; one still running after
        that never started, and is cancelled (then diagnosed as a host gone before its agent started). Returns
        whether it cancelled the attempt; ends by itself once the attempt has (after a question in flight)."""
        spec, watched = self.spec, 0.0
        while watched < spec.start_timeout_seconds:
            try:
                await workflow.wait_condition(attempt.done, timeout=START_WATCH_SECONDS)
                return False
            except asyncio.TimeoutError:
                watched += START_WATCH_SECONDS
            try:
                described = await workflow.execute_activity_method(ControlActivities.describe_host, host,
                                                                   **DESCRIBE)
            except ActivityError as err:  # the provider cannot say now: the start timeout still bounds the wait
                workflow.logger.warning("host %s could not be described during start-up: %s", host.host_id, err)
                continue
            if described.state != HostState.GONE:
                continue
            try:
                await workflow.wait_condition(attempt.done,
                                              timeout=spec.heartbeat_timeout_seconds + VACATE_GRACE_SECONDS)
                return False
            except asyncio.TimeoutError:
                workflow.logger.info("host %s gone before its agent started: %s", host.host_id, described.reason)
                attempt.cancel()
                return True
        return False

    async def _prune_while_running(self, done: Callable[[], bool], record: AttemptRecord) -> None:
        """Retention during a long attempt; ends once the attempt has, never in the middle of a removal."""
        while True:
            try:
                await workflow.wait_condition(done, timeout=self.spec.prune_every_seconds)
                return
            except asyncio.TimeoutError:
                await self._prune(record)

    async def _prune(self, record: AttemptRecord) -> None:
        """Keep the newest complete checkpoints and what `record`'s attempt resumed from; remove the rest and
        the partial uploads of ended attempts. A failure is only logged: storage stays fuller a while."""
        spec = self.spec
        reported = {ended.attempt: ended.durable_step if ended.durable_step is not None else -1
                    for ended in self.status.attempts if ended.outcome is not None}
        prune = PruneInput(run_id=spec.run_id, storage_url=spec.storage_url, keep=spec.keep_checkpoints,
                           fences=self.status.fences, reported=reported,
                           protect=[record.resumed_from] if record.resumed_from else [])
        try:
            await workflow.execute_activity_method(ControlActivities.prune_checkpoints, prune, **PRUNE)
        except ActivityError as err:
            if is_cancelled_exception(err):
                raise
            workflow.logger.warning("checkpoint retention failed: %s", err)

    async def _reclaim_on_schedule(self, host: Host) -> None:
        await workflow.sleep(self.spec.reclaim_every_seconds)
        self._inject(host, with_notice=self.spec.notice_seconds > 0)  # 0: the scheduled `vl reclaim --no-notice`

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
            try:
                progress = AttemptProgress.model_validate(cause.last_heartbeat_details[0])
            except ValidationError:  # a broken or foreign host: diagnose without its details, never fail the task
                workflow.logger.warning("attempt %d: unreadable heartbeat details ignored", record.attempt)
        base = dict(start_step=record.start_step, end_step=progress.step, durable_step=progress.durable_step)
        never_started = isinstance(cause, TimeoutError) and cause.type == TimeoutType.SCHEDULE_TO_START
        if never_started or is_cancelled_exception(err):  # the latter: given up on after a move (`_run_on_host`)
            if is_cancelled_exception(err) or workflow.patched(UNSTARTED_DIAGNOSIS_PATCH):
                # A host taken (a reclaim, or a move off it) before its agent started is a reclaim, not a fault.
                described = await workflow.execute_activity_method(ControlActivities.describe_host, host, **DESCRIBE)
                if described.state == HostState.GONE:
                    return AttemptResult(outcome=AttemptOutcome.RECLAIMED, host_gone=True,
                                         reason=f"host gone before its agent started ({described.reason})", **base)
            return AttemptResult(outcome=AttemptOutcome.HOST_FAULT, reason="the host agent never started", **base)
        if not isinstance(cause, TimeoutError):
            return AttemptResult(outcome=AttemptOutcome.HOST_FAULT,
                                 reason=f"the host agent failed: {cause.message if cause else err}", **base)
        described = await workflow.execute_activity_method(ControlActivities.describe_host, host, **DESCRIBE)
        if described.state == HostState.GONE:
            return AttemptResult(outcome=AttemptOutcome.RECLAIMED,
                                 reason=f"heartbeats stopped; host gone ({described.reason})",
                                 host_gone=True, **base)
        return AttemptResult(outcome=AttemptOutcome.HOST_FAULT,
                             reason=f"heartbeats stopped while the host is {described.state.value} "
                                    f"({described.reason})", **base)

    def _close(self, record: AttemptRecord, result: AttemptResult) -> None:
        self.status = accounting.close_attempt(self.status, record.attempt, result, workflow.now())
        self._show()

    def _show(self) -> None:
        """The run's state in the Temporal UI. Current details are no command (a query answers them), so
        they need no patch; search attributes are set only when the server has them (RunSpec)."""
        workflow.set_current_details(ui.current_details(self.status))
        if self.spec.search_attributes and workflow.patched(SEARCH_ATTRIBUTES_PATCH):
            workflow.upsert_search_attributes(ui.search_attribute_updates(self.spec, self.status))
