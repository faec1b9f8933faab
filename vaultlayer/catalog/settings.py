"""What every cloud's settings file shares: TOML read into a pydantic model."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

SettingsT = TypeVar("SettingsT", bound=BaseModel)


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
