"""Application-consistent snapshots of SQLite, end to end.

A SQLite database in WAL mode lives in an ext4 image loop-mounted inside XFS; a writer process
commits transactions that each insert row ``n`` and set a one-row counter to ``n`` (n = 0, 1, ...),
logging the wall-clock time each commit returned. A real vault and agent (processes) protect the
image every 10 seconds with ``consistency: auto`` (a reflink clone, the filesystem frozen for the
instant) and the ``sqlite`` quiesce plugin, for two minutes. Then snapshots chosen at random are
restored: the ext4 filesystem is clean, ``PRAGMA integrity_check`` is ok (with the ``-wal`` file
and with the database file alone), rows and counter agree (whole transactions only), and every
transaction whose commit returned before the quiesce point (the time the plugin took the write
lock, in the snapshot's notes) is there. The pause per snapshot and the RPO are printed and
asserted.
"""

from __future__ import annotations

import re
import shutil
import sqlite3
import tempfile
from pathlib import Path

import pytest
from consistkit import choose_seed, protect_under_load, quiesce_note, report, restored, utc_seconds
from fskit import SQLITE_WRITER, Writer, debugfs_dump, e2fsck_clean, have, image_stack, needs_root

pytestmark = needs_root

QUIESCE_NOTE = re.compile(r"quiesce point: write lock at (\S+Z)")


def _check_database(directory: Path) -> tuple[int, int]:
    """integrity_check and whole transactions; (rows, largest n)."""
    conn = sqlite3.connect(directory / "app.db")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        count, top = conn.execute("SELECT count(*), coalesce(max(id), -1) FROM t").fetchone()
        (counter,) = conn.execute("SELECT n FROM counter").fetchone()
        assert count == top + 1 == counter + 1, (count, top, counter)  # whole transactions only
        return int(count), int(top)
    finally:
        conn.close()


@pytest.mark.slow
@pytest.mark.long_wait
def test_a_sqlite_writer_under_a_10_second_policy_every_checked_snapshot_holds_every_commit(
    tmp_path: Path,
) -> None:
    if not have("mkfs.xfs") or not have("debugfs"):
        pytest.skip("needs xfsprogs and e2fsprogs")
    seed = choose_seed()
    base = Path(tempfile.mkdtemp(prefix="dingyuan-sqlq-"))
    try:
        with image_stack(base, "xfs", inner_size=128 << 20) as st:
            db = st.inner / "app.db"
            writers: list[Writer] = []

            def start() -> None:
                writers.append(Writer(SQLITE_WRITER, db, tmp_path / "w.log", "wall"))
                writers[0].wait_for(100)

            try:
                run = protect_under_load(tmp_path, st.image, f"sqlite:{db}", start)
                assert writers[0].proc.poll() is None, "the writer died"
            finally:
                for w in writers:
                    w.stop()
        commits = writers[0].entries()
        assert [n for n, _ in commits] == list(range(len(commits))), "the writer's log has gaps"
        report(run, "sqlite", len(commits))

        for s, image in restored(run, seed, base, tmp_path / "cache"):
            point = quiesce_note(s, QUIESCE_NOTE)
            before = sum(1 for _, t in commits if t < utc_seconds(point.group(1)))
            ok, out = e2fsck_clean(image)
            assert ok, out
            got, alone = base / "got", base / "alone"
            for d in (got, alone):
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir()
            assert debugfs_dump(image, "/app.db", got / "app.db")
            shutil.copyfile(got / "app.db", alone / "app.db")
            debugfs_dump(image, "/app.db-wal", got / "app.db-wal")
            rows, top = _check_database(got)
            alone_rows, _ = _check_database(alone)
            print(
                f"snapshot {s['id'][:12]} at {s['time']}: {point.group(0)}, paused "
                f"{s['stats']['paused_ms']:.1f} ms; {before} commits returned before it, "
                f"rows 0..{top} ({rows}; {alone_rows} from the database file alone), integrity ok"
            )
            assert rows >= before, "a transaction committed before the quiesce point is missing"
            assert alone_rows >= before, "the database file alone misses a committed transaction"
            assert rows <= len(commits) + 1  # at most the one in flight when the writer was killed
    finally:
        shutil.rmtree(base, ignore_errors=True)
