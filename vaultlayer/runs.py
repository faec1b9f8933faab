"""The typed Python client for notebooks and scripts: submit a run, follow it, read its checkpoints and logs.

`AsyncClient` and `AsyncRun` are for async code; `Client` and `Run` wrap them for plain code. A sync call
runs on the client's own event loop thread, never `asyncio.run`, so it works where a loop is already
running, as in Jupyter. Everything returned is a pydantic model (`RunStatus`, `RunSpec`,
`CheckpointListing`) or plain text (logs). `vl logs` and `vl resume` are built on this module, which is built
on vaultlayer/client.py like the rest of `vl`.

`submit` takes a run config file's path, a mapping in the file's shape or a `RunRequest`, and checks it as
`vl run` does (vaultlayer/request.py: the same `build_spec`, the same one-line messages), or a `RunSpec`
as it is.

    import vaultlayer
    run = vaultlayer.submit("vl.yaml")
    run.wait(); print(run.status().state, run.logs())
"""

from __future__ import annotations

import asyncio
import os
import threading
import warnings
from collections.abc import AsyncIterator, Coroutine, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from temporalio.client import Client as TemporalClient
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from vaultlayer import checkpoint, logs_store, seed, workdir
from vaultlayer import client as vl_client
from vaultlayer.config import load_file, load_mapping
from vaultlayer.home import default_storage_url
from vaultlayer.models import CheckpointRef, RunInput, RunSpec, RunStatus, SnapshotRef
from vaultlayer.request import RunRequest, RunRequestError, build_spec, check_storage, pack_code, select_code
from vaultlayer.run_ids import new_run_id
from vaultlayer.ui import ensure_search_attributes
from vaultlayer.workdir import Selection

T = TypeVar("T")
Submittable = RunSpec | RunRequest | str | os.PathLike | Mapping[str, Any]
LOG_POLL_SECONDS = 1.0
SPEC_QUERY_SECONDS = 3.0  # then the spec is read from the run's history


class ClientError(Exception):
    """A request the client cannot carry out; the message says why and what to do instead."""


class RunNotFound(ClientError, LookupError):
    pass


def spec_of(run: Submittable) -> RunSpec:
    """The RunSpec for `run`: a RunSpec as it is; a RunRequest, a config file's path or a mapping in the file's
    shape (relative paths from the current directory) checked by `build_spec`, as `vl run -f` checks them.
    Raises RunRequestError, one line per problem."""
    return _prepared(run)[0]


def _prepared(run: Submittable) -> tuple[RunSpec, Selection | None]:
    """The spec, and the code that will travel with it (select_code: checked, nothing written yet). A RunSpec
    is taken as it is: its `code` snapshot, or none."""
    if isinstance(run, RunSpec):
        return run, None
    if isinstance(run, RunRequest):
        request = run
    elif isinstance(run, Mapping):
        request = load_mapping(dict(run), "config", Path.cwd()).request()
    else:
        request = load_file(run).request()
    spec = build_spec(request)
    return spec, select_code(request, spec)


def run_spec(command: Sequence[str], **fields: Any) -> RunSpec:
    """A RunSpec with the defaults `vl run` uses: a new run id, this directory, storage under VL_HOME."""
    values = dict(run_id=new_run_id(), command=list(command), workdir=os.getcwd(), storage_url=default_storage_url())
    return RunSpec(**values | fields)


def embedded_address() -> str:
    """Where `vl` runs its embedded Temporal server (VL_TEMPORAL_PORT, default 7233)."""
    return f"localhost:{os.environ.get('VL_TEMPORAL_PORT', '7233')}"


class AsyncClient:
    """Runs on one Temporal cluster: the configured one (TEMPORAL_ADDRESS, profiles), else `vl`'s embedded one."""

    def __init__(self, temporal: TemporalClient, task_queue: str | None = None) -> None:
        self.temporal = temporal
        self.task_queue = task_queue or vl_client.task_queue()

    @classmethod
    async def connect(cls, address: str | None = None, namespace: str | None = None,
                      task_queue: str | None = None) -> AsyncClient:
        target = address or vl_client.configured_address() or embedded_address()
        try:
            temporal = await vl_client.connect(target, namespace)
        except RuntimeError as err:
            raise ClientError(f"cannot reach Temporal at {target} ({err}); start the embedded server with any vl "
                              f"command (such as `vl ls`), or set TEMPORAL_ADDRESS to your cluster") from None
        return cls(temporal, task_queue)

    async def submit(self, run: Submittable) -> AsyncRun:
        """Start a run: a config file's path, a mapping in its shape, a RunRequest (all checked as `vl run`
        checks them; RunRequestError says what is wrong, and nothing starts) or a RunSpec
        (vaultlayer.run_spec makes one with `vl run`'s defaults)."""
        spec, code = await asyncio.to_thread(_prepared, run)  # a provider's checks may ask its cloud
        try:  # before anything is provisioned: a run that cannot save must not start
            await asyncio.to_thread(check_storage, spec.storage_url)
        except RunRequestError as err:
            raise ClientError(f"storage_url: {err}") from None
        spec = await asyncio.to_thread(pack_code, code, spec)
        if not spec.search_attributes:  # as `vl run` does: the run's state and step searchable in the UI
            problem = await ensure_search_attributes(self.temporal)
            if problem:
                warnings.warn(problem, stacklevel=2)
            spec = spec.model_copy(update={"search_attributes": problem is None})
        try:
            await vl_client.submit(self.temporal, spec, queue=self.task_queue)
        except WorkflowAlreadyStartedError:
            raise ClientError(f"run id {spec.run_id!r} is taken; give the run another id") from None
        return AsyncRun(self, spec.run_id)

    async def get_run(self, run_id: str) -> AsyncRun:
        """The run with this id; RunNotFound if there is none."""
        if not await self._exists(run_id):
            raise RunNotFound(f"no run {run_id!r}; list runs with: vl ls")
        return AsyncRun(self, run_id)

    async def _exists(self, run_id: str) -> bool:
        try:
            await self.temporal.get_workflow_handle(run_id).describe()
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                return False
            raise
        return True

    async def list_runs(self, limit: int = 100) -> list[RunStatus]:
        """Runs, newest first."""
        return await vl_client.list_runs(self.temporal, limit=limit)

    async def resume(self, run_id: str, new_id: str | None = None, fresh_code: bool = False) -> AsyncRun:
        """A new run with the same spec that starts from this finished run's newest verified checkpoint.

        The checkpoint is copied into the new run and verified first (vaultlayer/seed.py); the old run's
        checkpoints are only read. The new run runs the old run's code snapshot, or with `fresh_code` the
        old run's workdir packed again now (checked as `vl run` checks it)."""
        old = await self.get_run(run_id)
        status = await old.status()
        if not status.state.finished:
            raise ClientError(f"run {run_id} is still {status.state.value}; resume it once it has finished "
                              f"(vl cancel {run_id} stops it and keeps its checkpoints)")
        spec = await old.spec()
        new_spec = RunSpec.model_validate(spec.model_dump() | {"run_id": new_id or new_run_id(),
                                                               "submitted_at": datetime.now(UTC)})
        if await self._exists(new_spec.run_id):  # checked before the copy lands in that run's storage
            raise ClientError(f"run id {new_spec.run_id!r} is taken; give the new run another id")
        source = await asyncio.to_thread(seed.newest_verified, spec.storage_url, run_id, status.fences)
        if source is None:
            raise ClientError(f"run {run_id} has no verified checkpoint in {spec.storage_url} to resume from; "
                              f"start it anew with vl run")
        code = None
        if fresh_code:
            code = await asyncio.to_thread(select_code, RunRequest(), spec)  # the default checks and limit
        copied = await asyncio.to_thread(seed.copy_checkpoint, source, spec.storage_url, new_spec.run_id)
        new_spec = await asyncio.to_thread(pack_code, code, new_spec)
        run = await self.submit(new_spec)
        run.resumed_from = copied
        return run


class AsyncRun:
    """One run, by id. Cheap to make; every method asks the server (or the run's storage) afresh."""

    def __init__(self, client: AsyncClient, run_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self.resumed_from: CheckpointRef | None = None  # set by `resume`: the copied checkpoint it starts from
        self._spec: RunSpec | None = None

    def __repr__(self) -> str:
        return f"AsyncRun({self.run_id!r})"

    async def status(self) -> RunStatus:
        return await vl_client.status(self.client.temporal, self.run_id)

    async def spec(self) -> RunSpec:
        """What the run was submitted with. From its history when no worker answers the query, so that the
        checkpoints and logs of a run stay readable after its control plane has gone."""
        if self._spec is None:
            handle = self.client.temporal.get_workflow_handle(self.run_id)
            try:
                self._spec = await vl_client.query(handle, "spec", RunSpec,
                                                   rpc_timeout=timedelta(seconds=SPEC_QUERY_SECONDS))
            except RPCError:
                async for event in handle.fetch_history_events():
                    payloads = event.workflow_execution_started_event_attributes.input.payloads
                    [started] = await self.client.temporal.data_converter.decode(payloads, [RunInput])
                    self._spec = started.spec
                    break
        return self._spec

    async def wait(self, timeout: float | None = None) -> RunStatus:
        """The status once the run has finished (succeeded, failed or cancelled); TimeoutError after `timeout` s."""
        try:
            await asyncio.wait_for(self.client.temporal.get_workflow_handle(self.run_id).result(), timeout)
        except WorkflowFailureError:
            pass  # failed or cancelled: the status says which, and why
        except TimeoutError:
            raise TimeoutError(f"run {self.run_id} has not finished after {timeout} s") from None
        return await self.status()

    async def cancel(self) -> None:
        """Stop the run: its hosts are released, its checkpoints kept (`resume` starts from them)."""
        await vl_client.cancel(self.client.temporal, self.run_id)

    async def checkpoints(self, verify: bool = False) -> list[checkpoint.CheckpointListing]:
        """Every checkpoint of the run, newest first, judged as a resume would; `verify` re-hashes every byte."""
        spec, status = await self.spec(), await self.status()
        ended = [record.attempt for record in status.attempts if record.outcome is not None]
        return await asyncio.to_thread(checkpoint.describe_checkpoints, spec.storage_url, self.run_id,
                                       status.fences, ended, verify)

    async def pull(self, dest: str | os.PathLike[str]) -> Path:
        """Download the run's outputs (`--output-dir`, stored when its script succeeded or was cancelled) into `dest` (absent or
        empty), every file checked against its digest. ClientError when the run stored none."""
        spec, ref = await self.spec(), await self.outputs()
        if ref is None:
            why = ("it was started without --output-dir" if spec.output_dir is None else
                   f"its script has not succeeded with {spec.output_dir}/ yet, nor been cancelled")
            raise ClientError(f"run {self.run_id} stored no outputs: {why}")
        try:
            await asyncio.to_thread(workdir.restore_snapshot, ref, dest)
        except workdir.WorkdirError as err:
            raise ClientError(f"cannot pull the outputs of {self.run_id}: {err}") from None
        return Path(dest).resolve()

    async def outputs(self) -> SnapshotRef | None:
        """The run's stored outputs (what `pull` downloads), from its storage; None when it stored none."""
        spec = await self.spec()
        return await asyncio.to_thread(workdir.stored_outputs, spec.storage_url, self.run_id)

    async def code(self) -> workdir.WorkdirManifest:
        """The files of the code snapshot the run runs (each with its size and digest); ClientError without one."""
        spec = await self.spec()
        if spec.code is None:
            raise ClientError(f"run {self.run_id} ships no code (submitted with --no-code): it runs in "
                              f"{spec.workdir} as each host has it")
        try:
            return await asyncio.to_thread(workdir.read_manifest, spec.code)
        except workdir.WorkdirError as err:
            raise ClientError(f"cannot read the code of {self.run_id}: {err}") from None

    async def logs(self, attempt: int | None = None) -> str:
        """The script's output stored so far: one attempt's, or every attempt's under a header line each."""
        spec = await self.spec()
        return await asyncio.to_thread(logs_store.read_logs, spec.storage_url, self.run_id, attempt)

    async def follow_logs(self, attempt: int | None = None) -> AsyncIterator[str]:
        """The output as it is stored, until the run has finished and everything it stored was read."""
        spec = await self.spec()
        cursor = logs_store.LogCursor(spec.storage_url, self.run_id, attempt)
        handle = self.client.temporal.get_workflow_handle(self.run_id)
        while True:
            finished = (await handle.describe()).status != WorkflowExecutionStatus.RUNNING
            text = await asyncio.to_thread(cursor.read_new)
            if text:
                yield text
            if finished:
                return
            await asyncio.sleep(LOG_POLL_SECONDS)


class _LoopThread:
    """A private event loop on its own thread, so that sync calls work inside a running loop (Jupyter)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="vaultlayer-client", daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # Ctrl-C in a notebook stops the call too
            raise

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


class Client:
    """The sync client. `Client()` connects like `vl` does; `address`/`namespace` override the configuration."""

    def __init__(self, address: str | None = None, namespace: str | None = None,
                 task_queue: str | None = None) -> None:
        self._loop = _LoopThread()
        try:
            self.aio = self._loop.run(AsyncClient.connect(address, namespace, task_queue))
        except BaseException:
            self._loop.close()
            raise

    def submit(self, run: Submittable) -> Run:
        return Run(self._loop, self._loop.run(self.aio.submit(run)))

    def get_run(self, run_id: str) -> Run:
        return Run(self._loop, self._loop.run(self.aio.get_run(run_id)))

    def list_runs(self, limit: int = 100) -> list[RunStatus]:
        return self._loop.run(self.aio.list_runs(limit))

    def resume(self, run_id: str, new_id: str | None = None, fresh_code: bool = False) -> Run:
        return Run(self._loop, self._loop.run(self.aio.resume(run_id, new_id, fresh_code)))

    def close(self) -> None:
        self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Run:
    """One run, by id; the sync face of `AsyncRun` (same methods, same results)."""

    def __init__(self, loop: _LoopThread, aio: AsyncRun) -> None:
        self._loop = loop
        self.aio = aio

    def __repr__(self) -> str:
        return f"Run({self.run_id!r})"

    @property
    def run_id(self) -> str:
        return self.aio.run_id

    @property
    def resumed_from(self) -> CheckpointRef | None:
        return self.aio.resumed_from

    def status(self) -> RunStatus:
        return self._loop.run(self.aio.status())

    def spec(self) -> RunSpec:
        return self._loop.run(self.aio.spec())

    def wait(self, timeout: float | None = None) -> RunStatus:
        return self._loop.run(self.aio.wait(timeout))

    def cancel(self) -> None:
        self._loop.run(self.aio.cancel())

    def checkpoints(self, verify: bool = False) -> list[checkpoint.CheckpointListing]:
        return self._loop.run(self.aio.checkpoints(verify))

    def logs(self, attempt: int | None = None) -> str:
        return self._loop.run(self.aio.logs(attempt))

    def pull(self, dest: str | os.PathLike[str]) -> Path:
        return self._loop.run(self.aio.pull(dest))

    def code(self) -> workdir.WorkdirManifest:
        return self._loop.run(self.aio.code())

    def outputs(self) -> SnapshotRef | None:
        return self._loop.run(self.aio.outputs())

    def follow_logs(self, attempt: int | None = None) -> Iterator[str]:
        chunks = self.aio.follow_logs(attempt)
        try:
            while True:
                try:
                    yield self._loop.run(anext(chunks))
                except StopAsyncIteration:
                    return
        finally:
            self._loop.run(chunks.aclose())


_default: Client | None = None
_default_lock = threading.Lock()


def default_client() -> Client:
    """The client behind the module functions, connected on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Client()
        return _default


def submit(run: Submittable) -> Run:
    return default_client().submit(run)


def get_run(run_id: str) -> Run:
    return default_client().get_run(run_id)


def list_runs(limit: int = 100) -> list[RunStatus]:
    return default_client().list_runs(limit)
