"""Provider registry: one package per cloud, found by provider name and imported on first use, so `vl`
starts fast and works without every cloud SDK installed.

The control plane asks it for a provider (`make_provider`); a host's agent asks it for what the host
reads from its cloud (`notice_source`, `temporal_settings`, `secret_readers`), each cloud's `HostSide`
answering for itself, so no caller needs to know which cloud it runs on. What each provider offers, and
the pool checks, are the catalogs' (vaultlayer/catalog/).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path

from activities.notices import NoNoticeSource, NoticeSource
from activities.providers.base import TEMPORAL_SETTINGS_VARIABLE, HostSide, Provider
from vaultlayer.catalog import KNOWN_PROVIDERS

# name -> (module, class) of its control-plane side.
PROVIDERS: dict[str, tuple[str, str]] = {
    "local": ("activities.providers.local", "LocalProvider"),
    "aws": ("activities.providers.aws", "AwsProvider"),
    "gcp": ("activities.providers.gcp", "GcpProvider"),
    "harness": ("activities.providers.harness", "HarnessProvider"),
}
# name -> module whose `HOST` is the host side of that cloud (the harness plays its hosts in one process).
# A cloud's notice source, named by its bootstrap, goes before the local metadata directory.
HOST_SIDES: dict[str, str] = {
    "aws": "activities.providers.aws.host",
    "gcp": "activities.providers.gcp.host",
    "local": "activities.providers.local.host",
}


def make_provider(name: str, vl_home: Path, temporal_env: dict[str, str]) -> Provider:
    if name not in PROVIDERS:
        raise ValueError(f"unknown provider {name!r}; use one of: {', '.join(KNOWN_PROVIDERS)}")
    module, cls = PROVIDERS[name]
    return getattr(importlib.import_module(module), cls)(vl_home=vl_home, temporal_env=temporal_env)


# ---------------------------------------------------------------- the host's side


def host_sides() -> list[HostSide]:
    return [importlib.import_module(module).HOST for module in HOST_SIDES.values()]


def notice_source() -> NoticeSource:
    """Where this host learns of a reclaim: the source its provider set it up with, else none."""
    return next((source for side in host_sides() if (source := side.notice_source()) is not None), NoNoticeSource())


def temporal_settings() -> dict[str, str] | None:
    """The Temporal connection settings a cloud host reads with its own role, from where its bootstrap's
    TEMPORAL_SETTINGS_VARIABLE points; None where that is unset (the settings are in the environment)."""
    reference = os.environ.get(TEMPORAL_SETTINGS_VARIABLE)
    if not reference:
        return None
    readers = {store: read for side in host_sides() for store, read in side.temporal_settings_readers.items()}
    store = reference.partition(":")[0]
    if store not in readers:
        raise ValueError(f"{TEMPORAL_SETTINGS_VARIABLE} {reference!r}: expected <store>:<name> with a store of "
                         f"{', '.join(readers)}")
    return readers[store](reference)


def secret_readers() -> dict[str, Callable[[str], str]]:
    """Scheme -> reader of every cloud's secret env references (`aws-sm`, `gcp-sm`)."""
    return {scheme: read for side in host_sides() for scheme, read in side.secret_readers.items()}
