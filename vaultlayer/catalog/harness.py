"""The `harness` provider's catalog: hosts played by the load harness (bench/load.py), any pool at all."""

from __future__ import annotations

from pathlib import Path

from vaultlayer.models import Pool


def is_configured(vl_home: Path) -> bool:
    """Only where a harness has played hosts: the sweep looks at nothing otherwise."""
    return (vl_home / "harness").is_dir()


def validate_pool(pool: Pool) -> None:
    """Any pool: the harness plays whatever host it is asked for."""
