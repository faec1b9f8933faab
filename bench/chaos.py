"""A seeded chaos soak: real runs under faults of every kind at once, at random moments, then invariants.

One process starts a Temporal dev server of its own (SQLite), moto's S3 behind a TCP proxy (to slow), a
control-plane worker process, and keeps --runs real local runs going (tests/faults/counter_train.py, whose
result is bit-exact; file:// and s3:// storage by turns; each run prints a planted secret). For --minutes it
injects faults drawn from --seed: the same seed gives the same schedule (`schedule`), printed with the time of
each fault as it is injected. A fault aimed at a run that has no host at that moment is logged as skipped.

Fault kinds (`KINDS`): a reclaim with a long (30 s) or a short (3 s) notice, as a cloud gives it (the
instance-action document, then the host's process group killed at the deadline); a reclaim without notice
(the group killed); the host agent SIGKILLed (its script orphaned); the script SIGKILLed; one host cut off
from the server (its agent's connections through the soak's proxy reset, new ones refused, while its processes
live on, as tests/faults/test_partition.py does; the control plane may release it meanwhile); the control worker
SIGKILLed and started again; the dev server SIGKILLed and started again on the same database; an S3 outage
(the server stopped, then started with its objects); slow S3 (the proxy holds every chunk); the newest
complete checkpoint corrupted (one byte of a data file); `vl cancel` followed by `vl resume`.

Then, with every fault healed and every run finished, the invariants (a table, and the exit status):
every run not cancelled succeeded with the uninterrupted run's result, and every cancelled run's resumption
did; no host process or group is left; no complete checkpoint was lost or changed (but the corrupted ones,
and those beyond a fence); every recorded history replays; the secret appears in no file the soak left
(server database, hosts, storage, logs); no attempt lost more than two checkpoint intervals of steps (but
those that overlapped a storage fault, which are listed).

    python bench/chaos.py --minutes 30 --seed 1 [--runs 4] [--json FILE] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import counter_command  # noqa: E402 - the repository is on the path from here
from tests.faults.conftest import (  # noqa: E402
    CuttableProxy,
    DevServer,
    host_tags,
    scripts_alive,
    write_instance_action,
)
from tests.object_storage import S3Server  # noqa: E402

KINDS = ("reclaim-long-notice", "reclaim-short-notice", "reclaim-no-notice", "agent-kill", "script-crash",
         "host-partition", "control-worker-restart", "server-restart", "storage-outage", "slow-storage",
         "corrupt-newest", "cancel-resume")
LONG_NOTICE_SECONDS, SHORT_NOTICE_SECONDS = 30.0, 3.0
CHECKPOINT_EVERY = 10  # steps
STEP_SECONDS = 0.2
RUN_STEPS = (300, 450, 600)  # a run's length is one of these
WARM_UP_SECONDS = 20.0  # before the first fault: the runs' first hosts start
MEAN_GAP_SECONDS = 12.0  # between faults
RECOVERY_BOUND_SECONDS = 300.0
# How a fault's recovery is timed (`Soak.recovery`): from the fault until a later attempt (or the resumed run)
# trains past the step the run was at; from the end of a spell until the run trains (or, storage, stores) past
# where it was then. A corrupted checkpoint does nothing until a resume picks it: no time of its own.
ENDS_THE_ATTEMPT = ("reclaim-long-notice", "reclaim-short-notice", "reclaim-no-notice", "agent-kill",
                    "script-crash", "cancel-resume")
STORAGE_SPELLS = ("storage-outage", "slow-storage")
FINISH_BOUND_SECONDS = 900.0  # after the last fault, for every run to end


@dataclasses.dataclass(frozen=True)
class Fault:
    at: float  # seconds after the soak's start
    kind: str
    slot: int  # the run slot it aims at (the run there at that moment)
    seconds: float  # how long an outage, a slow spell or a down process lasts


def schedule(seed: int, minutes: float, runs: int) -> list[Fault]:
    """The faults of a soak: a pure function of its arguments, so a seed names a schedule."""
    rng = random.Random(seed)
    faults, at = [], WARM_UP_SECONDS
    while True:
        at += rng.expovariate(1 / MEAN_GAP_SECONDS)
        if at >= minutes * 60:
            return faults
        faults.append(Fault(at=round(at, 1), kind=rng.choice(KINDS), slot=rng.randrange(runs),
                            seconds=round(rng.uniform(2.0, 10.0), 1)))


def run_steps(counter: int, seconds_left: float) -> int:
    """A run's length, drawn by its number from RUN_STEPS, but none longer than the faults still to come (and a
    minute): a long run started near the end would be waited for after every fault is over, most of a short
    soak's time, and none of it under faults."""
    fitting = [steps for steps in RUN_STEPS if steps * STEP_SECONDS <= seconds_left + 60] or [min(RUN_STEPS)]
    return random.Random(counter).choice(fitting)


@dataclasses.dataclass
class Lineage:
    """One run and, after each `vl cancel`, the run `vl resume` started from it: one result in the end."""

    slot: int
    steps: int
    storage: str
    out: Path
    run_ids: list[str]
    cancelled: set[str] = dataclasses.field(default_factory=set)
    busy: bool = False  # a cancel and resume in progress: the slot does not judge the run meanwhile
    final: object = None  # the last run's RunStatus


@dataclasses.dataclass
class Injected:
    """A fault as it was injected (or skipped), and how long its run took to train past where it was."""

    at: float
    kind: str
    slot: int
    run_id: str | None
    detail: str
    skipped: bool = False
    failed: bool = False  # the injection itself raised: the soak did not do what it says
    recovered_seconds: float | None = None
    step_at: int | None = None
    attempt_at: int | None = None
    began: float = 0.0  # time.time()
    spell_over: asyncio.Event = dataclasses.field(default_factory=asyncio.Event, repr=False)  # set when it ends


class Soak:
    """One soak: its services, its runs (a slot each, one lineage after another), the faults and the watch."""

    def __init__(self, args: argparse.Namespace, scratch: Path) -> None:
        self.args = args
        self.scratch = scratch
        self.home = scratch / "home"
        self.secret = f"chaos-secret-{secrets.token_hex(12)}"
        self.server = DevServer(scratch)
        self.s3 = S3Server()
        self.proxy: CuttableProxy | None = None  # in front of S3, to slow
        self.partitions: HostPartitions | None = None
        self.queue = f"vl-chaos-{uuid.uuid4().hex[:8]}"
        self.worker: subprocess.Popen | None = None
        self.client = None
        self.lineages: list[Lineage] = []
        self.injected: list[Injected] = []
        self.started = 0.0
        self.seen: dict[tuple[str, str], str] = {}  # (run id, checkpoint) -> manifest sha256, once complete
        self.corrupted: set[tuple[str, str]] = set()
        self.checkpoint_problems: list[str] = []
        self.storage_faults: list[list[float]] = []  # [began, ended] wall times; ended inf while it lasts
        self.background: set[asyncio.Task] = set()
        self.counter = 0

    # --- the services -----------------------------------------------------------------------------------------
    async def start(self) -> None:
        self.home.mkdir(parents=True)
        os.environ.update(VL_HOME=str(self.home), CHAOS_TOKEN=self.secret, AWS_ACCESS_KEY_ID="chaos",
                          AWS_SECRET_ACCESS_KEY="chaos", AWS_DEFAULT_REGION="us-east-1")
        self.server.start()
        self.client = await self.server.connect()
        self.s3.start()
        self.proxy = CuttableProxy(self.s3.port)
        self.proxy.start()
        os.environ["AWS_ENDPOINT_URL_S3"] = f"http://{self.proxy.address}"
        self.bucket_url = self.s3.new_bucket_url()
        self.partitions = HostPartitions(self.server.port)
        self.partitions.start()
        self.start_worker()
        self.started = time.monotonic()

    def start_worker(self) -> None:
        env = {**os.environ, "TEMPORAL_ADDRESS": self.server.address, "VL_TASK_QUEUE": self.queue,
               "CHAOS_HOSTS_REACH": self.partitions.address}
        with open(self.scratch / "worker.log", "ab") as log:
            self.worker = subprocess.Popen([sys.executable, "-c", WORKER], env=env, cwd=REPO,
                                           stdout=subprocess.DEVNULL, stderr=log)

    async def stop(self) -> None:
        if self.worker and self.worker.poll() is None:
            self.worker.kill()
            self.worker.wait()
        from activities.providers.local.provider import kill_group

        for tag_file in (self.home / "hosts").glob("*/*/host.json"):  # whatever a failed soak left
            with contextlib.suppress(Exception):
                kill_group(int(json.loads(tag_file.read_text())["pgid"]))
        for proxy in (self.proxy, self.partitions):
            if proxy:
                proxy.stop()
        with contextlib.suppress(Exception):
            self.s3.stop()
        if self.server.process and self.server.process.poll() is None:
            self.server.kill()

    def log(self, line: str) -> None:
        print(f"[{time.monotonic() - self.started:7.1f} s] {line}", flush=True)

    async def call(self, action, what: str, bound: float = 120.0):
        """A client call that outlives a server restart: retried until `bound`."""
        deadline = time.monotonic() + bound
        while True:
            try:
                return await action()
            except Exception as err:  # noqa: BLE001 - the server may be down for seconds; anything else recurs
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{what}: {err}") from err
                await asyncio.sleep(1.0)

    async def status(self, run_id: str):
        from vaultlayer import client as vl_client

        return await self.call(lambda: vl_client.status(self.client, run_id), f"status of {run_id}")

    # --- the runs ---------------------------------------------------------------------------------------------
    def spec(self, lineage: Lineage, run_id: str):
        from vaultlayer.models import Limits, Pool, RunSpec

        storage = (self.scratch / "storage").as_uri() if lineage.storage == "file" else self.bucket_url
        train = (f'echo "token $CHAOS_TOKEN"; exec {sys.executable} {REPO}/tests/faults/counter_train.py '
                 f"--steps {lineage.steps} --step-time {STEP_SECONDS} --out {lineage.out}")
        return RunSpec(run_id=run_id, command=["sh", "-c", train], workdir=str(REPO), code=None,
                       pools=[Pool()], storage_url=storage, checkpoint_every=str(CHECKPOINT_EVERY),
                       notice_seconds=LONG_NOTICE_SECONDS, heartbeat_timeout_seconds=5.0,
                       start_timeout_seconds=120.0, env_secrets={"CHAOS_TOKEN": "env:CHAOS_TOKEN"},
                       limits=Limits(max_reclaims=1000, max_host_faults=1000, script_retries=1000,
                                     max_attempts_without_progress=1000))

    async def run_slot(self, slot: int, soak_end: float) -> None:
        """Keep a run going in this slot until the soak's faults end, one lineage after another."""
        while time.monotonic() < soak_end:
            self.counter += 1
            lineage = Lineage(slot=slot, steps=run_steps(self.counter, soak_end - time.monotonic()),
                              storage=("file", "s3")[self.counter % 2],
                              out=self.scratch / "out" / f"slot{slot}-{self.counter}.json",
                              run_ids=[f"chaos-{self.counter}-{uuid.uuid4().hex[:6]}"])
            lineage.out.parent.mkdir(exist_ok=True)
            self.lineages.append(lineage)
            spec = self.spec(lineage, lineage.run_ids[0])
            await self.submit(spec)
            self.log(f"slot {slot}: started {spec.run_id} ({lineage.steps} steps, {lineage.storage})")
            lineage.final = await self.finished(lineage)
            self.log(f"slot {slot}: {lineage.run_ids[-1]} {lineage.final.state.value}")

    async def finished(self, lineage: Lineage):
        """The lineage's last run once it has ended. A cancel and resume is waited out, including one that began
        and ended while the status was asked: then the answer is the cancelled run's, not the last run's."""
        while True:
            if not lineage.busy:
                asked = lineage.run_ids[-1]
                status = await self.status(asked)
                if status.state.finished and not lineage.busy and lineage.run_ids[-1] == asked:
                    return status
            await asyncio.sleep(2.0)

    def current(self, slot: int) -> Lineage | None:
        live = [lineage for lineage in self.lineages if lineage.slot == slot and lineage.final is None]
        return live[-1] if live else None

    # --- the faults -------------------------------------------------------------------------------------------
    async def inject_all(self, faults: list[Fault]) -> None:
        for fault in faults:
            await asyncio.sleep(max(0.0, self.started + fault.at - time.monotonic()))
            record = await self.inject(fault)
            self.injected.append(record)
            self.log(f"{fault.kind} slot {fault.slot} ({record.run_id or '-'}): "
                     f"{'skipped: ' if record.skipped else ''}{record.detail}")
            if not (record.skipped or record.failed) and record.run_id:
                self.spawn(self.recovery(record))

    def spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def inject(self, fault: Fault) -> Injected:
        lineage = self.current(fault.slot)
        run_id = lineage.run_ids[-1] if lineage else None
        record = Injected(at=round(time.monotonic() - self.started, 1), kind=fault.kind, slot=fault.slot,
                          run_id=run_id, detail="", began=time.time())
        if lineage is not None and not lineage.busy:
            status = await self.status(run_id)
            record.step_at = status.step or 0
            record.attempt_at = status.current_attempt.attempt if status.current_attempt else None
        if fault.kind not in ("host-partition", "control-worker-restart", *STORAGE_SPELLS):
            record.spell_over.set()  # over at once (a server restart is over when its handler returns)
        try:
            record.detail = await getattr(self, "_" + fault.kind.replace("-", "_"))(fault, lineage, record)
        except Skip as skip:
            record.skipped, record.detail = True, str(skip)
        except Exception as err:  # noqa: BLE001 - the soak goes on; the end reports the fault as not injected
            record.failed, record.detail = True, f"could not inject: {type(err).__name__}: {err}"
        return record

    async def host_of(self, lineage: Lineage | None, record: Injected):
        if lineage is None or lineage.busy:
            raise Skip("no run in the slot")
        status = await self.status(lineage.run_ids[-1])
        if status.state.finished or status.current_host is None:
            raise Skip(f"run {status.run_id} has no host now ({status.state.value})")
        return status.current_host

    async def _reclaim(self, fault: Fault, lineage: Lineage | None, record: Injected, notice: float | None) -> str:
        from activities.providers.local.provider import kill_group

        host = await self.host_of(lineage, record)
        pgid = int(host.handle["pgid"])
        if notice is None:
            kill_group(pgid)
            return f"host {host.host_id} killed without notice"
        write_instance_action(Path(host.handle["dir"]) / "metadata", notice)

        async def at_deadline() -> None:
            await asyncio.sleep(notice)
            kill_group(pgid)

        self.spawn(at_deadline())
        return f"host {host.host_id}: notice of {notice:.0f} s"

    async def _reclaim_long_notice(self, fault, lineage, record) -> str:
        return await self._reclaim(fault, lineage, record, LONG_NOTICE_SECONDS)

    async def _reclaim_short_notice(self, fault, lineage, record) -> str:
        return await self._reclaim(fault, lineage, record, SHORT_NOTICE_SECONDS)

    async def _reclaim_no_notice(self, fault, lineage, record) -> str:
        return await self._reclaim(fault, lineage, record, None)

    async def _agent_kill(self, fault, lineage, record) -> str:
        host = await self.host_of(lineage, record)
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(host.handle["pgid"]), signal.SIGKILL)  # the agent leads its host's group
        return f"agent of {host.host_id} killed; its script lives on"

    async def _script_crash(self, fault, lineage, record) -> str:
        from activities.providers.local import group_members

        host = await self.host_of(lineage, record)
        pgid = int(host.handle["pgid"])
        for pid, state in group_members(pgid):
            with contextlib.suppress(OSError):
                if state != "Z" and b"counter_train.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
                    return f"script {pid} on {host.host_id} killed"
        raise Skip(f"no script running on {host.host_id}")

    async def _host_partition(self, fault, lineage, record) -> str:
        host = await self.host_of(lineage, record)
        agent = int(host.handle["pgid"])
        seconds = fault.seconds * 2  # 4 to 20 s: a blip the heartbeats ride out, or a host given up on
        self.partitions.isolate(agent)

        async def rejoin() -> None:
            await asyncio.sleep(seconds)
            self.partitions.rejoin(agent)
            record.spell_over.set()
            self.log(f"host {host.host_id} of {record.run_id} reaches the server again")

        self.spawn(rejoin())
        return f"host {host.host_id} cut off from the server for {seconds:.0f} s"

    async def _control_worker_restart(self, fault, lineage, record) -> str:
        if self.worker.poll() is not None:
            raise Skip("the control worker is down already")
        self.worker.kill()
        self.worker.wait()

        async def restart() -> None:
            await asyncio.sleep(fault.seconds)
            self.start_worker()
            record.spell_over.set()
            self.log("control worker started again")

        self.spawn(restart())
        return f"control worker killed for {fault.seconds} s"

    async def _server_restart(self, fault, lineage, record) -> str:
        if self.server.process.poll() is not None:
            raise Skip("the server is down already")
        self.server.kill()
        await asyncio.sleep(fault.seconds)  # every other fault waits too: they need the server
        self.server.start()
        self.client = await self.server.connect(timeout=60)
        return f"dev server killed, started again on its database after {fault.seconds} s"

    async def _storage_outage(self, fault, lineage, record) -> str:
        if self.s3_down:
            raise Skip("S3 is down already")
        self.s3_down = True
        self.s3_spells += 1
        self.s3.stop()
        spell = [record.began, float("inf")]
        self.storage_faults.append(spell)

        async def back() -> None:
            await asyncio.sleep(fault.seconds)
            self.s3.start()
            self.s3_down = False
            spell[1] = time.time()
            record.spell_over.set()
            self.log("S3 back")

        self.spawn(back())
        return f"S3 stopped for {fault.seconds} s"

    s3_down = False
    s3_spells = 0  # outages and slow spells begun: a listing that meets one is not judged (`judged_listing`)

    def s3_disturbed(self) -> bool:
        return self.s3_down or bool(self.proxy.delay_seconds)

    async def _slow_storage(self, fault, lineage, record) -> str:
        if self.proxy.delay_seconds:
            raise Skip("S3 is slow already")
        self.proxy.slow(0.5)
        self.s3_spells += 1
        spell = [record.began, float("inf")]
        self.storage_faults.append(spell)

        async def heal() -> None:
            await asyncio.sleep(fault.seconds * 2)
            self.proxy.heal()
            spell[1] = time.time()
            record.spell_over.set()
            self.log("S3 at full speed")

        self.spawn(heal())
        return f"S3 slowed (0.5 s a chunk) for {fault.seconds * 2} s"

    async def _corrupt_newest(self, fault, lineage, record) -> str:
        from fsspec.core import url_to_fs

        from vaultlayer import checkpoint
        from vaultlayer.checkpoint import storage

        if lineage is None or lineage.busy:
            raise Skip("no run in the slot")
        run_id = lineage.run_ids[-1]
        spec = self.spec(lineage, run_id)
        try:
            names = await asyncio.to_thread(checkpoint.list_checkpoints, spec.storage_url, run_id)
        except Exception as err:  # noqa: BLE001 - storage down or slow at this moment
            raise Skip(f"cannot list {run_id}'s checkpoints: {err}") from None
        if not names:
            raise Skip(f"{run_id} has no complete checkpoint yet")
        name = names[0][0]
        fs, remote = url_to_fs(storage.checkpoint_url(spec.storage_url, run_id, name))
        self.corrupted.add((run_id, name))
        target = f"{remote}/state.json"
        data = bytearray(await asyncio.to_thread(fs.cat_file, target))
        data[len(data) // 2] ^= 0x01
        await asyncio.to_thread(fs.pipe_file, target, bytes(data))
        return f"{run_id}/{name}/state.json: one bit flipped"

    async def _cancel_resume(self, fault, lineage, record) -> str:
        from vaultlayer import client as vl_client
        from vaultlayer.runs import AsyncClient, ClientError

        if lineage is None or lineage.busy:
            raise Skip("no run in the slot")
        old = lineage.run_ids[-1]
        status = await self.status(old)
        if status.state.finished:
            raise Skip(f"{old} has ended ({status.state.value})")
        lineage.busy = True
        lineage.cancelled.add(old)
        try:
            await self.call(lambda: vl_client.cancel(self.client, old), f"cancel {old}")
            while not (await self.status(old)).state.finished:
                await asyncio.sleep(1.0)
            new_id = f"chaos-{self.counter}-r{uuid.uuid4().hex[:6]}"  # one id for every try: a retry finds it taken
            deadline = time.monotonic() + 120
            while True:
                try:
                    new = await AsyncClient(self.client, self.queue).resume(old, new_id=new_id)
                    detail = f"cancelled; resumed as {new_id} from {new.resumed_from.name}"
                    break
                except ClientError as err:
                    if "is taken" in str(err):  # an earlier try got through before the server went
                        detail = f"cancelled; resumed as {new_id}"
                        break
                    if "no verified checkpoint" not in str(err):
                        raise
                    spec = self.spec(lineage, new_id)  # nothing stored yet: anew
                    await self.submit(spec)
                    detail = f"cancelled before its first checkpoint; started anew as {new_id}"
                    break
                except Exception:  # noqa: BLE001 - the server restarting: try again
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(1.0)
            lineage.run_ids.append(new_id)
            return detail
        finally:
            lineage.busy = False

    async def submit(self, spec) -> None:
        from temporalio.exceptions import WorkflowAlreadyStartedError

        from vaultlayer import client as vl_client

        async def once() -> None:
            with contextlib.suppress(WorkflowAlreadyStartedError):  # an earlier try got through
                await vl_client.submit(self.client, spec, queue=self.queue)

        await self.call(once, f"submit {spec.run_id}")

    async def recovery(self, record: Injected) -> None:
        """How long the run took to get back to where the fault found it (ENDS_THE_ATTEMPT says how it is timed)."""
        if record.kind == "corrupt-newest":
            return
        lineage = next(lin for lin in self.lineages if record.run_id in lin.run_ids)
        await record.spell_over.wait()
        began, baseline = time.monotonic(), None
        storage = record.kind in STORAGE_SPELLS
        while time.monotonic() - began < RECOVERY_BOUND_SECONDS:
            if not lineage.busy:
                status = await self.status(lineage.run_ids[-1])
                progress = (status.durable_step if storage else status.step) or 0
                attempt = status.current_attempt.attempt if status.current_attempt else None
                if baseline is None:  # where the run was when the fault hit, or when its spell ended
                    baseline = (record.step_at or 0) if record.kind in ENDS_THE_ATTEMPT else progress
                newer = (record.kind not in ENDS_THE_ATTEMPT or status.run_id != record.run_id
                         or (attempt or 0) > (record.attempt_at or 0))
                if status.state.finished or (newer and progress > baseline):
                    record.recovered_seconds = round(time.monotonic() - began, 1)
                    return
            await asyncio.sleep(0.5)

    # --- checkpoints, watched while the soak runs ------------------------------------------------------------
    async def watch_checkpoints(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.sample_checkpoints(running_only=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 3.0)

    async def sample_checkpoints(self, running_only: bool = False) -> None:
        """Note each complete checkpoint's manifest, and any seen before that changed or went wrongly. While
        the soak runs only the running lineages are looked at (an ended run's storage is still); at the end all."""
        for lineage in list(self.lineages):
            if running_only and lineage.final is not None:
                continue
            for run_id in lineage.run_ids:
                spec = self.spec(lineage, run_id)
                before = (self.s3_disturbed(), self.s3_spells)
                try:
                    present = await asyncio.to_thread(manifests, spec.storage_url, run_id)
                except Exception:  # noqa: BLE001 - storage down or slow: the next sample sees it
                    continue
                if not judged_listing(spec.storage_url, before, (self.s3_disturbed(), self.s3_spells)):
                    continue
                fences = None
                for (seen_run, name), digest in list(self.seen.items()):
                    if seen_run != run_id or (run_id, name) in self.corrupted:
                        continue
                    if name in present and present[name] != digest:
                        self.checkpoint_problems.append(f"{run_id}/{name}: its manifest changed")
                        self.seen[(run_id, name)] = present[name]
                    elif name not in present:
                        if fences is None:
                            fences = (await self.status(run_id)).fences
                        if not removed_rightly(name, present, fences):
                            self.checkpoint_problems.append(f"{run_id}/{name}: removed while the newest complete")
                        del self.seen[(run_id, name)]
                for name, digest in present.items():
                    self.seen.setdefault((run_id, name), digest)

    # --- the end ----------------------------------------------------------------------------------------------
    async def heal_everything(self) -> None:
        """Wait for the spells still on (storage, partitions, the control worker) to end as scheduled."""
        while self.s3_down or self.proxy.delay_seconds or self.partitions.isolated or self.worker.poll() is not None:
            await asyncio.sleep(0.5)
        for spell in self.storage_faults:
            spell[1] = min(spell[1], time.time())

    async def invariants(self) -> list[tuple[str, bool, str]]:
        from temporalio.client import WorkflowHistory
        from temporalio.contrib.pydantic import pydantic_data_converter
        from temporalio.worker import Replayer

        from workflows.training_run import TrainingRun

        failed = [f"{r.kind} at {r.at} s: {r.detail}" for r in self.injected if r.failed]
        results = [("every scheduled fault was injected, or skipped with nothing to act on", not failed,
                    "; ".join(failed[:3]) or f"{sum(not r.skipped for r in self.injected)} injected, "
                                             f"{sum(r.skipped for r in self.injected)} skipped")]
        references: dict[int, str] = {}
        wrong = []
        for lineage in self.lineages:
            if lineage.steps not in references:
                out = self.scratch / f"reference-{lineage.steps}.json"
                env = {k: v for k, v in os.environ.items() if not k.startswith("VL_")}
                subprocess.run(counter_command(lineage.steps, out), check=True, env=env, cwd=REPO,
                               capture_output=True)
                references[lineage.steps] = out.read_text()
            state = lineage.final.state.value if lineage.final else "unfinished"
            if state != "succeeded":
                wrong.append(f"{lineage.run_ids[-1]}: {state} ({lineage.final.stop_reason if lineage.final else ''})")
            elif not lineage.out.exists() or lineage.out.read_text() != references[lineage.steps]:
                wrong.append(f"{lineage.run_ids[-1]}: result differs from the uninterrupted run's")
        cancelled = sum(len(lineage.cancelled) for lineage in self.lineages)
        results.append(("every run succeeded with the uninterrupted result (cancelled ones once resumed)",
                        not wrong, "; ".join(wrong) or f"{len(self.lineages)} runs, {cancelled} cancelled and resumed"))

        await asyncio.sleep(5.0)  # released hosts' groups end
        tags = host_tags(self.home)
        left = [t["host_id"] + "@" + t["run_id"] for t in tags
                if not t.get("released") or _host_alive(int(t["pgid"]), self.home / "hosts" / t["run_id"] / t["host_id"])]
        scripts = scripts_alive(self.home / "hosts")
        results.append(("no host process or group left", not left and not scripts,
                        f"{len(tags)} hosts; left: {left or 'none'}; scripts alive: {scripts or 'none'}"))

        await self.sample_checkpoints()
        results.append(("no complete checkpoint lost or changed", not self.checkpoint_problems,
                        "; ".join(self.checkpoint_problems[:5]) or f"{len(self.seen)} complete checkpoints "
                        f"watched; {len(self.corrupted)} corrupted on purpose"))

        replayer = Replayer(workflows=[TrainingRun], data_converter=pydantic_data_converter, debug_mode=True)
        histories, failures = 0, []
        for lineage in self.lineages:
            for run_id in lineage.run_ids:
                async for execution in self.client.list_workflows(f'WorkflowId = "{run_id}"'):
                    history = await self.client.get_workflow_handle(run_id, run_id=execution.run_id).fetch_history()
                    histories += 1
                    try:
                        await replayer.replay_workflow(WorkflowHistory.from_json(run_id, history.to_json()))
                    except Exception as err:  # noqa: BLE001 - every nondeterminism is reported
                        failures.append(f"{run_id}/{execution.run_id[:8]}: {err}")
        results.append(("every recorded history replays", not failures and histories > 0,
                        "; ".join(failures[:3]) or f"{histories} histories"))

        found = [str(path) for path in self.scratch.rglob("*")  # the server's database, hosts, file storage, logs
                 if path.is_file() and self.secret.encode() in _read(path)]
        found += [f"s3://{key}" for key in _s3_keys_holding(self.bucket_url, self.secret)]
        results.append(("the planted secret appears nowhere", not found,
                        ", ".join(found[:5]) or "server database, hosts, storage and logs searched"))

        over, exempt = [], []
        bound = 2 * CHECKPOINT_EVERY
        for lineage in self.lineages:
            for run_id in lineage.run_ids:
                status = await self.status(run_id)
                for attempt in status.attempts:
                    if attempt.steps_lost <= bound:
                        continue
                    span = (attempt.started_at.timestamp(), (attempt.ended_at or datetime.now(UTC)).timestamp())
                    if any(b <= span[1] and e >= span[0] for b, e in self.storage_faults):
                        exempt.append(f"{run_id}#{attempt.attempt}: {attempt.steps_lost}")
                    else:
                        over.append(f"{run_id}#{attempt.attempt}: {attempt.steps_lost} ({attempt.reason})")
        results.append((f"no attempt lost more than {bound} steps (two checkpoint intervals)", not over,
                        "; ".join(over[:5]) or f"exempt for a storage fault: {', '.join(exempt) or 'none'}"))
        return results


class Skip(Exception):
    """The fault has nothing to act on at this moment."""


# The control worker, with the hosts it starts sent to the server through the soak's proxy (HostPartitions),
# as tests/faults/test_partition.py sends them; the worker itself and the soak reach the server directly.
WORKER = ("import os, worker.control as control; direct = control.agent_connection_env; "
          "control.agent_connection_env = lambda client: direct(client) | "
          "{'TEMPORAL_ADDRESS': os.environ['CHAOS_HOSTS_REACH']}; control.main()")


class HostPartitions(CuttableProxy):
    """The hosts' way to the server. `isolate(pid)` cuts the host whose agent is `pid` off: its connections
    are reset and new ones refused (known by their source port, which /proc ties to the agent), while every
    other host's pass; `rejoin(pid)` lets it through again."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.isolated: set[int] = set()

    def isolate(self, pid: int) -> None:
        self.isolated.add(pid)
        ports = _local_ports(pid)

        async def reset() -> None:
            for writer in list(self._writers):
                peer = writer.get_extra_info("peername")
                if peer and peer[1] in ports:
                    writer.transport.abort()

        asyncio.run_coroutine_threadsafe(reset(), self._loop).result()

    def rejoin(self, pid: int) -> None:
        self.isolated.discard(pid)

    async def _serve(self, client_reader, client_writer) -> None:
        peer = client_writer.get_extra_info("peername")
        if peer and any(peer[1] in _local_ports(pid) for pid in list(self.isolated)):
            client_writer.transport.abort()
            return
        await super()._serve(client_reader, client_writer)


def _local_ports(pid: int) -> set[int]:
    """The local TCP ports of a process's sockets (its fds' inodes, looked up in /proc/net/tcp)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:["):-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _host_alive(pgid: int, host_dir: Path) -> bool:
    """A live process of the host's group that is the host's own: its environment names the host's directory.
    Three soaks side by side start processes fast enough that a dead host's group id is soon someone else's."""
    from activities.providers.local import group_members

    marker = f"={host_dir}".encode()
    return any(state != "Z" and marker in _read(Path(f"/proc/{pid}/environ")) for pid, state in group_members(pgid))


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _s3_keys_holding(bucket_url: str, needle: str) -> list[str]:
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(bucket_url.split("/checkpoints")[0])
    return [key for key in fs.find(root) if needle.encode() in fs.cat_file(key)]


def manifests(storage_url: str, run_id: str) -> dict[str, str]:
    """Each complete checkpoint of the run (its manifest is there): name -> sha256 of the manifest."""
    from fsspec.core import url_to_fs

    from vaultlayer.checkpoint import MANIFEST_NAME, storage

    fs, root = url_to_fs(storage.checkpoints_url(storage_url, run_id))
    fs.invalidate_cache()  # s3fs and gcsfs keep listings: a stale one would list what retention removed since
    try:  # not fs.exists: s3fs answers False when S3 is down, and every checkpoint would look removed
        entries = fs.ls(root, detail=False)
    except FileNotFoundError:
        return {}
    found = {}
    for entry in entries:
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        with contextlib.suppress(FileNotFoundError):
            found[name] = hashlib.sha256(fs.cat_file(f"{entry.rstrip('/')}/{MANIFEST_NAME}")).hexdigest()
    return found


def judged_listing(storage_url: str, before: tuple[bool, int], after: tuple[bool, int]) -> bool:
    """Whether a listing may judge what was removed: for s3://, only one taken with S3 up and at full speed from
    start to end ((disturbed, spells begun) the same before and after, and not disturbed). In an outage or a slow
    spell a manifest can read as missing without an error: seeds 3 and 4 (30 min, 7 Dec 2026) flagged checkpoints
    "removed" in a 5.4 s outage and in two slow spells, which the worker's log shows it removed only later."""
    return not storage_url.startswith("s3://") or (before == after and not before[0])


def removed_rightly(name: str, present: dict[str, str], fences: dict[int, int]) -> bool:
    """A complete checkpoint may go when a newer complete one is there (retention), or when it lies beyond
    its attempt's fence (written after the workflow stopped listening to that attempt)."""
    from vaultlayer.checkpoint import parse_checkpoint_name

    step, attempt = parse_checkpoint_name(name)
    if attempt in fences and step > fences[attempt]:
        return True
    return any((parsed := parse_checkpoint_name(other)) and parsed[0] > step for other in present)


def quiet_client_retries() -> None:
    """The soak's client retries through every server restart on purpose: only errors of its core are printed."""
    from temporalio.runtime import LoggingConfig, Runtime, TelemetryConfig, TelemetryFilter

    quiet = LoggingConfig(filter=TelemetryFilter(core_level="ERROR", other_level="ERROR"))
    Runtime.set_default(Runtime(telemetry=TelemetryConfig(logging=quiet)))


async def main_async(args: argparse.Namespace) -> int:
    quiet_client_retries()
    faults = schedule(args.seed, args.minutes, args.runs)
    scratch = Path(tempfile.mkdtemp(prefix="vl-chaos-"))
    soak = Soak(args, scratch)
    print(f"chaos soak: seed {args.seed}, {args.minutes} min, {args.runs} runs at a time, {len(faults)} faults "
          f"scheduled; scratch {scratch}", flush=True)
    began = time.monotonic()
    stop_watch = asyncio.Event()
    try:
        await soak.start()
        soak_end = soak.started + args.minutes * 60
        slots = [asyncio.create_task(soak.run_slot(slot, soak_end)) for slot in range(args.runs)]
        watcher = asyncio.create_task(soak.watch_checkpoints(stop_watch))
        await soak.inject_all(faults)
        await asyncio.sleep(max(0.0, soak_end - time.monotonic()))
        await soak.heal_everything()
        soak.log("faults over; every fault healed; waiting for the runs to end")
        await asyncio.wait_for(asyncio.gather(*slots), FINISH_BOUND_SECONDS)
        for task in list(soak.background):
            task.cancel()
        stop_watch.set()
        await watcher
        results = await soak.invariants()
    finally:
        await soak.stop()
    report = summary(soak, faults, results, time.monotonic() - began)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    passed = all(ok for _, ok, _ in results)
    if passed and not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0 if passed else 1


def summary(soak: Soak, faults: list[Fault], results, seconds: float) -> dict:
    by_kind = {}
    for kind in KINDS:
        records = [r for r in soak.injected if r.kind == kind]
        done = [r for r in records if not (r.skipped or r.failed)]
        recovered = sorted(r.recovered_seconds for r in done if r.recovered_seconds is not None)
        by_kind[kind] = {"scheduled": len(records), "injected": len(done),
                         "recovered_median_s": recovered[len(recovered) // 2] if recovered else None,
                         "recovered_max_s": recovered[-1] if recovered else None}
    statuses = [lineage.final for lineage in soak.lineages if lineage.final]
    return {
        "seed": soak.args.seed, "minutes": soak.args.minutes, "runs_at_a_time": soak.args.runs,
        "runs": len(soak.lineages), "seconds": round(seconds), "faults": by_kind,
        "reclaims": sum(s.reclaims for s in statuses), "host_faults": sum(s.host_faults for s in statuses),
        "steps_lost": sum(s.steps_lost for s in statuses),
        "invariants": [{"invariant": name, "held": ok, "detail": detail} for name, ok, detail in results],
        "log": [{field.name: getattr(r, field.name) for field in dataclasses.fields(r) if field.name != "spell_over"}
                for r in soak.injected],
    }


def print_report(report: dict) -> None:
    print(f"\nseed {report['seed']}: {report['runs']} runs in {report['seconds']} s; {report['reclaims']} reclaims, "
          f"{report['host_faults']} host faults, {report['steps_lost']} steps lost (final runs)")
    print(f"{'fault':24} {'scheduled':>9} {'injected':>9} {'recovered s (median/max)':>26}")
    for kind, row in report["faults"].items():
        recovered = f"{row['recovered_median_s']}/{row['recovered_max_s']}" if row["recovered_max_s"] else "-"
        print(f"{kind:24} {row['scheduled']:9} {row['injected']:9} {recovered:>26}")
    print()
    for row in report["invariants"]:
        print(f"{'held  ' if row['held'] else 'BROKEN'} {row['invariant']}: {row['detail']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--runs", type=int, default=4, help="runs going at a time")
    parser.add_argument("--json", help="also write the report here")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory even when all held")
    parser.add_argument("--print-schedule", action="store_true", help="print the seed's schedule and exit")
    args = parser.parse_args()
    if args.print_schedule:
        for fault in schedule(args.seed, args.minutes, args.runs):
            print(json.dumps(dataclasses.asdict(fault)))
        return
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
