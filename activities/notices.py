"""Where a host learns that it is about to be taken: what every notice source shares.

Every source returns the same `Notice`; each cloud's source lives in its provider package
(`activities.providers.<cloud>.host`). The local provider writes the AWS IMDS `spot/instance-action`
document into the host's metadata directory, so its parser, here, is the one the AWS provider's IMDS
poller uses too.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Protocol

from vaultlayer.models import Notice


class NoticeSource(Protocol):
    async def poll(self) -> Notice | None:
        """The pending notice, if any. Called every few hundred milliseconds."""
        ...


class NoticeError(ValueError):
    """A notice document that does not parse: the one error the parsers raise, whatever the input."""


def parse_instance_action(body: str, received_at: datetime) -> Notice:
    """Parse AWS `spot/instance-action`: {"action": "terminate"|"stop"|"hibernate", "time": ISO 8601}."""
    try:
        document = json.loads(body)
        deadline = datetime.strptime(document["time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        return Notice(kind="spot-termination", action=document["action"], deadline=deadline,
                      received_at=received_at)
    except (ValueError, KeyError, TypeError, IndexError, RecursionError) as err:  # JSON and pydantic errors too
        raise NoticeError(f'spot/instance-action is not {{"action": ..., "time": "YYYY-MM-DDTHH:MM:SSZ"}}: '
                          f"{type(err).__name__}: {str(err)[:200]}") from None


class NoNoticeSource:
    """A host no provider warns before taking it."""

    async def poll(self) -> Notice | None:
        return None
