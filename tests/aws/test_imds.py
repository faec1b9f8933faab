"""The host side of a spot reclaim: the IMDSv2 watcher against a local server that serves the documented
paths, token handshake and JSON."""

from __future__ import annotations

import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta

import pytest

from activities.providers.aws import ImdsNoticeSource
from tests.aws.fakes import ImdsFake


@pytest.fixture
def imds():
    fake = ImdsFake("i-0abc", "us-east-1a", "g5.xlarge", "spot")
    yield fake
    fake.close()


def status_of(request: urllib.request.Request) -> int:
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_the_fake_is_imdsv2(imds):
    """What the watcher must cope with: no token, 401; a token without a TTL, 400; nothing pending, 404."""
    assert status_of(urllib.request.Request(f"{imds.url}/latest/meta-data/instance-id")) == 401
    assert status_of(urllib.request.Request(f"{imds.url}/latest/api/token", method="PUT")) == 400
    put = urllib.request.Request(f"{imds.url}/latest/api/token", method="PUT",
                                 headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    token = urllib.request.urlopen(put).read().decode()
    read = urllib.request.Request(f"{imds.url}/latest/meta-data/spot/instance-action",
                                  headers={"X-aws-ec2-metadata-token": token})
    assert status_of(read) == 404


async def test_nothing_pending_is_no_notice(imds):
    source = ImdsNoticeSource(imds.url, interval=0)
    assert await source.poll() is None
    assert imds.reads == ["spot/instance-action", "events/recommendations/rebalance"]
    assert source.rebalance_recommended_at is None


async def test_instance_action_becomes_a_notice_with_its_deadline(imds):
    source = ImdsNoticeSource(imds.url, interval=0)
    assert await source.poll() is None
    deadline = datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=2)
    imds.announce("stop", deadline)
    notice = await source.poll()
    assert (notice.kind, notice.action, notice.deadline) == ("spot-termination", "stop", deadline)
    imds.instance_action = None
    assert await source.poll() == notice, "a notice once seen stays"


async def test_a_token_no_longer_valid_is_renewed(imds):
    source = ImdsNoticeSource(imds.url, interval=0)
    await source.poll()
    imds.expire_tokens()  # every read now answers 401 until a new token is fetched
    imds.announce("terminate", datetime.now(UTC) + timedelta(minutes=2))
    assert (await source.poll()).action == "terminate"
    assert imds.issued == 2


async def test_a_rebalance_recommendation_is_kept_but_is_no_notice(imds):
    source = ImdsNoticeSource(imds.url, interval=0)
    when = datetime(2026, 11, 27, 8, 22, tzinfo=UTC)
    imds.recommend_rebalance(when)
    assert await source.poll() is None
    assert source.rebalance_recommended_at == when


async def test_metadata_is_read_at_most_once_per_interval(imds):
    assert ImdsNoticeSource(imds.url).interval == 5.0
    source = ImdsNoticeSource(imds.url, interval=3600)
    await source.poll()
    imds.announce("terminate", datetime.now(UTC) + timedelta(minutes=2))
    assert await source.poll() is None  # the caller polls often; IMDS is asked again only next interval
    assert len(imds.reads) == 2


async def test_unreachable_metadata_is_no_notice_and_no_crash():
    assert await ImdsNoticeSource("http://127.0.0.1:9", interval=0).poll() is None
