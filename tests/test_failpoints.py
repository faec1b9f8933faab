"""vaultlayer/failpoints.py: a point holds only when armed, until released; without VL_FAILPOINTS it is free."""

from __future__ import annotations

import asyncio

from tests.helpers import Failpoints, wait_until
from vaultlayer import failpoints, protocol


async def test_an_armed_point_holds_until_the_test_releases_it(tmp_path, monkeypatch):
    points = Failpoints(tmp_path / "fp").install(monkeypatch)
    name = failpoints.before_restore(2)
    points.arm(name)
    held = asyncio.create_task(failpoints.reach(name))
    await points.wait_reached(name, 30)
    await asyncio.sleep(0)  # one turn of the loop: still held, whatever the machine's speed
    assert not held.done()
    points.release(name)
    await asyncio.wait_for(held, 30)


async def test_a_point_not_armed_or_without_the_variable_passes(tmp_path, monkeypatch):
    points = Failpoints(tmp_path / "fp").install(monkeypatch)
    points.arm(failpoints.before_restore(2))
    await failpoints.reach(failpoints.before_restore(3))  # another attempt's point: not armed
    assert not points.reached(failpoints.before_restore(3))
    monkeypatch.delenv(protocol.ENV_FAILPOINTS)
    await failpoints.reach(failpoints.before_restore(2))
    assert not points.reached(failpoints.before_restore(2))


async def test_wait_until_returns_the_first_truthy_value():
    values = iter([None, 0, "ready"])

    async def check():
        return next(values)

    assert await wait_until(check, 30, "a value") == "ready"
