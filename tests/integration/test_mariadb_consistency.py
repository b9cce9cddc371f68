"""Application-consistent snapshots of MariaDB, end to end.

A MariaDB server (InnoDB, binary log on, every commit durable) keeps its data directory in an
ext4 image loop-mounted inside XFS. One client runs transactions that move an amount between two
of 1000 accounts (the sum of the balances never changes) and insert the next number into a
``counter`` table, so the numbers committed are 0, 1, ... in order; it logs the wall-clock time
each commit returned. A real vault and agent (processes) protect the image every 10 seconds with
``consistency: auto`` (a reflink clone, the filesystem frozen for the instant) and the ``mysql``
quiesce plugin (FLUSH TABLES WITH READ LOCK), for two minutes. Then snapshots chosen at random
are restored and loop-mounted, and a server is started on the restored data directory: it
recovers without an error, ``CHECK TABLE`` is OK for every table, the sum of the balances is
unchanged, the counter has no gap and holds every number whose commit returned before the
snapshot's quiesce point (the server's clock when the read lock was taken, in the notes). The
pause per snapshot and the RPO are printed and asserted.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from consistkit import choose_seed, protect_under_load, quiesce_note, report, restored, utc_seconds
from fskit import have, image_stack, loop_mount, needs_root

from mariakit import MariaServer, have_mariadb

pytestmark = needs_root

ACCOUNTS = 1000
BALANCE = 1000
CLOCK_MARGIN = 0.01  # seconds: the client and the server read the same clock
QUIESCE_NOTE = re.compile(r"quiesce point: read lock at (\S+Z)")
#: InnoDB is the default engine; every commit is durable (innodb_flush_log_at_trx_commit=1, the
#: default) and the binary log on, as on a production server
SETTINGS = ("--log-bin=binlog", "--server-id=1", "--innodb-log-file-size=16M")

WRITER = r"""
import random, sys, time
import pymysql
sock, log, accounts = sys.argv[1], sys.argv[2], int(sys.argv[3])
db = pymysql.connect(unix_socket=sock, user="root", database="app", autocommit=False)
rnd = random.Random(1)
with open(log, "w", buffering=1) as out, db.cursor() as cur:
    n = 0
    while True:
        a, b = rnd.sample(range(1, accounts + 1), 2)
        d = rnd.randint(1, 100)
        cur.execute("UPDATE accounts SET balance = balance - %s WHERE id = %s", (d, a))
        cur.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s", (d, b))
        cur.execute("INSERT INTO counter (id, at) VALUES (%s, NOW(6))", (n,))
        db.commit()
        out.write(f"{n} {time.time()}\n")
        n += 1
        time.sleep(0.002)
"""


def _load(server: MariaServer) -> None:
    conn = server.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE app")
            cur.execute(
                "CREATE TABLE app.accounts (id INT PRIMARY KEY, balance BIGINT NOT NULL) ENGINE=InnoDB"
            )
            cur.execute(
                "CREATE TABLE app.counter (id BIGINT PRIMARY KEY, at DATETIME(6) NOT NULL) ENGINE=InnoDB"
            )
            cur.executemany(
                "INSERT INTO app.accounts VALUES (%s, %s)", [(i, BALANCE) for i in range(1, ACCOUNTS + 1)]
            )
    finally:
        conn.close()


def _commits(log: Path) -> list[tuple[int, float]]:
    out = []
    for line in log.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            out.append((int(parts[0]), float(parts[1])))
    assert [n for n, _ in out] == list(range(len(out))), "the writer's log has gaps"
    return out


def _check_restored(image: Path, base: Path) -> tuple[int, int, float]:
    """Loop-mount a restored image, start MariaDB on its data directory (crash recovery), check
    every table and the invariants; (rows in counter, largest number, seconds to start)."""
    with loop_mount(image, base / "mnt"):
        server = MariaServer(base / "mnt" / "mysql", base / "sock", base / "error.log")
        t0 = time.monotonic()
        try:
            server.start(*SETTINGS)
            started = time.monotonic() - t0
            log = server.logtext()
            bad = [line for line in log.splitlines() if "[ERROR]" in line]
            assert not bad, log
            conn = server.connect("app")
            try:
                with conn.cursor() as cur:
                    cur.execute("CHECK TABLE app.accounts, app.counter EXTENDED")
                    rows = cur.fetchall()
                    assert {r[0] for r in rows} == {"app.accounts", "app.counter"}, rows
                    assert all(r[3] == "OK" for r in rows if r[2] == "status"), rows
                    assert not [r for r in rows if r[2] == "error"], rows
                    cur.execute("SELECT count(*), sum(balance) FROM accounts")
                    assert cur.fetchone() == (ACCOUNTS, ACCOUNTS * BALANCE), "the balances do not add up"
                    cur.execute("SELECT count(*), coalesce(max(id), -1) FROM counter")
                    count, largest = cur.fetchone()
                    return int(count), int(largest), started
            finally:
                conn.close()
        finally:
            server.stop()


@pytest.mark.slow
@pytest.mark.long_wait
def test_mariadb_under_a_10_second_policy_every_checked_snapshot_recovers_with_every_commit(
    tmp_path: Path,
) -> None:
    if not have_mariadb() or not have("mkfs.xfs"):
        pytest.skip("needs the MariaDB server (Debian package mariadb-server) and xfsprogs")
    pytest.importorskip("pymysql")
    seed = choose_seed()
    base = Path(tempfile.mkdtemp(prefix="dingyuan-myq-"))
    writers: list[subprocess.Popen[bytes]] = []
    try:
        with image_stack(base, "xfs", inner_size=256 << 20) as st:
            server = MariaServer(st.inner / "mysql", base / "sock", base / "error.log")
            try:
                server.install()
                server.start(*SETTINGS)
                _load(server)

                def start() -> None:
                    argv = [
                        sys.executable,
                        "-c",
                        WRITER,
                        str(server.socket),
                        str(tmp_path / "w.log"),
                        str(ACCOUNTS),
                    ]
                    writers.append(subprocess.Popen(argv, stderr=subprocess.PIPE))

                quiesce = f"mysql:socket={server.socket} user=root"
                run = protect_under_load(tmp_path, st.image, quiesce, start)
                assert writers[0].poll() is None, writers[0].communicate()[1].decode(errors="replace")
            finally:
                for w in writers:
                    if w.poll() is None:
                        w.kill()
                    w.communicate()
                server.stop()
        commits = _commits(tmp_path / "w.log")
        report(run, "mysql", len(commits))

        for i, (s, image) in enumerate(restored(run, seed, base, tmp_path / "cache")):
            note = quiesce_note(s, QUIESCE_NOTE)
            before = sum(1 for _, t in commits if t < utc_seconds(note.group(1)) - CLOCK_MARGIN)
            rows, largest, start_s = _check_restored(image, base / f"check-{i}")
            print(
                f"snapshot {s['id'][:12]} at {s['time']}: {note.group(0)}, paused "
                f"{s['stats']['paused_ms']:.1f} ms; {before} commits returned before it, counter "
                f"holds 0..{largest} ({rows} rows); recovered in {start_s:.1f} s, CHECK TABLE OK, "
                "balances add up"
            )
            assert rows == largest + 1, "the counter has gaps"
            assert rows >= before, "a transaction committed before the quiesce point is missing"
            assert rows <= len(commits) + 1  # at most the one in flight when the writer was killed
    finally:
        shutil.rmtree(base, ignore_errors=True)
