"""`vl codec-server`: Temporal's codec server protocol over the payload codec, so that the Temporal UI and
`temporal workflow show --codec-endpoint` display encrypted payloads decoded, while the server keeps only
ciphertext.

POST /encode and /decode (also under /{namespace}/..., the CLI's `{namespace}` templating) take and return
`{"payloads": [...]}` in protobuf JSON (base64 `data` and metadata values). The namespace comes from the
`X-Namespace` header or the path; with `namespaces` given, any other is refused. Browsers may call it only
from the listed origins (the UI's): a preflight from another origin is refused and no CORS header is sent.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import structlog
from google.protobuf import json_format
from temporalio.api.common.v1 import Payloads
from temporalio.converter import PayloadCodec

from vaultlayer.codec import EncryptionKeyError

log = structlog.get_logger(__name__)

DEFAULT_PORT = 8081
# The embedded dev server's UI, under both names a browser may use for it.
DEFAULT_ORIGINS = ("http://localhost:8233", "http://127.0.0.1:8233")
MAX_BODY_BYTES = 64 << 20  # a page of history with large payloads; more is refused, not buffered
ALLOWED_HEADERS = "Content-Type, X-Namespace, Authorization"


def make_server(codec: PayloadCodec, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                cors_origins: Iterable[str] = DEFAULT_ORIGINS, namespaces: Iterable[str] = ()) -> ThreadingHTTPServer:
    """A server ready for `serve_forever()`; port 0 picks a free port (`server.server_address`)."""
    origins, allowed = frozenset(cors_origins), frozenset(namespaces)

    class Handler(BaseHTTPRequestHandler):
        def do_OPTIONS(self) -> None:  # noqa: N802 - http.server's naming
            if self._cors_origin() is None:
                self._reply(403, {"error": "origin not allowed; start the codec server with --cors-origin ORIGIN"})
                return
            self.send_response(204)
            self._cors_headers()
            self.send_header("Access-Control-Allow-Methods", "POST, OPTIONS")
            self.send_header("Access-Control-Allow-Headers", ALLOWED_HEADERS)
            self.send_header("Access-Control-Max-Age", "600")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self) -> None:  # noqa: N802
            parts = [part for part in self.path.split("?", 1)[0].split("/") if part]
            if not parts or parts[-1] not in ("encode", "decode") or len(parts) > 2:
                self._reply(404, {"error": "use POST /encode or /decode (or /{namespace}/encode, /{namespace}/decode)"})
                return
            namespace = self.headers.get("X-Namespace") or (parts[0] if len(parts) == 2 else "")
            if allowed and namespace not in allowed:
                self._reply(403, {"error": f"namespace {namespace!r} is not served here; "
                                           f"this codec server serves {', '.join(sorted(allowed))}"})
                return
            length = self.headers.get("Content-Length", "0")
            if not length.isdigit() or int(length) > MAX_BODY_BYTES:
                self._reply(413, {"error": f"Content-Length {length!r}: send at most {MAX_BODY_BYTES} bytes"})
                return
            try:
                payloads = json_format.Parse(self.rfile.read(int(length)), Payloads())
                work = codec.encode if parts[-1] == "encode" else codec.decode
                result = asyncio.run(work(list(payloads.payloads)))
            except (json_format.ParseError, UnicodeDecodeError) as err:
                self._reply(400, {"error": f"expected {{\"payloads\": [...]}} in protobuf JSON: {err}"})
                return
            except EncryptionKeyError as err:
                self._reply(422, {"error": str(err)})
                return
            self._reply(200, json_format.MessageToDict(Payloads(payloads=result)) or {"payloads": []})

        def _cors_origin(self) -> str | None:
            origin = self.headers.get("Origin")
            return origin if origin in origins else None

        def _cors_headers(self) -> None:
            if origin := self._cors_origin():
                self.send_header("Access-Control-Allow-Origin", origin)
                self.send_header("Access-Control-Allow-Credentials", "true")  # the UI may send its token
                self.send_header("Vary", "Origin")

        def _reply(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self._cors_headers()
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
            log.info("codec server request", request=self.requestline, status=args[1] if len(args) > 1 else None)

    return ThreadingHTTPServer((host, port), Handler)
