"""SQL Server 2022 or later: a T-SQL snapshot backup of one database.

**Untested on a real SQL Server**: the command sequence and the error parsing are tested on
recorded outputs of ``sqlcmd`` (no SQL Server exists where dingyuan is tested). On Windows the
``vss`` provider's writer check (``SqlServerWriter``) is the other way.

Every step runs ``sqlcmd -b -S INSTANCE -E -Q "..."`` (Windows/Kerberos integrated
authentication of the agent's user: no password in a policy); ``-b`` makes an error exit
non-zero and its ``Msg NNNN, Level L, State S`` block becomes the step's error. Each run is
killed (its whole process group) at the plugin's timeout.

- ``freeze``: ``ALTER DATABASE [db] SET SUSPEND_FOR_SNAPSHOT_BACKUP = ON``: writes to the
  database wait from here on (reads go on).
- ``thaw``, right after the point in time: ``BACKUP DATABASE [db] TO DISK = 'FILE' WITH
  METADATA_ONLY``, which records the snapshot backup in the backup history (``FILE``, named in
  the snapshot's notes, lands in the server's default backup directory and is what a restore
  needs: ``RESTORE DATABASE ... FROM DISK = 'FILE' WITH METADATA_ONLY``) and resumes the
  database. When that fails, or the freeze failed or timed out,
  ``ALTER DATABASE [db] SET SUSPEND_FOR_SNAPSHOT_BACKUP = OFF`` resumes it without a backup.

To check on a real server: the exact ``sqlcmd`` output (``sqlcmd`` from mssql-tools18 and the
newer go-sqlcmd), what ``SUSPEND_FOR_SNAPSHOT_BACKUP = OFF`` says when nothing is suspended,
that the metadata file's default directory suits the deployment, and a restore drill from the
copy with the metadata file.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Mapping

from ...errors import CommandFailed, PluginFailed
from .base import DEFAULT_STEP_TIMEOUT, Plugin
from .tools import Runner, run_bounded

DEFAULT_INSTANCE = "localhost"
_MSG = re.compile(r"\bMsg (\d+), Level (\d+), State \d+.*\r?\n(.*)$", re.MULTILINE)


def suspend(db: str, on: bool) -> str:
    return f"ALTER DATABASE [{db}] SET SUSPEND_FOR_SNAPSHOT_BACKUP = {'ON' if on else 'OFF'}"


def metadata_backup(db: str, file: str) -> str:
    return f"BACKUP DATABASE [{db}] TO DISK = '{file}' WITH METADATA_ONLY"


def sqlserver_errors(out: str) -> list[str]:
    """``Msg NNNN: text`` for each error block of sqlcmd output (level 11 and above)."""
    return [f"Msg {m.group(1)}: {m.group(3).strip()}" for m in _MSG.finditer(out) if int(m.group(2)) > 10]


class SqlServerPlugin(Plugin):
    name = "sqlserver"

    def __init__(
        self,
        settings: Mapping[str, str],
        timeout: float = DEFAULT_STEP_TIMEOUT,
        run: Runner | None = None,
        clock: float | None = None,
    ) -> None:
        super().__init__(timeout)
        self.settings = dict(settings)
        self.database = self.settings["database"]
        self.instance = self.settings.get("instance", DEFAULT_INSTANCE)
        self.run: Runner = run or (lambda argv: run_bounded(argv, self.timeout))
        self._clock = clock
        self._lock = threading.Lock()
        self._asked = False
        self._frozen = False
        self._thawed = False
        self.metadata_file: str | None = None

    def describe(self) -> str:
        return f"{self.name}:{self.instance}/{self.database}"

    def argv(self, query: str) -> list[str]:
        return ["sqlcmd", "-b", "-S", self.instance, "-E", "-Q", query]

    def _sqlcmd(self, step: str, query: str) -> str:
        try:
            out = self.run(self.argv(query))
        except CommandFailed as e:
            detail = str(e.kwargs.get("detail") or e)
            errors = sqlserver_errors(detail)
            raise PluginFailed(
                plugin=self.describe(), step=step, detail="; ".join(errors) if errors else f"sqlcmd {detail}"
            ) from None
        errors = sqlserver_errors(out)
        if errors:
            raise PluginFailed(plugin=self.describe(), step=step, detail="; ".join(errors))
        return out

    def prepare(self) -> None:
        with self._lock:
            self._asked = self._frozen = self._thawed = False
            self.metadata_file = None

    def freeze(self) -> None:
        with self._lock:
            if self._thawed:
                return
            self._asked = True
        self._sqlcmd("freeze", suspend(self.database, True))
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._clock))
        with self._lock:
            late = self._thawed
            if not late:
                self._frozen = True
                self.metadata_file = f"dingyuan-{self.database}-{stamp}.bkm"
        if late:  # thaw ran while the suspension was on its way: resume again
            self._sqlcmd("thaw", suspend(self.database, False))

    def notes(self) -> list[str]:
        if self.metadata_file is None:
            return []
        return [f"snapshot backup metadata: {self.metadata_file} (server's default backup directory)"]

    def thaw(self) -> None:
        with self._lock:
            self._thawed = True
            asked, frozen = self._asked, self._frozen
            self._asked = self._frozen = False
        if not asked:
            return
        if frozen and self.metadata_file is not None:
            try:
                self._sqlcmd("thaw", metadata_backup(self.database, self.metadata_file))
                return  # the metadata backup resumed the database
            except PluginFailed:
                self._sqlcmd("thaw", suspend(self.database, False))
                raise
        self._sqlcmd("thaw", suspend(self.database, False))
