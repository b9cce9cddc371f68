"""Application-consistent snapshots of PostgreSQL, end to end.

A PostgreSQL cluster lives in an ext4 image loop-mounted inside XFS and runs pgbench: a custom
transaction that does pgbench's usual work and inserts the next number into a ``counter`` table,
one client, so the numbers committed are 1, 2, ... in order and pgbench's log says when each
commit returned. A real vault and agent (processes) protect the image every 10 seconds with
``consistency: auto`` (a reflink clone, the filesystem frozen for the instant) and the
``postgresql`` quiesce plugin, for two minutes. Then snapshots chosen at random are restored,
loop-mounted and started as PostgreSQL: the server recovers without an error, ``amcheck`` finds
every B-tree index of the pgbench and counter tables sound, and the counter holds every number
whose commit returned before the snapshot's quiesce point. The pause per snapshot and the RPO
(age of the newest snapshot, sampled every second) are measured and printed.

The other tests point the plugin at a server that never answers: the run ends within the step's
timeout, the error is in the snapshot's notes and the snapshot is labelled ``crash``
(``on_failure=crash``), or no snapshot is made (``skip``); nothing stays frozen.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from consistkit import (
    PROTECT_SECONDS,
    Protected,
    choose_seed,
    protect_under_load,
    quiesce_note,
    report,
    restored,
    utc_seconds,
)
from fskit import Stack, have, image_stack, loop_mount, needs_root, writable_within

from dingyuan.agent.runner import RunSpec, run_backup
from dingyuan.errors import QuiesceFailed
from dingyuan.repository.repo import Repository
from dingyuan.vault.ingest import Ingest
from pgkit import PORT, PgServer, server_bindir
from transferkit import DirectClient

pytestmark = needs_root

RATE = 200  # transactions per second pgbench aims at (one client)
CLOCK_MARGIN = 0.01  # seconds: pgbench and the server read the same clock
QUIESCE_NOTE = re.compile(r"quiesce point: WAL ([0-9A-F]+/[0-9A-F]+) at (\S+Z)")
SETTINGS = ("max_wal_size=32MB", "min_wal_size=4MB", "shared_buffers=16MB")

TRANSACTION = r"""\set aid random(1, 100000 * :scale)
\set bid random(1, 1 * :scale)
\set tid random(1, 10 * :scale)
\set delta random(-5000, 5000)
\set n :n + 1
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, now());
INSERT INTO counter (id, at) VALUES (:n, clock_timestamp());
END;
"""


def _bindir() -> Path:
    bindir = server_bindir()
    if bindir is None or not (bindir / "pgbench").exists():
        pytest.skip("needs the PostgreSQL server and pgbench (Debian package postgresql)")
    if not have("mkfs.xfs"):
        pytest.skip("needs xfsprogs")
    return bindir


def _client_env(server: PgServer) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "PGHOST": str(server.sockdir), "PGPORT": str(PORT), "PGUSER": "postgres"}


def _load(bindir: Path, server: PgServer) -> None:
    env = _client_env(server)
    subprocess.run(
        [str(bindir / "pgbench"), "-i", "-q", "-s", "1", "postgres"], env=env, check=True, capture_output=True
    )
    subprocess.run(
        [str(bindir / "psql"), "-qX", "-v", "ON_ERROR_STOP=1", "-c",
         "CREATE TABLE counter (id bigint PRIMARY KEY, at timestamptz NOT NULL)", "postgres"],
        env=env, check=True, capture_output=True,
    )  # fmt: skip


def _commits(log_prefix: Path) -> list[tuple[int, float]]:
    """(number, time the commit returned) of every transaction pgbench's log lists: one client,
    so transaction k inserted k into the counter."""
    out = []
    for f in log_prefix.parent.glob(log_prefix.name + ".*"):
        for line in f.read_text().splitlines():
            client, tx, _, _, epoch, us = line.split()[:6]
            assert client == "0"
            out.append((int(tx), int(epoch) + int(us) / 1e6))
    out.sort()
    assert [n for n, _ in out] == list(range(1, len(out) + 1)), "pgbench's log has gaps"
    return out


def _check_restored(bindir: Path, image: Path, base: Path) -> tuple[int, int, float]:
    """Loop-mount a restored image, start PostgreSQL on it (crash recovery), run amcheck over the
    pgbench and counter indexes; (rows in counter, largest number, seconds to start)."""
    import psycopg

    with loop_mount(image, base / "mnt"):
        data = base / "mnt" / "pgdata"
        # the server's lock file came along with the copy: a restore to another host removes it
        (data / "postmaster.pid").unlink(missing_ok=True)
        server = PgServer(bindir, data, base / "sock", base / "server.log")
        t0 = time.monotonic()
        try:
            server.start(*SETTINGS)
            started = time.monotonic() - t0
            log = server.logtext()
            # a clone of a running server: PostgreSQL replays its WAL, as after a power cut
            assert "automatic recovery in progress" in log and "redo done" in log, log
            assert "database system is ready to accept connections" in log, log
            bad = [line for line in log.splitlines() if re.search(r"\b(PANIC|FATAL|ERROR):", line)]
            assert not bad, log
            with psycopg.connect(server.conninfo(), autocommit=True) as conn:
                conn.execute("CREATE EXTENSION amcheck")
                indexes = conn.execute(
                    "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                    "JOIN pg_class t ON t.oid = i.indrelid JOIN pg_am a ON a.oid = c.relam "
                    "WHERE a.amname = 'btree' AND (t.relname LIKE 'pgbench%' OR t.relname = 'counter')"
                ).fetchall()
                assert {r[0] for r in indexes} >= {"counter_pkey", "pgbench_accounts_pkey"}
                for (name,) in indexes:
                    conn.execute("SELECT bt_index_check(%s::regclass, true)", (name,))
                row = conn.execute("SELECT count(*), coalesce(max(id), 0) FROM counter").fetchone()
                assert row is not None
                return int(row[0]), int(row[1]), started
        finally:
            server.stop()


@pytest.mark.slow
@pytest.mark.long_wait
def test_pgbench_under_a_10_second_policy_every_checked_snapshot_recovers_with_every_commit(
    tmp_path: Path,
) -> None:
    import psycopg  # noqa: F401  (the plugin and the checks need it)

    bindir = _bindir()
    seed = choose_seed()
    benches: list[subprocess.Popen[bytes]] = []
    server: PgServer | None = None
    # the server runs as postgres, which cannot enter pytest's private tmp_path: its files live
    # in a directory of their own that it can traverse
    base = Path(tempfile.mkdtemp(prefix="dingyuan-pgq-"))
    base.chmod(0o711)
    stack = contextlib.ExitStack()
    stack.callback(shutil.rmtree, base, ignore_errors=True)
    with stack:
        st = stack.enter_context(image_stack(base, "xfs", inner_size=128 << 20))
        try:
            server = PgServer(bindir, st.inner / "pgdata", base / "sock", base / "pg.log")
            server.initdb("--wal-segsize=1")
            server.start(*SETTINGS)
            _load(bindir, server)
            (tmp_path / "tx.sql").write_text(TRANSACTION)
            env = _client_env(server)

            def start() -> None:
                argv = [str(bindir / "pgbench"), "-n", "-c", "1", "-R", str(RATE),
                        "-T", str(PROTECT_SECONDS + 8), "-D", "n=0", "-f", str(tmp_path / "tx.sql"),
                        "-l", "--log-prefix", str(tmp_path / "pgb"), "postgres"]  # fmt: skip
                benches.append(
                    subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                )

            quiesce = f"postgresql:host={server.sockdir} port={PORT} user=postgres"
            run = protect_under_load(tmp_path, st.image, quiesce, start)
            _, err = benches[0].communicate(timeout=60)
            assert benches[0].returncode == 0, err.decode(errors="replace")
        finally:
            for bench in benches:
                if bench.poll() is None:
                    bench.send_signal(signal.SIGKILL)
                    bench.wait()
            if server is not None:
                with contextlib.suppress(Exception):
                    server.stop()

        check(bindir, run, _commits(tmp_path / "pgb"), seed, base, tmp_path)


def check(
    bindir: Path, run: Protected, commits: list[tuple[int, float]], seed: int, base: Path, tmp_path: Path
) -> None:
    """The figures of the run, and the chosen snapshots restored, started and checked."""
    report(run, "postgresql", len(commits))
    for i, (s, image) in enumerate(restored(run, seed, base, tmp_path / "cache")):
        note = quiesce_note(s, QUIESCE_NOTE)
        lsn, point = note.group(1), utc_seconds(note.group(2))
        before = sum(1 for _, t in commits if t < point - CLOCK_MARGIN)
        rows, largest, start_s = _check_restored(bindir, image, base / f"check-{i}")
        print(
            f"snapshot {s['id'][:12]} at {s['time']}: quiesce point WAL {lsn}, "
            f"paused {s['stats']['paused_ms']:.1f} ms; {before} commits returned before it, "
            f"counter holds 1..{largest} ({rows} rows); recovered in {start_s:.1f} s, amcheck passed"
        )
        assert rows == largest, "the counter has gaps"
        assert largest >= before, "a transaction committed before the quiesce point is missing"
        assert largest <= len(commits)


# a server that never answers ------------------------------------------------------------------
@contextlib.contextmanager
def _silent_server(directory: Path) -> Iterator[None]:
    """A Unix socket where PostgreSQL's would be: connections are accepted, nothing answers."""
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(directory / f".s.PGSQL.{PORT}"))
        s.listen(8)
        yield


@pytest.mark.parametrize("on_failure", ["crash", "skip"])
def test_a_postgresql_that_never_answers_ends_the_run_within_the_timeout_and_freezes_nothing(
    xfs_stack: Stack, repo_local: Repository, tmp_path: Path, on_failure: str
) -> None:
    client = DirectClient(Ingest(repo_local, tmp_path / "spool"))
    sock = tmp_path / "sock"
    sock.mkdir()
    (xfs_stack.inner / "data").write_bytes(os.urandom(1 << 20))
    spec = RunSpec(
        volume="disk0",
        source=str(xfs_stack.image),
        chunk_size=64 << 10,
        consistency="auto",
        quiesce=f"postgresql:host={sock} port={PORT} user=postgres;timeout=2;on_failure={on_failure}",
    )
    with _silent_server(sock):
        t0 = time.monotonic()
        if on_failure == "skip":
            with pytest.raises(QuiesceFailed, match="cannot connect"):
                run_backup(client, repo_local.cipher.id_key, tmp_path / "agent", spec)  # type: ignore[arg-type]
        else:
            doc = run_backup(client, repo_local.cipher.id_key, tmp_path / "agent", spec).snapshot  # type: ignore[arg-type]
        took = time.monotonic() - t0
    assert took < 2 + 5, f"the run took {took:.1f} s"
    assert writable_within(xfs_stack.inner, 1.0), "the filesystem stayed frozen"
    assert not list(xfs_stack.image.parent.glob(".disk.img*")), "a clone was left behind"
    if on_failure == "skip":
        assert list(repo_local.snapshots()) == []
        return
    snap = repo_local.read_snapshot(doc["id"])
    assert snap.consistency == "crash"
    assert snap.stats["paused_ms"] < 1000
    assert any("prepare failed: cannot connect" in n for n in snap.stats["consistency_notes"]), snap.stats
