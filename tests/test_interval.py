"""The checkpoint interval's pure rules: the first save comes early once hosts of the run die before it."""

from datetime import UTC, datetime, timedelta

from vaultlayer.interval import choose_interval, shortest_life_without_a_save, stored_a_checkpoint
from vaultlayer.models import AttemptOutcome, AttemptRecord, RunStatus

T0 = datetime(2026, 12, 1, tzinfo=UTC)


def record(number: int, lived: float, outcome: AttemptOutcome, start_step: int = 0,
           durable_step: int | None = None, host: str | None = "h", emergency_save: str | None = "missed"
           ) -> AttemptRecord:
    return AttemptRecord(attempt=number, host=host, pool="local", outcome=outcome, start_step=start_step,
                         durable_step=durable_step, started_at=T0 - timedelta(seconds=1), running_at=T0,
                         ended_at=T0 + timedelta(seconds=lived), emergency_save=emergency_save)


def test_the_shortest_life_counts_only_hosts_lost_before_they_stored_a_checkpoint():
    status = RunStatus(run_id="r", started_at=T0, attempts=[
        record(1, 4.0, AttemptOutcome.RECLAIMED, durable_step=12),  # saved: not counted
        record(2, 9.0, AttemptOutcome.RECLAIMED, start_step=12, durable_step=12),
        record(3, 20.0, AttemptOutcome.HOST_FAULT, start_step=12),
        record(4, 2.0, AttemptOutcome.FAILED, start_step=12),  # the script's own failure
        record(5, 1.0, AttemptOutcome.REFUSED, host=None),
    ])
    assert shortest_life_without_a_save(status, heartbeat_timeout_seconds=30.0) == 9.0
    assert shortest_life_without_a_save(RunStatus(run_id="r", started_at=T0), 30.0) is None


def test_a_host_lost_without_a_notice_died_a_heartbeat_timeout_before_its_attempt_ended():
    status = RunStatus(run_id="r", started_at=T0, attempts=[record(1, 39.0, AttemptOutcome.RECLAIMED,
                                                                   emergency_save=None)])
    assert shortest_life_without_a_save(status, heartbeat_timeout_seconds=30.0) == 9.0


def test_saves_come_at_half_the_shortest_life_below_the_minimum_while_the_host_is_young():
    seconds, why = choose_interval(None, 7200.0, min_seconds=60.0, shortest_life_seconds=9.0)
    assert seconds == 4.5 and "early" in why and "9 s" in why
    assert choose_interval(0.001, 7200.0, min_seconds=60.0, shortest_life_seconds=9.0, host_age_seconds=60)[0] == 4.5
    assert choose_interval(None, 7200.0, min_seconds=60.0, shortest_life_seconds=0.2)[0] == 1.0  # at most 1/s
    assert choose_interval(None, 7200.0, min_seconds=60.0)[0] == 60.0
    assert choose_interval(None, 7200.0, min_seconds=60.0, shortest_life_seconds=600.0)[0] == 60.0


def test_the_minimum_bounds_the_steady_state_once_the_host_outlived_the_shortest_life_by_it():
    assert choose_interval(0.001, 7200.0, min_seconds=60.0, shortest_life_seconds=9.0, host_age_seconds=70)[0] == 60.0


def test_a_later_resume_further_on_is_progress_though_the_lost_host_never_reported_it():
    """A host lost without a notice takes its freshest heartbeat with it: the next start step tells."""
    status = RunStatus(run_id="r", started_at=T0, attempts=[
        record(1, 5.0, AttemptOutcome.RECLAIMED, emergency_save=None),
        record(2, 9.0, AttemptOutcome.RECLAIMED, emergency_save=None),
        record(3, 7.0, AttemptOutcome.RECLAIMED, start_step=30, emergency_save=None),
    ])
    assert [stored_a_checkpoint(status.attempts, i) for i in range(3)] == [False, True, False]
    assert shortest_life_without_a_save(status, heartbeat_timeout_seconds=0.0) == 5.0
