"""The host agent's pure decisions, without a script or a server."""

from datetime import UTC, datetime

import pytest

from activities.host import MAX_MARGIN_SECONDS, deadline_margin, emergency_save_outcome
from activities.providers.local.provider import announced_deadline
from vaultlayer.models import Notice

DEADLINE = 1_000.0
NOTICE = Notice(deadline=datetime.fromtimestamp(DEADLINE, UTC), received_at=datetime.fromtimestamp(900.0, UTC))


def test_a_stored_emergency_save_ends_the_attempt_as_saved_even_late():
    assert emergency_save_outcome(True, NOTICE, now=900.0) == "saved"
    assert emergency_save_outcome(True, NOTICE, now=DEADLINE + 10) == "saved"


def test_without_the_save_the_attempt_waits_until_the_margin_before_the_deadline():
    last_wait = DEADLINE - MAX_MARGIN_SECONDS  # a 100 s notice
    assert emergency_save_outcome(False, NOTICE, now=900.0) is None
    assert emergency_save_outcome(False, NOTICE, now=last_wait) is None
    assert emergency_save_outcome(False, NOTICE, now=last_wait + 0.01) == "missed"


@pytest.mark.parametrize(("notice_seconds", "margin"), [(0.0, 0.5), (1.0, 0.5), (2.0, 0.5), (3.0, 0.75),
                                                        (8.0, 2.0), (30.0, 3.0), (120.0, 3.0)])
def test_the_margin_is_a_quarter_of_the_notice_within_half_a_second_and_three(notice_seconds, margin):
    assert deadline_margin(notice_seconds) == pytest.approx(margin)


@pytest.mark.parametrize("notice_seconds", [2.0, 3.0])
def test_a_notice_no_longer_than_the_old_constant_margin_is_not_missed_on_arrival(notice_seconds):
    """A 3 s margin declared a 3 s notice missed the moment it arrived, however fast the save."""
    received = 900.0
    short = Notice(deadline=datetime.fromtimestamp(received + notice_seconds, UTC),
                   received_at=datetime.fromtimestamp(received, UTC))
    assert emergency_save_outcome(False, short, now=received) is None
    assert emergency_save_outcome(False, short, now=received + notice_seconds / 2) is None
    assert emergency_save_outcome(True, short, now=received + notice_seconds / 2) == "saved"
    assert emergency_save_outcome(False, short, now=received + notice_seconds - 0.4) == "missed"


@pytest.mark.parametrize("deadline", [1_000.0, 1_000.01, 1_000.5, 1_000.99])
def test_the_local_provider_announces_whole_seconds_rounded_up_never_a_shorter_notice(deadline):
    announced = announced_deadline(deadline).timestamp()
    assert announced == int(announced)
    assert deadline <= announced < deadline + 1
