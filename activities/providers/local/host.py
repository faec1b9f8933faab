"""The local provider's host side: the metadata directory that stands in for a cloud's metadata service.

The provider gives each agent a directory (METADATA_DIR_VARIABLE) and takes the host back by writing
the AWS IMDS `spot/instance-action` document into it, then killing the host's process group.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import structlog

from activities.notices import parse_instance_action
from activities.providers.base import HostSide
from vaultlayer.models import Notice

log = structlog.get_logger(__name__)

METADATA_DIR_VARIABLE = "VL_HOST_METADATA_DIR"
NOTICE_RELATIVE_PATH = Path("spot") / "instance-action"


class MetadataDirNoticeSource:
    """Notices from a directory laid out like the instance-metadata service (local provider)."""

    def __init__(self, metadata_dir: Path) -> None:
        self.instance_action = metadata_dir / NOTICE_RELATIVE_PATH
        self._seen: Notice | None = None

    async def poll(self) -> Notice | None:
        if self._seen is None and self.instance_action.exists():
            try:
                self._seen = parse_instance_action(self.instance_action.read_text(), datetime.now(UTC))
            except (OSError, ValueError) as err:  # unreadable or malformed: look again at the next poll
                log.warning("unreadable notice file", path=str(self.instance_action), error=str(err))
        return self._seen


def notice_source() -> MetadataDirNoticeSource | None:
    metadata_dir = os.environ.get(METADATA_DIR_VARIABLE)
    return MetadataDirNoticeSource(Path(metadata_dir)) if metadata_dir else None


# Local hosts read their Temporal settings and secrets from the environment they inherit.
HOST = HostSide(notice_source=notice_source)
