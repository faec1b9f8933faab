"""Optional payload encryption: AES-256-GCM over every Temporal payload, so the server, its history and
its UI hold ciphertext only. Off unless a key is configured.

Keys: `VL_ENCRYPTION_KEY` (base64 of 32 bytes) or `VL_ENCRYPTION_KEY_FILE` (a file of them, one a line).
Either may hold several keys, comma- or line-separated: the first encrypts, every one decrypts. Each
encrypted payload names its key by id (a fingerprint, never the key) in its metadata, so keys rotate by
putting the new key first and keeping the old one behind it until no open run needs it.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter, DefaultFailureConverterWithEncodedAttributes, PayloadCodec

KEY_ENV = "VL_ENCRYPTION_KEY"
KEY_FILE_ENV = "VL_ENCRYPTION_KEY_FILE"
ENCODING = b"binary/encrypted"
KEY_ID_METADATA = "encryption-key-id"
_NONCE_BYTES = 12
_FIX = f"set {KEY_ENV} (base64 of 32 random bytes: openssl rand -base64 32) or {KEY_FILE_ENV}"


class EncryptionKeyError(ValueError):
    """A key setting is malformed, or a payload needs a key this process does not have. Names key ids only."""


def key_id(key: bytes) -> str:
    """A short public fingerprint of a key: which key sealed a payload, without revealing it."""
    return hashlib.sha256(b"vaultlayer-key-id:" + key).hexdigest()[:16]


def _parse_keys(text: str, source: str) -> list[bytes]:
    keys = []
    for number, item in enumerate(text.replace(",", "\n").split(), start=1):
        try:
            key = base64.b64decode(item, validate=True)
        except binascii.Error:
            raise EncryptionKeyError(f"{source}: key {number} is not base64; {_FIX}") from None
        if len(key) != 32:
            raise EncryptionKeyError(f"{source}: key {number} is {len(key)} bytes, AES-256 needs 32; {_FIX}")
        keys.append(key)
    if not keys:
        raise EncryptionKeyError(f"{source} holds no key; {_FIX}, or unset it to run without encryption")
    return keys


def load_keys(env: Mapping[str, str] | None = None) -> list[bytes]:
    """The configured keys, current first; [] when encryption is off."""
    env = os.environ if env is None else env
    inline, path = env.get(KEY_ENV), env.get(KEY_FILE_ENV)
    if inline and path:
        raise EncryptionKeyError(f"both {KEY_ENV} and {KEY_FILE_ENV} are set; keep one")
    if inline:
        return _parse_keys(inline, KEY_ENV)
    if path:
        try:
            text = Path(path).expanduser().read_text()
        except OSError as err:
            raise EncryptionKeyError(f"{KEY_FILE_ENV}={path}: cannot read it ({err.strerror})") from None
        return _parse_keys(text, f"{KEY_FILE_ENV}={path}")
    return []


def keys_fingerprint(env: Mapping[str, str] | None = None) -> str:
    """The configured keys' ids, '' without encryption: a background worker started with others is stale."""
    return ",".join(key_id(key) for key in load_keys(env))


class AesGcmCodec(PayloadCodec):
    """Each payload becomes nonce || AES-GCM(serialized payload), with its key id as associated data.
    Without keys it encrypts nothing and refuses what it cannot read by name, not as an unknown encoding."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        self._current = key_id(keys[0]) if keys else None
        self._ciphers = {key_id(key): AESGCM(key) for key in keys}

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        if self._current is None:
            return list(payloads)
        cipher, kid = self._ciphers[self._current], self._current.encode()
        encoded = []
        for payload in payloads:
            nonce = os.urandom(_NONCE_BYTES)
            sealed = cipher.encrypt(nonce, payload.SerializeToString(), kid)
            encoded.append(Payload(metadata={"encoding": ENCODING, KEY_ID_METADATA: kid}, data=nonce + sealed))
        return encoded

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self._decode_one(payload) for payload in payloads]

    def _decode_one(self, payload: Payload) -> Payload:
        if payload.metadata.get("encoding") != ENCODING:
            return payload  # written before encryption was turned on
        kid = payload.metadata.get(KEY_ID_METADATA, b"").decode(errors="replace")
        cipher = self._ciphers.get(kid)
        if cipher is None and not self._ciphers:
            raise EncryptionKeyError(f"a payload is encrypted with key {kid or '(none named)'} and this process has "
                                     f"no key; set {KEY_ENV} or {KEY_FILE_ENV} as the workers have it")
        if cipher is None:
            raise EncryptionKeyError(
                f"a payload is encrypted with key {kid or '(none named)'}, and this process has only "
                f"{', '.join(self._ciphers)}; add that key after the current one in {KEY_ENV} or {KEY_FILE_ENV}")
        try:
            plain = cipher.decrypt(payload.data[:_NONCE_BYTES], payload.data[_NONCE_BYTES:], kid.encode())
        except (InvalidTag, ValueError):  # ValueError: too short to hold a nonce
            raise EncryptionKeyError(f"a payload sealed with key {kid} fails authentication: "
                                     "it was altered or cut short") from None
        return Payload.FromString(plain)


def data_converter(env: Mapping[str, str] | None = None) -> DataConverter:
    """The pydantic converter every client and worker uses; with a key configured, payloads and failure
    messages are encrypted too (failure messages can quote commands and paths)."""
    keys = load_keys(env)
    if not keys:
        return dataclasses.replace(pydantic_data_converter, payload_codec=AesGcmCodec([]))
    return dataclasses.replace(pydantic_data_converter, payload_codec=AesGcmCodec(keys),
                               failure_converter_class=DefaultFailureConverterWithEncodedAttributes)
