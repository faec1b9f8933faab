"""What every provider shares, written once.

The control plane's side: the small interface every provider implements (modelled on SkyPilot's provision
API and dstack's Compute: provision returns a host or a typed refusal the policy can act on; release is
idempotent and fast; describe tells a reclaimed host from a broken one after heartbeats stop), its error
hierarchy, the host's task-queue name and the bootstrap script a cloud host boots the agent with.
The host's side: `HostSide`, what a host of one cloud reads from that cloud (its notice source, its
Temporal settings, its secrets), and the checks every cloud's Temporal settings pass.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import quote

from activities.notices import NoticeSource
from vaultlayer.codec import KEY_ENV
from vaultlayer.home import HOME_VARIABLE
from vaultlayer.models import (
    AgentRef,
    Host,
    HostDescription,
    InjectReclaimInput,
    ProvisionInput,
    ProvisionResult,
    Refusal,
)

# What a cloud host's bootstrap exports for its agent: where to read the Temporal connection settings
# (`<store>:<name>`, read with the host's own role) and which notice source to watch.
TEMPORAL_SETTINGS_VARIABLE = "VL_TEMPORAL_SETTINGS"
NOTICE_SOURCE_VARIABLE = "VL_NOTICE_SOURCE"
HOST_HOME = "/opt/vaultlayer"  # VL_HOME on a cloud host: the agent's venv, its host directory


class ProviderError(Exception):
    """Base of provider errors that are not capacity refusals."""


class ProviderConfigError(ProviderError):
    """The provider's settings are wrong (a subnet, a secret, credentials): no retry helps."""


class NoCapacityError(ProviderError):
    """The pool has no capacity now; the policy should move on (another zone, type, market)."""

    def __init__(self, kind: Refusal, message: str, held_host_seconds: float = 0.0) -> None:
        super().__init__(message)
        self.kind = kind
        # A gang the pool could give only part of: the hosts it did give were released at once, and are paid for
        # (host-seconds, all of them together).
        self.held_host_seconds = held_host_seconds


class SecretUnavailable(Exception):
    """A secret env reference could not be read on this host: the attempt fails with this message."""


class Provider(Protocol):
    name: str

    def provision(self, request: ProvisionInput) -> ProvisionResult: ...

    def release(self, host: Host) -> None: ...

    def describe(self, host: Host) -> HostDescription: ...

    def reap(self, run_id: str) -> list[str]:
        """Release every host of the run that is still alive; returns their ids."""
        ...

    def live_runs(self) -> set[str]:
        """Runs that have a host alive here: what the sweep of finished runs looks at."""
        ...


class ReclaimInjector(Protocol):
    """Providers that can take a host back on request (the local provider, test fakes)."""

    async def inject_reclaim(self, request: InjectReclaimInput) -> None: ...


@dataclass(frozen=True)
class HostSide:
    """What a host of one cloud reads from that cloud. The registry asks every provider's `HOST` in turn,
    so the agent never needs to know which cloud it is on."""

    # This cloud's notice source when the host's environment names it, else None.
    notice_source: Callable[[], NoticeSource | None]
    # Store of a TEMPORAL_SETTINGS_VARIABLE reference (`<store>:<name>`) -> the reader of that reference.
    temporal_settings_readers: dict[str, Callable[[str], dict[str, str]]] = field(default_factory=dict)
    # Scheme of a secret env reference (`aws-sm:<id>`) -> the reader of the part after the scheme.
    secret_readers: dict[str, Callable[[str], str]] = field(default_factory=dict)


def host_queue(run_id: str, host_id: str) -> str:
    """The task queue a host's agent polls: one per host, so an attempt reaches only its own host."""
    return f"vl-host-{run_id}-{host_id}"


def agent_install(*, agent: AgentRef | None, package: str | None, extra: str,
                  fetch: Callable[[AgentRef], list[str]], home: str = HOST_HOME) -> list[str]:
    """The bootstrap lines that install VaultLayer on a host: the run's own wheel (`fetch` brings it to
    `agent_wheel_path(agent)`), its SHA-256 checked, its dependencies held to the submitter's versions; or,
    only when a provider's settings name one deliberately, `package` from an index. Into `home`/venv."""
    venv = f"{home}/venv"
    if package:
        return [f"{venv}/bin/pip install --quiet {shlex.quote(package)}"]
    if agent is None:
        raise ProviderConfigError("this run carries no agent wheel (its spec was not packed by `vl run` or the "
                                  "client) and the provider's settings name no `package`; submit it with vl run, "
                                  "or set package in the provider's settings (docs/code-and-outputs.md)")
    wheel, constraints = agent_wheel_path(agent, home), f"{home}/constraints.txt"
    return [
        *fetch(agent),
        f"echo {shlex.quote(f'{agent.sha256}  {wheel}')} | sha256sum --check --strict -",
        f"cat > {constraints} <<'VL_PINS'",
        *agent.pins,
        "VL_PINS",
        f"{venv}/bin/pip install --quiet --constraint {constraints} {shlex.quote(f'{wheel}[{extra}]')}",
    ]


def agent_wheel_path(agent: AgentRef, home: str = HOST_HOME) -> str:
    return f"{home}/{agent.filename}"


def fetch_lines(url: str, dest: str, *, presign: Callable[[str], str] | None = None,
                google_token: bool = False) -> list[str]:
    """Shell lines that download a storage object to `dest` before VaultLayer (and fsspec) is installed: a
    copy for file:// (a host sharing this machine's disk), a pre-signed HTTPS URL for s3:// (`presign`, made
    by the control plane), the instance's own token for gs:// on Compute Engine (`google_token`)."""
    scheme, _, rest = url.partition("://")
    if scheme == "file":
        return [f"cp {shlex.quote(rest)} {shlex.quote(dest)}"]
    if scheme == "s3" and presign is not None:
        return [f"curl -fsS --retry 5 -o {shlex.quote(dest)} {shlex.quote(presign(url))}"]
    if scheme == "gs" and google_token:
        bucket, _, key = rest.partition("/")
        token_url = "http://metadata.google.internal/computeMetadata/v1/instance/service-accounts/default/token"
        object_url = f"https://storage.googleapis.com/storage/v1/b/{bucket}/o/{quote(key, safe='')}?alt=media"
        return [
            f"VL_TOKEN=$(curl -fsS -H 'Metadata-Flavor: Google' {token_url} | "
            "python3 -c 'import json, sys; print(json.load(sys.stdin)[\"access_token\"])')",
            f"curl -fsS --retry 5 -H \"Authorization: Bearer $VL_TOKEN\" -o {shlex.quote(dest)} "
            f"{shlex.quote(object_url)}",
        ]
    raise ProviderConfigError(f"a host of this provider cannot fetch the agent wheel from {scheme}:// storage; use "
                              f"storage of its own cloud, or set package in the provider's settings")


def bootstrap_script(*, temporal_settings: str, notice_source: str, install: list[str], setup: list[str],
                     task_queue: str, host_id: str, run_id: str, exports: dict[str, str] | None = None) -> str:
    """A cloud host's boot script (run once as root): install the run's version of VaultLayer (`install`,
    from agent_install), run the user's setup lines, start the host agent. It holds no secret: the agent reads
    the Temporal connection settings with the host's own role from the `temporal_settings` reference exported
    here. However it ends (a failed step, the agent exiting) the host powers off: it stops costing GPU time,
    and the provider reads it as failed."""
    venv = f"{HOST_HOME}/venv"
    return "\n".join([
        "#!/bin/bash",
        "# VaultLayer host bootstrap: install the run's version, start the host agent.",
        "set -euo pipefail",
        "exec >>/var/log/vaultlayer-bootstrap.log 2>&1",
        "# However this ends (a failed step, the agent exiting) the host powers off.",
        "trap 'shutdown -h now' EXIT",
        f"export {HOME_VARIABLE}={HOST_HOME}",
        *(f"export {name}={shlex.quote(value)}" for name, value in (exports or {}).items()),
        f"export {TEMPORAL_SETTINGS_VARIABLE}={shlex.quote(temporal_settings)}",
        f"export {NOTICE_SOURCE_VARIABLE}={notice_source}",
        f"python3 -m venv {venv} || "
        f"{{ apt-get update -q && apt-get install -y -q python3-venv && python3 -m venv {venv}; }}",
        *install,
        *setup,
        f"{venv}/bin/vl agent --task-queue {shlex.quote(task_queue)} --host-id {shlex.quote(host_id)} "
        f"--host-dir {HOST_HOME}/host --run-id {shlex.quote(run_id)}",
        "",
    ])


def check_temporal_settings(reference: str, text: str | bytes) -> dict[str, str]:
    """The Temporal connection settings stored at `reference`: a JSON object of Temporal environment-config
    variables (TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE, TEMPORAL_API_KEY, TEMPORAL_TLS_*, and the encryption key
    when payloads are encrypted). Errors name keys, never values."""
    try:
        settings = json.loads(text)
    except ValueError:
        raise ValueError(f"{reference}: not a JSON object of TEMPORAL_* settings") from None
    if not isinstance(settings, dict) or "TEMPORAL_ADDRESS" not in settings:
        raise ValueError(f"{reference}: expected a JSON object with at least TEMPORAL_ADDRESS")
    odd = [key for key, value in settings.items()
           if not (key.startswith("TEMPORAL_") or key == KEY_ENV) or not isinstance(value, str)]
    if odd:
        raise ValueError(f"{reference}: keys must be TEMPORAL_* or {KEY_ENV}, with string values; "
                         f"check {', '.join(odd)}")
    return settings
