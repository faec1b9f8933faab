"""The one small interface every provider implements.

Modelled on SkyPilot's provision API and dstack's Compute: provision returns a host or a typed
refusal the policy can act on; release is idempotent and fast; describe tells a reclaimed host from a
broken one after heartbeats stop.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from vaultlayer.models import Host, HostDescription, InjectReclaimInput, ProvisionInput, ProvisionResult, Refusal


SettingsT = TypeVar("SettingsT", bound=BaseModel)


class ProviderError(Exception):
    """Base of provider errors that are not capacity refusals."""


class ProviderConfigError(ProviderError):
    """The provider's settings are wrong (a subnet, a secret, credentials): no retry helps."""


class NoCapacityError(ProviderError):
    """The pool has no capacity now; the policy should move on (another zone, type, market)."""

    def __init__(self, kind: Refusal, message: str) -> None:
        super().__init__(message)
        self.kind = kind


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


def load_toml_settings(path: Path, model: type[SettingsT], missing: str) -> SettingsT:
    """A provider's TOML settings as its pydantic model; every problem is one error naming the file."""
    if not path.exists():
        raise ValueError(missing)
    try:
        return model.model_validate(tomllib.loads(path.read_text()))
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: {err}") from None
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ValueError(f"{path}: {problems}") from None
