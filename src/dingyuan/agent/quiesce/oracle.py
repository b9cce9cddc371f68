"""Oracle Database in ARCHIVELOG mode: hot backup mode around the point in time.

**Untested on a real Oracle server**: the command sequence and the error parsing are tested on
recorded outputs of ``sqlplus`` (no Oracle server exists where dingyuan is tested).

Every step runs ``sqlplus -S -L / as sysdba @SCRIPT`` (operating-system authentication as
SYSDBA: the agent's user is in the ``dba`` group; no password in a policy), with ``ORACLE_SID``
and ``ORACLE_HOME`` from the setting when given. The script stops at the first error
(``WHENEVER SQLERROR EXIT FAILURE``) and the ``ORA-``/``SP2-`` lines of its output become the
step's error. Each run is killed (its whole process group) at the plugin's timeout.

- ``freeze``: ``ALTER DATABASE BEGIN BACKUP`` (every datafile in backup mode: Oracle logs whole
  blocks from here on, so a copy with fractured blocks is repaired by recovery), then
  ``SELECT CURRENT_SCN FROM V$DATABASE``, recorded in the snapshot's notes.
- ``thaw`` (also after a failed or timed-out freeze): ``ALTER DATABASE END BACKUP``, then
  ``ALTER SYSTEM ARCHIVE LOG CURRENT`` so the redo that makes the copy consistent is archived.
  ``ORA-01142`` (no file in backup mode) means nothing was frozen: thaw is then done.

Writes go on during backup mode (this is not a pause): the copy is consistent once recovered with
the archived redo up to at least the SCN noted after ``END BACKUP``, so the archive log
destination must be kept (or lie on the snapshotted source too).

To check on a real server: the exact ``sqlplus`` output of each step on the versions in use
(19c, 23ai), that OS authentication works for the agent's user, a container database (CDB:
``BEGIN BACKUP`` from the root covers every PDB), and a restore drill (``RECOVER DATABASE`` from
the copy and the archived logs).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import threading
from collections.abc import Mapping

from ...errors import CommandFailed, PluginFailed
from .base import DEFAULT_STEP_TIMEOUT, Plugin
from .tools import Runner, run_bounded

BEGIN = "ALTER DATABASE BEGIN BACKUP;"
SCN = "SELECT 'SCN=' || CURRENT_SCN FROM V$DATABASE;"
END = "ALTER DATABASE END BACKUP;"
ARCHIVE = "ALTER SYSTEM ARCHIVE LOG CURRENT;"
#: END BACKUP when no file is in backup mode
NOT_IN_BACKUP = "ORA-01142"
#: setting -> environment variable of sqlplus
ENV = {"sid": "ORACLE_SID", "oracle_home": "ORACLE_HOME"}
_ERROR = re.compile(r"\b(?:ORA|SP2)-\d{4,5}:.*$", re.MULTILINE)


def script(*statements: str) -> str:
    """The sqlplus script of one step: stop at the first error, plain output, exit."""
    head = [
        "WHENEVER SQLERROR EXIT FAILURE",
        "WHENEVER OSERROR EXIT FAILURE",
        "SET HEADING OFF FEEDBACK OFF PAGESIZE 0",
    ]
    return "\n".join([*head, *statements, "EXIT", ""])


def oracle_errors(out: str) -> list[str]:
    """The ``ORA-``/``SP2-`` lines of sqlplus output, in order."""
    return [m.group(0).strip() for m in _ERROR.finditer(out)]


class OraclePlugin(Plugin):
    name = "oracle"

    def __init__(
        self,
        settings: Mapping[str, str] | None = None,
        timeout: float = DEFAULT_STEP_TIMEOUT,
        run: Runner | None = None,
    ) -> None:
        super().__init__(timeout)
        self.settings = dict(settings or {})
        self.run: Runner = run or (lambda argv: run_bounded(argv, self.timeout))
        self._lock = threading.Lock()
        self._asked = False  # freeze was called since the last thaw
        self._thawed = False
        self.scn: str | None = None

    def describe(self) -> str:
        sid = self.settings.get("sid")
        return f"{self.name}:{sid}" if sid else self.name

    def argv(self, script_path: str) -> list[str]:
        home = self.settings.get("oracle_home")
        sqlplus = f"{home}/bin/sqlplus" if home else "sqlplus"
        env = [f"{var}={self.settings[key]}" for key, var in ENV.items() if key in self.settings]
        prefix = ["env", *env] if env else []
        return [*prefix, sqlplus, "-S", "-L", "/", "as", "sysdba", f"@{script_path}"]

    def _sqlplus(self, step: str, *statements: str) -> str:
        fd, path = tempfile.mkstemp(prefix="dingyuan-oracle-", suffix=".sql")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(script(*statements))
            try:
                out = self.run(self.argv(path))
            except CommandFailed as e:
                detail = str(e.kwargs.get("detail") or e)
                errors = oracle_errors(detail)
                raise PluginFailed(
                    plugin=self.describe(),
                    step=step,
                    detail="; ".join(errors) if errors else f"sqlplus {detail}",
                ) from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
        errors = oracle_errors(out)
        if errors:  # sqlplus exited 0 but said why it did nothing
            raise PluginFailed(plugin=self.describe(), step=step, detail="; ".join(errors))
        return out

    def prepare(self) -> None:
        with self._lock:
            self._thawed = False
            self._asked = False
            self.scn = None

    def freeze(self) -> None:
        with self._lock:
            if self._thawed:  # our timeout passed and thaw already ran
                return
            self._asked = True
        out = self._sqlplus("freeze", BEGIN, SCN)
        m = re.search(r"SCN=(\d+)", out)
        self.scn = m.group(1) if m else None
        with self._lock:
            late = self._thawed
        if late:  # thaw ran while BEGIN BACKUP was on its way: end backup mode again
            self._end()

    def notes(self) -> list[str]:
        return [f"quiesce point: backup mode from SCN {self.scn}"] if self.scn else []

    def thaw(self) -> None:
        with self._lock:
            self._thawed = True
            asked, self._asked = self._asked, False
        if asked:
            self._end()

    def _end(self) -> None:
        try:
            self._sqlplus("thaw", END)
        except PluginFailed as e:
            if NOT_IN_BACKUP in str(e.kwargs.get("detail")):
                return  # nothing was in backup mode: nothing to archive either
            raise
        self._sqlplus("thaw", ARCHIVE)
