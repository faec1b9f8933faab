"""The GCE metadata watcher against a local server speaking the documented metadata protocol:
`Metadata-Flavor: Google` required, an ETag per value, `wait_for_change=true` with `last_etag`."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from datetime import timedelta

import pytest

from activities.providers.gcp import GceMetadataNoticeSource
from tests.fakes.gce import FakeGce
from tests.helpers import wait_until

ZONE, NAME = "us-central1-a", "vl-watched-1"
BASE = "/computeMetadata/v1/instance/"


@pytest.fixture
def vm():
    fake = FakeGce().start()
    fake.add_instance(ZONE, NAME, labels={})
    yield fake, fake.metadata_server(ZONE, NAME)
    fake.stop()


def long_polls(server, key: str) -> list[str]:
    return [path for path in server.requests if path.startswith(BASE + key + "?")]


async def parked(server, key: str, count: int = 1) -> None:
    """Until the watcher has `count` long polls of `key` open or done: it waits for a change now."""

    async def check():
        return len(long_polls(server, key)) >= count

    await wait_until(check, 10, f"{count} long poll(s) of {key}")


async def notice_of(source: GceMetadataNoticeSource):
    async def check():
        return await source.poll()

    return await wait_until(check, 10, "a notice")


async def test_preemption_becomes_a_notice_with_a_30s_deadline(vm):
    fake, server = vm
    source = GceMetadataNoticeSource(server.host)
    assert await source.poll() is None
    await parked(server, "preempted")
    assert await source.poll() is None  # FALSE, and the long poll is waiting for a change

    fake.preempt(NAME)
    notice = await notice_of(source)
    assert notice.kind == "spot-preemption" and notice.action == "terminate"
    assert notice.deadline - notice.received_at == timedelta(seconds=30)
    # The first read returns the current value and its ETag; every later one waits for a change of it.
    reads = [path for path in server.requests if path.startswith(BASE + "preempted")]
    assert reads[0] == BASE + "preempted"
    assert all("wait_for_change=true" in path and "last_etag=" in path for path in reads[1:]) and reads[1:]


async def test_only_a_terminating_maintenance_event_is_a_notice(vm):
    fake, server = vm
    source = GceMetadataNoticeSource(server.host)
    await source.poll()
    await parked(server, "maintenance-event")

    fake.announce_maintenance(NAME, "MIGRATE_ON_HOST_MAINTENANCE")  # a live migration: the VM stays
    await parked(server, "maintenance-event", count=2)  # the watcher saw it and waits again
    assert await source.poll() is None

    fake.announce_maintenance(NAME, "TERMINATE_ON_HOST_MAINTENANCE")
    notice = await notice_of(source)
    assert notice.kind == "host-maintenance"
    assert notice.deadline - notice.received_at == timedelta(seconds=30)


async def test_the_fake_speaks_the_documented_protocol(vm):
    """What the watcher relies on, checked against the fake itself so the fake cannot drift."""
    _, server = vm
    url = f"http://{server.host}{BASE}preempted"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    with pytest.raises(urllib.error.HTTPError) as refused:
        await asyncio.to_thread(opener.open, url, timeout=5)
    assert refused.value.code == 403  # no Metadata-Flavor header

    def get(query: str = ""):
        request = urllib.request.Request(url + query, headers={"Metadata-Flavor": "Google"})
        with opener.open(request, timeout=5) as response:
            return response.read().decode(), response.headers["ETag"], response.headers["Metadata-Flavor"]

    value, etag, flavor = await asyncio.to_thread(get)
    assert (value, flavor) == ("FALSE", "Google") and etag
    # A stale ETag answers at once; the current one waits up to timeout_sec, then answers the same value.
    assert (await asyncio.to_thread(get, "?wait_for_change=true&last_etag=stale"))[0] == "FALSE"
    assert (await asyncio.to_thread(get, f"?wait_for_change=true&last_etag={etag}&timeout_sec=1"))[1] == etag
