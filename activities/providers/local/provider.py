"""The `local` provider's control plane: a host is a `vl agent` process group on this machine.

Each host gets its own working directory under VL_HOME/hosts/<run>/<host>, holding `host.json` (the
host's tag: run, attempt, process group), the agent's log, and `metadata/`, which stands in for the
instance-metadata service: a reclaim writes `metadata/spot/instance-action` in the same JSON shape as
AWS IMDS, waits the grace period, then SIGKILLs the whole group, as a spot provider would.
"""

from __future__ import annotations

import asyncio
import json
import itertools
import math
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import structlog

from activities.providers.base import NoCapacityError, ProviderConfigError, host_queue
from activities.providers.local import throttle
from activities.providers.local.host import METADATA_DIR_VARIABLE, NOTICE_RELATIVE_PATH
from activities.providers.local.throttle import group_alive
from vaultlayer import failpoints, protocol
from vaultlayer.models import (
    Host,
    HostDescription,
    HostState,
    InjectReclaimInput,
    ProvisionInput,
    ProvisionResult,
    Refusal,
)

log = structlog.get_logger(__name__)

LOOPBACK = "127.0.0.1"  # every local host's address: a gang's hosts reach each other here
# In VL_HOME, for trying placement: `[capacity]` zone = hosts it holds at once; `[slowdown]` zone = factor above 1
# (its hosts get about 1/factor of the CPU time, throttle.py).
LOCAL_SETTINGS_FILE = "local.toml"
SETTINGS_TABLES = ("capacity", "slowdown")


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _wait_gone(pgids: list[int], seconds: float = 5.0) -> None:
    """Until every group is gone, for at most `seconds`. After a SIGKILL too: a killed process still runs its
    teardown in the kernel for a moment, and released (or reaped) means gone, as a cloud's terminated instance is
    (bounded: a process stuck in the kernel is left)."""
    deadline = time.monotonic() + seconds
    while any(group_alive(pgid) for pgid in pgids) and time.monotonic() < deadline:
        time.sleep(0.02)


# Ports to listen on are picked below the kernel's ephemeral range (`free_port`); from this one up.
LISTEN_PORTS_FROM = 10000
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _ephemeral_low() -> int:
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


_next_port = itertools.count(random.randrange(1 << 16))


def free_port() -> int:
    """A TCP port nothing listens on now (a gang's rendezvous port, its hosts all sharing 127.0.0.1), from below
    the kernel's ephemeral range. A port the kernel gives a bind to port 0 lies in that range, and until its
    user listens on it, any connection this machine opens may take it as its local port: on a busy machine
    that happened between a pick and the listen. Below the range only listeners bind. Picks go on from a random
    start, so processes that pick at once rarely try the same port, and a process never picks one twice."""
    low = _ephemeral_low()
    span = low - LISTEN_PORTS_FROM
    for _ in range(span):
        port = LISTEN_PORTS_FROM + next(_next_port) % span
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((LOOPBACK, port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port from {LISTEN_PORTS_FROM} to {low - 1}")


def announced_deadline(deadline: float) -> datetime:
    """The deadline as the notice document can say it: whole seconds (the AWS instance-action shape has no
    fraction), rounded up so a short notice is never announced shorter than it is."""
    return datetime.fromtimestamp(math.ceil(deadline), UTC)


@dataclass(frozen=True)
class LocalSettings:
    """`VL_HOME/local.toml`, checked: zone label -> hosts it holds at once, and zone label -> slowdown factor."""

    capacity: dict[str, int] = field(default_factory=dict)
    slowdown: dict[str, float] = field(default_factory=dict)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def load_settings(vl_home: Path) -> LocalSettings:
    """The local provider's settings, every value checked, so that a mistake fails the provision before any host
    starts, naming the file, the zone and the fix (ProviderConfigError: no retry can mend a file)."""
    path = vl_home / LOCAL_SETTINGS_FILE
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return LocalSettings()
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ProviderConfigError(f"{path} cannot be read as TOML ({err}); fix it, or remove it to have no "
                                  "local capacity limits and no slowdowns") from None
    unknown = sorted(set(raw) - set(SETTINGS_TABLES))
    if unknown:
        raise ProviderConfigError(f"{path}: unknown {', '.join(map(repr, unknown))}; the local provider reads only "
                                  f"the tables {', '.join(f'[{name}]' for name in SETTINGS_TABLES)}")
    for name in SETTINGS_TABLES:
        if not isinstance(raw.get(name, {}), dict):
            raise ProviderConfigError(f"{path}: {name} must be a table, [{name}] with lines of zone = value")
    capacity, slowdown = raw.get("capacity", {}), raw.get("slowdown", {})
    for zone, hosts in capacity.items():
        if not (isinstance(hosts, int) and not isinstance(hosts, bool) and hosts >= 0):
            raise ProviderConfigError(f"{path}: [capacity] {zone} = {hosts!r} is not a number of hosts; set it to a "
                                      "whole number, 0 or more, or remove the line for no limit")
    for zone, factor in slowdown.items():
        if not (_is_number(factor) and factor > 1):
            raise ProviderConfigError(f"{path}: [slowdown] {zone} = {factor!r} is not a slowdown factor; set it to a "
                                      "number above 1 (4.0 gives the zone's hosts about a quarter of the CPU time), "
                                      "or remove the line to run them at full speed")
    return LocalSettings(capacity=dict(capacity), slowdown={zone: float(f) for zone, f in slowdown.items()})


class LocalProvider:
    name = "local"

    def __init__(self, vl_home: Path, temporal_env: dict[str, str]) -> None:
        self.hosts_root = vl_home / "hosts"
        self.temporal_env = temporal_env
        self._throttles: dict[int, subprocess.Popen] = {}  # pgid -> throttle this provider started (slowed zones)

    def host_dir(self, run_id: str, host_id: str) -> Path:
        return self.hosts_root / run_id / host_id

    def provision(self, request: ProvisionInput) -> ProvisionResult:
        """One host, or a gang of `placement.nodes` hosts on 127.0.0.1 with a free rendezvous port. A zone with a
        capacity (`local.toml`) that cannot hold the whole gang gives what it can, which is released at once; a zone
        with a slowdown gets each of its hosts a throttle. The settings are checked before any host starts."""
        nodes = request.placement.nodes
        settings = load_settings(self.hosts_root.parent)
        slowdown = settings.slowdown.get(request.placement.pool.zone or "")
        free = self._free_capacity(request.placement.pool.zone, settings)
        if free is not None and free < nodes:
            began, held = time.time(), [self._provision_one(request, self._host_id(request, rank), slowdown)
                                        for rank in range(free)]
            for host in held:
                self.release(host)
            raise NoCapacityError(Refusal.NO_CAPACITY,
                                  f"local zone {request.placement.pool.zone} could give {free} of {nodes} hosts "
                                  f"({LOCAL_SETTINGS_FILE} [capacity])",
                                  held_host_seconds=(time.time() - began) * len(held))
        hosts = []
        for rank in range(nodes):
            if nodes > 1:
                failpoints.reach_blocking(failpoints.provisioning_node(request.placement.attempt, rank))
            hosts.append(self._provision_one(request, self._host_id(request, rank), slowdown))
        return ProvisionResult(hosts=hosts, master_port=free_port() if nodes > 1 else 29500)

    @staticmethod
    def _host_id(request: ProvisionInput, node_rank: int) -> str:
        attempt = request.placement.attempt
        return f"h-{attempt}" if request.placement.nodes == 1 else f"h-{attempt}-n{node_rank}"

    def _free_capacity(self, zone: str | None, settings: LocalSettings) -> int | None:
        """How many more hosts the zone holds now (`local.toml`: `[capacity]` zone = hosts), None without a limit.
        Counts every run's live hosts of the zone, as a cloud zone's capacity does."""
        capacity = settings.capacity.get(zone or "")
        if capacity is None:
            return None
        used = 0
        for tag_file in self.hosts_root.glob("*/*/host.json"):
            tag = json.loads(tag_file.read_text())
            if tag.get("zone") == zone and not tag.get("released") and group_alive(tag["pgid"]):
                used += 1
        return max(capacity - used, 0)

    def _provision_one(self, request: ProvisionInput, host_id: str, slowdown: float | None = None) -> Host:
        placement = request.placement
        directory = self.host_dir(request.run_id, host_id)
        tag_file = directory / "host.json"
        excluded = host_id in placement.excluded_hosts
        if tag_file.exists() or excluded:
            # A retried provision: the host from the first try is the one to use, or to replace.
            tag = json.loads(tag_file.read_text()) if tag_file.exists() else {}
            if tag and not excluded and not tag.get("released") and group_alive(tag["pgid"]):
                return self._host(request, host_id, tag["pgid"])
            host_id = f"{host_id}-{int(time.time() * 1000) % 100000}"
            directory = self.host_dir(request.run_id, host_id)
            tag_file = directory / "host.json"
        (directory / "metadata").mkdir(parents=True, exist_ok=True)
        task_queue = host_queue(request.run_id, host_id)
        # The agent inherits this worker's environment: its TLS/API-key settings and its encryption key setting
        # (the key, or the path of its file) reach the host here, never through history.
        env = {**os.environ, **self.temporal_env, METADATA_DIR_VARIABLE: str(directory / "metadata"),
               protocol.ENV_HANDED_OVER: str(self.handed_over(request.run_id))}
        command = [
            sys.executable, "-m", "cli.main", "agent",
            "--task-queue", task_queue,
            "--host-id", host_id,
            "--host-dir", str(directory),
            "--run-id", request.run_id,
        ]
        with open(directory / "agent.log", "ab") as agent_log:
            process = subprocess.Popen(
                command,
                cwd=directory,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=agent_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        # Reap the agent when it dies so that a dead host does not linger as a zombie.
        threading.Thread(target=process.wait, daemon=True).start()
        tag = {
            "run_id": request.run_id,
            "attempt": placement.attempt,
            "host_id": host_id,
            "pgid": process.pid,
            "zone": placement.pool.zone,
            "created_at": time.time(),
        }
        if slowdown is not None:
            # It ends by itself once the group is gone: release, reap and `vl down` kill the group as they always did.
            try:
                slower = throttle.start(process.pid, slowdown, directory / "throttle.log")
            except OSError:
                kill_group(process.pid)  # no host left untagged
                raise
            threading.Thread(target=slower.wait, daemon=True).start()
            self._throttles[process.pid] = slower
            tag.update(slowdown=slowdown, throttle_pid=slower.pid)
        tag_file.write_text(json.dumps(tag))
        log.info("host provisioned", run_id=request.run_id, host=host_id, pgid=process.pid, slowdown=slowdown)
        return self._host(request, host_id, process.pid)

    def _host(self, request: ProvisionInput, host_id: str, pgid: int) -> Host:
        return Host(
            host_id=host_id,
            provider=self.name,
            pool=request.placement.pool,
            task_queue=host_queue(request.run_id, host_id),
            handle={"pgid": str(pgid), "dir": str(self.host_dir(request.run_id, host_id))},
            # This machine costs what the pool says it does (`vl run --price`), 0 by default.
            price_per_hour=request.placement.pool.price_per_hour or 0.0,
            on_demand_price_per_hour=request.placement.pool.on_demand_price_per_hour,
            address=LOOPBACK,
        )

    def _update_tag(self, host: Host, **fields: object) -> None:
        tag_file = Path(host.handle["dir"]) / "host.json"
        try:
            tag = json.loads(tag_file.read_text())
        except FileNotFoundError:
            return
        tag.update(fields)
        tag_file.write_text(json.dumps(tag))

    def release(self, host: Host) -> None:
        pgid = int(host.handle["pgid"])
        kill_group(pgid, signal.SIGTERM)
        _wait_gone([pgid], seconds=3)  # the grace period
        kill_group(pgid, signal.SIGKILL)
        _wait_gone([pgid])
        self._await_throttle(pgid)
        self._update_tag(host, released=True)
        log.info("host released", host=host.host_id, pgid=pgid)

    def _await_throttle(self, pgid: int) -> None:
        """A slowed host's throttle ends by itself once its group is gone (within a period, or a second where only
        zombies are left): wait for it, bounded, where this provider started it (else it ends unwatched)."""
        slower = self._throttles.pop(pgid, None)
        if slower is None:
            return
        try:
            slower.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.warning("host throttle still running", pgid=pgid, throttle_pid=slower.pid)

    def describe(self, host: Host) -> HostDescription:
        pgid = int(host.handle["pgid"])
        if group_alive(pgid):
            return HostDescription(state=HostState.RUNNING, reason="process group is alive")
        try:
            tag = json.loads((Path(host.handle["dir"]) / "host.json").read_text())
        except FileNotFoundError:
            tag = {}
        if tag.get("reclaimed_at"):
            return HostDescription(state=HostState.GONE, reason="reclaimed by the provider")
        return HostDescription(state=HostState.GONE, reason="process group is gone")

    def handed_over(self, run_id: str) -> Path:
        """The submitter's `env:` secret values for the run (vaultlayer/secrets.py `hand_over`)."""
        return protocol.handed_over_path(self.hosts_root.parent, run_id)

    def reap(self, run_id: str) -> list[str]:
        self.handed_over(run_id).unlink(missing_ok=True)  # the run has ended: its secret values go
        reaped, killed = [], []
        for tag_file in sorted((self.hosts_root / run_id).glob("*/host.json")):
            tag = json.loads(tag_file.read_text())
            if group_alive(tag["pgid"]):
                kill_group(tag["pgid"])
                reaped.append(tag["host_id"])
                killed.append(tag["pgid"])
            if not tag.get("released"):
                tag["released"] = True
                tag_file.write_text(json.dumps(tag))
        _wait_gone(killed)
        return reaped

    def live_runs(self) -> set[str]:
        runs = set()
        for tag_file in self.hosts_root.glob("*/*/host.json"):
            tag = json.loads(tag_file.read_text())
            if not tag.get("released") and group_alive(tag["pgid"]):
                runs.add(tag["run_id"])
        return runs

    async def inject_reclaim(self, request: InjectReclaimInput, heartbeat=None) -> None:
        """Take the host back: notice (AWS instance-action shape), grace period, SIGKILL."""
        host = request.host
        pgid = int(host.handle["pgid"])
        self._update_tag(host, reclaimed_at=time.time())
        if request.with_notice:
            deadline = announced_deadline(time.time() + request.notice_seconds)
            notice_file = Path(host.handle["dir"]) / "metadata" / NOTICE_RELATIVE_PATH
            notice_file.parent.mkdir(parents=True, exist_ok=True)
            body = {"action": "terminate", "time": deadline.strftime("%Y-%m-%dT%H:%M:%SZ")}
            tmp = notice_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(body))
            tmp.replace(notice_file)
            log.info("reclaim notice", host=host.host_id, deadline=body["time"])
            end = time.monotonic() + (deadline.timestamp() - time.time())  # the deadline announced, not earlier
            while time.monotonic() < end and group_alive(pgid):
                if heartbeat:
                    heartbeat()
                await asyncio.sleep(0.5)
        kill_group(pgid)
        log.info("host reclaimed", host=host.host_id, pgid=pgid)
