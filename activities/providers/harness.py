"""The `harness` provider: hosts played by the load harness (`bench/load.py`), for control-plane load tests.

Only used when a run's pool names it. A host is a tag file under VL_HOME/harness/<run>/<host>.json
and the task queue the harness process polls (QUEUE_VARIABLE): one harness worker plays every
host, so a thousand runs need one poller instead of a thousand agent processes. Release, describe and
reap work on the tag files exactly as the local provider's do on its process groups, so a leaked host
shows up as a tag never released.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import structlog

from vaultlayer.models import Host, HostDescription, HostState, ProvisionInput, ProvisionResult

log = structlog.get_logger(__name__)

QUEUE_VARIABLE = "VL_HARNESS_TASK_QUEUE"
DEFAULT_QUEUE = "vl-harness"


class HarnessProvider:
    name = "harness"

    def __init__(self, vl_home: Path, temporal_env: dict[str, str]) -> None:
        self.root = vl_home / "harness"
        self.task_queue = os.environ.get(QUEUE_VARIABLE, DEFAULT_QUEUE)

    def _tag_file(self, run_id: str, host_id: str) -> Path:
        return self.root / run_id / f"{host_id}.json"

    def provision(self, request: ProvisionInput) -> ProvisionResult:
        placement = request.placement
        # One host per attempt; a retried provision finds the same tag and hands back the same host.
        host_id = f"h-{placement.attempt}"
        tag_file = self._tag_file(request.run_id, host_id)
        if not tag_file.exists():
            tag_file.parent.mkdir(parents=True, exist_ok=True)
            tag_file.write_text(json.dumps({"run_id": request.run_id, "host_id": host_id, "released": False}))
        return ProvisionResult(host=Host(
            host_id=host_id, provider=self.name, pool=placement.pool, task_queue=self.task_queue,
            handle={"tag": str(tag_file)}, price_per_hour=placement.pool.price_per_hour or 0.0,
            on_demand_price_per_hour=placement.pool.on_demand_price_per_hour,
        ))

    @staticmethod
    def _read(tag_file: Path) -> dict:
        try:
            return json.loads(tag_file.read_text())
        except FileNotFoundError:
            return {}

    def release(self, host: Host) -> None:
        tag_file = Path(host.handle["tag"])
        tag = self._read(tag_file)
        if tag and not tag["released"]:
            tag["released"] = True
            tag_file.write_text(json.dumps(tag))

    def describe(self, host: Host) -> HostDescription:
        if self._read(Path(host.handle["tag"])).get("released", True):
            return HostDescription(state=HostState.GONE, reason="released")
        return HostDescription(state=HostState.RUNNING, reason="held by the harness")

    def reap(self, run_id: str) -> list[str]:
        reaped = []
        for tag_file in sorted((self.root / run_id).glob("*.json")):
            tag = self._read(tag_file)
            if tag and not tag["released"]:
                tag["released"] = True
                tag_file.write_text(json.dumps(tag))
                reaped.append(tag["host_id"])
        return reaped

    def live_runs(self) -> set[str]:
        return {tag["run_id"] for tag_file in self.root.glob("*/*.json")
                if (tag := self._read(tag_file)) and not tag["released"]}
