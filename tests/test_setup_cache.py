"""Setup that does not repeat forever (issue 15, docs/code-and-outputs.md): what a run's setup commands leave in
pip's and uv's caches is stored once, by the first host that finished setup, and restored on every later host
before its setup starts. `bench/setup_time.py` measures the time it saves with a real pip build.

The end-to-end test's setup plays a package manager with a cache: it builds (slowly, in real life) only when
its cache misses, and says which it did in the attempt's log.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from cli.render import attempt_line
from tests.conftest import travelling_spec
from tests.helpers import wait_for_progress, wait_until
from tests.test_run_e2e import result_of
from vaultlayer import client as vl_client
from vaultlayer.models import AttemptOutcome, RunState
from vaultlayer.workdir import (
    WorkdirError,
    restore_snapshot,
    setup_cache_env,
    store_setup_cache,
    stored_setup_cache,
)

BUILD_ONCE = ('if [ -f "$PIP_CACHE_DIR/wheels/pkg.whl" ]; then echo "setup: cache hit"; else echo "setup: building"; '
              'mkdir -p "$PIP_CACHE_DIR/wheels" && echo built > "$PIP_CACHE_DIR/wheels/pkg.whl"; fi')


def attempt_log(vl_home, run_id: str, host: str, attempt: int) -> str:
    return (vl_home / "hosts" / run_id / host / f"a{attempt}.log").read_text()


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "no-cache"])
async def test_a_second_host_restores_what_the_first_hosts_setup_cached(
        temporal_env, control, vl_home, tmp_path, cache):
    client = temporal_env.client
    spec = travelling_spec(tmp_path, steps=300, out=tmp_path / "w.pt", setup=[BUILD_ONCE], setup_cache=cache)
    await vl_client.submit(client, spec, queue=control)
    await wait_for_progress(client, spec.run_id, steps=10, durable=10, attempt=1)
    if cache:  # the first host stores it beside the training; reclaiming before then would test nothing
        await wait_until(lambda: asyncio.to_thread(stored_setup_cache, spec.storage_url, spec.run_id), 60,
                         "the stored setup cache")
    await vl_client.reclaim(client, spec.run_id)
    status = await result_of(client, spec.run_id)

    assert status.state == RunState.SUCCEEDED, status.stop_reason
    first, second = status.attempts
    assert (first.outcome, second.outcome) == (AttemptOutcome.RECLAIMED, AttemptOutcome.COMPLETED)
    assert first.setup_seconds is not None and second.setup_seconds is not None
    assert "setup: building" in attempt_log(vl_home, spec.run_id, first.host, 1)
    if cache:
        assert second.setup_cache == "restored" and " setup " in attempt_line(second)
        assert attempt_line(second).split(" setup ", 1)[1].split("s, cache restored", 1)[0].replace(".", "").isdigit()
        assert "setup: cache hit" in attempt_log(vl_home, spec.run_id, second.host, 2)
    else:
        assert stored_setup_cache(spec.storage_url, spec.run_id) is None
        assert (first.setup_cache, second.setup_cache) == ("", "")
        assert "setup: building" in attempt_log(vl_home, spec.run_id, second.host, 2)


def test_the_cache_round_trips_through_storage_and_one_over_the_limit_is_not_stored(tmp_path):
    storage_url = (tmp_path / "storage").as_uri()
    cache = tmp_path / "cache"
    env = setup_cache_env(cache)
    assert env == {"VL_SETUP_CACHE": str(cache), "PIP_CACHE_DIR": str(cache / "pip"),
                   "UV_CACHE_DIR": str(cache / "uv")}
    (cache / "pip" / "wheels").mkdir(parents=True)
    (cache / "pip" / "wheels" / "torch.whl").write_bytes(os.urandom(4096))
    (cache / "uv").mkdir()
    (cache / "uv" / "CACHEDIR.TAG").write_text("Signature: 8a477f597d28d172789f06886806bc55\n")

    with pytest.raises(WorkdirError, match="over the 1.0 KB worth restoring"):
        store_setup_cache(cache, storage_url, "r1", max_bytes=1000)
    assert stored_setup_cache(storage_url, "r1") is None, "nothing is pointed at when nothing was stored"

    ref = store_setup_cache(cache, storage_url, "r1")
    assert stored_setup_cache(storage_url, "r1") == ref and stored_setup_cache(storage_url, "r2") is None
    restore_snapshot(ref, tmp_path / "elsewhere")
    for path in ("pip/wheels/torch.whl", "uv/CACHEDIR.TAG"):
        assert (tmp_path / "elsewhere" / path).read_bytes() == (cache / path).read_bytes()
