"""Parsing of the durations and checkpoint intervals that users type (`--checkpoint-every 5m`)."""

from __future__ import annotations

import re

_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"(?P<number>\d+(?:\.\d*)?|\.\d+)(?P<unit>[smh])")
_DURATION_FORMS = "a number with a unit: '20s', '1.5s', '5m' or '2h'"


def parse_duration(text: str) -> float:
    """Seconds in `text`. The unit is required, so that a bare '90' is never silently read as seconds."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a duration; write {_DURATION_FORMS}")
    seconds = float(match["number"]) * _UNIT_SECONDS[match["unit"]]
    if seconds <= 0:
        raise ValueError(f"duration {text!r} must be longer than zero; write {_DURATION_FORMS}")
    return seconds


def parse_interval(text: str) -> tuple[str, float]:
    """("steps", N) for a bare positive integer such as '50', or ("seconds", s) for a duration such as '5m'."""
    stripped = text.strip()
    if re.fullmatch(r"[+-]?\d+", stripped):
        steps = int(stripped)
        if steps <= 0:
            raise ValueError(
                f"checkpoint interval {text!r} must be a positive number of steps, such as '50',"
                f" or a duration such as '30s' or '5m'"
            )
        return ("steps", float(steps))
    if _DURATION.fullmatch(stripped) is None:
        raise ValueError(
            f"checkpoint interval {text!r} is neither a number of steps nor a duration;"
            f" write a positive integer of steps such as '50', or {_DURATION_FORMS}"
        )
    return ("seconds", parse_duration(stripped))
