"""Database drills on real PostgreSQL and MariaDB data directories.

Each server keeps its data directory in an ext4 image, loop-mounted, at the path a distribution
uses (``var/lib/postgresql/<version>/main``, ``var/lib/mysql``), so the drill has to find it. Two
copies of each image are made: one while the server runs, with the filesystem frozen for the copy
(what a crash-consistent snapshot holds: the last rows are only in the WAL / redo log), and one
after a clean shutdown. A test drills a fresh copy of one of them, loop-mounted: the drill must pass
and the query see every committed row; with a data file overwritten by garbage it must fail, say
why from the server's log, and leave no server process behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from drillkit import MORE, ROWS, Images, copy_while_frozen, garble, make_pg_images
from fskit import loop_mount, make_fs, needs_root, sh

from dingyuan.errors import UsageError
from dingyuan.recovery.dbdrill import DataDir, drill, find_data_dirs
from mariakit import MariaServer, have_mariadb
from pgkit import PgCluster

pytestmark = needs_root


@pytest.fixture(scope="module")
def base(traversable_tmp: Path) -> Path:
    return traversable_tmp


@contextlib.contextmanager
def mounted_copy(image: Path, base: Path, name: str) -> Iterator[Path]:
    """A fresh copy of ``image`` (a drill writes to it), loop-mounted; yields the mountpoint."""
    copy = base / f"{name}.img"
    sh("cp", "--sparse=always", image, copy)
    try:
        with loop_mount(copy, base / name):
            yield base / name
    finally:
        copy.unlink()


def processes_in(path: Path) -> list[str]:
    """Processes whose working directory is under ``path`` (both servers work in their data
    directory): a drill must leave none."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            cwd = os.readlink(f"/proc/{pid}/cwd")
            if cwd == str(path) or cwd.startswith(f"{path}/"):
                found.append(f"{pid}: {Path(f'/proc/{pid}/cmdline').read_bytes()!r}")
    return found


# PostgreSQL -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pg(base: Path) -> Images:
    return make_pg_images(base)


def test_postgresql_clean_copy_passes_and_answers(pg: Images, base: Path) -> None:
    with mounted_copy(pg.clean, base, "pg-a") as mnt:
        assert find_data_dirs(mnt) == [DataDir("postgresql", mnt / pg.data)]
        result = drill(mnt)
        assert result.ok, result.detail
        assert ("postgres", "1") in result.rows, result.rows  # the items table
        assert "from a clean shutdown" in result.detail, result.detail

        result = drill(mnt, sql="SELECT count(*), sum(id) FROM items")
        assert result.ok, result.detail
        n = ROWS + MORE
        assert result.rows == ((str(n), str(n * (n + 1) // 2)),)
        assert processes_in(mnt) == []


def test_postgresql_crash_consistent_copy_recovers_every_committed_row(pg: Images, base: Path) -> None:
    with mounted_copy(pg.crash, base, "pg-b") as mnt:
        result = drill(mnt, data_dir=Path(pg.data), sql="SELECT count(*) FROM items WHERE payload = 'after'")
        assert result.ok, result.detail
        assert "after crash recovery" in result.detail, result.detail
        assert result.rows == ((str(MORE),),)  # replayed from the WAL
        assert processes_in(mnt) == []


def test_postgresql_with_a_garbled_control_file_fails_and_says_why(pg: Images, base: Path) -> None:
    with mounted_copy(pg.clean, base, "pg-c") as mnt:
        garble(mnt / pg.data / "global" / "pg_control", 8192)
        result = drill(mnt, start_timeout=60)
        assert not result.ok
        assert "exited" in result.detail and "FATAL" in result.detail, result.detail
        assert "PG_CONTROL_VERSION" in result.detail, result.detail  # what the garbage looks like
        assert result.seconds < 60
        assert processes_in(mnt) == []


def test_postgresql_with_a_garbled_table_fails_the_query_that_reads_it(pg: Images, base: Path) -> None:
    with mounted_copy(pg.clean, base, "pg-d") as mnt:
        garble(mnt / pg.data / pg.table_file, 3 * 8192)
        result = drill(mnt, sql="SELECT count(*) FROM items")
        assert not result.ok
        assert "query failed" in result.detail and "invalid page" in result.detail, result.detail
        assert processes_in(mnt) == []


def test_a_tablespace_outside_the_clone_is_refused_before_anything_starts(pg: Images, base: Path) -> None:
    """Its symlink names a path of the snapshot's machine: here, this machine's own."""
    with mounted_copy(pg.clean, base, "pg-e") as mnt:
        (mnt / pg.data / "pg_tblspc" / "99999").symlink_to(base / "elsewhere")
        with pytest.raises(UsageError, match=r"pg_tblspc/99999 -> .*elsewhere"):
            drill(mnt)
        assert not (base / "elsewhere").exists()
        assert processes_in(mnt) == []


def test_a_live_data_directory_is_refused(pg_cluster: PgCluster) -> None:
    with pytest.raises(UsageError, match="runs on"):
        drill(pg_cluster.data)
    assert pg_cluster.data.joinpath("postmaster.pid").exists(), "the live server's lock file was removed"


def test_no_data_directory_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    with pytest.raises(UsageError, match="no PostgreSQL or MariaDB data directory"):
        drill(tmp_path)
    with pytest.raises(UsageError, match="is not a postgresql data directory"):
        drill(tmp_path, data_dir=Path("etc"), engine="postgresql")


# MariaDB ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def maria(base: Path) -> Images:
    if not have_mariadb():
        pytest.skip("needs MariaDB (Debian package mariadb-server)")
    image = base / "maria.img"
    make_fs(image, 256 << 20, "ext4")
    data = "var/lib/mysql"
    with loop_mount(image, base / "maria-src"):
        server = MariaServer(base / "maria-src" / data, base / "maria-sock", base / "maria.log")
        server.install()
        # the binary log on, as on a production server: the drill has to start with it
        server.start("--log-bin=binlog", "--server-id=1", "--innodb-log-file-size=16M")
        try:
            conn = server.connect()
            try:
                with conn.cursor() as cur:
                    cur.execute("CREATE DATABASE app")
                    cur.execute("CREATE TABLE app.items (id INT PRIMARY KEY, payload TEXT NOT NULL)")
                    # the Sequence engine's seq_FROM_to_TO tables number the rows
                    cur.execute(
                        f"INSERT INTO app.items SELECT seq, REPEAT('x', 100) FROM app.seq_1_to_{ROWS}"
                    )
                    cur.execute(
                        f"INSERT INTO app.items SELECT seq, 'after' FROM app.seq_{ROWS + 1}_to_{ROWS + MORE}"
                    )
            finally:
                conn.close()
            copy_while_frozen(base / "maria-src", image, base / "maria-crash.img")
        finally:
            server.stop()
    shutil.move(image, base / "maria-clean.img")
    return Images(base / "maria-clean.img", base / "maria-crash.img", data, "app/items.ibd")


def test_mariadb_clean_copy_passes_and_answers(maria: Images, base: Path) -> None:
    with mounted_copy(maria.clean, base, "maria-a") as mnt:
        assert find_data_dirs(mnt) == [DataDir("mariadb", mnt / maria.data)]
        result = drill(mnt)
        assert result.ok, result.detail
        assert result.rows == (("app", "1"),), result.rows
        assert "from a clean shutdown" in result.detail, result.detail

        result = drill(mnt, sql="SELECT COUNT(*), SUM(id) FROM app.items")
        assert result.ok, result.detail
        n = ROWS + MORE
        assert result.rows == ((str(n), str(n * (n + 1) // 2)),)
        assert processes_in(mnt) == []


def test_mariadb_crash_consistent_copy_recovers_every_committed_row(maria: Images, base: Path) -> None:
    with mounted_copy(maria.crash, base, "maria-b") as mnt:
        result = drill(mnt, engine="mariadb", sql="SELECT COUNT(*) FROM items WHERE payload = 'after'",
                       database="app")  # fmt: skip
        assert result.ok, result.detail
        assert "after crash recovery" in result.detail, result.detail
        assert result.rows == ((str(MORE),),)
        # started with its binary log (which decides prepared transactions), so it made a new one
        assert (mnt / maria.data / "binlog.000002").exists()
        assert processes_in(mnt) == []


def test_mariadb_with_a_garbled_system_tablespace_fails_and_says_why(maria: Images, base: Path) -> None:
    with mounted_copy(maria.clean, base, "maria-c") as mnt:
        garble(mnt / maria.data / "ibdata1", 64 << 10)
        result = drill(mnt, start_timeout=60)
        assert not result.ok
        assert "[ERROR]" in result.detail and "InnoDB" in result.detail, result.detail
        assert result.seconds < 60
        assert processes_in(mnt) == []


def test_mariadb_with_a_garbled_table_fails_the_query_that_reads_it(maria: Images, base: Path) -> None:
    with mounted_copy(maria.clean, base, "maria-d") as mnt:
        garble(mnt / maria.data / maria.table_file, 64 << 10)
        result = drill(mnt, sql="SELECT COUNT(*) FROM app.items")
        assert not result.ok
        assert "query failed: ERROR 1877" in result.detail and "is corrupted" in result.detail, result.detail
        assert processes_in(mnt) == []


def test_a_table_kept_outside_the_clone_is_refused_before_anything_starts(maria: Images, base: Path) -> None:
    with mounted_copy(maria.clean, base, "maria-e") as mnt:
        (mnt / maria.data / "app" / "ext.isl").write_text("/srv/live/app/ext.ibd")
        with pytest.raises(UsageError, match=r"app/ext.isl -> /srv/live/app/ext.ibd"):
            drill(mnt)
        assert processes_in(mnt) == []


def test_two_data_directories_must_be_told_apart(pg: Images, base: Path) -> None:
    with mounted_copy(pg.clean, base, "both") as mnt:
        subprocess.run(["cp", "-a", str(mnt / pg.data), str(mnt / "second")], check=True)
        with pytest.raises(UsageError, match="several data directories"):
            drill(mnt)
        result = drill(mnt, data_dir=Path("second"), sql="SELECT count(*) FROM items")
        assert result.ok and result.rows == ((str(ROWS + MORE),),), result.detail


@pytest.mark.parametrize("engine", ["postgresql", "mariadb"])
def test_data_owned_by_a_user_unknown_here_is_drilled_as_that_user(
    engine: str, request: pytest.FixtureRequest, base: Path
) -> None:
    """A snapshot of another machine keeps its uids: the server runs as the data's owner even
    when no local user has that uid (PostgreSQL refuses a data directory that is not its user's)."""
    images: Images = request.getfixturevalue("pg" if engine == "postgresql" else "maria")
    stranger = 54321
    with mounted_copy(images.clean, base, f"{engine}-uid") as mnt:
        data = mnt / images.data
        subprocess.run(["chown", "-R", f"{stranger}:{stranger}", str(data)], check=True)
        sql = "SELECT count(*) FROM items" if engine == "postgresql" else "SELECT COUNT(*) FROM app.items"
        result = drill(mnt, sql=sql)
        assert result.ok, result.detail
        assert result.rows == ((str(ROWS + MORE),),)
        # what it wrote (new WAL segments, a new binary log, ...) belongs to that user too
        owners = {p.stat().st_uid for p in data.rglob("*")}
        assert owners == {stranger}, "the server wrote files as another user"
        assert processes_in(mnt) == []
