"""Google Cloud on loopback: a Compute Engine (and Secret Manager) REST fake, a GCE metadata server per
VM, and a player that runs each VM's host agent locally from the startup-script the provider wrote.

The fake serves what google-cloud-compute 1.57 sends over REST: instances insert/get/delete and
aggregatedList with a label `filter`, zoneOperations get/wait/list, resourcePolicies insert/delete and
aggregatedList (compact placement policies, which an instance names in `resourcePolicies`), regionOperations
get/wait; error bodies have the public API's shape (`{"error": {"code", "message", "errors": [{"message",
"domain", "reason"}]}}`), and failed inserts end in an Operation whose `error.errors[]` carries codes such as
ZONE_RESOURCE_POOL_EXHAUSTED (`insert_errors`, or a zone's `capacity` used up). VMs get internal addresses, on
loopback since local processes play them.
State changes (an operation finishing, a deleted VM going away, a preempted VM stopping) happen when
their time is due, checked on every request, so the fake has no clock thread of its own.

A test that needs an order forces it with a hold rather than hoping to act inside a window:
`hold_next(method, path_pattern)` holds the next matching request(s), after any `fail_next` answers, unanswered
until released (the client just sees a slow call); `hold_operations("insert")` keeps the zone operations of that
type started from then on RUNNING (an inserted VM stays PROVISIONING) until released, when each finishes as its
time comes (at once, if it came while held); operations of other types go on (a VM whose insert is held can still
be deleted, and its insert then ends without bringing it back). Each returns a `Hold`: `wait_held()` blocks until
something is held, `release()` lets go. Release in a `finally`; the fixture also releases every hold at teardown.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import ipaddress
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import google_crc32c
import pytest

API = "https://www.googleapis.com/compute/v1"
HOST_SERVICE_ACCOUNT = "vaultlayer-host@vl-test.iam.gserviceaccount.com"


def error_body(code: int, message: str, reason: str, domain: str = "global") -> dict:
    """An error as Compute Engine's v1 REST API returns it."""
    return {"error": {"code": code, "message": message,
                      "errors": [{"message": message, "domain": domain, "reason": reason}]}}


def stockout(project: str, zone: str, with_details: bool = False) -> dict:
    """The operation error of an insert the zone has no capacity for."""
    if not with_details:
        return {"code": "ZONE_RESOURCE_POOL_EXHAUSTED",
                "message": f"The zone 'projects/{project}/zones/{zone}' does not have enough resources available "
                           "to fulfill the request.  Try a different zone, or try again later."}
    return {"code": "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS",
            "message": f"The zone 'projects/{project}/zones/{zone}' does not have enough resources available to "
                       "fulfill the request.  '(resource type:compute)'.",
            "errorDetails": [{"errorInfo": {"reason": "resource_availability", "domain": "compute.googleapis.com",
                                            "metadatas": {"zone": zone, "vmType": "g2-standard-4"}}}]}


def quota_exceeded(region: str, metric: str = "NVIDIA_L4_GPUS") -> dict:
    return {"code": "QUOTA_EXCEEDED",
            "message": f"Quota '{metric}' exceeded.  Limit: 0.0 in region {region}.",
            "errorDetails": [{"quotaInfo": {"metricName": f"compute.googleapis.com/{metric.lower()}",
                                            "limitName": f"{metric.replace('_', '-')}-per-project-region",
                                            "dimensions": {"region": region}, "limit": 0}}]}


RATE_LIMITED = (429, {"error": {
    "code": 429, "status": "RESOURCE_EXHAUSTED",
    "message": "Quota exceeded for quota metric 'Queries' and limit 'Queries per minute' of service "
               "'compute.googleapis.com' for consumer 'project_number:100000000001'.",
    "errors": [{"message": "Quota exceeded for quota metric 'Queries'", "domain": "usageLimits",
                "reason": "rateLimitExceeded"}]}})
RATE_LIMITED_403 = (403, error_body(403, "Rate Limit Exceeded", "rateLimitExceeded", domain="usageLimits"))
BACKEND_ERROR = (503, error_body(503, "Internal error. Please try again or contact Google Support. "
                                      "(Code: '-5541426425936346453')", "backendError"))


# ---------------------------------------------------------------- list filters


FILTER_TERM = re.compile(r'\(?\s*([A-Za-z][\w.-]*)\s*(=|!=|:)\s*("[^"]*"|[^\s()]+)\s*\)?')


def parse_filter(text: str) -> list[tuple[str, str, str]]:
    """`a = "b" AND (c != d) AND labels.k:*`, the subset of the list-filter grammar the provider uses."""
    terms = []
    for part in re.split(r"\s+AND\s+", text.strip()) if text.strip() else []:
        match = FILTER_TERM.fullmatch(part.strip())
        if match is None:
            raise ValueError(part)
        name, operator, value = match.groups()
        terms.append((name, operator, value.strip('"')))
    return terms


def field_of(resource: dict, dotted: str):
    value = resource
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def matches(resource: dict, terms: list[tuple[str, str, str]]) -> bool:
    for name, operator, expected in terms:
        actual = field_of(resource, name)
        if operator == ":" and expected == "*":
            ok = actual is not None
        elif operator == ":":
            ok = actual is not None and expected in str(actual)
        elif operator == "=":
            ok = actual is not None and str(actual) == expected
        else:
            ok = actual is None or str(actual) != expected
        if not ok:
            return False
    return True


# ---------------------------------------------------------------- the Compute fake


@dataclass
class Vm:
    resource: dict
    guest: dict[str, str] = field(default_factory=lambda: {"preempted": "FALSE", "maintenance-event": "NONE"})
    metadata_server: MetadataServer | None = None


@dataclass(eq=False)
class Hold:
    """Requests (`FakeGce.hold_next`) or zone operations (`FakeGce.hold_operations`) a test holds until it lets go.
    `held` counts what it caught; a released hold catches nothing more."""

    cond: threading.Condition
    method: str = ""
    path: re.Pattern | None = None
    operation_type: str = ""
    times: float = math.inf
    held: int = 0
    released: bool = False

    def wait_held(self, count: int = 1, timeout: float = 60) -> bool:
        """Until `count` requests or operations are held (False if `timeout` passes first). Blocks: from a test,
        call it through `asyncio.to_thread`."""
        with self.cond:
            return self.cond.wait_for(lambda: self.held >= count, timeout)

    def release(self) -> None:
        """Held requests are served as usual; held operations finish when their time is due."""
        with self.cond:
            self.released = True
            self.cond.notify_all()


class FakeGce:
    """Compute Engine and Secret Manager for one project, in memory, over HTTP on loopback."""

    def __init__(self, project: str = "vl-test", op_seconds: float = 0.1) -> None:
        self.project = project
        self.op_seconds = op_seconds
        self.cond = threading.Condition()
        self.vms: dict[tuple[str, str], Vm] = {}
        self.operations: dict[tuple[str, str], dict] = {}
        self.by_request_id: dict[str, dict] = {}
        self.insert_errors: dict[str, dict] = {}  # zone -> the operation error its inserts end with
        self.capacity: dict[str, int] = {}  # zone -> VMs it holds at most: an insert past that is a stockout
        self.policies: dict[tuple[str, str], dict] = {}  # (region, name) -> resource policy
        self.not_offered: dict[str, set[str]] = {}  # zone -> machine and accelerator types it lacks
        self.faults: list[list] = []  # [method, path regex, status, body, times left]
        self.holds: list[Hold] = []
        self.secrets: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.permissions: set[str] = set()
        self._due: list[tuple[float, Callable[[], None]]] = []
        self._operations_running = 0
        self._metadata_servers: list[MetadataServer] = []
        self._ids = itertools.count(4_000_000_000_000_000_001)
        # Internal addresses on loopback (a VPC's would be 10.128.0.2 on): the VMs are local processes, and a gang's
        # hosts must reach each other at them (torchrun's master_addr).
        self._addresses = (ipaddress.ip_address("127.128.0.2") + n for n in itertools.count())
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> FakeGce:
        threading.Thread(target=self.server.serve_forever, daemon=True, name="fake-gce").start()
        return self

    def stop(self) -> None:
        self.release_holds()
        self.server.shutdown()
        self.server.server_close()
        for metadata_server in self._metadata_servers:
            metadata_server.stop()

    # ------------------------------------------------------------ test controls

    def fail_next(self, method: str, path_pattern: str, status: int, body: dict, times: int = 1) -> None:
        with self.cond:
            self.faults.append([method, re.compile(path_pattern), status, body, times])

    def hold_next(self, method: str, path_pattern: str, times: int = 1) -> Hold:
        """The next `times` matching requests that `fail_next` does not answer wait, unanswered, until released."""
        with self.cond:
            hold = Hold(self.cond, method=method, path=re.compile(path_pattern), times=times)
            self.holds.append(hold)
            return hold

    def hold_operations(self, operation_type: str = "insert") -> Hold:
        """Zone operations of this type started from now on stay RUNNING until released."""
        with self.cond:
            hold = Hold(self.cond, operation_type=operation_type)
            self.holds.append(hold)
            return hold

    def release_holds(self) -> None:
        for hold in self.holds:
            hold.release()

    def instances(self) -> list[dict]:
        with self.cond:
            self._advance()
            return [json.loads(json.dumps(vm.resource)) for vm in self.vms.values()]

    def resource_policies(self) -> list[dict]:
        with self.cond:
            self._advance()
            return [json.loads(json.dumps(policy)) for policy in self.policies.values()]

    def labelled(self, key: str = "vaultlayer-run-id") -> list[dict]:
        return [r for r in self.instances() if key in r.get("labels", {})]

    def add_instance(self, zone: str, name: str, labels: dict[str, str], status: str = "RUNNING") -> dict:
        """A VM that exists without the provider having asked for it now (a lost provision, a leak)."""
        with self.cond:
            resource = self._new_resource(zone, {"name": name, "labels": labels,
                                                 "machineType": f"zones/{zone}/machineTypes/g2-standard-4"})
            resource["status"] = status
            self.vms[(zone, name)] = Vm(resource)
            self.cond.notify_all()
            return resource

    def preempt(self, name: str, grace_seconds: float = 30.0) -> None:
        """Compute Engine takes a Spot VM back: `preempted` turns TRUE, the VM stops after the grace
        period, and a `compute.instances.preempted` system event is recorded; then, with the DELETE
        termination action, the VM is deleted."""
        with self.cond:
            zone, vm = self._vm_named(name)
            vm.guest["preempted"] = "TRUE"
            vm.resource["status"] = "STOPPING"
            self._system_event(zone, vm, "compute.instances.preempted", "Instance was preempted.")
            self._after(grace_seconds, lambda: self._stopped(zone, vm, by_provider=True))
            self.cond.notify_all()

    def announce_maintenance(self, name: str, event: str) -> None:
        with self.cond:
            _, vm = self._vm_named(name)
            vm.guest["maintenance-event"] = event
            self.cond.notify_all()

    def guest_shutdown(self, name: str) -> None:
        """The VM powered itself off (`shutdown -h now` from its startup-script)."""
        with self.cond:
            zone, vm = self._vm_named(name)
            self._system_event(zone, vm, "compute.instances.guestTerminate",
                               "Instance terminated by guest OS shutdown.")
            self._stopped(zone, vm, by_provider=False)
            self.cond.notify_all()

    def host_error(self, name: str) -> None:
        with self.cond:
            zone, vm = self._vm_named(name)
            self._system_event(zone, vm, "compute.instances.hostError", "Instance terminated due to a host error.")
            self._stopped(zone, vm, by_provider=False)
            self.cond.notify_all()

    def metadata_server(self, zone: str, name: str) -> MetadataServer:
        with self.cond:
            vm = self.vms[(zone, name)]
            if vm.metadata_server is None:
                vm.metadata_server = MetadataServer(self, vm).start()
                self._metadata_servers.append(vm.metadata_server)
            return vm.metadata_server

    # ------------------------------------------------------------ state

    def _vm_named(self, name: str) -> tuple[str, Vm]:
        self._advance()
        [(zone, vm)] = [(z, vm) for (z, n), vm in self.vms.items() if n == name]
        return zone, vm

    def _after(self, seconds: float, action: Callable[[], None], hold: Hold | None = None) -> None:
        self._due.append((time.monotonic() + seconds, action, hold))

    def _advance(self) -> None:
        """Apply every state change whose time has come and that no hold keeps back (caller holds the lock)."""
        now = time.monotonic()
        due = [item for item in self._due if item[0] <= now and (item[2] is None or item[2].released)]
        if due:
            self._due = [item for item in self._due if item not in due]
            for _, action, _ in sorted(due, key=lambda item: item[0]):
                action()
            self.cond.notify_all()

    def _operation_hold(self, operation_type: str) -> Hold | None:
        """The hold that keeps an operation of this type, starting now, RUNNING, if any (caller holds the lock)."""
        for hold in self.holds:
            if hold.operation_type == operation_type and not hold.released:
                hold.held += 1
                self.cond.notify_all()
                return hold
        return None

    def _held_request(self, method: str, path: str) -> None:
        """Wait, the lock let go meanwhile, while a hold keeps this request back (caller holds the lock)."""
        for hold in self.holds:
            if hold.path is not None and hold.method == method and hold.path.search(path) and hold.times > 0 \
                    and not hold.released:
                hold.times -= 1
                hold.held += 1
                self.cond.notify_all()
                self.cond.wait_for(lambda hold=hold: hold.released)
                self._advance()
                return

    def settle(self) -> None:
        """Until every operation started so far is DONE (inserts running, deletions gone)."""
        with self.cond:
            self.wait_until(lambda: self._operations_running == 0, timeout=10)

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Block (caller holds the lock) until `predicate` holds, letting due changes happen meanwhile."""
        deadline = time.monotonic() + timeout
        self._advance()
        while not predicate() and time.monotonic() < deadline:
            self.cond.wait(min(0.05, max(0.0, deadline - time.monotonic())))
            self._advance()

    def _stopped(self, zone: str, vm: Vm, by_provider: bool) -> None:
        key = (zone, vm.resource["name"])
        if self.vms.get(key) is not vm:
            return
        vm.resource["status"] = "TERMINATED"
        if by_provider and vm.resource.get("scheduling", {}).get("instanceTerminationAction") == "DELETE":
            del self.vms[key]

    def _now(self) -> str:
        return datetime.now(UTC).isoformat(timespec="milliseconds")

    def _link(self, zone: str, kind: str, name: str) -> str:
        return f"{API}/projects/{self.project}/zones/{zone}/{kind}/{name}"

    def _new_resource(self, zone: str, body: dict) -> dict:
        resource = json.loads(json.dumps(body))
        name = resource["name"]
        resource.update(
            kind="compute#instance", id=str(next(self._ids)), creationTimestamp=self._now(),
            zone=f"{API}/projects/{self.project}/zones/{zone}", status="PROVISIONING",
            selfLink=self._link(zone, "instances", name),
            machineType=f"{API}/projects/{self.project}/{resource['machineType']}",
            labelFingerprint=hashlib.sha1(json.dumps(resource.get("labels", {})).encode()).hexdigest()[:12],
        )
        for accelerator in resource.get("guestAccelerators", []):
            accelerator["acceleratorType"] = f"{API}/projects/{self.project}/{accelerator['acceleratorType']}"
        for index, interface in enumerate(resource.get("networkInterfaces", [])):
            interface.update(name=f"nic{index}", networkIP=str(next(self._addresses)))
        resource["resourcePolicies"] = [self._policy_link(path) for path in resource.get("resourcePolicies", [])]
        if not resource["resourcePolicies"]:
            del resource["resourcePolicies"]
        return resource

    def _policy_link(self, path: str) -> str:
        """A resource policy's full URL, from the full or partial one an instance names it by."""
        path = path.removeprefix(f"{API}/")
        return f"{API}/{path if path.startswith('projects/') else f'projects/{self.project}/{path}'}"

    def _operation(self, zone: str, operation_type: str, target: dict, status: str = "RUNNING",
                   scope: str = "zones") -> dict:
        """A zone operation, or with `scope="regions"` a region operation (`zone` then names the region)."""
        op_id = next(self._ids)
        name = f"operation-{int(time.time() * 1000)}-{op_id % 10**12:012x}"
        operation = {
            "kind": "compute#operation", "id": str(op_id), "name": name, "operationType": operation_type,
            scope.removesuffix("s"): f"{API}/projects/{self.project}/{scope}/{zone}",
            "targetLink": target["selfLink"], "targetId": target["id"], "status": status,
            "progress": 100 if status == "DONE" else 0, "user": "vaultlayer-worker@vl-test.iam.gserviceaccount.com",
            "insertTime": self._now(), "startTime": self._now(),
            "selfLink": f"{API}/projects/{self.project}/{scope}/{zone}/operations/{name}",
        }
        self.operations[(zone, name)] = operation
        return operation

    def _system_event(self, zone: str, vm: Vm, operation_type: str, message: str) -> None:
        operation = self._operation(zone, operation_type, vm.resource, status="DONE")
        operation.update(user="system", statusMessage=message, endTime=self._now())

    def _finish(self, operation: dict, error: dict | None = None) -> None:
        operation.update(status="DONE", progress=100, endTime=self._now())
        if error:
            status, text = (403, "FORBIDDEN") if error["code"] == "QUOTA_EXCEEDED" else (503, "SERVICE UNAVAILABLE")
            operation.update(error={"errors": [error]}, httpErrorStatusCode=status, httpErrorMessage=text)

    # ------------------------------------------------------------ the REST API

    def insert(self, zone: str, body: dict, request_id: str | None) -> tuple[int, dict]:
        if request_id and request_id in self.by_request_id:
            return 200, self.by_request_id[request_id]
        name = body["name"]
        if (zone, name) in self.vms:
            return 409, error_body(409, f"The resource 'projects/{self.project}/zones/{zone}/instances/{name}' "
                                        "already exists", "alreadyExists")
        lacking = self.not_offered.get(zone, set())
        machine = body["machineType"].rsplit("/", 1)[-1]
        if machine in lacking:
            return 400, error_body(400, f"Invalid value for field 'resource.machineType': '{body['machineType']}'. "
                                        f"Machine type with name '{machine}' does not exist in zone '{zone}'.",
                                   "invalid")
        for index, accelerator in enumerate(body.get("guestAccelerators", [])):
            kind = accelerator["acceleratorType"].rsplit("/", 1)[-1]
            if kind in lacking:
                return 400, error_body(
                    400, f"Invalid value for field 'resource.guestAccelerators[{index}].acceleratorType': "
                         f"'{accelerator['acceleratorType']}'. Accelerator type '{kind}' does not exist in zone "
                         f"{zone}.",
                    "invalid")
        region = zone.rsplit("-", 1)[0]
        for path in body.get("resourcePolicies", []):
            link = self._policy_link(path)
            if link.rsplit("/", 1)[-1] not in {name for (where, name) in self.policies if where == region} \
                    or f"/regions/{region}/" not in link:
                return 404, error_body(404, f"The resource '{link.removeprefix(API + '/')}' was not found",
                                       "notFound")
        self._record_create_permissions(body)
        resource = self._new_resource(zone, body)
        operation = self._operation(zone, "insert", resource)
        error = self.insert_errors.get(zone)
        if error is None and sum(1 for z, _ in self.vms if z == zone) >= self.capacity.get(zone, math.inf):
            error = stockout(self.project, zone)
        vm = None if error else Vm(resource)  # a refused insert creates nothing
        if vm:
            self.vms[(zone, name)] = vm

        def started() -> None:
            self._finish(operation, error)
            self._operations_running -= 1
            if vm and self.vms.get((zone, name)) is vm and resource["status"] == "PROVISIONING":
                resource["status"] = "RUNNING"

        self._operations_running += 1
        self._after(self.op_seconds, started, self._operation_hold("insert"))
        if request_id:
            self.by_request_id[request_id] = operation
        return 200, operation

    def _record_create_permissions(self, body: dict) -> None:
        """What creating this VM needs (the "Create a VM" IAM table of the Compute docs)."""
        self.permissions |= {"compute.instances.create", "compute.disks.create"}
        if body.get("metadata", {}).get("items"):
            self.permissions.add("compute.instances.setMetadata")
        if body.get("labels"):
            self.permissions.add("compute.instances.setLabels")
        if body.get("resourcePolicies"):
            self.permissions.add("compute.resourcePolicies.use")
        if body.get("serviceAccounts"):
            self.permissions |= {"compute.instances.setServiceAccount", "iam.serviceAccounts.actAs"}
        for interface in body.get("networkInterfaces", []):
            self.permissions.add("compute.subnetworks.use")
            if interface.get("accessConfigs"):
                self.permissions.add("compute.subnetworks.useExternalIp")

    def delete(self, zone: str, name: str) -> tuple[int, dict]:
        vm = self.vms.get((zone, name))
        if vm is None:
            return self._not_found(zone, "instances", name)
        operation = self._operation(zone, "delete", vm.resource)
        vm.resource["status"] = "STOPPING"

        def gone() -> None:
            self._finish(operation)
            self._operations_running -= 1
            if self.vms.get((zone, name)) is vm:
                del self.vms[(zone, name)]

        self._operations_running += 1
        self._after(self.op_seconds, gone, self._operation_hold("delete"))
        return 200, operation

    def insert_policy(self, region: str, body: dict, request_id: str | None) -> tuple[int, dict]:
        self.permissions.add("compute.resourcePolicies.create")
        if request_id and request_id in self.by_request_id:
            return 200, self.by_request_id[request_id]
        name = body["name"]
        if (region, name) in self.policies:
            return 409, error_body(409, f"The resource 'projects/{self.project}/regions/{region}/resourcePolicies/"
                                        f"{name}' already exists", "alreadyExists")
        policy = json.loads(json.dumps(body))
        policy.update(kind="compute#resourcePolicy", id=str(next(self._ids)), creationTimestamp=self._now(),
                      region=f"{API}/projects/{self.project}/regions/{region}", status="CREATING",
                      selfLink=f"{API}/projects/{self.project}/regions/{region}/resourcePolicies/{name}")
        self.policies[(region, name)] = policy
        operation = self._operation(region, "insert", policy, scope="regions")

        def made() -> None:
            self._finish(operation)
            self._operations_running -= 1
            policy["status"] = "READY"

        self._operations_running += 1
        self._after(self.op_seconds, made)
        if request_id:
            self.by_request_id[request_id] = operation
        return 200, operation

    def delete_policy(self, region: str, name: str) -> tuple[int, dict]:
        self.permissions.add("compute.resourcePolicies.delete")
        policy = self.policies.get((region, name))
        if policy is None:
            return 404, error_body(404, f"The resource 'projects/{self.project}/regions/{region}/resourcePolicies/"
                                        f"{name}' was not found", "notFound")
        users = [vm.resource for vm in self.vms.values() if policy["selfLink"] in vm.resource.get("resourcePolicies", [])]
        if users:
            user = users[0]["selfLink"].removeprefix(f"{API}/")
            return 400, error_body(400, f"The resource_policy resource 'projects/{self.project}/regions/{region}/"
                                        f"resourcePolicies/{name}' is already being used by '{user}'",
                                   "resourceInUseByAnotherResource")
        operation = self._operation(region, "delete", policy, scope="regions")
        policy["status"] = "DELETING"

        def gone() -> None:
            self._finish(operation)
            self._operations_running -= 1
            if self.policies.get((region, name)) is policy:
                del self.policies[(region, name)]

        self._operations_running += 1
        self._after(self.op_seconds, gone)
        return 200, operation

    def _not_found(self, zone: str, kind: str, name: str) -> tuple[int, dict]:
        return 404, error_body(404, f"The resource 'projects/{self.project}/zones/{zone}/{kind}/{name}' was not found",
                               "notFound")

    def handle(self, method: str, path: str, query: dict[str, str], body: dict | None) -> tuple[int, dict]:
        self.requests.append((method, path))
        for fault in self.faults:
            if fault[0] == method and fault[1].search(path) and fault[4] > 0:
                fault[4] -= 1
                return fault[2], fault[3]
        self._held_request(method, path)
        secret = re.fullmatch(r"/v1/projects/([^/]+)/secrets/([^/]+)/versions/([^/:]+):access", path)
        if secret:
            return self._access_secret(*secret.groups())
        route = re.fullmatch(r"/compute/v1/projects/([^/]+)/(?:(zones|regions)/([^/]+)/)?(.*)", path)
        if route is None or route.group(1) != self.project:
            return 404, error_body(404, f"The resource '{path}' was not found", "notFound")
        scope, rest = route.group(2), route.group(4)
        zone = route.group(3) if scope == "zones" else None
        try:
            terms = parse_filter(query.get("filter", ""))
        except ValueError as err:
            return 400, error_body(400, f"Invalid value for field 'filter': '{query['filter']}'. "
                                        f"Invalid list filter expression ({err}).", "invalid")
        if zone is None and rest == "aggregated/instances" and method == "GET":
            self.permissions.add("compute.instances.list")
            items: dict[str, dict] = {}
            for (vm_zone, _), vm in self.vms.items():
                if matches(vm.resource, terms):
                    items.setdefault(f"zones/{vm_zone}", {"instances": []})["instances"].append(vm.resource)
            listing = f"projects/{self.project}/aggregated/instances"
            return 200, {"kind": "compute#instanceAggregatedList", "id": listing, "items": items,
                         "selfLink": f"{API}/{listing}"}
        if scope is None and rest == "aggregated/resourcePolicies" and method == "GET":
            self.permissions.add("compute.resourcePolicies.list")
            items = {}
            for (region, _), policy in self.policies.items():
                if matches(policy, terms):
                    items.setdefault(f"regions/{region}", {"resourcePolicies": []})["resourcePolicies"].append(policy)
            listing = f"projects/{self.project}/aggregated/resourcePolicies"
            return 200, {"kind": "compute#resourcePolicyAggregatedList", "id": listing, "items": items,
                         "selfLink": f"{API}/{listing}"}
        if scope == "regions":
            return self._regional(method, route.group(3), rest, query, body)
        if zone is None:
            return 404, error_body(404, f"The resource '{path}' was not found", "notFound")
        if rest == "instances" and method == "POST":
            return self.insert(zone, body or {}, query.get("requestId"))
        instance = re.fullmatch(r"instances/([^/]+)", rest)
        if instance and method == "GET":
            self.permissions.add("compute.instances.get")
            vm = self.vms.get((zone, instance.group(1)))
            return (200, vm.resource) if vm else self._not_found(zone, "instances", instance.group(1))
        if instance and method == "DELETE":
            self.permissions.add("compute.instances.delete")
            return self.delete(zone, instance.group(1))
        if rest == "operations" and method == "GET":
            self.permissions.add("compute.zoneOperations.list")
            found = [op for (z, _), op in self.operations.items() if z == zone and matches(op, terms)]
            return 200, {"kind": "compute#operationList", "items": found}
        operation = re.fullmatch(r"operations/([^/]+)(/wait)?", rest)
        if operation and method in ("GET", "POST"):
            self.permissions.add("compute.zoneOperations.get")
            found = self.operations.get((zone, operation.group(1)))
            if found is None:
                return self._not_found(zone, "operations", operation.group(1))
            if operation.group(2):  # wait: until DONE, at most two minutes, as the real service
                self.wait_until(lambda: found["status"] == "DONE", timeout=120)
            return 200, found
        return 404, error_body(404, f"The resource '{path}' was not found", "notFound")

    def _regional(self, method: str, region: str, rest: str, query: dict[str, str],
                  body: dict | None) -> tuple[int, dict]:
        """resourcePolicies insert and delete, regionOperations get and wait."""
        if rest == "resourcePolicies" and method == "POST":
            return self.insert_policy(region, body or {}, query.get("requestId"))
        policy = re.fullmatch(r"resourcePolicies/([^/]+)", rest)
        if policy and method == "DELETE":
            return self.delete_policy(region, policy.group(1))
        operation = re.fullmatch(r"operations/([^/]+)(/wait)?", rest)
        if operation and method in ("GET", "POST"):
            self.permissions.add("compute.regionOperations.get")
            found = self.operations.get((region, operation.group(1)))
            if found is None:
                return 404, error_body(404, f"The resource 'projects/{self.project}/regions/{region}/operations/"
                                            f"{operation.group(1)}' was not found", "notFound")
            if operation.group(2):  # wait: until DONE, at most two minutes, as the real service
                self.wait_until(lambda: found["status"] == "DONE", timeout=120)
            return 200, found
        return 404, error_body(404, f"The resource 'projects/{self.project}/regions/{region}/{rest}' was not found",
                               "notFound")

    def _access_secret(self, project: str, secret: str, version: str) -> tuple[int, dict]:
        self.permissions.add("secretmanager.versions.access")
        if project != self.project or secret not in self.secrets:
            message = f"Secret [projects/{project}/secrets/{secret}] not found or has no versions."
            return 404, {"error": {"code": 404, "status": "NOT_FOUND", "message": message}}
        data = self.secrets[secret]
        return 200, {"name": f"projects/{project}/secrets/{secret}/versions/1",
                     "payload": {"data": base64.b64encode(data).decode(),
                                 "dataCrc32c": str(google_crc32c.value(data))}}

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                with fake.cond:
                    fake._advance()
                    status, document = fake.handle(self.command, url.path, query, body)
                    fake.cond.notify_all()
                payload = json.dumps(document).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_DELETE = _serve

            def log_message(self, *args) -> None:
                pass

        return Handler


# ---------------------------------------------------------------- the metadata server


class MetadataServer:
    """One VM's metadata server: `Metadata-Flavor: Google` required (403 without), an ETag per value,
    `wait_for_change=true` with `last_etag` and `timeout_sec`, as documented for Compute Engine."""

    KEYS = {"preempted", "maintenance-event"}

    def __init__(self, fake: FakeGce, vm: Vm) -> None:
        self.fake, self.vm = fake, vm
        self.requests: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> MetadataServer:
        threading.Thread(target=self.server.serve_forever, daemon=True, name="fake-gce-metadata").start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def etag(value: str) -> str:
        return hashlib.md5(value.encode()).hexdigest()[:16]

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _reply(self, status: int, text: str, etag: str | None = None) -> None:
                payload = text.encode()
                self.send_response(status)
                self.send_header("Metadata-Flavor", "Google")
                self.send_header("Content-Type", "application/text")
                if etag:
                    self.send_header("ETag", etag)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:
                server.requests.append(self.path)
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                if self.headers.get("Metadata-Flavor") != "Google" or "X-Forwarded-For" in self.headers:
                    self._reply(403, "Your client does not have permission to get URL "
                                     f"{url.path} from this server. Missing Metadata-Flavor:Google header.")
                    return
                key = url.path.removeprefix("/computeMetadata/v1/instance/")
                if key not in server.KEYS:
                    self._reply(404, "Not Found")
                    return
                fake, guest = server.fake, server.vm.guest
                with fake.cond:
                    if query.get("wait_for_change") == "true":
                        seen = query.get("last_etag") or server.etag(guest[key])
                        fake.wait_until(lambda: server.etag(guest[key]) != seen,
                                        timeout=float(query.get("timeout_sec", 3600)))
                    value = guest[key]
                self._reply(200, value, server.etag(value))

            def log_message(self, *args) -> None:
                pass

        return Handler


# ---------------------------------------------------------------- playing the VMs


def parse_startup_script(script: str) -> tuple[dict[str, str], list[str]]:
    """The contract a host agent is started from: the exported settings and the `vl agent` command.
    The player also honours the script's end: however it ends, the VM powers off (the EXIT trap)."""
    assert "trap 'shutdown -h now' EXIT" in script and "set -euo pipefail" in script, script
    exports: dict[str, str] = {}
    agent: list[str] | None = None
    for line in script.splitlines():
        tokens = shlex.split(line, comments=True)
        if tokens[:1] == ["export"]:
            exports.update(token.split("=", 1) for token in tokens[1:])
        elif len(tokens) > 1 and tokens[0].endswith("/bin/vl") and tokens[1] == "agent":
            agent = tokens
    assert agent is not None, script
    return exports, agent


@dataclass
class PlayedVm:
    zone: str
    name: str
    process: subprocess.Popen
    directory: Path


class GceHostPlayer:
    """Stands in for the machines: for each VM the fake reports RUNNING, a local `vl agent` started as
    its startup-script says, pointed at that VM's metadata server; killed with its process group once
    the VM is stopped or gone; and a VM whose agent exits is powered off, as its script would do."""

    def __init__(self, fake: FakeGce, root: Path) -> None:
        self.fake, self.root = fake, root
        self.played: dict[str, PlayedVm] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="gce-host-player")

    def start(self) -> GceHostPlayer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        for vm in self.played.values():
            _kill_group(vm.process)

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            resources = self.fake.instances()
            status = {r["name"]: r["status"] for r in resources}
            for resource in resources:
                if resource["status"] == "RUNNING" and resource["name"] not in self.played:
                    items = {item["key"]: item["value"] for item in resource.get("metadata", {}).get("items", [])}
                    if "startup-script" in items:
                        self._boot(resource, items["startup-script"])
            for vm in self.played.values():
                state = status.get(vm.name)
                if state in (None, "TERMINATED") and vm.process.poll() is None:
                    _kill_group(vm.process)
                elif state == "RUNNING" and vm.process.poll() is not None:
                    self.fake.guest_shutdown(vm.name)

    def _boot(self, resource: dict, script: str) -> None:
        exports, agent = parse_startup_script(script)
        zone, name = resource["zone"].rsplit("/", 1)[-1], resource["name"]
        directory = self.root / name
        host_dir_at = agent.index("--host-dir") + 1
        agent[host_dir_at] = str(directory / agent[host_dir_at].lstrip("/"))
        Path(agent[host_dir_at]).mkdir(parents=True)
        metadata = self.fake.metadata_server(zone, name)
        # What this machine would have: its own environment (no Temporal settings: those come from the
        # secret), the metadata server, and the Google APIs (here the fake).
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VL_", "TEMPORAL_"))}
        env.update(exports, GCE_METADATA_HOST=metadata.host, VL_GCP_EMULATOR_HOST=self.fake.url)
        env["VL_HOME"] = str(directory / exports["VL_HOME"].lstrip("/"))  # the VM's disk, under `root`
        with open(directory / "agent.log", "ab") as log:
            # In the VM's own empty folder: the run's code reaches it from storage, or not at all.
            process = subprocess.Popen([sys.executable, "-m", "cli.main", *agent[1:]], cwd=directory, env=env,
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        self.played[name] = PlayedVm(zone, name, process, directory)

    def agent_log(self, name: str) -> str:
        return (self.played[name].directory / "agent.log").read_text(errors="replace")


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


# ---------------------------------------------------------------- fixtures (import them into a test module)


@pytest.fixture
def gce(vl_home: Path, monkeypatch) -> Iterator[FakeGce]:
    """A fresh fake project; `gcp.toml` in VL_HOME and VL_GCP_EMULATOR_HOST point the provider at it."""
    fake = FakeGce().start()
    # `package` set deliberately: the played VMs start the agent of this checkout whatever the bootstrap installs,
    # and specs made by hand carry no agent wheel (tests/test_agent_wheel.py checks the wheel's install).
    (vl_home / "gcp.toml").write_text(f'project = "{fake.project}"\nservice_account = "{HOST_SERVICE_ACCOUNT}"\n'
                                      'package = "vaultlayer[gcp]==0.1.0"\n')
    monkeypatch.setenv("VL_GCP_EMULATOR_HOST", fake.url)
    yield fake
    fake.release_holds()  # a failed test's holds: let its requests and operations finish
    fake.settle()
    left = [vm["name"] for vm in fake.labelled()] + [name for _, name in fake.policies]
    fake.stop()
    assert not left, f"VMs or placement policies outlived their test: {left}"


@pytest.fixture
def gce_hosts(gce: FakeGce, temporal_address: str, tmp_path: Path) -> Iterator[GceHostPlayer]:
    """The VMs played by local agents, which find the test cluster in the project's Temporal secret."""
    gce.secrets["vaultlayer-temporal"] = json.dumps(
        {"TEMPORAL_ADDRESS": temporal_address, "TEMPORAL_NAMESPACE": "default"}).encode()
    player = GceHostPlayer(gce, tmp_path / "gce-hosts").start()
    yield player
    player.stop()
