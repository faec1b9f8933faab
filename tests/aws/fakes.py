"""What moto does not do, played faithfully on loopback: the instance metadata service (IMDSv2) of each
instance, EC2's capacity and throttling errors, placement groups (moto 5.2 has none), spot interruptions,
and the instances themselves booting their user-data (a local `vl agent` with the identity and queue the
user-data names)."""

from __future__ import annotations

import base64
import gzip
import http.client
import itertools
import json
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MOTO_ACCOUNT = "123456789012"


def serve(handler: type[BaseHTTPRequestHandler], owner) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.owner = owner
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# ---------------------------------------------------------------- IMDSv2


def _imds_error(status: int, title: str) -> bytes:
    """The body real IMDS sends with a 401 or 404."""
    return (f'<?xml version="1.0" encoding="iso-8859-1"?>\n<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 '
            f'Transitional//EN"\n\t"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">\n'
            f'<html xmlns="http://www.w3.org/1999/xhtml" xml:lang="en" lang="en">\n <head>\n  '
            f'<title>{status} - {title}</title>\n </head>\n <body>\n  <h1>{status} - {title}</h1>\n </body>\n'
            f'</html>\n').encode()


class _ImdsHandler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self) -> None:
        imds: ImdsFake = self.server.owner
        ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
        if self.path != "/latest/api/token":
            return self._send(404, _imds_error(404, "Not Found"), "text/html")
        if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
            return self._send(400, _imds_error(400, "Bad Request"), "text/html")
        token = base64.b64encode(secrets.token_bytes(42)).decode()
        imds.tokens[token] = time.monotonic() + int(ttl)
        imds.issued += 1
        self._send(200, token.encode())

    def do_GET(self) -> None:
        imds: ImdsFake = self.server.owner
        token = self.headers.get("X-aws-ec2-metadata-token")
        if token is None or imds.tokens.get(token, 0) < time.monotonic():
            return self._send(401, _imds_error(401, "Unauthorized"), "text/html")
        path = self.path.removeprefix("/latest/meta-data/")
        imds.reads.append(path)
        value = imds.values().get(path)
        if value is None:
            return self._send(404, _imds_error(404, "Not Found"), "text/html")
        self._send(200, value.encode())


class ImdsFake:
    """One instance's metadata service: the documented IMDSv2 paths, token handshake and JSON."""

    def __init__(self, instance_id: str, zone: str, instance_type: str, lifecycle: str) -> None:
        self.identity = {"instance-id": instance_id, "placement/availability-zone": zone,
                         "instance-type": instance_type, "instance-life-cycle": lifecycle}
        self.instance_action: str | None = None
        self.rebalance: str | None = None
        self.tokens: dict[str, float] = {}
        self.issued = 0
        self.reads: list[str] = []
        self._server = serve(_ImdsHandler, self)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def values(self) -> dict[str, str | None]:
        return {**self.identity, "spot/instance-action": self.instance_action,
                "events/recommendations/rebalance": self.rebalance}

    def announce(self, action: str, deadline: datetime) -> None:
        self.instance_action = json.dumps({"action": action, "time": deadline.strftime("%Y-%m-%dT%H:%M:%SZ")})

    def recommend_rebalance(self, when: datetime) -> None:
        self.rebalance = json.dumps({"noticeTime": when.strftime("%Y-%m-%dT%H:%M:%SZ")})

    def expire_tokens(self) -> None:
        self.tokens.clear()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# ---------------------------------------------------------------- EC2 errors moto does not produce

ERROR_STATUS = {"InsufficientInstanceCapacity": 500, "RequestLimitExceeded": 503, "InternalError": 500}


def ec2_error_body(code: str, message: str) -> bytes:
    """EC2's documented error response."""
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{code}</Code>'
            f'<Message>{message}</Message></Error></Errors><RequestID>{uuid.uuid4()}</RequestID></Response>'
            ).encode()


def error_message(code: str, instance_type: str, zone: str) -> str:
    return {
        "InsufficientInstanceCapacity": (
            f"We currently do not have sufficient {instance_type} capacity in the Availability Zone you requested "
            f"({zone}). Our system will be working on provisioning additional capacity. You can currently get "
            f"{instance_type} capacity by not specifying an Availability Zone in your request or choosing "
            "another Availability Zone."),
        "SpotMaxPriceTooLow": ("Your Spot request price of 0.1 is lower than the minimum required Spot request "
                               "fulfillment price of 0.3618."),
        "MaxSpotInstanceCountExceeded": "Max spot instance count exceeded",
        "InstanceLimitExceeded": (f"You have requested more instances (1) than your current instance limit of 0 "
                                  f"allows for the specified instance type. Please visit "
                                  f"http://aws.amazon.com/contact-us/ec2-request to request an adjustment to this "
                                  f"limit."),
        "VcpuLimitExceeded": ("You have requested more vCPU capacity than your current vCPU limit of 0 allows for "
                              "the instance bucket that the specified instance type belongs to. Please visit "
                              "http://aws.amazon.com/contact-us/ec2-request to request an adjustment to this limit."),
        "Unsupported": (f"Your requested instance type ({instance_type}) is not supported in your requested "
                        f"Availability Zone ({zone}). Please retry your request by not specifying an Availability "
                        "Zone or choosing another Availability Zone."),
        "RequestLimitExceeded": "Request limit exceeded.",
        "InternalError": "An internal error has occurred",
    }[code]


def ec2_response(action: str, inner: str) -> bytes:
    """EC2's success response of `action`."""
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<{action}Response xmlns="http://ec2.amazonaws.com/doc/'
            f'2016-11-15/"><requestId>{uuid.uuid4()}</requestId>{inner}</{action}Response>').encode()


def numbered(form: dict[str, list[str]], prefix: str, suffix: str = "") -> list[str]:
    """The values of a query-API list (`<prefix>.1<suffix>`, `<prefix>.2<suffix>`, ...), in order."""
    values: list[str] = []
    while (key := f"{prefix}.{len(values) + 1}{suffix}") in form:
        values.append(form[key][0])
    return values


def region_of(headers) -> str:
    """The region a SigV4-signed request is for (its credential scope)."""
    match = re.search(r"Credential=[^/]+/\d{8}/([^/]+)/", headers.get("Authorization", ""))
    return match.group(1) if match else "us-east-1"


@dataclass
class PlacementGroup:
    name: str
    group_id: str
    strategy: str
    region: str
    tags: dict[str, str]

    def xml(self) -> str:
        tags = "".join(f"<item><key>{key}</key><value>{value}</value></item>" for key, value in self.tags.items())
        return (f"<groupName>{self.name}</groupName><groupId>{self.group_id}</groupId><strategy>{self.strategy}"
                f"</strategy><state>available</state><groupArn>arn:aws:ec2:{self.region}:{MOTO_ACCOUNT}:"
                f"placement-group/{self.name}</groupArn><tagSet>{tags}</tagSet>")

    def matches(self, name: str, values: list[str]) -> bool:
        """One filter of DescribePlacementGroups."""
        if name.startswith("tag:"):
            return self.tags.get(name.removeprefix("tag:")) in values
        return {"tag-key": bool(set(self.tags) & set(values)), "group-name": self.name in values,
                "strategy": self.strategy in values, "state": "available" in values}[name]


def group_error(code: str, name: str) -> tuple[int, bytes]:
    message = {"InvalidPlacementGroup.Duplicate": f"The Placement Group '{name}' already exists.",
               "InvalidPlacementGroup.Unknown": f"The Placement Group '{name}' is unknown.",
               "InvalidPlacementGroup.InUse": f"The placement group '{name}' is in use and may not be deleted."}[code]
    return 400, ec2_error_body(code, message)


class _ProxyHandler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def _relay(self) -> None:
        proxy: Ec2Proxy = self.server.owner
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        form = urllib.parse.parse_qs(body.decode(errors="replace")) if self.command == "POST" else {}
        region = region_of(self.headers)
        answer = proxy.intercept(form, region)
        if answer is None:
            connection = http.client.HTTPConnection("127.0.0.1", proxy.moto_port, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            status, payload = response.status, response.read()
            content_type = response.getheader("Content-Type", "text/xml")
            connection.close()
            proxy.launched(form, region, status, payload)
        else:
            status, payload, content_type = *answer, "text/xml;charset=UTF-8"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _relay


class Ec2Proxy:
    """Loopback proxy in front of moto. RunInstances for a zone (and type) may be answered with the error
    EC2 gives there; placement groups, which moto lacks, are served here (create, describe, delete, and
    RunInstances into one, which puts its instances in the group on moto's own records); every other
    request goes through untouched."""

    def __init__(self, moto_port: int) -> None:
        self.moto_port = moto_port
        self.subnet_zones: dict[str, str] = {}
        self._refusals: dict[tuple[str, str | None], str] = {}
        self._transient: dict[str, list[str]] = {}  # zone -> error codes to answer with, in order
        self._room: dict[str, int] = {}  # zone -> instances a launch may get there
        self.launches: list[tuple[str, str, str]] = []  # (zone, type, error code or "launched")
        self.placement_groups: dict[tuple[str, str], PlacementGroup] = {}  # (region, name) -> group
        self._group_ids = itertools.count(0x0A1B2C3D4E5F6071)
        self._lock = threading.Lock()
        self._server = serve(_ProxyHandler, self)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def refuse(self, zone: str, code: str, instance_type: str | None = None) -> None:
        self._refusals[zone, instance_type] = code

    def fail_next(self, zone: str, *codes: str) -> None:
        self._transient.setdefault(zone, []).extend(codes)

    def capacity(self, zone: str, hosts: int) -> None:
        """EC2 has room for `hosts` instances in the zone: a launch whose MinCount asks for more is refused with
        InsufficientInstanceCapacity and launches none (EC2's all or nothing)."""
        self._room[zone] = hosts

    def reset(self) -> None:
        with self._lock:
            self._refusals.clear()
            self._transient.clear()
            self._room.clear()
            self.launches.clear()
            self.placement_groups.clear()

    def intercept(self, form: dict[str, list[str]], region: str) -> tuple[int, bytes] | None:
        action = form.get("Action", [""])[0]
        if action in ("CreatePlacementGroup", "DescribePlacementGroups", "DeletePlacementGroup"):
            with self._lock:
                return getattr(self, f"_{action}")(form, region)
        if action != "RunInstances":
            return None
        itype = form.get("InstanceType", [""])[0]
        zone = form.get("Placement.AvailabilityZone", [None])[0] or self.subnet_zones.get(
            form.get("SubnetId", [""])[0], "")
        group = form.get("Placement.GroupName", [None])[0]
        if group and (region, group) not in self.placement_groups:
            return group_error("InvalidPlacementGroup.Unknown", group)
        with self._lock:
            code = self._transient[zone].pop(0) if self._transient.get(zone) else None
            code = code or self._refusals.get((zone, itype)) or self._refusals.get((zone, None))
            if code is None and int(form.get("MinCount", ["1"])[0]) > self._room.get(zone, sys.maxsize):
                code = "InsufficientInstanceCapacity"
            self.launches.append((zone, itype, code or "launched"))
        if code is None:
            return None
        return ERROR_STATUS.get(code, 400), ec2_error_body(code, error_message(code, itype, zone))

    def launched(self, form: dict[str, list[str]], region: str, status: int, payload: bytes) -> None:
        """After moto ran a launch into a placement group: its instances are in the group (moto has a field for
        an instance's group, and leaves it empty)."""
        group = form.get("Placement.GroupName", [None])[0]
        if form.get("Action") != ["RunInstances"] or not group or status != 200:
            return
        from moto.ec2.models import ec2_backends

        backend = ec2_backends[MOTO_ACCOUNT][region]
        for instance_id in re.findall(r"<instanceId>(i-[0-9a-f]+)</instanceId>", payload.decode()):
            backend.get_instance(instance_id).placement.group_name = group

    def _CreatePlacementGroup(self, form: dict[str, list[str]], region: str) -> tuple[int, bytes]:  # noqa: N802
        name = form["GroupName"][0]
        if (region, name) in self.placement_groups:
            return group_error("InvalidPlacementGroup.Duplicate", name)
        tags = dict(zip(numbered(form, "TagSpecification.1.Tag", ".Key"),
                        numbered(form, "TagSpecification.1.Tag", ".Value"), strict=True))
        group = PlacementGroup(name, f"pg-{next(self._group_ids):016x}", form.get("Strategy", ["cluster"])[0],
                               region, tags)
        self.placement_groups[(region, name)] = group
        return 200, ec2_response("CreatePlacementGroup", f"<placementGroup>{group.xml()}</placementGroup>")

    def _DescribePlacementGroups(self, form: dict[str, list[str]], region: str) -> tuple[int, bytes]:  # noqa: N802
        names = numbered(form, "GroupName")
        filters = [(name, numbered(form, f"Filter.{n}.Value"))
                   for n, name in enumerate(numbered(form, "Filter", ".Name"), start=1)]
        for name in names:
            if (region, name) not in self.placement_groups:
                return group_error("InvalidPlacementGroup.Unknown", name)
        found = [group for (where, name), group in self.placement_groups.items()
                 if where == region and (not names or name in names) and all(group.matches(*f) for f in filters)]
        items = "".join(f"<item>{group.xml()}</item>" for group in found)
        return 200, ec2_response("DescribePlacementGroups", f"<placementGroupSet>{items}</placementGroupSet>")

    def _DeletePlacementGroup(self, form: dict[str, list[str]], region: str) -> tuple[int, bytes]:  # noqa: N802
        from moto.ec2.models import ec2_backends

        name = form["GroupName"][0]
        if (region, name) not in self.placement_groups:
            return group_error("InvalidPlacementGroup.Unknown", name)
        if any(instance.placement.group_name == name and instance.state != "terminated"
               for reservation in ec2_backends[MOTO_ACCOUNT][region].all_reservations()
               for instance in reservation.instances):
            return group_error("InvalidPlacementGroup.InUse", name)
        del self.placement_groups[(region, name)]
        return 200, ec2_response("DeletePlacementGroup", "<return>true</return>")

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# ---------------------------------------------------------------- the instances themselves


def parse_user_data(script: str) -> tuple[dict[str, str], list[str]]:
    """The environment a user-data script exports and the `vl agent` command it ends with."""
    env, agent = {}, []
    for line in script.splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["export"] and "=" in words[1]:
            name, _, value = words[1].partition("=")
            env[name] = value
        elif len(words) > 1 and words[0].endswith("/vl") and words[1] == "agent":
            agent = words[1:]
    return env, agent


def instance_user_data(ec2, instance: dict) -> str:
    """The bootstrap an instance runs: its user-data, unzipped as cloud-init does; of a gang's one user-data, the
    part of the instance's launch index (what the part that reads it from IMDS picks)."""
    encoded = ec2.describe_instance_attribute(InstanceId=instance["InstanceId"], Attribute="userData")
    data = base64.b64decode(encoded.get("UserData", {}).get("Value", ""))
    text = (gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data).decode()
    node = instance["AmiLaunchIndex"]
    part = re.search(rf"<<'VL_NODE_{node}'\n(.*?\n)VL_NODE_{node}\n", text, re.DOTALL)
    return part.group(1) if part else text


@dataclass
class Machine:
    imds: ImdsFake
    agent: subprocess.Popen | None  # None: its user-data starts no agent
    env: dict[str, str]  # the agent's environment


class InstancePlayer:
    """For each instance moto reports running, boot what its user-data says: an IMDS of its own and a
    local `vl agent` with the exported environment and the agent's command line (the host directory
    moved under `root`). An instance that stops running takes its agent down with it, as a machine
    would. `booting = False` leaves new instances without an agent (the agent never starts)."""

    def __init__(self, ec2, root: Path, base_env: dict[str, str]) -> None:
        self.ec2 = ec2
        self.root = root
        self.base_env = base_env
        self.machines: dict[str, Machine] = {}
        self.booting = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.3):
            try:
                self.tick()
            except Exception as err:  # noqa: BLE001 - keep playing; the test sees what went wrong
                print(f"instance player: {err!r}", file=sys.stderr)

    def tick(self) -> None:
        pages = self.ec2.describe_instances(Filters=[{"Name": "tag-key", "Values": ["vaultlayer:run-id"]}])
        for instance in (i for r in pages["Reservations"] for i in r["Instances"]):
            machine = self.machines.get(instance["InstanceId"])
            running = instance["State"]["Name"] == "running"
            if machine is None and running and self.booting:
                self.machines[instance["InstanceId"]] = self.boot(instance)
            elif machine is not None and not running:
                self.kill_agent(machine)  # the machine is gone, and its processes with it

    def boot(self, instance: dict) -> Machine:
        instance_id = instance["InstanceId"]
        exported, agent_args = parse_user_data(instance_user_data(self.ec2, instance))
        imds = ImdsFake(instance_id, instance["Placement"]["AvailabilityZone"], instance["InstanceType"],
                        instance.get("InstanceLifecycle", "on-demand"))
        if not agent_args:
            return Machine(imds, None, exported)
        disk = self.root / instance_id
        disk.mkdir(parents=True)
        args = list(agent_args)
        args[args.index("--host-dir") + 1] = str(disk / "host")
        env = {**self.base_env, **exported, "VL_HOME": str(disk / "vl"),
               "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.url}
        with open(disk / "agent.log", "ab") as log:
            # In the machine's own empty folder: the run's code reaches it from storage, or not at all.
            agent = subprocess.Popen([sys.executable, "-m", "cli.main", *args], env=env, cwd=disk,
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        threading.Thread(target=agent.wait, daemon=True).start()
        return Machine(imds, agent, env)

    @staticmethod
    def kill_agent(machine: Machine) -> None:
        if machine.agent is not None and machine.agent.poll() is None:
            try:
                os.killpg(machine.agent.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def machine(self, instance_id: str, timeout: float = 60) -> Machine:
        deadline = time.monotonic() + timeout
        while instance_id not in self.machines:
            assert time.monotonic() < deadline, f"instance {instance_id} never booted"
            time.sleep(0.1)
        return self.machines[instance_id]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for machine in self.machines.values():
            self.kill_agent(machine)
            machine.imds.close()


class SpotMarket:
    """Plays EC2's side of a spot interruption on moto's own records: the notice on the instance's IMDS,
    then, at its time, the instance terminated with the reason EC2 gives (moto has no interruptions)."""

    REASON = ("Server.SpotInstanceTermination", "Server.SpotInstanceTermination: Spot instance termination")

    def __init__(self, player: InstancePlayer) -> None:
        self.player = player
        self._timers: list[threading.Timer] = []

    def interrupt(self, instance_id: str, notice_seconds: float) -> datetime:
        deadline = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=notice_seconds)
        self.player.machine(instance_id).imds.announce("terminate", deadline)
        timer = threading.Timer((deadline - datetime.now(UTC)).total_seconds(), self.reclaim_now, [instance_id])
        timer.daemon = True
        timer.start()
        self._timers.append(timer)
        return deadline

    @classmethod
    def reclaim_now(cls, instance_id: str, region: str = "us-east-1") -> None:
        from moto.ec2.models import ec2_backends
        from moto.ec2.models.instances import StateReason

        instance = ec2_backends[MOTO_ACCOUNT][region].get_instance(instance_id)
        if instance.state == "running":  # a host released first stays terminated by its user
            instance.terminate()
            code, message = cls.REASON
            instance.state_reason = StateReason(message, code)

    def close(self) -> None:
        for timer in self._timers:
            timer.cancel()
