"""Control-plane activities: provision, release, describe, verify, reap, and reclaim injection.

Built once by the control-plane worker. Provider SDKs block, so these run on the worker's thread pool
(sync activities), except the reclaim injection, which waits out a grace period.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.heartbeats import heartbeating
from activities.providers import make_provider
from activities.providers.base import NoCapacityError, Provider, ProviderConfigError
from vaultlayer import checkpoint
from vaultlayer.models import (
    Host,
    HostDescription,
    InjectReclaimInput,
    ProvisionInput,
    ProvisionResult,
    PruneInput,
    ReapInput,
    VerifyInput,
    VerifyResult,
)

log = structlog.get_logger(__name__)


class ControlActivities:
    def __init__(self, vl_home: Path, temporal_env: dict[str, str]) -> None:
        self.vl_home = vl_home
        self.temporal_env = temporal_env
        self._providers: dict[str, Provider] = {}

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
