"""Control-plane activities: provision, release, describe, verify, reap, price quotes and reclaim injection.

Built once by the control-plane worker. Provider SDKs block, so these run on the worker's thread pool
(sync activities), except the reclaim injection, which waits out a grace period.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
from pathlib import Path

import structlog
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.heartbeats import heartbeating
from activities.providers import make_provider
from activities.providers.base import NoCapacityError, Provider, ProviderConfigError
from vaultlayer import checkpoint
from vaultlayer.catalog import current_prices
from vaultlayer.models import (
    Host,
    HostDescription,
    InjectReclaimInput,
    Pool,
    PriceQuotes,
    ProvisionInput,
    ProvisionResult,
    PruneInput,
    QuotePricesInput,
    ReapInput,
    VerifyInput,
    VerifyResult,
)

log = structlog.get_logger(__name__)

# A pool's price is read at most once per this many seconds in a worker, however often runs place (AWS
# throttles DescribeSpotPriceHistory, and spot prices move over hours, not seconds). Tests set the variable.
PRICE_CACHE_SECONDS = 300.0
PRICE_CACHE_VARIABLE = "VL_PRICE_CACHE_SECONDS"
REASON_CHARACTERS = 200  # of a failed read's reason, in PriceQuotes.failed and the log


def price_cache_seconds() -> float:
    """PRICE_CACHE_SECONDS, or the number PRICE_CACHE_VARIABLE holds."""
    value = os.environ.get(PRICE_CACHE_VARIABLE)
    try:
        return float(value) if value else PRICE_CACHE_SECONDS
    except ValueError:
        log.warning("not a number of seconds: using the default", variable=PRICE_CACHE_VARIABLE,
                    default=PRICE_CACHE_SECONDS)
        return PRICE_CACHE_SECONDS


def price_cache_key(pool: Pool) -> str:
    """Runs share the cache: a price the user gave is its run's own, so it is part of the key."""
    return f"{pool.key}@{pool.price_per_hour}" if pool.price_given else pool.key


def read_failure(err: Exception) -> str:
    """A failed read, short: the error's type and the first line of its message, any user:password@ of a URL
    in it removed. Never the request, the settings or the credentials."""
    lines = str(err).strip().splitlines()
    message = re.sub(r"//[^/\s@]+@", "//", lines[0] if lines else "")
    return f"{type(err).__name__}: {message}"[:REASON_CHARACTERS] if message else type(err).__name__


class ControlActivities:
    def __init__(self, vl_home: Path, temporal_env: dict[str, str]) -> None:
        self.vl_home = vl_home
        self.temporal_env = temporal_env
        self._providers: dict[str, Provider] = {}
        # price_cache_key -> (time.monotonic() of the read, the price read: None when the provider has none)
        self._prices: dict[str, tuple[float, float | None]] = {}
        self._prices_lock = threading.Lock()

    def provider(self, name: str) -> Provider:
        if name not in self._providers:
            self._providers[name] = make_provider(name, self.vl_home, self.temporal_env)
        return self._providers[name]

    @activity.defn(name="provision")
    @heartbeating
    def provision(self, inp: ProvisionInput) -> ProvisionResult:
        provider = self.provider(inp.placement.pool.provider)
        try:
            return provider.provision(inp)
        except NoCapacityError as err:
            price = inp.placement.pool.price_per_hour or 0.0
            return ProvisionResult(refusal=err.kind, message=str(err),
                                   held_cost_usd=price * err.held_host_seconds / 3600)
        except ProviderConfigError as err:  # no retry can fix settings: fail the run with the reason
            raise ApplicationError(str(err), type="ProviderConfigError", non_retryable=True) from None

    @activity.defn(name="release")
    @heartbeating
    def release(self, host: Host) -> None:
        self.provider(host.provider).release(host)

    @activity.defn(name="describe_host")
    @heartbeating
    def describe_host(self, host: Host) -> HostDescription:
        return self.provider(host.provider).describe(host)

    @activity.defn(name="verify_checkpoint")
    @heartbeating
    def verify_checkpoint(self, inp: VerifyInput) -> VerifyResult:
        result = checkpoint.choose_checkpoint(inp.storage_url, inp.run_id, inp.fences)
        for bad in result.rejected:
            log.warning("checkpoint rejected", run_id=inp.run_id, checkpoint=bad.name, reason=bad.reason)
        return result

    @activity.defn(name="prune_checkpoints")
    @heartbeating
    def prune_checkpoints(self, inp: PruneInput) -> list[str]:
        """Retention (checkpoint.prune_checkpoints): here, because hosts come and go and may die mid-upload."""
        removed = checkpoint.prune_checkpoints(inp.storage_url, inp.run_id, inp.keep, inp.fences, inp.reported,
                                               inp.protect)
        if removed:
            log.info("checkpoints pruned", run_id=inp.run_id, removed=removed)
        return removed

    @activity.defn(name="quote_prices")
    @heartbeating
    def quote_prices(self, inp: QuotePricesInput) -> PriceQuotes:
        """What one host of each pool costs now (catalog.current_prices), each pool read at most once per
        price_cache_seconds() in this worker. Never raises for a read that failed: the pool is named in `failed`
        and keeps its last price read, however old, if there is one."""
        max_age, now = price_cache_seconds(), time.monotonic()
        with self._prices_lock:
            cached = {pool.key: self._prices.get(price_cache_key(pool)) for pool in inp.pools}
        due = [pool for pool in inp.pools if cached[pool.key] is None or now - cached[pool.key][0] >= max_age]
        read, errors = current_prices(due)
        with self._prices_lock:
            for pool in due:
                if pool.key in read:
                    self._prices[price_cache_key(pool)] = cached[pool.key] = (now, read[pool.key])
        quotes = PriceQuotes()
        for pool in inp.pools:
            if pool.key in errors:
                quotes.failed[pool.key] = read_failure(errors[pool.key])
                log.warning("price read failed", pool=pool.key, reason=quotes.failed[pool.key],
                            last_price=cached[pool.key][1] if cached[pool.key] else None)
            if cached[pool.key] is not None and cached[pool.key][1] is not None:
                quotes.prices[pool.key] = cached[pool.key][1]
        return quotes

    @activity.defn(name="reap_run")
    @heartbeating
    def reap_run(self, inp: ReapInput) -> list[str]:
        reaped = []
        for name in inp.providers:
            reaped += self.provider(name).reap(inp.run_id)
        if reaped:
            log.warning("reaped hosts", run_id=inp.run_id, hosts=reaped)
        return reaped

    @activity.defn(name="inject_reclaim")
    async def inject_reclaim(self, inp: InjectReclaimInput) -> None:
        """Take the host back: with a notice where the provider can give one (the local provider), else by
        releasing it, which the workflow sees as a reclaim without notice (a policy move or a limit on a
        cloud host loses the work since the last checkpoint)."""
        provider = self.provider(inp.host.provider)
        if hasattr(provider, "inject_reclaim"):
            await provider.inject_reclaim(inp, heartbeat=activity.heartbeat)
        else:
            log.warning("no notice channel: releasing the host", host=inp.host.host_id, provider=provider.name)
            await asyncio.to_thread(provider.release, inp.host)
