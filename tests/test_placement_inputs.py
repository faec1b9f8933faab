"""What placement needs from the edges, without a server: local pools with zone labels and prices, an
excluded host never handed back, and the `vl run` flags and `vl status` lines for limits and costs."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta

import pytest

from activities.control import ControlActivities
from activities.providers.local import LocalProvider
from cli import render
from cli.cmd_run import request_from_args
from cli.main import parser
from vaultlayer.catalog import local
from vaultlayer.models import (
    AttemptRecord,
    Host,
    InjectReclaimInput,
    Market,
    Placement,
    Pool,
    ProvisionInput,
    RunStatus,
)
from vaultlayer.request import RunRequestError, build_spec


def test_local_pools_take_zone_labels_but_no_regions():
    local.validate_pool(Pool(zone="a"))
    with pytest.raises(ValueError, match="no regions"):
        local.validate_pool(Pool(region="us-east-1"))


def test_the_local_provider_never_hands_back_an_excluded_host_and_reports_the_pool_price(tmp_path):
    provider = LocalProvider(vl_home=tmp_path, temporal_env={"TEMPORAL_ADDRESS": "127.0.0.1:1"})
    # A retried provision finds the first try's host alive: normally it is handed back as it is.
    first = subprocess.Popen(["sleep", "60"], start_new_session=True)
    directory = provider.host_dir("r", "h-1")
    directory.mkdir(parents=True)
    (directory / "host.json").write_text(json.dumps({"run_id": "r", "host_id": "h-1", "pgid": first.pid}))
    pool = Pool(zone="a", price_per_hour=0.5, on_demand_price_per_hour=2.0)
    try:
        kept = provider.provision(ProvisionInput(run_id="r", placement=Placement(pool=pool, attempt=1)))
        assert kept.host.host_id == "h-1"
        replaced = provider.provision(ProvisionInput(run_id="r", placement=Placement(
            pool=pool, attempt=1, excluded_hosts=["h-1"])))
        assert replaced.host.host_id != "h-1"
        assert (replaced.host.price_per_hour, replaced.host.on_demand_price_per_hour) == (0.5, 2.0)
    finally:
        first.kill()
        first.wait()
        provider.reap("r")


async def test_a_provider_without_a_notice_channel_takes_the_host_back_by_releasing_it(tmp_path):
    """How a policy move or a limit vacates a cloud host: the workflow then sees a reclaim without notice."""
    released = []

    class NoNotices:
        name = "quiet"

        def release(self, host: Host) -> None:
            released.append(host.host_id)

    control = ControlActivities(vl_home=tmp_path, temporal_env={})
    control._providers["quiet"] = NoNotices()
    await control.inject_reclaim(InjectReclaimInput(host=Host(host_id="h-1", provider="quiet", pool=Pool(),
                                                              task_queue="q"), notice_seconds=30))
    assert released == ["h-1"]


def spec_from(*flags: str, monkeypatch, tmp_path):
    monkeypatch.setenv("VL_HOME", str(tmp_path))
    args = parser().parse_args(["run", "--run-id", "r-test", *flags, "--", "python", "-c", "pass"])
    return build_spec(request_from_args(args))


def test_run_flags_set_limits_prices_and_an_on_demand_fallback(monkeypatch, tmp_path):
    before = datetime.now(UTC)
    spec = spec_from("--zone", "a", "--zone", "b", "--price", "0.9", "--on-demand-price", "3", "--on-demand-fallback",
                     "--deadline", "36h", "--total-steps", "1000", "--work", "24h", "--max-cost", "50",
                     "--exclude-hosts-for", "1h", "--reclaim-in", "a", "--max-attempts", "7", "--max-reclaims", "9",
                     monkeypatch=monkeypatch, tmp_path=tmp_path)
    assert [(p.zone, p.market, p.price_per_hour) for p in spec.pools] == [
        ("a", Market.SPOT, 0.9), ("b", Market.SPOT, 0.9), ("a", Market.ON_DEMAND, 3.0), ("b", Market.ON_DEMAND, 3.0)]
    limits = spec.limits
    assert before + timedelta(hours=36) <= limits.deadline <= datetime.now(UTC) + timedelta(hours=36)
    assert (limits.max_cost, limits.host_exclusion_seconds) == (50.0, 3600.0)
    assert (limits.max_attempts, limits.max_reclaims) == (7, 9)
    assert (spec.total_steps, spec.work_seconds, spec.reclaim_only_in) == (1000, 86400.0, ["a"])


@pytest.mark.parametrize(("flags", "message"), [(["--max-cost", "0"], "--max-cost 0.0: must be more than zero"),
                                                (["--deadline", "soon"], "--deadline 'soon'"),
                                                (["--price", "-1"], "--price -1.0: must be zero or more")])
def test_bad_limit_flags_are_refused(flags, message, monkeypatch, tmp_path):
    with pytest.raises(RunRequestError, match=message):
        spec_from(*flags, monkeypatch=monkeypatch, tmp_path=tmp_path)


def test_status_shows_cost_per_attempt_and_per_run():
    started = datetime(2026, 1, 1, tzinfo=UTC)
    record = AttemptRecord(attempt=1, pool="local/a/cpu/spot", host="h-1", started_at=started, cost_usd=1.25,
                           reason="reclaim notice")
    status = RunStatus(run_id="r", attempts=[record], cost_usd=1.25, on_demand_cost_usd=5.0)
    assert render.cost_line(status) == "cost $1.25, on demand $5.00 (25% of on-demand)"
    assert "local/a/cpu/spot host h-1 running" in render.attempt_line(record) and "$1.25" in render.attempt_line(record)
