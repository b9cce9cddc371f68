"""PostgreSQL: a cluster whose data directory *and* WAL lie on the source being snapshotted.

- ``prepare``: ``CHECKPOINT`` (with a statement timeout): dirty buffers go to the data files, so
  the restored copy has little WAL to replay when it starts.
- ``freeze``: pauses nothing. It records the quiesce point, ``pg_current_wal_lsn()`` and the
  server's clock, in the snapshot's notes (``consistency_notes``).
- ``thaw``: closes the connection.

Why this is application-consistent: the provider's point in time is **atomic** (a reflink clone
or a volume snapshot, taken with the filesystem frozen), so the copy holds exactly what a power
cut at that instant would leave, data files and WAL of the same instant. PostgreSQL is built to
recover from that: on start it replays the WAL from the last checkpoint and reaches a consistent
state holding every transaction whose commit returned before the instant (with
``synchronous_commit`` on; with it off, those of the last ``wal_writer_delay`` may be missing,
as after a crash). The checkpoint in ``prepare`` only shortens that replay. Writers are never
blocked, so the pause is the filesystem's freeze alone.

``pg_backup_start``/``pg_backup_stop`` (and keeping the backup label) are needed only for a copy
that is *not* atomic: files copied one after the other while the server writes, or data and WAL
(``pg_wal`` on another volume, tablespaces elsewhere) snapshotted at different instants. This
plugin does not support those layouts: put the whole cluster on one protected volume.

A server that hangs or refuses fails the step: the connection has ``connect_timeout``, the
statements a ``statement_timeout``, and a server that stops answering altogether (stopped, a
network that drops packets) has its socket shut down at the step's timeout, so the step never
outlives it. psycopg 3 is an optional dependency (``pip install 'dingyuan[postgres]'``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ...errors import PluginFailed
from .base import DEFAULT_STEP_TIMEOUT, Plugin

if TYPE_CHECKING:
    import psycopg


class PostgresqlPlugin(Plugin):
    name = "postgresql"

    def __init__(
        self, conninfo: Mapping[str, str] | None = None, timeout: float = DEFAULT_STEP_TIMEOUT
    ) -> None:
        super().__init__(timeout)
        self.conninfo = dict(conninfo or {})
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        self._thawed = False
        self.lsn: str | None = None
        self.at: str | None = None

    def describe(self) -> str:
        where = ":".join(self.conninfo[k] for k in ("host", "port") if k in self.conninfo)
        return f"{self.name}:{where}" if where else self.name

    def _fail(self, step: str, detail: str) -> PluginFailed:
        return PluginFailed(plugin=self.describe(), step=step, detail=detail)

    def _connect(self, step: str) -> psycopg.Connection[Any]:
        try:
            import psycopg
        except ImportError:
            raise self._fail(
                step, "psycopg 3 is not installed on the agent (pip install 'dingyuan[postgres]')"
            ) from None
        ms = max(1, int(self.timeout * 1000))
        try:
            return psycopg.connect(
                psycopg.conninfo.make_conninfo("", **self.conninfo),
                connect_timeout=max(1, int(self.timeout)),
                autocommit=True,
                application_name="dingyuan-quiesce",
                options=f"-c statement_timeout={ms} -c lock_timeout={ms}",
            )
        except psycopg.Error as e:
            raise self._fail(step, f"cannot connect: {str(e).strip() or type(e).__name__}") from None

    def _query(self, conn: psycopg.Connection[Any], step: str, sql: str) -> tuple[Any, ...] | None:
        """Run ``sql``; at the step's timeout the socket is shut down, which wakes the waiting
        call with an error even when the server never answers."""
        import psycopg

        expired = threading.Event()

        def expire() -> None:
            expired.set()
            _shutdown(conn)

        timer = threading.Timer(self.timeout, expire)
        timer.daemon = True
        timer.start()
        try:
            cur = conn.execute(sql)
            return cur.fetchone() if cur.description else None
        except psycopg.Error as e:
            detail = str(e).strip() or type(e).__name__
            if expired.is_set():
                detail = f"no answer within {self.timeout:g} s"
            raise self._fail(step, f"{sql.split(',')[0]}: {detail}") from None
        finally:
            timer.cancel()

    def prepare(self) -> None:
        self.thaw()  # one plugin object may serve run after run
        with self._lock:
            self._thawed = False
            self.lsn = self.at = None
        conn = self._connect("prepare")
        try:
            self._query(conn, "prepare", "CHECKPOINT")
        except BaseException:
            conn.close()
            raise
        with self._lock:
            if self._thawed:  # our timeout passed and thaw already ran
                conn.close()
                return
            self._conn = conn

    def freeze(self) -> None:
        with self._lock:
            conn = self._conn
        if conn is None:  # prepare did not keep one
            conn = self._connect("freeze")
            with self._lock:
                if self._thawed:  # our timeout passed and thaw already ran: let go at once
                    conn.close()
                    return
                self._conn = conn
        row = self._query(
            conn,
            "freeze",
            "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() "
            "ELSE pg_current_wal_lsn() END::text, "
            "to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
        )
        if row is not None:
            self.lsn, self.at = str(row[0]), str(row[1])

    def notes(self) -> list[str]:
        if self.lsn is None:
            return []
        return [f"quiesce point: WAL {self.lsn} at {self.at}"]

    def thaw(self) -> None:
        with self._lock:
            self._thawed = True
            conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()


def _shutdown(conn: psycopg.Connection[Any]) -> None:
    """Shut the connection's socket down (both ways): a call waiting on it returns an error."""
    with contextlib.suppress(Exception):
        sock = socket.socket(fileno=os.dup(conn.fileno()))
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.close()
