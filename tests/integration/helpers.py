"""Helpers for the integration tests: test images, the CLI as a subprocess, repository probes."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

from dingyuan.repository.backends.base import Backend
from dingyuan.repository.backends.local import LocalBackend
from dingyuan.repository.crypto import KdfParams
from dingyuan.repository.format import ZERO_ID
from dingyuan.repository.repo import Repository

KDF = KdfParams(1024, 1, 1)
PASSPHRASE = b"integration"
CHUNK = 64 << 10
CLI = [sys.executable, "-m", "dingyuan.cli.main"]


# images ----------------------------------------------------------------------------------------
def compressible(rng: random.Random, n: int) -> bytes:
    """``n`` bytes that zstd shrinks well: short random words repeated, with some noise."""
    words = [rng.randbytes(rng.randint(3, 12)) for _ in range(24)]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words)
        if rng.random() < 0.02:
            out += rng.randbytes(1)
    return bytes(out[:n])


def make_image(rng: random.Random, size: int) -> bytearray:
    """A volume image of ``size`` bytes (a multiple of 64 KiB): random, compressible and zero
    regions, plus regions that copy others chunk-aligned (duplicate chunks) and one unaligned
    (new chunks with the same bytes)."""
    assert size % CHUNK == 0 and size >= 32 * CHUNK
    img = bytearray(size)
    pos = 0
    while pos < size:
        n = min(size - pos, rng.randint(2, 24) * CHUNK)
        kind = rng.random()
        if kind < 0.45:
            img[pos : pos + n] = rng.randbytes(n)
        elif kind < 0.75:
            img[pos : pos + n] = compressible(rng, n)
        # else: zeros (holes the backup stores as ZERO_ID)
        pos += n
    for _ in range(3):  # chunk-aligned duplicates of other regions
        n = rng.randint(2, 8) * CHUNK
        src = rng.randrange(0, size - n, CHUNK)
        dst = rng.randrange(0, size - n, CHUNK)
        img[dst : dst + n] = img[src : src + n]
    return img


def write_file(path: Path, data: bytes | bytearray) -> None:
    with open(path, "wb") as f:
        f.write(data)


def sha256(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 << 20):
            h.update(block)
    return h.hexdigest()


def first_difference(a: bytes | bytearray, b: bytes | bytearray) -> str:
    """Where two images first differ, for assertion messages."""
    if len(a) != len(b):
        return f"sizes differ: {len(a)} != {len(b)}"
    for off in range(0, len(a), CHUNK):
        if a[off : off + CHUNK] != b[off : off + CHUNK]:
            return f"first difference in the chunk at offset {off} (chunk {off // CHUNK})"
    return "identical"


# the CLI ---------------------------------------------------------------------------------------
def cli_env(repo: Path, cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DINGYUAN_")}
    env.update(
        DINGYUAN_REPO=str(repo),
        DINGYUAN_PASSPHRASE=PASSPHRASE.decode(),
        DINGYUAN_CACHE_DIR=str(cache),
        DINGYUAN_KDF="1024,1,1",
    )
    return env


def run_cli(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def describe(proc: subprocess.CompletedProcess[str]) -> str:
    return (
        f"{proc.args!r} exited {proc.returncode}\n"
        f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-2000:]}"
    )


def cli_json(args: list[str], env: dict[str, str], context: str = "") -> Any:
    proc = run_cli([*args, "--json"], env)
    assert proc.returncode == 0, f"{context}{describe(proc)}"
    return json.loads(proc.stdout)


# the library -----------------------------------------------------------------------------------
def init_repo(backend: Backend, cache: Path, pack_size: int) -> Repository:
    return Repository.init(backend, PASSPHRASE, cache_dir=cache, pack_size=pack_size, kdf=KDF)


def open_repo(backend: Backend | Path, cache: Path) -> Repository:
    if isinstance(backend, Path):
        backend = LocalBackend(backend)
    return Repository.open(backend, PASSPHRASE, cache_dir=cache)


def snapshot_ids(backend: Backend) -> set[str]:
    """Ids of the committed snapshots (their manifests), straight from the backend."""
    return {name.rsplit("/", 1)[-1] for name, _ in backend.list("snapshots/")}


def durable_chunk_ids(repo: Repository) -> set[bytes]:
    """Every blob id in any pack present in the repository, from the packs' own TOCs."""
    ids: set[bytes] = set()
    for pack, size in repo.iter_packs():
        ids.update(e.id for e in repo.read_pack_toc(pack, size))
    return ids


def image_chunk_ids(repo: Repository, image: bytes | bytearray, chunk: int = CHUNK) -> set[bytes]:
    """Distinct ids of the image's non-zero chunks."""
    zero = bytes(chunk)
    mv = memoryview(image)
    ids = {
        repo.cipher.blob_id(mv[o : o + chunk])
        for o in range(0, len(image), chunk)
        if mv[o : o + chunk] != zero
    }
    ids.discard(ZERO_ID)
    return ids


def lock_names(backend: Backend) -> list[str]:
    return sorted(name for name, _ in backend.list("locks/"))


def unused_pid() -> int:
    """A process id no process has (pid_max is never handed out)."""
    with open("/proc/sys/kernel/pid_max") as f:
        return int(f.read())


def locks_of_exited_process(backend: Backend) -> int:
    """Make every lock left in the repository look like the CLI's after its process exited.

    In-process tests keep running after a failed operation, so a lock its failed release left
    behind still names this (live) pid; a real ``dingyuan`` process exits, and the next command
    finds the lock stale. Returns how many locks were rewritten.
    """
    names = lock_names(backend)
    for name in names:
        doc = json.loads(backend.get(name))
        doc["pid"] = unused_pid()
        backend.put(name, json.dumps(doc).encode())
    return len(names)
