"""VL_HOME: where the embedded server, local hosts and default storage live (default ~/.vaultlayer)."""

from __future__ import annotations

import os
from pathlib import Path


def vl_home() -> Path:
    return Path(os.environ.get("VL_HOME", "~/.vaultlayer")).expanduser().resolve()


def default_storage_url() -> str:
    return (vl_home() / "storage").as_uri()
