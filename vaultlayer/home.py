"""VL_HOME: where the embedded server, local hosts and default storage live (default ~/.vaultlayer)."""

from __future__ import annotations

import os
from pathlib import Path

HOME_VARIABLE = "VL_HOME"


def vl_home() -> Path:
    return Path(os.environ.get(HOME_VARIABLE, "~/.vaultlayer")).expanduser().resolve()


def default_storage_url() -> str:
    return (vl_home() / "storage").as_uri()
