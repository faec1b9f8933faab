"""Provider registry: one module per provider, imported lazily so `vl` starts fast."""

from __future__ import annotations

from pathlib import Path

from activities.providers.base import Provider

KNOWN_PROVIDERS = ("local",)


def make_provider(name: str, vl_home: Path, temporal_env: dict[str, str]) -> Provider:
    if name == "local":
        from activities.providers.local import LocalProvider

        return LocalProvider(vl_home=vl_home, temporal_env=temporal_env)
    raise ValueError(f"unknown provider {name!r}; known providers: {', '.join(KNOWN_PROVIDERS)}")
