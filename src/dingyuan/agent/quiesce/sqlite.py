"""SQLite: a database file that other processes write.

- ``prepare``: ``PRAGMA wal_checkpoint(TRUNCATE)`` moves the write-ahead log into the database
  file, so the pause has little to do and a restore rarely needs the ``-wal`` file.
- ``freeze``: ``BEGIN IMMEDIATE`` on a connection of our own (polled, so that back-to-back
  writers cannot starve it) takes the write lock: writers wait
  (their busy timeout) from here on, readers go on. A second connection then runs a PASSIVE
  checkpoint, which needs no write lock: the frames committed since ``prepare`` reach the
  database file too, so a copy of the database file alone holds every committed transaction
  (the ``-wal`` file, if the copy has it, is consistent with it as well).
- ``thaw``: ``ROLLBACK`` (nothing was written) releases the lock.

The snapshot's notes record the quiesce point: the UTC time the write lock was taken (every
transaction whose commit returned before it is in the copy) and the checkpoint's frame counts.

A rollback-journal database needs no checkpoint: holding the RESERVED lock means no other
connection is committing, so the database file holds exactly the committed transactions.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from ...errors import PluginFailed
from .base import DEFAULT_STEP_TIMEOUT, Plugin


class SqlitePlugin(Plugin):
    name = "sqlite"

    def __init__(self, database: str | Path, timeout: float = DEFAULT_STEP_TIMEOUT) -> None:
        super().__init__(timeout)
        self.database = Path(database)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._thawed = False
        self.checkpoint: tuple[int, int, int] | None = None  # (busy, log, checkpointed) at freeze
        self.at: str | None = None  # UTC time the write lock was taken (ISO 8601)

    def describe(self) -> str:
        return f"sqlite:{self.database.name}"

    def _connect(self) -> sqlite3.Connection:
        if not self.database.is_file():
            raise PluginFailed(plugin=self.describe(), step="open", detail=f"no database at {self.database}")
        # autocommit mode (isolation_level None): our BEGIN/ROLLBACK are the only transaction;
        # the connection is used by the step threads one after the other
        return sqlite3.connect(
            self.database, timeout=self.timeout, isolation_level=None, check_same_thread=False
        )

    def prepare(self) -> None:
        with self._lock:
            self._thawed = False  # one plugin object may serve run after run
            self.at = None
            self.checkpoint = None
        conn = self._connect()
        try:
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
            if str(mode).lower() == "wal":
                busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
                if busy:  # readers on old snapshots: the freeze's checkpoint catches up
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            conn.close()

    def _begin_immediate(self) -> sqlite3.Connection:
        """BEGIN IMMEDIATE, polling every half millisecond instead of SQLite's busy handler: its
        sleeps grow to 100 ms and a writer that commits back to back would always win the lock
        in between (starving us until the timeout)."""
        conn = self._connect()
        conn.execute("PRAGMA busy_timeout = 0")
        deadline = time.monotonic() + self.timeout
        try:
            while True:
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    return conn
                except sqlite3.OperationalError as e:
                    busy = "locked" in str(e) or "busy" in str(e)
                    if not busy or self._thawed or time.monotonic() > deadline:
                        raise
                time.sleep(0.0005)
        except BaseException:
            conn.close()
            raise

    def freeze(self) -> None:
        conn = self._begin_immediate()
        at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        with self._lock:
            if self._thawed:  # our timeout passed and thaw already ran: let go at once
                conn.execute("ROLLBACK")
                conn.close()
                return
            self._conn = conn
            self.at = at
        side = self._connect()
        try:
            if str(side.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
                busy, nlog, done = side.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                self.checkpoint = (int(busy), int(nlog), int(done))
        finally:
            side.close()

    def notes(self) -> list[str]:
        if self.at is None:
            return []
        point = f"quiesce point: write lock at {self.at}"
        if self.checkpoint is not None:
            busy, nlog, done = self.checkpoint
            point += f", WAL frames {done}/{nlog} checkpointed" + (" (busy)" if busy else "")
        return [point]

    def thaw(self) -> None:
        with self._lock:
            self._thawed = True
            conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.execute("ROLLBACK")
            finally:
                conn.close()
