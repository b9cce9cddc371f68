"""Keys, ids and authenticated encryption.

* The *master key* is 64 random bytes: ``id_key`` (first 32) keys BLAKE3 for chunk and tree ids,
  ``enc_key`` (last 32) is the root of every encryption key.
* Every blob and every sealed object is encrypted with its own AES-256-GCM key
  ``BLAKE3(salt, key=enc_key)`` where ``salt`` is 16 random bytes stored in front of the
  ciphertext; the nonce is then always zero. A random 128-bit salt per message removes the
  2^32-messages limit of random GCM nonces.
* With ``encryption = none`` the same layouts are used, but blobs are stored as plaintext (their
  id, a keyed hash, still authenticates them) and sealed objects carry a keyed-BLAKE3 tag.
* The master key is stored wrapped: AES-256-GCM under a key derived from the passphrase by
  Argon2id (memory-hard), parameters stored beside it.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from dataclasses import dataclass
from typing import Any

import blake3
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from ..errors import CorruptObject, UnsupportedFormat, WrongPassphrase
from .format import SALT_LEN, TAG_LEN

_ZERO_NONCE = bytes(12)
_KEY_AAD = b"dingyuan master key v1"

#: Argon2id defaults: OWASP's recommended 19 MiB and 2 passes; every command pays this once, and the
#: parameters are stored per key object, so a key can be re-wrapped with stronger ones.
DEFAULT_KDF = {"memory_kib": 19456, "iterations": 2, "lanes": 1}


@dataclass(frozen=True)
class KdfParams:
    memory_kib: int
    iterations: int
    lanes: int

    @classmethod
    def from_env(cls) -> KdfParams:
        """Defaults, or ``DINGYUAN_KDF="memory_kib,iterations,lanes"`` (for tests only)."""
        raw = os.environ.get("DINGYUAN_KDF")
        if raw:
            m, t, p = (int(x) for x in raw.split(","))
            return cls(m, t, p)
        return cls(**DEFAULT_KDF)


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: str) -> bytes:
    return base64.b64decode(s.encode(), validate=True)


def _kek(passphrase: bytes, salt: bytes, p: KdfParams) -> bytes:
    kdf = Argon2id(salt=salt, length=32, iterations=p.iterations, lanes=p.lanes, memory_cost=p.memory_kib)
    return kdf.derive(passphrase)


def _key_check(doc: dict[str, Any]) -> str:
    """Checksum of a key document (without its ``check`` field): tells damage from a wrong passphrase."""
    body = json.dumps({k: v for k, v in doc.items() if k != "check"}, sort_keys=True).encode()
    return str(blake3.blake3(body).hexdigest()[:32])


def wrap_master_key(master: bytes, passphrase: bytes | None, params: KdfParams) -> dict[str, Any]:
    """Return the JSON document of a key object. ``passphrase=None`` stores the key in clear."""
    doc = _wrap(master, passphrase, params)
    doc["check"] = _key_check(doc)
    return doc


def _wrap(master: bytes, passphrase: bytes | None, params: KdfParams) -> dict[str, Any]:
    if passphrase is None:
        return {"version": 1, "kdf": "none", "key": _b64(master)}
    salt = os.urandom(16)
    nonce = os.urandom(12)
    ct = AESGCM(_kek(passphrase, salt, params)).encrypt(nonce, master, _KEY_AAD)
    return {
        "version": 1,
        "kdf": "argon2id",
        "memory_kib": params.memory_kib,
        "iterations": params.iterations,
        "lanes": params.lanes,
        "salt": _b64(salt),
        "nonce": _b64(nonce),
        "key": _b64(ct),
    }


def unwrap_master_key(doc: dict[str, Any], passphrase: bytes | None, name: str) -> bytes:
    """Return the master key of a key object, or raise WrongPassphrase."""
    try:
        if not isinstance(doc, dict):
            raise CorruptObject(name=name, detail="key object is not a JSON object")
        if doc.get("version") != 1:
            raise UnsupportedFormat(what=name, detail=f"key version {doc.get('version')}")
        if doc.get("kdf") not in ("none", "argon2id"):
            raise UnsupportedFormat(what=name, detail=f"kdf {doc.get('kdf')}")
        if doc.get("check") != _key_check(doc):
            raise CorruptObject(name=name, detail="checksum mismatch")
        if doc["kdf"] == "none":
            return _unb64(doc["key"])
        if doc["kdf"] != "argon2id":
            raise UnsupportedFormat(what=name, detail=f"kdf {doc['kdf']}")
        if passphrase is None:
            raise WrongPassphrase()
        params = KdfParams(int(doc["memory_kib"]), int(doc["iterations"]), int(doc["lanes"]))
        kek = _kek(passphrase, _unb64(doc["salt"]), params)
        return AESGCM(kek).decrypt(_unb64(doc["nonce"]), _unb64(doc["key"]), _KEY_AAD)
    except InvalidTag:
        raise WrongPassphrase() from None
    except (KeyError, ValueError, TypeError) as e:
        raise CorruptObject(name=name, detail=f"malformed key object: {e}") from None


class Cipher:
    """Ids, blob encryption and sealed objects under one master key."""

    def __init__(self, master: bytes, encrypted: bool) -> None:
        if len(master) != 64:
            raise CorruptObject(name="keys", detail="master key has the wrong length")
        self.id_key = master[:32]
        self.enc_key = master[32:]
        self.encrypted = encrypted
        self._local = threading.local()  # zstd contexts are not thread-safe

    # ids -------------------------------------------------------------------------------------
    def blob_id(self, data: bytes | memoryview) -> bytes:
        """The keyed BLAKE3 id of a chunk or tree node plaintext."""
        return blake3.blake3(data, key=self.id_key).digest()

    def mac(self, data: bytes | memoryview) -> bytes:
        return blake3.blake3(data, key=self.enc_key).digest()[:TAG_LEN]

    def _aead(self, salt: bytes) -> AESGCM:
        return AESGCM(blake3.blake3(salt, key=self.enc_key).digest())

    # blobs inside packs ----------------------------------------------------------------------
    def seal_blob(self, payload: bytes | bytearray | memoryview, aad: bytes) -> bytes | bytearray:
        """salt | AES-256-GCM(payload) in one new buffer (or a copy of payload, unencrypted)."""
        if not self.encrypted:
            return bytes(payload)
        out = bytearray(SALT_LEN + len(payload) + TAG_LEN)
        salt = os.urandom(SALT_LEN)
        out[:SALT_LEN] = salt
        self._aead(salt).encrypt_into(_ZERO_NONCE, payload, aad, memoryview(out)[SALT_LEN:])
        return out

    def open_blob(self, stored: bytes | memoryview, aad: bytes, name: str) -> bytes:
        if not self.encrypted:
            return bytes(stored)
        if len(stored) < SALT_LEN + TAG_LEN:
            raise CorruptObject(name=name, detail="blob too short")
        salt = bytes(stored[:SALT_LEN])
        try:
            return self._aead(salt).decrypt(_ZERO_NONCE, stored[SALT_LEN:], aad)
        except InvalidTag:
            raise CorruptObject(name=name, detail="blob authentication failed") from None

    # sealed objects (pack TOC, index, manifest) -----------------------------------------------
    def seal(self, magic: bytes, plain: bytes) -> bytes:
        """magic | salt | AEAD(zstd(plain)) -- or, unencrypted, magic | salt | zstd(plain) | tag."""
        zc = getattr(self._local, "zc", None)
        if zc is None:
            zc = self._local.zc = zstandard.ZstdCompressor(level=3)
        body = zc.compress(plain)
        salt = os.urandom(SALT_LEN)
        if self.encrypted:
            return magic + salt + self._aead(salt).encrypt(_ZERO_NONCE, body, magic)
        head = magic + salt
        return head + body + self.mac(head + body)

    def unseal(self, magic: bytes, data: bytes, name: str) -> bytes:
        if len(data) < len(magic) + SALT_LEN + TAG_LEN:
            raise CorruptObject(name=name, detail="object too short")
        if data[: len(magic)] != magic:
            raise UnsupportedFormat(what=name, detail="magic")
        salt = data[len(magic) : len(magic) + SALT_LEN]
        rest = data[len(magic) + SALT_LEN :]
        if self.encrypted:
            try:
                body = self._aead(salt).decrypt(_ZERO_NONCE, rest, magic)
            except InvalidTag:
                raise CorruptObject(name=name, detail="authentication failed") from None
        else:
            body, tag = rest[:-TAG_LEN], rest[-TAG_LEN:]
            if self.mac(data[:-TAG_LEN]) != tag:
                raise CorruptObject(name=name, detail="checksum mismatch")
        try:
            return zstandard.ZstdDecompressor().decompress(body, max_output_size=1 << 30)
        except zstandard.ZstdError as e:
            raise CorruptObject(name=name, detail=f"cannot decompress: {e}") from None

    def seal_json(self, magic: bytes, doc: dict[str, Any]) -> bytes:
        return self.seal(magic, json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())

    def unseal_json(self, magic: bytes, data: bytes, name: str) -> dict[str, Any]:
        try:
            doc = json.loads(self.unseal(magic, data, name))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptObject(name=name, detail=f"malformed JSON: {e}") from None
        if not isinstance(doc, dict):
            raise CorruptObject(name=name, detail="not a JSON object")
        return doc
