"""The host agent's pure decisions, without a script or a server."""

from datetime import UTC, datetime

from activities.host import DEADLINE_MARGIN_SECONDS, emergency_save_outcome
from vaultlayer.models import Notice

DEADLINE = 1_000.0
NOTICE = Notice(deadline=datetime.fromtimestamp(DEADLINE, UTC), received_at=datetime.fromtimestamp(900.0, UTC))


def test_a_stored_emergency_save_ends_the_attempt_as_saved_even_late():
    assert emergency_save_outcome(True, NOTICE, now=900.0) == "saved"
    assert emergency_save_outcome(True, NOTICE, now=DEADLINE + 10) == "saved"


def test_without_the_save_the_attempt_waits_until_the_margin_before_the_deadline():
    last_wait = DEADLINE - DEADLINE_MARGIN_SECONDS
    assert emergency_save_outcome(False, NOTICE, now=900.0) is None
    assert emergency_save_outcome(False, NOTICE, now=last_wait) is None
    assert emergency_save_outcome(False, NOTICE, now=last_wait + 0.01) == "missed"
