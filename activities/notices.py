"""Where a host learns that it is about to be taken.

Every source returns the same `Notice`. The local provider writes the AWS IMDS
`spot/instance-action` document into the host's metadata directory, so its parser is the one the AWS
provider's IMDS poller (`ImdsNoticeSource`) uses too.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

import structlog

from vaultlayer.models import Notice

log = structlog.get_logger(__name__)


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


class MetadataDirNoticeSource:
    """Notices from a directory laid out like the instance-metadata service (local provider)."""

    def __init__(self, metadata_dir: Path) -> None:
        self.instance_action = metadata_dir / "spot" / "instance-action"
        self._seen: Notice | None = None

    async def poll(self) -> Notice | None:
        if self._seen is None and self.instance_action.exists():
            try:
                self._seen = parse_instance_action(self.instance_action.read_text(), datetime.now(UTC))
            except (OSError, ValueError) as err:  # unreadable or malformed: look again at the next poll
                log.warning("unreadable notice file", path=str(self.instance_action), error=str(err))
        return self._seen


class GceMetadataNoticeSource:
    """Notices from the GCE metadata server: `instance/preempted` turns TRUE when Compute Engine
    preempts a Spot VM, and `instance/maintenance-event` names a TERMINATE_ON_HOST_MAINTENANCE to come
    (GPU VMs cannot live-migrate). Either leaves the VM 30 s.

    Each key is long-polled with `wait_for_change` (the request returns only when the value changes),
    in a daemon thread, so neither the event loop nor the agent's exit waits on it.
    """

    GRACE_SECONDS = 30.0
    WAIT_SECONDS = 60  # `timeout_sec` of one long poll; the server answers with the current value then
    WATCHED = {
        "preempted": ("TRUE", "spot-preemption"),
        "maintenance-event": ("TERMINATE_ON_HOST_MAINTENANCE", "host-maintenance"),
    }

    def __init__(self, host: str | None = None) -> None:
        host = host or os.environ.get("GCE_METADATA_HOST", "metadata.google.internal")
        self.base_url = f"http://{host}/computeMetadata/v1/instance/"
        # The metadata server is link-local: a proxy from the environment must never see these requests.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._notice: Notice | None = None
        self._watchers: list[threading.Thread] = []

    async def poll(self) -> Notice | None:
        if not self._watchers:
            for key, (value, kind) in self.WATCHED.items():
                watcher = threading.Thread(target=self._watch, args=(key, value, kind), daemon=True,
                                           name=f"gce-metadata-{key}")
                watcher.start()
                self._watchers.append(watcher)
        return self._notice

    def _get(self, key: str, etag: str | None) -> tuple[str, str | None]:
        query = "" if etag is None else "?" + urllib.parse.urlencode(
            {"wait_for_change": "true", "last_etag": etag, "timeout_sec": self.WAIT_SECONDS})
        request = urllib.request.Request(self.base_url + key + query, headers={"Metadata-Flavor": "Google"})
        with self._opener.open(request, timeout=self.WAIT_SECONDS + 10) as response:
            return response.read().decode(errors="replace").strip(), response.headers.get("ETag")

    def _watch(self, key: str, notice_value: str, kind: str) -> None:
        etag = None  # the first read returns at once; later ones wait for a change of that value
        while self._notice is None:
            try:
                value, etag = self._get(key, etag)
            except (OSError, http.client.HTTPException) as err:  # unreachable, or an HTTP error: keep watching
                log.warning("metadata server read failed", key=key, error=str(err))
                time.sleep(1.0)
                continue
            if value == notice_value and self._notice is None:
                now = datetime.now(UTC)
                self._notice = Notice(kind=kind, action="terminate", received_at=now,
                                      deadline=now + timedelta(seconds=self.GRACE_SECONDS))
                log.warning("reclaim notice from the metadata server", key=key, value=value)


class ImdsNoticeSource:
    """AWS instance metadata, IMDSv2: `spot/instance-action` (the two-minute warning) becomes the notice;
    `events/recommendations/rebalance` (a raised risk, no deadline) is logged and kept.

    IMDS is asked every `interval` seconds at most, whatever the caller's pace (AWS suggests 5 s). Every
    request carries a session token from PUT /latest/api/token; a 401 means the token is no longer valid,
    so a new one is fetched and the request repeated once. A 404 means nothing is pending.
    """

    TOKEN_TTL_SECONDS = 21600

    def __init__(self, endpoint: str | None = None, interval: float = 5.0) -> None:
        endpoint = endpoint or os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT") or "http://169.254.169.254"
        self.endpoint = endpoint.rstrip("/")
        self.interval = interval
        self.rebalance_recommended_at: datetime | None = None
        # IMDS is link-local: a proxy from the environment must never see these requests.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._token: str | None = None
        self._next_poll = 0.0
        self._notice: Notice | None = None

    async def poll(self) -> Notice | None:
        if self._notice is not None or time.monotonic() < self._next_poll:
            return self._notice
        self._next_poll = time.monotonic() + self.interval
        try:
            action, rebalance = await asyncio.to_thread(self._read_both)
        except (OSError, ValueError, KeyError) as err:  # unreachable or odd: ask again next interval
            log.warning("instance metadata read failed", error=str(err))
            return None
        if rebalance is not None and self.rebalance_recommended_at is None:
            try:
                notice_time = json.loads(rebalance)["noticeTime"]
                self.rebalance_recommended_at = datetime.strptime(notice_time, "%Y-%m-%dT%H:%M:%SZ").replace(
                    tzinfo=UTC)
            except (ValueError, KeyError, TypeError, IndexError) as err:  # a hint only: logged, never fatal
                log.warning("unreadable rebalance recommendation", error=f"{type(err).__name__}: {err}"[:200])
            else:
                log.warning("rebalance recommended: a reclaim of this host is more likely", notice_time=notice_time)
        if action is not None:
            try:
                self._notice = parse_instance_action(action, datetime.now(UTC))
            except NoticeError as err:  # read it again next interval
                log.warning("unreadable reclaim notice from instance metadata", error=str(err))
            else:
                log.warning("reclaim notice from instance metadata", action=self._notice.action,
                            deadline=self._notice.deadline.isoformat())
        return self._notice

    def _read_both(self) -> tuple[str | None, str | None]:
        return self._get("spot/instance-action"), self._get("events/recommendations/rebalance")

    def _get(self, path: str) -> str | None:
        for _ in range(2):
            if self._token is None:
                request = urllib.request.Request(
                    f"{self.endpoint}/latest/api/token", method="PUT",
                    headers={"X-aws-ec2-metadata-token-ttl-seconds": str(self.TOKEN_TTL_SECONDS)},
                )
                with self._opener.open(request, timeout=2) as response:
                    self._token = response.read().decode()
            request = urllib.request.Request(f"{self.endpoint}/latest/meta-data/{path}",
                                             headers={"X-aws-ec2-metadata-token": self._token})
            try:
                with self._opener.open(request, timeout=2) as response:
                    return response.read().decode()
            except urllib.error.HTTPError as err:
                if err.code == 404:
                    return None
                if err.code != 401:
                    raise
                self._token = None
        raise ValueError(f"instance metadata refused a fresh token for {path}")


class NoNoticeSource:
    async def poll(self) -> Notice | None:
        return None
