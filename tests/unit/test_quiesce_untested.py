"""The Oracle and SQL Server plugins on recorded outputs of sqlplus and sqlcmd (untested on the
real servers): command sequences, error parsing, thaw after a failed freeze, timeouts."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from dingyuan.agent.quiesce import OraclePlugin, Quiescer, SqlServerPlugin, parse_quiesce, quiescer_for
from dingyuan.agent.quiesce.oracle import oracle_errors
from dingyuan.agent.quiesce.sqlserver import sqlserver_errors
from dingyuan.errors import CommandFailed, PluginFailed, QuiesceFailed

FIXTURES = Path(__file__).parent / "fixtures" / "quiesce"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


class Recorded:
    """Answers each call with the next recorded answer; logs argv and, for sqlplus, the SQL of
    its script (read while the call runs: the plugin deletes it afterwards)."""

    def __init__(self, *answers: str | Exception) -> None:
        self.answers = list(answers)
        self.calls: list[list[str]] = []
        self.sql: list[list[str]] = []

    def __call__(self, argv: Sequence[str]) -> str:
        self.calls.append(list(argv))
        if argv[-1].startswith("@"):
            lines = Path(argv[-1][1:]).read_text().splitlines()
            self.sql.append([ln for ln in lines if not ln.startswith(("WHENEVER", "SET ")) and ln != "EXIT"])
        elif "-Q" in argv:
            self.sql.append([argv[argv.index("-Q") + 1]])
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def failed(out: str, command: str = "sqlplus") -> CommandFailed:
    return CommandFailed(command=command, detail=f"status 1: {out}")


def test_oracle_sequence_and_scn_note() -> None:
    run = Recorded(fixture("oracle_begin.txt"), "", "")
    plugin = OraclePlugin({"sid": "ORCL", "oracle_home": "/u01/db"}, run=run)
    q = Quiescer([plugin])
    q.prepare()
    assert q.freeze()
    q.thaw()
    assert q.report.ok and q.report.errors == []
    assert q.report.notes == ["oracle:ORCL: quiesce point: backup mode from SCN 4471283"]
    assert run.calls[0][:-1] == [
        "env", "ORACLE_SID=ORCL", "ORACLE_HOME=/u01/db",
        "/u01/db/bin/sqlplus", "-S", "-L", "/", "as", "sysdba",
    ]  # fmt: skip
    assert run.sql == [
        ["ALTER DATABASE BEGIN BACKUP;", "SELECT 'SCN=' || CURRENT_SCN FROM V$DATABASE;"],
        ["ALTER DATABASE END BACKUP;"],
        ["ALTER SYSTEM ARCHIVE LOG CURRENT;"],
    ]
    assert not any(Path(c[-1][1:]).exists() for c in run.calls)  # scripts removed
    assert OraclePlugin().argv("/s.sql") == ["sqlplus", "-S", "-L", "/", "as", "sysdba", "@/s.sql"]


def test_oracle_error_parsing_and_thaw_after_a_failed_freeze() -> None:
    assert oracle_errors(fixture("oracle_begin_error.txt")) == [
        "ORA-01123: cannot start online backup; media recovery not enabled"
    ]
    run = Recorded(failed(fixture("oracle_begin_error.txt")), failed(fixture("oracle_end_none.txt")))
    q = Quiescer([OraclePlugin(run=run)], on_failure="crash")
    q.prepare()
    assert not q.freeze()
    assert q.report.errors == [
        "oracle: freeze failed: ORA-01123: cannot start online backup; media recovery not enabled"
    ]
    # END BACKUP ran; ORA-01142 means nothing was in backup mode: no archive, no thaw error
    assert run.sql == [
        ["ALTER DATABASE BEGIN BACKUP;", "SELECT 'SCN=' || CURRENT_SCN FROM V$DATABASE;"],
        ["ALTER DATABASE END BACKUP;"],
    ]
    # an error printed with status 0 is an error too; skip raises
    run = Recorded("ORA-01031: insufficient privileges\n", "", "")
    skip = Quiescer([OraclePlugin(run=run)], on_failure="skip")
    skip.prepare()
    with pytest.raises(QuiesceFailed, match="ORA-01031"):
        skip.freeze()
    assert [s[0] for s in run.sql] == [
        "ALTER DATABASE BEGIN BACKUP;",
        "ALTER DATABASE END BACKUP;",  # succeeded (the freeze's state is unknown): archive the redo
        "ALTER SYSTEM ARCHIVE LOG CURRENT;",
    ]


def test_sqlserver_sequence_metadata_backup_resumes() -> None:
    run = Recorded("", fixture("sqlcmd_metadata_ok.txt"))
    plugin = SqlServerPlugin({"instance": "db1\\SQL2022", "database": "sales"}, run=run, clock=0.0)
    q = Quiescer([plugin])
    q.prepare()
    assert q.freeze()
    q.thaw()
    assert q.report.ok and q.report.errors == []
    file = "dingyuan-sales-19700101T000000Z.bkm"
    assert q.report.notes == [
        f"sqlserver:db1\\SQL2022/sales: snapshot backup metadata: {file} (server's default backup directory)"
    ]
    assert run.calls[0][:-1] == ["sqlcmd", "-b", "-S", "db1\\SQL2022", "-E", "-Q"]
    assert run.sql == [
        ["ALTER DATABASE [sales] SET SUSPEND_FOR_SNAPSHOT_BACKUP = ON"],
        [f"BACKUP DATABASE [sales] TO DISK = '{file}' WITH METADATA_ONLY"],
    ]  # no SUSPEND ... OFF: the metadata backup resumed the database


def test_sqlserver_errors_and_resume_without_a_backup() -> None:
    assert sqlserver_errors(fixture("sqlcmd_permission.txt")) == [
        "Msg 262: ALTER DATABASE permission denied in database 'sales'."
    ]
    assert sqlserver_errors("Msg 5701, Level 0, State 2, Server x, Line 1\nChanged database context\n") == []
    run = Recorded(failed(fixture("sqlcmd_permission.txt"), "sqlcmd"), "")
    q = Quiescer([SqlServerPlugin({"database": "sales"}, run=run)])
    q.prepare()
    assert not q.freeze()
    assert q.report.errors == [
        "sqlserver:localhost/sales: freeze failed: "
        "Msg 262: ALTER DATABASE permission denied in database 'sales'."
    ]
    assert run.sql == [
        ["ALTER DATABASE [sales] SET SUSPEND_FOR_SNAPSHOT_BACKUP = ON"],
        ["ALTER DATABASE [sales] SET SUSPEND_FOR_SNAPSHOT_BACKUP = OFF"],
    ]
    # the metadata backup fails: the database is resumed without it, and thaw reports the failure
    run = Recorded(
        "",
        failed("Msg 3201, Level 16, State 1, Server x, Line 1\nCannot open backup device.\n", "sqlcmd"),
        "",
    )
    q = Quiescer([SqlServerPlugin({"database": "sales"}, run=run)])
    q.prepare()
    assert q.freeze()
    q.thaw()
    assert len(q.report.errors) == 1
    assert q.report.errors[0].endswith("failed to thaw: Msg 3201: Cannot open backup device.")
    assert [s[0].split(" TO ")[0] for s in run.sql] == [
        "ALTER DATABASE [sales] SET SUSPEND_FOR_SNAPSHOT_BACKUP = ON",
        "BACKUP DATABASE [sales]",
        "ALTER DATABASE [sales] SET SUSPEND_FOR_SNAPSHOT_BACKUP = OFF",
    ]


def hanging_tool(directory: Path, name: str) -> Path:
    """A client that hangs (and has a child that would outlive it without the group kill)."""
    directory.mkdir(parents=True, exist_ok=True)
    tool = directory / name
    tool.write_text(f"#!/bin/sh\nsleep 30 &\necho $! > {directory}/child.pid\nwait\n")
    tool.chmod(0o755)
    return tool


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_hung_sqlplus_is_killed_at_the_timeout(tmp_path: Path) -> None:
    hanging_tool(tmp_path / "bin", "sqlplus")
    plugin = OraclePlugin({"oracle_home": str(tmp_path)}, timeout=0.5)
    start = time.monotonic()
    with pytest.raises(PluginFailed, match=r"killed after 0.5 s"):
        plugin.freeze()
    assert time.monotonic() - start < 5
    child = int((tmp_path / "bin" / "child.pid").read_text())
    deadline = time.monotonic() + 5
    while not gone(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(child)


def test_a_hung_sqlcmd_is_killed_at_the_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hanging_tool(tmp_path, "sqlcmd")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    q = Quiescer([SqlServerPlugin({"database": "sales"}, timeout=0.5)])
    q.prepare()
    start = time.monotonic()
    assert not q.freeze()  # freeze killed, then thaw's SUSPEND ... OFF killed too
    assert time.monotonic() - start < 5
    assert len(q.report.errors) == 2
    assert q.report.errors[0] == "sqlserver:localhost/sales: freeze failed: sqlcmd killed after 0.5 s"
    assert q.report.errors[1].endswith("failed to thaw: sqlcmd killed after 0.5 s")


def test_specs() -> None:
    spec = parse_quiesce(
        "oracle:sid=ORCL oracle_home=/u01/db user=sysdba_os_auth;sqlserver:instance=h,1433 database=s"
    )
    assert [(p.kind, p.args) for p in spec.plugins] == [
        ("oracle", {"sid": "ORCL", "oracle_home": "/u01/db", "user": "sysdba_os_auth"}),
        ("sqlserver", {"instance": "h,1433", "database": "s"}),
    ]
    assert parse_quiesce("oracle").plugins[0].args == {}
    assert [p.describe() for p in quiescer_for("oracle:sid=X;sqlserver:database=d").plugins] == [
        "oracle:X",
        "sqlserver:localhost/d",
    ]
    for bad, reason in [
        ("oracle:user=system", "sysdba_os_auth"),
        ("oracle:oracle_home=u01", "absolute path"),
        ("oracle:sid=1x", "Oracle SID"),
        ("oracle:password=x", "KEY=VALUE"),
        ("sqlserver", "database=NAME is needed"),
        ("sqlserver:database=a]b", "plain name"),
        ("sqlserver:database=a'b", "plain name"),
        ("sqlserver:database=d instance=h;x", "quiesce plugin"),
        ("sqlserver:database=d instance=a/b", "HOST"),
        ("sqlserver:database=d database=e", "given twice"),
    ]:
        with pytest.raises(ValueError, match=reason):
            parse_quiesce(bad)
