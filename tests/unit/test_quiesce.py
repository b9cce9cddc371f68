"""Quiesce plugins and the Quiescer: order, timeouts, always thawing, the failure policy."""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path

import pytest

from dingyuan.agent.quiesce import Plugin, Quiescer, ScriptPlugin, SqlitePlugin, Watchdog
from dingyuan.errors import QuiesceFailed


class Recorder(Plugin):
    def __init__(self, name: str, log: list[str], fail: str | None = None) -> None:
        super().__init__(timeout=1.0)
        self.label, self.log, self.fail = name, log, fail

    def describe(self) -> str:
        return self.label

    def _step(self, step: str) -> None:
        self.log.append(f"{self.label}.{step}")
        if self.fail == step:
            raise RuntimeError(f"{step} broke")

    def prepare(self) -> None:
        self._step("prepare")

    def freeze(self) -> None:
        self._step("freeze")

    def thaw(self) -> None:
        self._step("thaw")


def test_plugins_freeze_in_order_and_thaw_in_reverse() -> None:
    log: list[str] = []
    q = Quiescer([Recorder("a", log), Recorder("b", log)])
    q.prepare()
    assert q.freeze()
    q.thaw()
    q.thaw()  # idempotent
    assert log == ["a.prepare", "b.prepare", "a.freeze", "b.freeze", "b.thaw", "a.thaw"]
    assert q.report.ok and q.report.plugin == "a+b" and q.report.paused_seconds >= 0


@pytest.mark.parametrize("step", ["prepare", "freeze"])
def test_a_failure_thaws_everything_and_goes_on_as_crash(step: str) -> None:
    log: list[str] = []
    q = Quiescer([Recorder("a", log), Recorder("b", log, fail=step)], on_failure="crash")
    q.prepare()
    assert not q.freeze()
    q.thaw()
    assert not q.report.ok and q.report.errors == [f"b: {step} failed: {step} broke"]
    if step == "freeze":  # the failed plugin is thawed too
        assert log[-2:] == ["b.thaw", "a.thaw"]
    else:
        assert "a.freeze" not in log


def test_skip_raises_after_thawing() -> None:
    log: list[str] = []
    q = Quiescer([Recorder("a", log), Recorder("b", log, fail="freeze")], on_failure="skip")
    q.prepare()
    with pytest.raises(QuiesceFailed, match="b failed to freeze"):
        q.freeze()
    assert log[-2:] == ["b.thaw", "a.thaw"]


def test_a_failing_thaw_is_reported() -> None:
    log: list[str] = []
    q = Quiescer([Recorder("a", log, fail="thaw")])
    q.prepare()
    q.freeze()
    q.thaw()
    assert q.report.errors == ["a: thaw failed: thaw broke"]


def test_watchdog_fires_once_unless_stopped() -> None:
    fired: list[str] = []
    wd = Watchdog(0.1, "test")
    wd.add(lambda: fired.append("first"))
    wd.add(lambda: fired.append("second"))
    wd.start()
    time.sleep(0.3)
    wd.stop()
    assert wd.fired and fired == ["second", "first"]
    calm = Watchdog(5, "test")
    calm.add(lambda: fired.append("never"))
    calm.start()
    calm.stop()
    assert not calm.fired and "never" not in fired


# script ----------------------------------------------------------------------------------------
def test_script_steps_see_their_name(tmp_path: Path) -> None:
    out = tmp_path / "steps"
    cmd = f'echo "$DINGYUAN_QUIESCE_STEP" >> {out}'
    q = Quiescer([ScriptPlugin(freeze=cmd, thaw=cmd, prepare=cmd)])
    q.prepare()
    assert q.freeze()
    q.thaw()
    assert out.read_text().split() == ["prepare", "freeze", "thaw"]


def test_script_timeout_kills_the_whole_group_and_post_runs(tmp_path: Path) -> None:
    post = tmp_path / "post"
    child = tmp_path / "child"
    plugin = ScriptPlugin(
        freeze=f"(sleep 2; touch {child}) & sleep 30", thaw=["touch", str(post)], timeout=0.5
    )
    q = Quiescer([plugin], on_failure="crash")
    t0 = time.monotonic()
    q.prepare()
    assert not q.freeze()
    assert time.monotonic() - t0 < 2.0
    assert post.exists(), "the post script did not run after the failed freeze"
    assert "killed after 0.5 s" in q.report.errors[0]
    time.sleep(2.0)
    assert not child.exists(), "a child of the timed-out script survived"


def test_script_failure_reports_its_output_and_skip_raises(tmp_path: Path) -> None:
    post = tmp_path / "post"
    q = Quiescer(
        [ScriptPlugin(freeze="echo cannot lock the tables >&2; exit 3", thaw=f"touch {post}")],
        on_failure="skip",
    )
    q.prepare()
    with pytest.raises(QuiesceFailed, match="status 3: cannot lock the tables"):
        q.freeze()
    assert post.exists()
    missing = Quiescer([ScriptPlugin(freeze=["/nonexistent/freeze"], thaw=None)])
    missing.prepare()
    assert not missing.freeze() and "cannot run /nonexistent/freeze" in missing.report.errors[0]


# sqlite ----------------------------------------------------------------------------------------
def test_sqlite_freeze_blocks_writers_until_thaw(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    w = sqlite3.connect(db, timeout=0.2, isolation_level=None)
    w.execute("PRAGMA journal_mode=WAL")
    w.execute("CREATE TABLE t (x)")
    w.execute("INSERT INTO t VALUES (1)")
    plugin = SqlitePlugin(db, timeout=2)
    q = Quiescer([plugin])
    q.prepare()
    assert not (tmp_path / "app.db-wal").exists() or (tmp_path / "app.db-wal").stat().st_size == 0
    w.execute("INSERT INTO t VALUES (2)")  # after the checkpoint: in the WAL only
    assert q.freeze()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        w.execute("INSERT INTO t VALUES (3)")
    assert w.execute("SELECT count(*) FROM t").fetchone()[0] == 2  # readers go on
    # the freeze's checkpoint put row 2 into the database file itself
    assert plugin.checkpoint is not None and plugin.checkpoint[1] == plugin.checkpoint[2]
    alone = tmp_path / "alone.db"
    alone.write_bytes(db.read_bytes())
    c = sqlite3.connect(alone)
    assert c.execute("SELECT count(*) FROM t").fetchone()[0] == 2
    c.close()
    q.thaw()
    w.execute("INSERT INTO t VALUES (3)")
    w.close()
    assert q.report.ok and q.report.plugin == "sqlite:app.db"
    (note,) = q.report.notes  # the quiesce point: when the write lock was taken
    assert re.fullmatch(
        r"sqlite:app\.db: quiesce point: write lock at \S+Z, WAL frames (\d+)/\1 checkpointed", note
    ), note


def test_sqlite_freeze_times_out_when_a_writer_holds_the_lock(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    w = sqlite3.connect(db, isolation_level=None)
    w.execute("CREATE TABLE t (x)")
    w.execute("BEGIN IMMEDIATE")
    q = Quiescer([SqlitePlugin(db, timeout=0.3)], on_failure="crash")
    q.prepare()
    assert not q.freeze()
    assert "freeze failed" in q.report.errors[-1]
    w.execute("ROLLBACK")
    w.close()
    missing = Quiescer([SqlitePlugin(tmp_path / "none.db")])
    missing.prepare()
    assert not missing.report.ok and "no database" in missing.report.errors[0]
