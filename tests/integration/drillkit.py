"""Database data directories in disk images, for the database drill tests."""

from __future__ import annotations

import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fskit import loop_mount, make_fs, sh

from pgkit import PgServer, server_bindir

ROWS = 1000  # committed before the last checkpoint
MORE = 500  # committed after it: in the WAL / redo log only, in the crash-consistent copy


@pytest.fixture(scope="module")
def traversable_tmp() -> Iterator[Path]:
    """A temporary directory other users can traverse (not list): the database servers run as
    their data's owner, and pytest's own directories are private to root."""
    path = Path(tempfile.mkdtemp(prefix="dingyuan-test-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class Images:
    clean: Path
    crash: Path
    #: the data directory, relative to the filesystem's root
    data: str
    #: a data file of the rows' table, relative to the data directory
    table_file: str


def copy_while_frozen(mountpoint: Path, image: Path, dest: Path) -> None:
    """Copy the image of a mounted filesystem as a snapshot would hold it: frozen (every
    completed write on disk, none in progress), the server running on."""
    sh("fsfreeze", "-f", mountpoint)
    try:
        sh("cp", "--sparse=always", image, dest)
    finally:
        sh("fsfreeze", "-u", mountpoint)


def garble(path: Path, length: int) -> None:
    """Overwrite the first ``length`` bytes of ``path`` with random bytes."""
    with open(path, "r+b") as f:
        f.write(random.Random(3).randbytes(length))


def make_pg_images(base: Path) -> Images:
    """A PostgreSQL cluster in an ext4 image at Debian's path, as two copies: crash-consistent
    (copied frozen while it runs: the last MORE rows are in the WAL only) and clean (after a
    shutdown). Skips the test without the PostgreSQL server."""
    import psycopg

    bindir = server_bindir()
    if bindir is None:
        pytest.skip("needs the PostgreSQL server (Debian package postgresql)")
    image = base / "pg.img"
    make_fs(image, 128 << 20, "ext4")
    data = f"var/lib/postgresql/{bindir.parent.name}/main"
    with loop_mount(image, base / "pg-src"):
        server = PgServer(bindir, base / "pg-src" / data, base / "pg-sock", base / "pg.log")
        server.initdb("--wal-segsize=1")
        server.start()
        try:
            with psycopg.connect(server.conninfo(), autocommit=True) as conn:
                conn.execute("CREATE TABLE items (id int PRIMARY KEY, payload text NOT NULL)")
                conn.execute(
                    "INSERT INTO items SELECT i, repeat('x', 100) FROM generate_series(1, %s::int) i", (ROWS,)
                )
                conn.execute("CHECKPOINT")
                conn.execute(
                    "INSERT INTO items SELECT i, 'after' FROM generate_series(%s::int, %s::int) i",
                    (ROWS + 1, ROWS + MORE),
                )
                row = conn.execute("SELECT pg_relation_filepath('items')").fetchone()
                assert row is not None
                table_file = str(row[0])
            copy_while_frozen(base / "pg-src", image, base / "pg-crash.img")
        finally:
            server.stop()
    shutil.move(image, base / "pg-clean.img")
    return Images(base / "pg-clean.img", base / "pg-crash.img", data, table_file)
