"""Provider registry: one module per provider, imported lazily so `vl` starts fast and works without
every cloud SDK installed."""

from __future__ import annotations

import importlib
from pathlib import Path

from activities.providers.base import Provider
from vaultlayer.models import Pool

# name -> (module, class). Each module also has `validate_pool(pool) -> None`, a check without side
# effects that raises ValueError naming the bad field and the fix, run before anything is provisioned.
PROVIDERS: dict[str, tuple[str, str]] = {
    "local": ("activities.providers.local", "LocalProvider"),
}
KNOWN_PROVIDERS = tuple(PROVIDERS)


def _module(name: str):
    if name not in PROVIDERS:
        raise ValueError(f"unknown provider {name!r}; use one of: {', '.join(KNOWN_PROVIDERS)}")
    return importlib.import_module(PROVIDERS[name][0])


def make_provider(name: str, vl_home: Path, temporal_env: dict[str, str]) -> Provider:
    module = _module(name)
    return getattr(module, PROVIDERS[name][1])(vl_home=vl_home, temporal_env=temporal_env)


def validate_pools(pools: list[Pool]) -> None:
    for pool in pools:
        _module(pool.provider).validate_pool(pool)
