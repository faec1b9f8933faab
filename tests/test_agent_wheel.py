"""The agent travels with the run (vaultlayer/workdir/agent.py): a wheel of this VaultLayer in the run's storage,
which a cloud host's bootstrap installs after checking its digest, never a name from a public index.

The bootstrap test plays the host: the install lines the providers put in the boot script, run by bash in an
empty virtual environment with no package index. The dependencies are there as an image with them would have
them (this environment's, less VaultLayer itself), so what gets installed can only come from storage.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from activities.providers.base import ProviderConfigError, agent_install, agent_wheel_path, fetch_lines
from vaultlayer.workdir.agent import build_agent_wheel, store_agent


def test_the_wheel_is_this_code_the_same_bytes_every_time():
    name, data = build_agent_wheel()
    assert name == "vaultlayer-0.1.0-py3-none-any.whl" and build_agent_wheel()[1] == data
    with zipfile.ZipFile(io.BytesIO(data)) as wheel:
        names = set(wheel.namelist())
        record = wheel.read("vaultlayer-0.1.0.dist-info/RECORD").decode()
        assert wheel.read("cli/main.py") == (Path(__file__).parents[1] / "cli" / "main.py").read_bytes()
    assert {"vaultlayer/sdk.py", "activities/host.py", "workflows/training_run.py", "worker/agent.py"} <= names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert "vl = cli.main:main" in zipfile.ZipFile(io.BytesIO(data)).read(
        "vaultlayer-0.1.0.dist-info/entry_points.txt").decode()
    assert all(line.count(",") == 2 for line in record.splitlines())


def host_like_venv(root: Path) -> Path:
    """An empty venv that sees this environment's packages but VaultLayer, as an image with its dependencies."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    deps = root / "deps"
    deps.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for entry in site.iterdir():
        if not entry.name.startswith(("vaultlayer", "__editable__", "_vaultlayer", "pip", "easy-install")):
            (deps / entry.name).symlink_to(entry)
    [venv_site] = (venv / "lib").glob("python*/site-packages")
    (venv_site / "image-dependencies.pth").write_text(f"{deps}\n")
    return venv


def run_install(lines: list[str], root: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VL_", "PIP_", "PYTHON"))}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")  # no index: storage is the only source
    return subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(lines)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_bootstrap_installs_the_agent_from_storage_in_an_empty_venv_with_no_index(tmp_path):
    agent = store_agent((tmp_path / "storage").as_uri())
    host = tmp_path / "host"
    host.mkdir()
    venv = host_like_venv(host)
    lines = agent_install(agent=agent, package=None, extra="aws", home=str(host),
                          fetch=lambda ref: fetch_lines(ref.url, agent_wheel_path(ref, str(host))))
    done = run_install(lines, host)
    assert done.returncode == 0, done.stdout + done.stderr
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import cli.main, vaultlayer; print(vaultlayer.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, check=True).stdout.strip()
    assert where.startswith(str(venv)), where  # installed from the wheel, not this checkout
    assert subprocess.run([str(venv / "bin" / "vl"), "--help"], capture_output=True, cwd=tmp_path).returncode == 0
    assert (host / "constraints.txt").read_text().splitlines() == agent.pins

    # A wheel changed in storage is refused before anything of it is installed.
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    venv = host_like_venv(tampered)
    wheel = Path(agent.url.removeprefix("file://"))
    wheel.write_bytes(wheel.read_bytes() + b"\0")
    lines = agent_install(agent=agent, package=None, extra="aws", home=str(tampered),
                          fetch=lambda ref: fetch_lines(ref.url, agent_wheel_path(ref, str(tampered))))
    done = run_install(lines, tampered)
    assert done.returncode != 0 and "FAILED" in done.stdout + done.stderr
    assert not (venv / "bin" / "vl").exists()


def test_an_index_name_is_used_only_when_set_and_a_run_without_a_wheel_is_refused(tmp_path):
    agent = store_agent((tmp_path / "storage").as_uri())
    chosen = agent_install(agent=agent, package="vaultlayer[aws]==0.1.0", extra="aws", fetch=lambda ref: [])
    assert chosen == ["/opt/vaultlayer/venv/bin/pip install --quiet 'vaultlayer[aws]==0.1.0'"]
    with pytest.raises(ProviderConfigError, match="carries no agent wheel"):
        agent_install(agent=None, package=None, extra="aws", fetch=lambda ref: [])
    with pytest.raises(ProviderConfigError, match="cannot fetch the agent wheel from gs:// storage"):
        fetch_lines("gs://bucket/x.whl", "/opt/vaultlayer/x.whl")
    token = fetch_lines("gs://bucket/_code/agents/ab/v.whl", "/opt/vaultlayer/v.whl", google_token=True)
    assert "storage/v1/b/bucket/o/_code%2Fagents%2Fab%2Fv.whl?alt=media" in token[1]
