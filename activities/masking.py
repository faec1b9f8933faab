"""Masking of secret values in the script's output, on its way into the host's log file.

Standard library only: the masker process (activities/log_masker.py) imports it at every script's start, on
every host, and must not pay for the agent's imports (storage, logging) to do so.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import BinaryIO

MASK = b"***"


def mask(data: bytes, secrets: Iterable[bytes]) -> bytes:
    for secret in secrets:
        data = data.replace(secret, MASK)
    return data


def _secret_begun_at_end(data: bytes, secrets: Iterable[bytes]) -> int:
    """How many bytes at the end of `data` could be the start of a secret whose rest is still to come."""
    longest = 0
    for secret in secrets:
        for size in range(min(len(secret) - 1, len(data)), longest, -1):
            if data.endswith(secret[:size]):
                longest = size
                break
    return longest


class MaskedLog:
    """The script's output on its way into the host's log file, masked before it is written: the raw file
    under VL_HOME/hosts never holds a secret value. A value split between two reads is still caught: the end
    of a read that could begin a secret is held back until the next read shows whether it does."""

    def __init__(self, file: BinaryIO, secrets: list[bytes]) -> None:
        self.file, self.secrets = file, secrets
        self.held = b""

    def write(self, data: bytes) -> None:
        data = mask(self.held + data, self.secrets)
        keep = _secret_begun_at_end(data, self.secrets)
        self.held = data[len(data) - keep:]
        self.file.write(data[:len(data) - keep])
        self.file.flush()

    def close(self) -> None:
        self.file.write(self.held)
        self.held = b""
        self.file.close()
