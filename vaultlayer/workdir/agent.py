"""The agent travels too: the exact VaultLayer a run was submitted with, as a wheel in the run's storage.

A cloud host used to `pip install vaultlayer[aws]==<version>` from the public index: a version we do not
publish, and a name whoever registers it could run code under, as root with the instance role. Instead
`vl run` builds a wheel from the installed code (the same bytes for the same code: entries sorted, fixed
times), stores it once under `<storage>/_code/agents/<sha256>/`, and the host's bootstrap installs that file
after checking its SHA-256, with the dependencies pinned to the versions the submitting machine has
(docs/code-and-outputs.md). A public-index name is used only when a provider's settings set `package`.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import re
import zipfile
from importlib import metadata
from pathlib import Path

from fsspec.core import url_to_fs

from vaultlayer.checkpoint import storage
from vaultlayer.models import AgentRef
from vaultlayer.workdir.snapshot import code_url

DISTRIBUTION = "vaultlayer"
PACKAGES = ("vaultlayer", "activities", "workflows", "worker", "cli")  # pyproject's packages.find
HOST_EXTRAS = ("aws", "gcp", "s3", "gcs")  # what a cloud host may install with the wheel
_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip holds: no build time in the bytes


def build_agent_wheel() -> tuple[str, bytes]:
    """(file name, bytes) of a wheel of the installed VaultLayer: its packages' files as they are on disk here,
    its metadata and entry points."""
    dist = metadata.distribution(DISTRIBUTION)
    version = dist.version
    entries: dict[str, bytes] = {}
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)  # found, not imported: this floor does not use them
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"package {package} of {DISTRIBUTION} is not installed; reinstall: pip install -e .")
        root = Path(next(iter(spec.submodule_search_locations)))
        for path in sorted(root.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                entries[f"{package}/{path.relative_to(root).as_posix()}"] = path.read_bytes()
    info = f"{DISTRIBUTION}-{version}.dist-info"
    # METADATA in an installed wheel or editable install; PKG-INFO in the egg-info a source checkout may hold.
    core = dist.read_text("METADATA") or dist.read_text("PKG-INFO")
    if not core or f"\nVersion: {version}\n" not in core:
        raise RuntimeError(f"the metadata of {DISTRIBUTION} {version} cannot be read from {dist}; reinstall it")
    entries[f"{info}/METADATA"] = core.encode()
    entries[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: vaultlayer\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    if entry_points := dist.read_text("entry_points.txt"):
        entries[f"{info}/entry_points.txt"] = entry_points.encode()
    record = [f"{name},sha256={_record_digest(data)},{len(data)}" for name, data in entries.items()]
    entries[f"{info}/RECORD"] = ("\n".join([*record, f"{info}/RECORD,,"]) + "\n").encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as wheel:
        for name, data in entries.items():
            item = zipfile.ZipInfo(name, _EPOCH)
            item.compress_type = zipfile.ZIP_DEFLATED
            item.external_attr = 0o644 << 16
            wheel.writestr(item, data)
    return f"{DISTRIBUTION}-{version}-py3-none-any.whl", buffer.getvalue()


def dependency_pins() -> list[str]:
    """`name==version` for every dependency of VaultLayer (with its extras) installed here: what the host
    installs beside the wheel, so it runs what was tested here and nothing an index offers later."""
    pins = set()
    for requirement in metadata.requires(DISTRIBUTION) or []:
        extra = re.search(r"""extra\s*==\s*["']([\w-]+)["']""", requirement)
        if extra is not None and extra.group(1) not in HOST_EXTRAS:
            continue
        name = re.match(r"\s*([A-Za-z0-9._-]+)", requirement).group(1)  # PEP 508: the name comes first
        try:
            pins.add(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue  # an extra this machine does not have: the host resolves it under the others' pins
    return sorted(pins, key=str.lower)


def store_agent(storage_url: str) -> AgentRef:
    """The wheel of this VaultLayer in the run's storage (stored once per distinct build), and its digest."""
    filename, data = build_agent_wheel()
    digest = hashlib.sha256(data).hexdigest()
    url = f"{code_url(storage_url)}/agents/{digest}/{filename}"
    fs, path = url_to_fs(url)
    if not storage.retry(lambda: fs.exists(path), "look for the agent wheel"):
        storage.retry(lambda: storage.write_atomically(fs, path, data), "store the agent wheel")
    return AgentRef(url=url, sha256=digest, pins=dependency_pins())


def _record_digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
