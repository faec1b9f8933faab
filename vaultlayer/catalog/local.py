"""The `local` provider's catalog: hosts are processes on this machine, so no GPUs to ask for, no regions."""

from __future__ import annotations

from pathlib import Path

from vaultlayer.models import Pool


def is_configured(vl_home: Path) -> bool:
    """The local provider needs no settings."""
    return True


def validate_pool(pool: Pool) -> None:
    if pool.gpu is not None:
        raise ValueError(f"the local provider runs on this machine and cannot provision --gpu {pool.gpu}; "
                         "leave --gpu out, or use --provider aws or gcp")
    if pool.region != "local":
        raise ValueError("the local provider has no regions; leave --region out (--zone takes any label, "
                         "so that a run can have several local pools)")
