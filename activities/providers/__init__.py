"""Provider registry: one module per provider, imported lazily so `vl` starts fast and works without
every cloud SDK installed."""

from __future__ import annotations

import importlib
from pathlib import Path

from activities.providers.base import Provider
from vaultlayer.models import Pool

# name -> (module, class). Each module also has `validate_pool(pool) -> None`, a check without side
# effects that raises ValueError naming the bad field and the fix, run before anything is provisioned,
# and `is_configured(vl_home) -> bool`, whether this machine has the provider's settings.
PROVIDERS: dict[str, tuple[str, str]] = {
    "local": ("activities.providers.local", "LocalProvider"),
    "aws": ("activities.providers.aws", "AwsProvider"),
    "gcp": ("activities.providers.gcp", "GcpProvider"),
    "harness": ("activities.providers.harness", "HarnessProvider"),
}
# What `vl run --provider` offers: the harness's hosts exist only while bench/load.py plays them.
KNOWN_PROVIDERS = tuple(name for name in PROVIDERS if name != "harness")


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


def priced_pools(pools: list[Pool]) -> list[Pool]:
    """The pools with the list prices their provider knows (`priced(pool)`), so the policy ranks by price;
    providers without a price list leave them as they are. Raises ValueError when prices are unreadable."""
    return [getattr(_module(pool.provider), "priced", lambda same: same)(pool) for pool in pools]


def configured_providers(vl_home: Path) -> list[str]:
    """Providers this machine has settings for: the ones whose hosts a sweep looks for."""
    return [name for name in PROVIDERS if _module(name).is_configured(vl_home)]
