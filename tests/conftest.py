"""Fixtures shared by every test: a hermetic environment and small, cheap repositories."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from dingyuan.repository.backends.local import LocalBackend
from dingyuan.repository.backends.memory import MemoryBackend
from dingyuan.repository.crypto import KdfParams
from dingyuan.repository.repo import Repository
from pgkit import PgCluster, server_bindir

#: Argon2id parameters cheap enough for tests (1 MiB, one pass, one lane).
TEST_KDF = KdfParams(1024, 1, 1)
TEST_PASSPHRASE = b"test"
TEST_PACK_SIZE = 256 << 10


@pytest.fixture(autouse=True)
def hermetic_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No DINGYUAN_* variable of the caller leaks in; caches go to a temporary directory."""
    for name in list(os.environ):
        if name.startswith("DINGYUAN_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("DINGYUAN_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("DINGYUAN_KDF", "1024,1,1")


def _init(backend: MemoryBackend | LocalBackend, cache_dir: Path) -> Repository:
    return Repository.init(
        backend, TEST_PASSPHRASE, cache_dir=cache_dir, pack_size=TEST_PACK_SIZE, kdf=TEST_KDF
    )


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repository]:
    """An encrypted repository on a MemoryBackend."""
    r = _init(MemoryBackend(), tmp_path / "repo-cache")
    yield r
    r.close()


@pytest.fixture
def repo_local(tmp_path: Path) -> Iterator[Repository]:
    """An encrypted repository on a LocalBackend in ``tmp_path / "repo"``."""
    r = _init(LocalBackend(tmp_path / "repo"), tmp_path / "repo-cache")
    yield r
    r.close()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A private PostgreSQL server for the session (Unix socket in a temporary directory), stopped
    and removed at the end; skips when the server binaries are not installed."""
    bindir = server_bindir()
    if bindir is None:
        pytest.skip(
            "PostgreSQL server not installed (no /usr/lib/postgresql/*/bin/initdb); "
            "install the Debian package postgresql"
        )
    cluster = PgCluster(bindir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    """The SQLAlchemy URL (``postgresql+psycopg://``) of a new, empty database on ``pg_cluster``."""
    return pg_cluster.create_database()
