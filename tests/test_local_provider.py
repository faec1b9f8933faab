"""The local provider's hosts are process groups: released or reaped means gone, as a cloud's terminated instance is."""

from __future__ import annotations

import json

from activities.providers.local import provider as local


def test_a_reap_returns_only_once_the_groups_it_killed_are_gone(tmp_path, monkeypatch):
    """A SIGKILLed process runs its teardown in the kernel for a moment, longer on a loaded machine. A reap that
    returned at once left a cancelled gang's host alive for a test that looked right after the run ended
    (`test_a_cancel_while_a_gang_is_provisioned_leaves_no_host`, under load)."""
    host_dir = tmp_path / "hosts" / "run-1" / "h-1"
    host_dir.mkdir(parents=True)
    (host_dir / "host.json").write_text(json.dumps({"host_id": "h-1", "pgid": 4242, "run_id": "run-1"}))
    states = iter([True, True, True, False])  # alive when the reap looks, still exiting twice after the kill, gone
    looks, kills = [], []

    def group_alive(pgid: int) -> bool:
        looks.append(pgid)
        return next(states, False)

    monkeypatch.setattr(local, "group_alive", group_alive)
    monkeypatch.setattr(local, "kill_group", lambda pgid, sig=None: kills.append(pgid))
    assert local.LocalProvider(vl_home=tmp_path, temporal_env={}).reap("run-1") == ["h-1"]
    assert kills == [4242]
    assert len(looks) == 4, "the reap returned before the group it killed was gone"
    assert json.loads((host_dir / "host.json").read_text())["released"]
