"""The MariaDB/MySQL quiesce plugin against a real private ``mariadbd`` (a temporary data
directory, a Unix socket only): FLUSH TABLES WITH READ LOCK holds writers until the thaw, the
quiesce point is recorded, and a server that hangs or a lock that cannot be had fails the step
within its timeout with nothing left locked."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dingyuan.agent.quiesce import MysqlPlugin, Quiescer, build_plugins, parse_quiesce
from dingyuan.errors import PluginFailed, QuiesceFailed
from mariakit import MariaServer, have_mariadb


def test_a_mysql_entry_names_its_server_without_a_password() -> None:
    spec = parse_quiesce("mysql:socket=/run/mysqld/mysqld.sock user=backup flush=no;timeout=4")
    (plugin,) = build_plugins(spec)
    assert isinstance(plugin, MysqlPlugin) and plugin.timeout == 4 and not plugin.flush
    assert plugin.describe() == "mysql:/run/mysqld/mysqld.sock"
    assert parse_quiesce("mysql").plugins[0].args == {}
    assert build_plugins(parse_quiesce("mysql:host=db port=3307"))[0].describe() == "mysql:db:3307"
    for bad in ("mysql:password=x", "mysql:socket=rel/sock", "mysql:port=x", "mysql:flush=maybe",
                "mysql:user=a user=b", "mysql:defaults_file=my.cnf", "mysql:host"):  # fmt: skip
        with pytest.raises(ValueError):
            parse_quiesce(bad)


@pytest.fixture(scope="module")
def maria() -> Iterator[MariaServer]:
    if not have_mariadb():
        pytest.skip("needs the MariaDB server (Debian package mariadb-server)")
    pytest.importorskip("pymysql")
    d = Path(tempfile.mkdtemp(prefix="dingyuan-maria-"))
    server = MariaServer(d / "data", d, d / "error.log")
    try:
        server.install()
        server.start("--log-bin=binlog", "--server-id=1")
        conn = server.connect()
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE app")
            cur.execute("CREATE TABLE app.t (id INT PRIMARY KEY AUTO_INCREMENT, v INT) ENGINE=InnoDB")
        conn.close()
        yield server
    finally:
        server.stop()
        shutil.rmtree(d, ignore_errors=True)


def _plugin(server: MariaServer, timeout: float = 5.0) -> MysqlPlugin:
    return MysqlPlugin({"socket": str(server.socket), "user": "root"}, timeout)


def _insert_in_background(server: MariaServer) -> tuple[threading.Thread, list[float]]:
    done: list[float] = []

    def run() -> None:
        conn = server.connect()
        try:
            with conn.cursor() as cur:
                cur.execute("INSERT INTO app.t (v) VALUES (1)")
            done.append(time.monotonic())
        finally:
            conn.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, done


def _unlocked(server: MariaServer) -> bool:
    """Whether a write goes through within two seconds (nothing holds the global read lock)."""
    t, done = _insert_in_background(server)
    t.join(2.0)
    return bool(done)


def test_the_read_lock_holds_writers_until_the_thaw_and_the_quiesce_point_is_recorded(
    maria: MariaServer,
) -> None:
    q = Quiescer([_plugin(maria)])
    q.prepare()
    assert q.freeze(), q.report.errors
    try:
        t, done = _insert_in_background(maria)
        time.sleep(0.5)
        assert not done, "a write went through the read lock"
    finally:
        thawed = time.monotonic()
        q.thaw()
    t.join(5.0)
    assert done and done[0] >= thawed, "the writer did not go on after the thaw"
    assert q.report.ok, q.report.errors
    (note,) = q.report.notes
    assert note.startswith(f"mysql:{maria.socket}: quiesce point: read lock at ") and "Z" in note
    assert ", GTID " in note and ", binlog binlog.0000" in note, note
    assert q.report.paused_seconds < 1.0
    q.thaw()  # idempotent
    assert _unlocked(maria)


def test_the_credentials_come_from_a_defaults_file(maria: MariaServer, tmp_path: Path) -> None:
    cnf = tmp_path / "backup.cnf"
    cnf.write_text(f"[client]\nuser=root\npassword=\nsocket={maria.socket}\n")
    q = Quiescer(build_plugins(parse_quiesce(f"mysql:defaults_file={cnf} flush=no")))
    q.prepare()
    assert q.freeze(), q.report.errors
    q.thaw()
    assert q.report.ok and "read lock at" in q.report.notes[0], q.report
    missing = MysqlPlugin({"defaults_file": str(tmp_path / "none.cnf")}, 1.0)
    with pytest.raises(PluginFailed, match="no defaults file"):
        missing.freeze()


def test_a_lock_that_cannot_be_had_fails_the_freeze_at_its_timeout_and_leaves_nothing_locked(
    maria: MariaServer,
) -> None:
    holder = maria.connect()
    try:
        with holder.cursor() as cur:
            cur.execute("LOCK TABLES app.t WRITE")  # FLUSH TABLES WITH READ LOCK waits for it
        q = Quiescer([_plugin(maria, timeout=1.0)], on_failure="crash")
        t0 = time.monotonic()
        q.prepare()
        assert not q.freeze()
        took = time.monotonic() - t0
        assert took < 1.0 * 2 + 2 * 0.5 + 1, f"took {took:.1f} s"
        assert not q.report.ok and q.report.notes == []
        assert any("failed" in e for e in q.report.errors), q.report.errors
    finally:
        holder.close()
    assert _unlocked(maria)


def test_a_server_that_hangs_fails_the_step_within_its_timeout_and_is_let_go(maria: MariaServer) -> None:
    assert maria.proc is not None
    plugin = _plugin(maria, timeout=1.0)
    q = Quiescer([plugin], on_failure="skip")
    os.kill(maria.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(QuiesceFailed):
            q.prepare()
        assert time.monotonic() - t0 < 1.0 + 0.5 + 1
    finally:
        os.kill(maria.proc.pid, signal.SIGCONT)
    assert _unlocked(maria)


def test_a_freeze_that_hangs_after_the_lock_is_killed_by_the_thaw(maria: MariaServer) -> None:
    """The lock is taken, then the server stops answering before the freeze returns: the
    Quiescer's thaw kills the connection from another one, and the lock goes with it."""
    plugin = _plugin(maria, timeout=1.0)
    plugin.prepare()
    real = plugin._query
    entered = threading.Event()
    release = threading.Event()

    def slow(conn: Any, step: str, sql: str) -> list[tuple[Any, ...]]:
        rows = real(conn, step, sql)
        if sql.startswith("FLUSH TABLES WITH READ LOCK"):
            entered.set()
            release.wait(10)  # the freeze "hangs" holding the lock
        return rows

    plugin._query = slow  # type: ignore[method-assign]
    q = Quiescer([plugin], on_failure="crash")
    t0 = time.monotonic()
    try:
        assert not q.freeze()
        assert entered.is_set() and time.monotonic() - t0 < 3.0
        assert any("freeze failed" in e for e in q.report.errors), q.report.errors
        assert _unlocked(maria), "the lock outlived the thaw"
    finally:
        release.set()


@contextlib.contextmanager
def _silent_socket(path: Path) -> Iterator[None]:
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        s.listen(8)
        yield


def test_a_socket_that_never_answers_fails_the_connect_within_the_timeout(tmp_path: Path) -> None:
    pytest.importorskip("pymysql")
    sock = tmp_path / "mysqld.sock"
    plugin = MysqlPlugin({"socket": str(sock)}, timeout=1.0)
    with _silent_socket(sock):
        t0 = time.monotonic()
        with pytest.raises(PluginFailed, match="cannot connect"):
            plugin.prepare()
        with pytest.raises(PluginFailed, match="cannot connect"):
            plugin.freeze()
        assert time.monotonic() - t0 < 4.0
    plugin.thaw()
