"""Helpers for unit tests that need a fresh repository per Hypothesis example (fixtures cannot)."""

from __future__ import annotations

import os
from pathlib import Path

from dingyuan.repository.backends.base import Backend
from dingyuan.repository.backends.memory import MemoryBackend
from dingyuan.repository.crypto import KdfParams
from dingyuan.repository.format import pack_name
from dingyuan.repository.repo import Repository

KDF = KdfParams(1024, 1, 1)
PASSPHRASE = b"test"
PACK_SIZE = 256 << 10


def new_repo(backend: Backend, cache_dir: Path, encryption: str = "aes-256-gcm") -> Repository:
    """``Repository.init`` with cheap Argon2id, 256 KiB packs and a private cache."""
    return Repository.init(
        backend,
        PASSPHRASE if encryption != "none" else None,
        encryption=encryption,
        cache_dir=cache_dir,
        pack_size=PACK_SIZE,
        kdf=KDF,
    )


def write_sparse(path: Path, size: int, writes: list[tuple[int, bytes]]) -> None:
    """Create ``path`` as a sparse file of ``size`` bytes and apply ``writes`` in order."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        for off, data in writes:
            os.pwrite(fd, data, off)
    finally:
        os.close(fd)


def apply_writes(image: bytearray, writes: list[tuple[int, bytes]]) -> None:
    for off, data in writes:
        image[off : off + len(data)] = data


def damage_blob(repo: Repository, backend: MemoryBackend, bid: bytes, mask: int) -> None:
    """Flip the bits of ``mask`` in the middle byte of blob ``bid`` as stored in its pack."""
    loc = repo.locate(bid)
    name = pack_name(loc.pack)
    raw = bytearray(backend.objects[name])
    raw[loc.entry.offset + loc.entry.length // 2] ^= mask
    backend.objects[name] = bytes(raw)
