"""MariaDB / MySQL: a server whose data directory (InnoDB files and redo log) lies on the source
being snapshotted.

- ``prepare``: ``FLUSH TABLES`` (unless ``flush=no``): open tables are closed and their caches
  written, so the read lock that follows is taken quickly.
- ``freeze``: ``FLUSH TABLES WITH READ LOCK`` on a connection of our own, held until ``thaw``:
  writes and commits wait from here on (reads go on). The quiesce point is recorded in the
  snapshot's notes: the server's UTC clock, ``@@gtid_current_pos`` (MariaDB) and the binary
  log's file and position (``SHOW MASTER STATUS``) when the server writes one.
- ``thaw``: ``UNLOCK TABLES`` and closes the connection; when the connection is stuck (a freeze
  that timed out), it is killed from a second connection (``KILL CONNECTION``), which releases
  the lock too.

Why this is application-consistent: with the global read lock held no transaction commits, and
the provider's point in time is atomic (a reflink clone or a volume snapshot of the filesystem
frozen for the instant), so the copy holds every transaction whose commit returned before the
lock, and none half done: InnoDB's crash recovery on the restored copy replays its redo log to
exactly that state. The lock also covers non-transactional engines (MyISAM, Aria) whose files
``FLUSH TABLES`` closed.

Every step is bounded by the plugin's timeout: the connection has a connect timeout and socket
read/write timeouts, the session a ``lock_wait_timeout`` (and on MariaDB ``max_statement_time``
for ``FLUSH TABLES``), so a server that hangs fails the step instead of holding the run.

Credentials never appear in the policy: the connection reads the ``[client]`` group of a
defaults file (``defaults_file=PATH``, or ``~/.my.cnf`` of the agent's user when it exists), or
uses the server's unix_socket authentication. PyMySQL is an optional dependency
(``pip install 'dingyuan[mysql]'``).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ...errors import PluginFailed
from .base import DEFAULT_STEP_TIMEOUT, Plugin

DEBIAN_SOCKET = "/run/mysqld/mysqld.sock"


class MysqlPlugin(Plugin):
    name = "mysql"

    def __init__(
        self, settings: Mapping[str, str] | None = None, timeout: float = DEFAULT_STEP_TIMEOUT
    ) -> None:
        super().__init__(timeout)
        self.settings = dict(settings or {})
        self.flush = self.settings.get("flush", "yes") != "no"
        self._lock = threading.Lock()
        self._conn: Any = None
        self._thread_id: int | None = None
        self._busy = False  # a statement is running on _conn (freeze's thread)
        self._thawed = False
        self.at: str | None = None
        self.gtid: str | None = None
        self.binlog: str | None = None

    def describe(self) -> str:
        where = self.settings.get("socket") or ":".join(
            self.settings[k] for k in ("host", "port") if k in self.settings
        )
        return f"{self.name}:{where}" if where else self.name

    def _fail(self, step: str, detail: str) -> PluginFailed:
        return PluginFailed(plugin=self.describe(), step=step, detail=detail)

    def _connect(self, step: str) -> Any:
        try:
            import pymysql
        except ImportError:
            raise self._fail(
                step, "PyMySQL is not installed on the agent (pip install 'dingyuan[mysql]')"
            ) from None
        kw: dict[str, Any] = {}
        s = self.settings
        defaults = s.get("defaults_file") or str(Path("~/.my.cnf").expanduser())
        if os.path.isfile(defaults):  # its [client] group fills in what the policy leaves out
            kw["read_default_file"] = defaults
        elif "defaults_file" in s:
            raise self._fail(step, f"no defaults file at {defaults}")
        if "socket" in s:
            kw["unix_socket"] = s["socket"]
        elif "host" not in s and "read_default_file" not in kw and os.path.exists(DEBIAN_SOCKET):
            kw["unix_socket"] = DEBIAN_SOCKET  # where the mysql client looks first, too
        if "host" in s:
            kw["host"] = s["host"]
        if "port" in s:
            kw["port"] = int(s["port"])
        if "user" in s:
            kw["user"] = s["user"]
        elif "read_default_file" not in kw:
            kw["user"] = "root"
        try:
            return pymysql.connect(
                connect_timeout=max(1.0, self.timeout),
                read_timeout=self.timeout,
                write_timeout=self.timeout,
                autocommit=True,
                program_name="dingyuan-quiesce",
                **kw,
            )
        except (pymysql.Error, OSError, ValueError) as e:
            raise self._fail(step, f"cannot connect: {_message(e)}") from None

    def _query(self, conn: Any, step: str, sql: str) -> list[tuple[Any, ...]]:
        import pymysql

        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                return list(cur.fetchall())
        except (pymysql.Error, OSError) as e:
            raise self._fail(step, f"{sql}: {_message(e)}") from None

    def _session(self, conn: Any, step: str) -> None:
        """Bound the session's waits by the step's timeout."""
        import pymysql

        seconds = max(1, int(self.timeout))
        self._query(conn, step, f"SET SESSION lock_wait_timeout = {seconds}")
        with contextlib.suppress(pymysql.Error), conn.cursor() as cur:  # MariaDB only
            cur.execute(f"SET SESSION max_statement_time = {self.timeout:g}")

    def prepare(self) -> None:
        self.thaw()  # one plugin object may serve run after run
        with self._lock:
            self._thawed = False
            self.at = self.gtid = self.binlog = None
        if not self.flush:
            return
        conn = self._connect("prepare")
        try:
            self._session(conn, "prepare")
            self._query(conn, "prepare", "FLUSH TABLES")
        finally:
            with contextlib.suppress(Exception):
                conn.close()

    def freeze(self) -> None:
        conn = self._connect("freeze")
        with self._lock:
            if self._thawed:  # our timeout passed and thaw already ran: let go at once
                with contextlib.suppress(Exception):
                    conn.close()
                return
            self._conn, self._thread_id, self._busy = conn, conn.thread_id(), True
        try:
            self._session(conn, "freeze")
            self._query(conn, "freeze", "FLUSH TABLES WITH READ LOCK")
            ((at,),) = self._query(
                conn, "freeze", "SELECT DATE_FORMAT(UTC_TIMESTAMP(6), '%Y-%m-%dT%H:%i:%s.%fZ')"
            )
            self.at = str(at)
            with contextlib.suppress(PluginFailed):  # MariaDB only
                rows = self._query(conn, "freeze", "SELECT @@gtid_current_pos")
                self.gtid = str(rows[0][0]) if rows and rows[0][0] else None
            with contextlib.suppress(PluginFailed):  # needs a binary log (and a privilege)
                rows = self._query(conn, "freeze", "SHOW MASTER STATUS")
                self.binlog = f"{rows[0][0]}:{rows[0][1]}" if rows else None
        finally:
            with self._lock:
                self._busy = False
                thawed = self._thawed
        if thawed:  # thaw ran while we waited (and killed the connection): close it here, the
            with contextlib.suppress(Exception):  # server then ends it and any lock it holds
                conn.close()

    def notes(self) -> list[str]:
        if self.at is None:
            return []
        point = f"quiesce point: read lock at {self.at}"
        if self.gtid:
            point += f", GTID {self.gtid}"
        if self.binlog:
            point += f", binlog {self.binlog}"
        return [point]

    def thaw(self) -> None:
        with self._lock:
            self._thawed = True
            conn, self._conn = self._conn, None
            thread_id, self._thread_id = self._thread_id, None
            busy = self._busy
        if conn is None:
            return
        if busy:  # the freeze still waits on this connection: end it on the server's side
            self._kill(thread_id)
            return
        self._release(conn, thread_id)

    def _release(self, conn: Any, thread_id: int | None) -> None:
        """UNLOCK TABLES and close; when that fails, kill the connection so the lock goes."""
        try:
            self._query(conn, "thaw", "UNLOCK TABLES")
        except PluginFailed:
            self._kill(thread_id)
            raise
        finally:
            with contextlib.suppress(Exception):
                conn.close()

    def _kill(self, thread_id: int | None) -> None:
        if thread_id is None:
            return
        side = self._connect("thaw")
        try:
            with contextlib.suppress(PluginFailed):  # already gone: nothing is held
                self._query(side, "thaw", f"KILL CONNECTION {int(thread_id)}")
        finally:
            with contextlib.suppress(Exception):
                side.close()


def _message(e: BaseException) -> str:
    args: tuple[Any, ...] = tuple(e.args)
    if len(args) == 2 and isinstance(args[0], int):  # PyMySQL: (code, message)
        return f"{args[1]} ({args[0]})"
    return str(e).strip() or type(e).__name__
