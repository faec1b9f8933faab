"""The `gcp` provider's host side: what a Compute Engine VM reads from Google with its service account.

Preemption and host-maintenance notices from the metadata server (`GceMetadataNoticeSource`), the Temporal
connection settings from Secret Manager (`read_temporal_settings`) and `gcp-sm:` secret env references
(`read_secret`). The Google libraries are imported inside the readers only.
"""

from __future__ import annotations

import http.client
import os
import threading
import time
import urllib.parse
import urllib.request
from datetime import UTC, datetime, timedelta

import structlog

from activities.providers.base import (
    NOTICE_SOURCE_VARIABLE,
    TEMPORAL_SETTINGS_VARIABLE,
    HostSide,
    SecretUnavailable,
    check_temporal_settings,
)
from activities.providers.gcp.api import client_kwargs, retry_policy
from vaultlayer.catalog.gcp import SECRET_STORE
from vaultlayer.models import Notice

log = structlog.get_logger(__name__)

NOTICE_SOURCE = "gce-metadata"  # the NOTICE_SOURCE_VARIABLE value of a Compute Engine VM
SECRET_SCHEME = "gcp-sm"  # secret env references gcp-sm:projects/P/secrets/S/versions/V


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


def notice_source() -> GceMetadataNoticeSource | None:
    return GceMetadataNoticeSource() if os.environ.get(NOTICE_SOURCE_VARIABLE) == NOTICE_SOURCE else None


def read_temporal_settings(reference: str) -> dict[str, str]:
    """The Temporal connection settings, read with the VM's service account from
    `gcp-secret-manager:<secret version>` (REST, CRC32C checked)."""
    import google_crc32c
    from google.api_core.exceptions import GoogleAPICallError
    from google.cloud import secretmanager

    store, _, name = reference.partition(":")
    if store != SECRET_STORE or not name:
        raise ValueError(f"{TEMPORAL_SETTINGS_VARIABLE} {reference!r}: "
                         f"expected {SECRET_STORE}:projects/P/secrets/S/versions/V")
    client = secretmanager.SecretManagerServiceClient(transport="rest", **client_kwargs())
    try:
        payload = client.access_secret_version(name=name, retry=retry_policy()).payload
    except GoogleAPICallError as err:
        raise ValueError(f"{reference}: {err.message}") from None
    if payload.data_crc32c and google_crc32c.value(payload.data) != payload.data_crc32c:
        raise ValueError(f"{reference}: the payload does not match its checksum")
    return check_temporal_settings(reference, payload.data)


def read_secret(name: str) -> str:
    """The value of a `gcp-sm:<secret version>` secret env reference, read with the VM's service account."""
    try:
        from google.api_core.exceptions import GoogleAPICallError
        from google.cloud import secretmanager
    except ImportError:
        raise SecretUnavailable("needs google-cloud-secret-manager; fix: pip install 'vaultlayer[gcp]'") from None

    client = secretmanager.SecretManagerServiceClient(transport="rest", **client_kwargs())
    try:
        payload = client.access_secret_version(name=name, retry=retry_policy()).payload
    except GoogleAPICallError as err:
        raise SecretUnavailable(f"Secret Manager refused ({err.code}); fix: check the name and the host service "
                                "account's secretmanager.versions.access") from None
    try:
        return payload.data.decode()
    except UnicodeDecodeError:
        raise SecretUnavailable("the secret is not UTF-8 text; fix: store it as text") from None


HOST = HostSide(
    notice_source=notice_source,
    temporal_settings_readers={SECRET_STORE: read_temporal_settings},
    secret_readers={SECRET_SCHEME: read_secret},
)
