"""Setup time per attempt: does a second host of the same run spend longer in setup than the first?

A real `vl run` of the tiny example whose setup is a real `pip install` of a package with a C extension, built
from its sdist (the shape of flash-attn or apex, smaller), from a package index this bench serves on loopback
(as PyPI or a private index would: pip's wheel cache is keyed by the URL a sdist came from, so a path inside
the attempt's own code directory would never hit): the first host builds it; the run is then reclaimed once
and finishes on a second host. Each attempt's setup time is the agent's own measure (from the host's start
on setup, the setup cache's restore included, to the end of the last setup command), read from `vl status`.
Side by side in one run: with the run's setup cache (the default) and with `--no-setup-cache`, where each host's
setup starts with an empty pip cache of its own, as a fresh cloud host does (local hosts share this machine's
~/.cache/pip, which would hide the difference). The target: the
second attempt's setup is no longer than the first's (ratio <= 1); with the cache, far shorter.

    python bench/setup_time.py [--json] [--repeats 1] [--functions 400]

Needs a C compiler and setuptools >= 70.1 (its own bdist_wheel) in this environment: the install uses only the
bench's own index and no build isolation, so nothing is downloaded from outside.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRAIN_TINY = REPO / "examples" / "train_tiny.py"
STEPS = 200
FINISHED = ("succeeded", "failed", "cancelled")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def vl(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], env={**env, "PYTHONPATH": str(REPO)}, cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def status(env: dict[str, str], cwd: Path, run_id: str) -> dict:
    return json.loads(vl(env, cwd, "status", run_id, "--json").stdout)


def slow_sdist(folder: Path, functions: int) -> None:
    """An sdist whose build compiles `functions` C functions: seconds of a compiler's work on every miss."""
    source = folder / "slowext-1.0"
    source.mkdir(parents=True)
    body = "\n".join(f"static long f{i}(long x) {{ long s = {i}; for (long k = 0; k < x; k++) s = s * 31 + k ^ {i};"
                     f" return s; }}" for i in range(functions))
    calls = " + ".join(f"f{i}(n)" for i in range(functions))
    (source / "slowext.c").write_text(f"""#include <Python.h>
{body}
static PyObject *total(PyObject *self, PyObject *arg) {{
    long n = PyLong_AsLong(arg);
    return PyLong_FromLong({calls});
}}
static PyMethodDef methods[] = {{{{"total", total, METH_O, ""}}, {{NULL, NULL, 0, NULL}}}};
static struct PyModuleDef module = {{PyModuleDef_HEAD_INIT, "slowext", "", -1, methods}};
PyMODINIT_FUNC PyInit_slowext(void) {{ return PyModule_Create(&module); }}
""")
    (source / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools>=70.1"]\n'
                                           'build-backend = "setuptools.build_meta"\n\n'
                                           '[project]\nname = "slowext"\nversion = "1.0"\n')
    (source / "setup.py").write_text('from setuptools import Extension, setup\n'
                                     'setup(ext_modules=[Extension("slowext", ["slowext.c"])])\n')
    (source / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: slowext\nVersion: 1.0\n")
    with tarfile.open(folder / "slowext-1.0.tar.gz", "w:gz") as archive:
        archive.add(source, arcname="slowext-1.0")
    shutil.rmtree(source)


def package_index(root: Path, functions: int) -> str:
    """A PEP 503 simple index holding the slow sdist, served on loopback from a thread; returns its URL."""
    slow_sdist(root / "packages", functions)
    digest = hashlib.sha256((root / "packages" / "slowext-1.0.tar.gz").read_bytes()).hexdigest()
    (root / "simple" / "slowext").mkdir(parents=True)
    (root / "simple" / "slowext" / "index.html").write_text(
        f'<html><body><a href="../../packages/slowext-1.0.tar.gz#sha256={digest}">slowext-1.0.tar.gz</a></body></html>')
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}/simple/"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def project(root: Path) -> Path:
    folder = root / "project"
    folder.mkdir(parents=True)
    shutil.copy(TRAIN_TINY, folder / "train.py")
    (folder / ".gitignore").write_text("deps/\n")
    return folder


def setup_command(index_url: str, cache: bool) -> str:
    fresh_host = "" if cache else 'export PIP_CACHE_DIR="$(mktemp -d)" && '
    return (f"{fresh_host}python -m pip install --index-url {index_url} --no-build-isolation --target deps slowext"
            " && python -c 'import sys; sys.path.insert(0, \"deps\"); import slowext; slowext.total(3)'")


def setup_seconds(env: dict[str, str], home: Path, folder: Path, index_url: str, cache: bool) -> list[dict]:
    """One run through one reclaim: each attempt's setup time and what the setup cache did for it."""
    started = vl(env, folder, "run", "--detach", "--heartbeat-timeout", "10s", "--notice-seconds", "20",
                 "--checkpoint-every", "20", "--setup", setup_command(index_url, cache), *([] if cache else ["--no-setup-cache"]), "--",
                 "python", "train.py", "--steps", str(STEPS), "--step-time", "0.05", "--out", str(home / "w.pt"))
    assert started.returncode == 0, started.stdout + started.stderr
    run_id = next(line for line in started.stdout.splitlines() if line.startswith("run ")).removeprefix("run ")
    pointer = home / "storage" / run_id / "SETUP_CACHE.json"
    while True:  # the first host trained a little and, with the cache, stored it
        current = status(env, folder, run_id)
        if (current.get("durable_step") or 0) >= 20 and (pointer.exists() or not cache):
            break
        assert current["state"] not in FINISHED, current
        time.sleep(0.5)
    reclaimed = vl(env, folder, "reclaim", run_id)
    assert reclaimed.returncode == 0, reclaimed.stderr
    while (current := status(env, folder, run_id))["state"] not in FINISHED:
        time.sleep(0.5)
    assert current["state"] == "succeeded", current
    attempts = current["attempts"]
    assert [a["outcome"] for a in attempts] == ["reclaimed", "completed"], attempts
    return [{"setup_seconds": a["setup_seconds"], "setup_cache": a["setup_cache"]} for a in attempts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--functions", type=int, default=400, help="C functions the package's build compiles")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="vl-bench-") as scratch:
        home = Path(scratch)
        folder = project(home)
        index_url = package_index(home / "index", args.functions)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VL_", "TEMPORAL_", "PIP_", "UV_"))}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.update(VL_HOME=str(home), VL_TEMPORAL_PORT=str(free_port()), VL_UI_PORT=str(free_port()))
        try:
            for _ in range(args.repeats):
                for cache in (True, False):  # alternated, so drift in the machine's load hits both alike
                    first, second = setup_seconds(env, home, folder, index_url, cache)
                    rows.append({"cache": cache, "first_s": first["setup_seconds"],
                                 "second_s": second["setup_seconds"], "second_cache": second["setup_cache"],
                                 "ratio": second["setup_seconds"] / first["setup_seconds"]})
        finally:
            vl(env, folder, "down")
    if args.json:
        print(json.dumps({"functions": args.functions, "rows": rows, "load_average": os.getloadavg()}))
        return
    print(f"setup: pip install of an sdist with {args.functions} C functions; load average {os.getloadavg()[0]:.2f}")
    print(f"{'setup cache':<12} {'attempt 1 (s)':>14} {'attempt 2 (s)':>14} {'2 / 1':>7}  attempt 2's cache")
    for row in rows:
        print(f"{'on' if row['cache'] else 'off':<12} {row['first_s']:>14.2f} {row['second_s']:>14.2f} "
              f"{row['ratio']:>7.2f}  {row['second_cache'] or '-'}")


if __name__ == "__main__":
    main()
