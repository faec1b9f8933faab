"""Provider catalogs: what each cloud offers (GPU shapes, instance types, list prices, regions and zones)
and the checks a pool must pass before anything is provisioned.

The ground floor, so that the one function turning a run request into a RunSpec can check and price
pools. One module per provider, imported on first use; none imports a cloud SDK at module level (the
few checks that need one, such as AWS credentials and spot prices, import it inside the function).
Each module has `validate_pool(pool) -> None` (raises ValueError naming the bad field and the fix),
`is_configured(vl_home) -> bool` (whether this machine has the provider's settings) and, where the provider has
a price list, `priced(pool) -> Pool` and `current_price(pool) -> float | None` (USD per hour of one host of the
pool now; `current_prices` gives a price the user gave without asking it).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from vaultlayer.models import Pool

CATALOGS: dict[str, str] = {
    "local": "vaultlayer.catalog.local",
    "aws": "vaultlayer.catalog.aws",
    "gcp": "vaultlayer.catalog.gcp",
    "harness": "vaultlayer.catalog.harness",
}
# What `vl run --provider` offers: the harness's hosts exist only while bench/load.py plays them.
KNOWN_PROVIDERS = tuple(name for name in CATALOGS if name != "harness")


def catalog(name: str) -> ModuleType:
    """The catalog module of provider `name`, imported now if it was not yet."""
    if name not in CATALOGS:
        raise ValueError(f"unknown provider {name!r}; use one of: {', '.join(KNOWN_PROVIDERS)}")
    return importlib.import_module(CATALOGS[name])


def validate_pools(pools: list[Pool]) -> None:
    for pool in pools:
        catalog(pool.provider).validate_pool(pool)


def priced_pools(pools: list[Pool]) -> list[Pool]:
    """The pools with the list prices their provider knows (`priced(pool)`), so the policy ranks by price;
    providers without a price list leave them as they are. Raises ValueError when prices are unreadable."""
    return [getattr(catalog(pool.provider), "priced", lambda same: same)(pool) for pool in pools]


def current_prices(pools: list[Pool]) -> tuple[dict[str, float | None], dict[str, Exception]]:
    """What one host of each pool costs now, by `Pool.key`, from its provider's `current_price` (AWS: the spot
    price in effect, read from EC2; GCP: the published table; local and harness: the pool's own price). A pool
    whose read raised is in the second mapping with its error instead; one pool's failure never stops the
    others. None: the provider knows no price for the pool."""
    prices: dict[str, float | None] = {}
    errors: dict[str, Exception] = {}
    for pool in pools:
        if pool.key in prices or pool.key in errors:
            continue
        if pool.price_given:  # the user's price wins over any read
            prices[pool.key] = pool.price_per_hour
            continue
        try:
            # A provider without a price to read (local, harness) costs what the pool says.
            read = getattr(catalog(pool.provider), "current_price", lambda same: same.price_per_hour)
            prices[pool.key] = read(pool)
        except Exception as err:  # noqa: BLE001 - a read may fail any way (network, settings, SDK missing)
            errors[pool.key] = err
    return prices, errors


def configured_providers(vl_home: Path) -> list[str]:
    """Providers this machine has settings for: the ones whose hosts a sweep looks for."""
    return [name for name in CATALOGS if catalog(name).is_configured(vl_home)]
