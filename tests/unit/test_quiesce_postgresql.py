"""The quiesce setting of a policy, the plugins it builds, and the PostgreSQL plugin against a
real server: a checkpoint, the quiesce point recorded, and a server that does not answer failing
the step within its timeout."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dingyuan.agent.quiesce import (
    PostgresqlPlugin,
    Quiescer,
    ScriptPlugin,
    SqlitePlugin,
    build_plugins,
    parse_quiesce,
    quiescer_for,
)
from dingyuan.errors import PluginFailed, QuiesceFailed
from pgkit import PORT, SUPERUSER, PgCluster


def test_a_setting_names_plugins_in_order_with_their_failure_policy_and_timeout() -> None:
    spec = parse_quiesce(" sqlite:/srv/a.db ; postgresql:host=/tmp port=5433;script:/bin/f,/bin/t;timeout=3")
    assert [p.kind for p in spec.plugins] == ["sqlite", "postgresql", "script"]
    assert spec.plugins[1].args == {"host": "/tmp", "port": "5433"}
    assert spec.on_failure == "crash" and spec.timeout == 3
    plugins = build_plugins(spec)
    assert [type(p) for p in plugins] == [SqlitePlugin, PostgresqlPlugin, ScriptPlugin]
    assert all(p.timeout == 3 for p in plugins)
    assert plugins[1].describe() == "postgresql:/tmp:5433"
    q = quiescer_for("postgresql;on_failure=skip")
    assert q.on_failure == "skip" and [p.describe() for p in q.plugins] == ["postgresql"]
    assert quiescer_for(None).plugins == () and parse_quiesce("  ").plugins == ()
    for bad in ("postgresql:host", "postgresql:host=a host=b", "script:/a,/b,/c", "sqlite:", "x" * 256):
        with pytest.raises(ValueError):
            parse_quiesce(bad)


def _plugin(cluster: PgCluster, timeout: float = 5.0) -> PostgresqlPlugin:
    return PostgresqlPlugin(
        {"host": str(cluster.dir), "port": str(PORT), "user": SUPERUSER, "dbname": "postgres"}, timeout
    )


def test_the_plugin_checkpoints_and_records_the_quiesce_point(pg_cluster: PgCluster) -> None:
    q = Quiescer([_plugin(pg_cluster)])
    q.prepare()
    assert q.freeze()
    q.thaw()
    assert q.report.ok, q.report.errors
    (note,) = q.report.notes
    assert note.startswith(f"postgresql:{pg_cluster.dir}:{PORT}: quiesce point: WAL ") and "Z" in note
    assert q.report.paused_seconds < 1.0


def test_a_backend_that_stops_answering_fails_the_step_at_its_timeout(pg_cluster: PgCluster) -> None:
    plugin = _plugin(pg_cluster, timeout=1.0)
    plugin.prepare()  # connected, checkpointed
    conn = plugin._conn
    assert conn is not None
    pid = conn.info.backend_pid
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(PluginFailed, match="no answer within 1 s"):
            plugin.freeze()
        assert time.monotonic() - t0 < 3.0
    finally:
        os.kill(pid, signal.SIGCONT)
        plugin.thaw()


@contextlib.contextmanager
def _silent_server(directory: Path) -> Iterator[None]:
    """A Unix socket where PostgreSQL's would be that accepts connections and never answers."""
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(directory / f".s.PGSQL.{PORT}"))
        s.listen(8)
        yield


@pytest.mark.parametrize("on_failure", ["crash", "skip"])
def test_a_server_that_never_answers_fails_within_the_timeout(tmp_path: Path, on_failure: str) -> None:
    with _silent_server(tmp_path):
        q = quiescer_for(f"postgresql:host={tmp_path} port={PORT} user=x;timeout=2;on_failure={on_failure}")
        t0 = time.monotonic()
        if on_failure == "skip":
            with pytest.raises(QuiesceFailed, match="cannot connect"):
                q.prepare()
        else:
            q.prepare()
            assert not q.freeze()
        assert time.monotonic() - t0 < 4.0
    assert not q.report.ok and "prepare failed: cannot connect" in q.report.errors[0]
    assert q.report.frozen_at is None
