"""Prices that move: each provider's price now (catalog.current_prices), the control plane's cached quote of it
(`quote_prices`), the policy ranking by the quote, and the workflow asking for it before each placement.

AWS is moto in server mode, reached by the real boto3 client over HTTP (a server of this file's own per test,
so that a test can stop it); GCP is its bundled table with gcp.toml's overrides. The workflow tests run on the
real Temporal dev server with real local hosts and the torch-free counter script.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import uuid
from datetime import UTC, datetime

import pytest
import structlog
from temporalio import activity
from temporalio.testing import ActivityEnvironment

import activities.control
import worker.control
from activities.control import PRICE_CACHE_VARIABLE, ControlActivities
from tests.conftest import counter_command, make_spec
from tests.test_run_e2e import record_histories
from vaultlayer import catalog
from vaultlayer import client as vl_client
from vaultlayer.catalog import current_prices
from vaultlayer.catalog import gcp as gcp_catalog
from vaultlayer.models import (
    AttemptOutcome,
    AttemptRecord,
    Limits,
    Market,
    Pool,
    PriceQuotes,
    QuotePricesInput,
    RunSpec,
    RunState,
    RunStatus,
)
from workflows import policy

REGION = "us-east-1"
SECRET_KEY = "s3cret-key-never-shown"  # moto takes any credentials; no answer or log line may hold this one
NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


def aws_pool(zone: str | None = "us-east-1a", market: Market = Market.SPOT, **fields) -> Pool:
    return Pool(provider="aws", region="" if zone else REGION, zone=zone, gpu="A10G", gpu_count=1, market=market,
                **fields)


class MotoEc2:
    """An EC2 of moto's on loopback, for one test; `stop()` makes it unreachable (connection refused)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        self.url = f"http://127.0.0.1:{self._server.get_host_and_port()[1]}"
        self.running = True

    def stop(self) -> None:
        if self.running:
            self._server.stop()
            self.running = False


@pytest.fixture
def moto_ec2(vl_home, monkeypatch):
    """boto3 pointed at a fresh moto server, and the aws.toml a pool check and a price read need."""
    server = MotoEc2()
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                        "AWS_DEFAULT_REGION": REGION, "AWS_ENDPOINT_URL": server.url,
                        "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
                        "AWS_SHARED_CREDENTIALS_FILE": os.devnull}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("VL_AWS_CONFIG", raising=False)
    (vl_home / "aws.toml").write_text('temporal_settings = "secretsmanager:vaultlayer/temporal"\n'
                                      'instance_profile = "vaultlayer-host"\n'
                                      f'regions = ["{REGION}"]\n')
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def quotes(vl_home, monkeypatch):
    """`quote_prices` of one control-plane activities object (one worker's cache), run as Temporal runs it."""
    monkeypatch.delenv(PRICE_CACHE_VARIABLE, raising=False)
    logged = structlog.testing.CapturingLogger()
    monkeypatch.setattr(activities.control, "log", logged)
    control = ControlActivities(vl_home, {})
    environment = ActivityEnvironment()

    def quote(*pools: Pool) -> PriceQuotes:
        return environment.run(control.quote_prices, QuotePricesInput(pools=list(pools)))

    quote.logged = logged
    return quote


# ---------------------------------------------------------------- each provider's price now


def test_aws_reads_the_spot_price_in_effect_and_on_demand_from_the_table(moto_ec2):
    zoned, regional, on_demand = aws_pool(), aws_pool(zone=None), aws_pool(market=Market.ON_DEMAND)
    given = aws_pool(zone="us-east-1b", price_per_hour=0.42, price_given=True)
    prices, errors = current_prices([zoned, regional, on_demand, given])
    assert errors == {}
    # moto prices every spot type at 0.00001; the cheapest A10G:1 on demand is g5.xlarge in the bundled table.
    assert prices == {zoned.key: 0.00001, regional.key: 0.00001, on_demand.key: 1.006, given.key: 0.42}
    # The same read `vl run` prices pools with at submit.
    assert catalog.priced_pools([zoned])[0].price_per_hour == prices[zoned.key]


def test_a_price_the_user_gave_wins_and_is_never_read(moto_ec2, vl_home):
    moto_ec2.stop()  # a read would fail now
    given = aws_pool(price_per_hour=0.42, price_given=True)
    listed = aws_pool(zone="us-east-1b", price_per_hour=0.42)  # a list price from submit: read again
    prices, errors = current_prices([given, listed])
    assert prices == {given.key: 0.42} and list(errors) == [listed.key]
    gcp_pool = Pool(provider="gcp", zone="us-central1-a", gpu="L4", gpu_count=1, price_per_hour=9.0, price_given=True)
    assert current_prices([gcp_pool]) == ({gcp_pool.key: 9.0}, {})  # no gcp.toml needed: nothing is read


def test_gcp_quotes_its_published_table_with_the_overrides_of_gcp_toml(vl_home, monkeypatch):
    monkeypatch.delenv(gcp_catalog.CONFIG_VARIABLE, raising=False)
    (vl_home / "gcp.toml").write_text('project = "p"\nservice_account = "sa@p.iam.gserviceaccount.com"\n'
                                      '[prices."us-central1/g2-standard-4"]\nspot = 0.25\non_demand = 0.71\n')
    l4_spot = Pool(provider="gcp", region="", zone="us-central1-a", gpu="L4", gpu_count=1)
    l4_elsewhere = l4_spot.model_copy(update={"zone": "europe-west4-a"})
    t4_on_demand = Pool(provider="gcp", region="", zone="us-central1-b", gpu="T4", gpu_count=2,
                        market=Market.ON_DEMAND)
    prices, errors = current_prices([l4_spot, l4_elsewhere, t4_on_demand])
    assert errors == {}
    assert prices == {l4_spot.key: 0.25,  # the override for its region
                      l4_elsewhere.key: gcp_catalog.PRICES["g2-standard-4"][0],  # the table's spot price
                      t4_on_demand.key: round(0.76 + 2 * 0.35, 4)}  # n1-standard-16 + two T4s, on demand
    for pool in (l4_spot, l4_elsewhere, t4_on_demand):
        assert gcp_catalog.priced(pool).price_per_hour == prices[pool.key]


def test_local_and_harness_pools_quote_their_own_price():
    priced, unpriced = Pool(zone="a", price_per_hour=0.7, price_given=True), Pool(zone="b")
    harness = Pool(provider="harness", region="harness", price_per_hour=0.3)
    assert current_prices([priced, unpriced, harness]) == ({priced.key: 0.7, unpriced.key: None, harness.key: 0.3},
                                                           {})


# ---------------------------------------------------------------- the activity and its cache


def test_a_quote_is_read_once_per_cache_period_then_a_failed_read_keeps_the_last_price(moto_ec2, quotes,
                                                                                        monkeypatch):
    spot, on_demand = aws_pool(), aws_pool(market=Market.ON_DEMAND)
    first = quotes(spot, on_demand)
    assert first == PriceQuotes(prices={spot.key: 0.00001, on_demand.key: 1.006})

    moto_ec2.stop()  # from here on every read of a spot price fails
    assert quotes(spot, on_demand) == first  # within the cache period: no read was made
    assert quotes.logged.calls == []

    monkeypatch.setenv(PRICE_CACHE_VARIABLE, "0")  # the cache period is over
    stale = quotes(spot, on_demand)
    assert list(stale.failed) == [spot.key] and stale.failed[spot.key].startswith("EndpointConnectionError: ")
    assert stale.prices == first.prices  # the spot price last read, and the table's on-demand price read again
    [warning] = quotes.logged.calls
    assert (warning.method_name, warning.args, warning.kwargs) == (
        "warning", ("price read failed",), {"pool": spot.key, "reason": stale.failed[spot.key], "last_price": 0.00001})
    assert SECRET_KEY not in repr(stale) and SECRET_KEY not in repr(quotes.logged.calls)


def test_a_failed_read_with_nothing_cached_is_named_and_never_raises(moto_ec2, quotes, vl_home):
    moto_ec2.stop()
    spot, local = aws_pool(), Pool(zone="a", price_per_hour=0.5, price_given=True)
    answer = quotes(spot, local)
    assert answer.prices == {local.key: 0.5} and list(answer.failed) == [spot.key]
    (vl_home / "aws.toml").unlink()  # a settings problem is a failed read too, named with its fix
    unset = aws_pool(market=Market.ON_DEMAND)
    assert "needs its settings" in quotes(unset).failed[unset.key]


def test_the_cache_keeps_a_price_the_user_gave_apart_from_the_same_pool_read(quotes, monkeypatch):
    reads = []
    monkeypatch.setattr(catalog.catalog("local"), "current_price", lambda pool: reads.append(pool) or 0.9,
                        raising=False)  # the local provider has no price to read: a stand-in for one that has
    read, given = Pool(zone="a"), Pool(zone="a", price_per_hour=0.2, price_given=True)
    assert quotes(read).prices == {read.key: 0.9}
    assert quotes(given).prices == {given.key: 0.2}  # the user's price, not the same pool's cached read
    assert quotes(read).prices == {read.key: 0.9} and len(reads) == 1  # the read, still cached


# ---------------------------------------------------------------- the policy


def spec_of(*pools: Pool) -> RunSpec:
    return RunSpec(run_id="r-prices", command=["train"], workdir="/tmp", storage_url="file:///tmp/s", pools=list(pools))


def test_pool_price_is_the_quote_then_the_last_host_then_the_list_price():
    pool, other = Pool(zone="a", price_per_hour=1.0), Pool(zone="b", price_per_hour=5.0)
    hosted = AttemptRecord(attempt=1, pool=pool.key, started_at=NOW, price_per_hour=0.8)
    assert policy.pool_price(pool, RunStatus(run_id="r")) == 1.0
    assert policy.pool_price(pool, RunStatus(run_id="r", attempts=[hosted])) == 0.8
    quoted = RunStatus(run_id="r", attempts=[hosted], price_quotes={pool.key: 0.6, "local/c/cpu/spot": 0.1})
    assert policy.pool_price(pool, quoted) == 0.6
    assert policy.pool_price(other, quoted) == 5.0
    assert policy.pool_price(Pool(zone="c"), RunStatus(run_id="r")) is None


def test_quotes_that_reverse_the_list_prices_reverse_the_placement():
    cheap_listed, dear_listed = Pool(zone="a", price_per_hour=1.0), Pool(zone="b", price_per_hour=2.0)
    spec = spec_of(cheap_listed, dear_listed)
    assert policy.next_placement(spec, RunStatus(run_id="r"), NOW).placement.pool == cheap_listed
    quoted = RunStatus(run_id="r", price_quotes={cheap_listed.key: 3.0, dear_listed.key: 0.5})
    assert policy.next_placement(spec, quoted, NOW).placement.pool == dear_listed


# ---------------------------------------------------------------- the workflow


def counter_spec(tmp_path, pools: list[Pool], **overrides) -> RunSpec:
    out = tmp_path / "counter.json"
    return make_spec(tmp_path, steps=5, out=out, pools=pools, checkpoint_every="2",
                     **{"command": counter_command(5, out), **overrides})


async def finished(client, run_id: str) -> RunStatus:
    await asyncio.wait_for(client.get_workflow_handle(run_id).result(), 120)
    await record_histories(client, run_id)  # VL_RECORD_HISTORIES: the replay guard covers the quotes
    return await vl_client.status(client, run_id)


async def events_of(client, handle) -> list:
    """Every event of the started workflow, over the chain of its continued-as-new runs, in order."""
    events, run = [], handle.first_execution_run_id
    while run:
        history = await client.get_workflow_handle(handle.id, run_id=run).fetch_history()
        events += history.events
        last = history.events[-1]
        run = last.workflow_execution_continued_as_new_event_attributes.new_execution_run_id \
            if last.HasField("workflow_execution_continued_as_new_event_attributes") else None
    return events


class QuotesUnavailable(ControlActivities):
    @activity.defn(name="quote_prices")
    def quote_prices(self, inp: QuotePricesInput) -> PriceQuotes:
        raise RuntimeError("the price service is down")


async def test_a_run_whose_price_activity_fails_still_places_and_finishes(temporal_env, vl_home, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setattr(worker.control, "ControlActivities", QuotesUnavailable)
    queue = f"vl-test-{uuid.uuid4().hex[:8]}"
    cheap, dear = Pool(zone="a", price_per_hour=0.5, price_given=True), Pool(zone="b", price_per_hour=1.0)
    spec = counter_spec(tmp_path, [dear, cheap])
    async with worker.control.create_worker(temporal_env.client, task_queue=queue, home=vl_home):
        handle = await vl_client.submit(temporal_env.client, spec, queue=queue)
        status = await finished(temporal_env.client, spec.run_id)

    assert status.state == RunState.SUCCEEDED
    assert [(a.pool, a.outcome) for a in status.attempts] == [(cheap.key, AttemptOutcome.COMPLETED)]  # list prices
    assert status.price_quotes == {} and status.price_quotes_at is None
    events = await events_of(temporal_env.client, handle)
    scheduled = [e.activity_task_scheduled_event_attributes.activity_type.name for e in events
                 if e.HasField("activity_task_scheduled_event_attributes")]
    failed = [e.activity_task_failed_event_attributes.failure for e in events
              if e.HasField("activity_task_failed_event_attributes")]
    tries = [e.activity_task_started_event_attributes.attempt for e in events
             if e.HasField("activity_task_started_event_attributes")]
    # Asked before the placement, tried twice, then the run placed without it; asked once only: not before the
    # stop, which places nothing.
    assert scheduled[0] == "quote_prices" and scheduled.count("quote_prices") == 1 and tries[0] == 2
    assert len(failed) == 1 and "the price service is down" in failed[0].message


async def test_the_quotes_in_the_status_are_what_ranked_the_pools_placement_by_placement(
        temporal_env, control, tmp_path, monkeypatch):
    listed_cheap, listed_dear = Pool(zone="a", price_per_hour=0.5), Pool(zone="b", price_per_hour=1.0)
    # The prices move between the two placements; the second read of listed_dear fails.
    rounds = {listed_cheap.key: [3.0, 0.2], listed_dear.key: [0.25, RuntimeError("price feed unreachable")]}

    def current_price(pool: Pool) -> float:
        price = rounds[pool.key].pop(0)
        if isinstance(price, Exception):
            raise price
        return price

    monkeypatch.setattr(catalog.catalog("local"), "current_price", current_price, raising=False)
    monkeypatch.setenv(PRICE_CACHE_VARIABLE, "0")  # each placement reads again
    marker, out = tmp_path / "failed-once", tmp_path / "counter.json"
    fails_once = f"test -e {marker} || {{ touch {marker}; exit 3; }}; " + shlex.join(counter_command(5, out))
    spec = counter_spec(tmp_path, [listed_cheap, listed_dear], command=["/bin/sh", "-c", fails_once],
                        limits=Limits(script_retries=1, max_host_faults=0))
    await vl_client.submit(temporal_env.client, spec, queue=control)
    status = await finished(temporal_env.client, spec.run_id)

    assert status.state == RunState.SUCCEEDED
    assert [(a.pool, a.outcome) for a in status.attempts] == [(listed_dear.key, AttemptOutcome.FAILED),
                                                              (listed_cheap.key, AttemptOutcome.COMPLETED)]
    # listed_dear kept the quote of its last good read: 0.25 > 0.2, so the second placement went to listed_cheap.
    assert status.price_quotes == {listed_cheap.key: 0.2, listed_dear.key: 0.25}
    assert status.price_quotes_at is not None and rounds == {listed_cheap.key: [], listed_dear.key: []}
    # The host bills what the local provider says; the quotes only rank.
    assert [a.price_per_hour for a in status.attempts] == [1.0, 0.5]
