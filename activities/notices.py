"""Where a host learns that it is about to be taken.

Every source returns the same `Notice`. The local provider writes the AWS IMDS
`spot/instance-action` document into the host's metadata directory, so its parser is the one the AWS
provider's IMDS poller uses too.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from vaultlayer.models import Notice


class NoticeSource(Protocol):
    async def poll(self) -> Notice | None:
        """The pending notice, if any. Called every few hundred milliseconds."""
        ...


def parse_instance_action(body: str, received_at: datetime) -> Notice:
    """Parse AWS `spot/instance-action`: {"action": "terminate"|"stop"|"hibernate", "time": ISO 8601}."""
    document = json.loads(body)
    deadline = datetime.strptime(document["time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    return Notice(
        kind="spot-termination",
        action=document["action"],
        deadline=deadline,
        received_at=received_at,
    )


class MetadataDirNoticeSource:
    """Notices from a directory laid out like the instance-metadata service (local provider)."""

    def __init__(self, metadata_dir: Path) -> None:
        self.instance_action = metadata_dir / "spot" / "instance-action"
        self._seen: Notice | None = None

    async def poll(self) -> Notice | None:
        if self._seen is None and self.instance_action.exists():
            self._seen = parse_instance_action(self.instance_action.read_text(), datetime.now(UTC))
        return self._seen


class NoNoticeSource:
    async def poll(self) -> Notice | None:
        return None
