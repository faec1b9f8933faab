"""The `aws` provider's host side: what an EC2 host reads from AWS with its instance role.

Reclaim notices from IMDSv2 (`ImdsNoticeSource`), the Temporal connection settings from Secrets Manager or
SSM (`read_temporal_settings`) and `aws-sm:` secret env references (`read_secret`). boto3 is imported
inside the readers only.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime

import structlog

from activities.notices import NoticeError, parse_instance_action
from activities.providers.base import (
    NOTICE_SOURCE_VARIABLE,
    TEMPORAL_SETTINGS_VARIABLE,
    HostSide,
    SecretUnavailable,
    check_temporal_settings,
)
from vaultlayer.catalog.aws import TEMPORAL_SETTINGS_STORES, call, error_code, import_boto3, new_client
from vaultlayer.models import Notice

log = structlog.get_logger(__name__)

NOTICE_SOURCE = "imds"  # the NOTICE_SOURCE_VARIABLE value of an EC2 host
SECRET_SCHEME = "aws-sm"  # secret env references aws-sm:<secret id or ARN>


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


def notice_source() -> ImdsNoticeSource | None:
    return ImdsNoticeSource() if os.environ.get(NOTICE_SOURCE_VARIABLE) == NOTICE_SOURCE else None


def read_temporal_settings(reference: str) -> dict[str, str]:
    """The Temporal connection settings, read with the instance role from `secretsmanager:<id>` or
    `ssm:<SecureString parameter>`."""
    boto3 = import_boto3()
    from botocore.config import Config

    # The agent reads this before it can serve its host: a stalled request must not hold it past the
    # workflow's start timeout (botocore's default read timeout alone is 60 s), so short timeouts, retried.
    quick = Config(connect_timeout=5, read_timeout=10, retries={"mode": "standard", "total_max_attempts": 5})
    store, _, name = reference.partition(":")
    region = name.split(":")[3] if name.startswith("arn:") else None
    if store == "secretsmanager":
        client = boto3.session.Session().client("secretsmanager", region_name=region, config=quick)
        text = call(client.get_secret_value, SecretId=name)["SecretString"]
    elif store == "ssm":
        client = boto3.session.Session().client("ssm", region_name=region, config=quick)
        text = call(client.get_parameter, Name=name, WithDecryption=True)["Parameter"]["Value"]
    else:
        raise ValueError(f"{TEMPORAL_SETTINGS_VARIABLE} {reference!r}: expected secretsmanager:<id> or ssm:<name>")
    return check_temporal_settings(reference, text)


def read_secret(secret_id: str) -> str:
    """The value of an `aws-sm:<secret id or ARN>` secret env reference, read with the instance role."""
    region = secret_id.split(":")[3] if secret_id.startswith("arn:") else None
    try:
        client = new_client("secretsmanager", region)
    except ValueError as err:  # boto3 is missing
        raise SecretUnavailable(str(err)) from None
    try:
        answer = call(client.get_secret_value, SecretId=secret_id)
    except Exception as err:  # noqa: BLE001 - botocore's errors, after retries: name the code only
        raise SecretUnavailable(f"Secrets Manager refused ({error_code(err) or type(err).__name__}); fix: check "
                                "the secret id and the host role's secretsmanager:GetSecretValue") from None
    if "SecretString" not in answer:
        raise SecretUnavailable("the secret is binary; fix: store it as a string")
    return answer["SecretString"]


HOST = HostSide(
    notice_source=notice_source,
    temporal_settings_readers=dict.fromkeys(TEMPORAL_SETTINGS_STORES, read_temporal_settings),
    secret_readers={SECRET_SCHEME: read_secret},
)
