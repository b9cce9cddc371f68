"""The agent's runs take a true point in time: a disk image on XFS, itself loop-mounted with a
writer appending fsync'ed records, is backed up through the vault's Ingest with the policy's
consistency "auto". The snapshot is labelled filesystem-consistent by the reflink provider, the
writer paused for well under a second, and the restored image is a clean ext4 whose records are a
gap-free prefix holding every record durable before the point in time."""

from __future__ import annotations

import time
from pathlib import Path

from fskit import WRITER, Stack, Writer, debugfs_cat, e2fsck_clean, max_gap, needs_root

from dingyuan.agent.runner import RunSpec, run_backup
from dingyuan.repository.repo import Repository
from dingyuan.repository.restore import restore
from dingyuan.vault.ingest import Ingest
from transferkit import DirectClient

pytestmark = needs_root


def test_an_agent_run_of_a_mounted_image_is_a_filesystem_consistent_point_in_time(
    xfs_stack: Stack, repo_local: Repository, tmp_path: Path
) -> None:
    client = DirectClient(Ingest(repo_local, tmp_path / "spool"))
    state = tmp_path / "agent"
    spec = RunSpec(volume="disk0", source=str(xfs_stack.image), chunk_size=64 << 10, consistency="auto")
    with Writer(WRITER, xfs_stack.inner / "records", tmp_path / "w.log") as w:
        w.wait_for(200)
        snaps = []
        for _ in range(2):  # a full and an incremental run
            t0 = time.monotonic()
            snaps.append((t0, run_backup(client, repo_local.cipher.id_key, state, spec).snapshot))  # type: ignore[arg-type]
            t1 = time.monotonic()
            assert max_gap(w.entries(), t0, t1) < 1.0, "the writer waited a second or more"
            w.wait_for(len(w.entries()) + 50)  # thawed: the writer goes on
        entries = w.entries()
    for t0, doc in snaps:
        snap = repo_local.read_snapshot(doc["id"])
        assert snap.consistency == "filesystem"
        assert snap.stats["consistency_provider"] == "reflink"
        assert 0 <= snap.stats["paused_ms"] < 1000
        assert snap.source == str(xfs_stack.image)
        out = tmp_path / f"restored-{snap.id[:8]}.img"
        restore(repo_local, snap, str(out), fsync=False)
        ok, report = e2fsck_clean(out)
        assert ok, report
        records = debugfs_cat(out, "/records").split(b"\n")
        assert records[-1] == b"", "a torn record"
        assert records[:-1] == [b"%08d" % i for i in range(len(records) - 1)]
        durable_before = [n for n, t in entries if t < t0]
        assert len(records) - 1 > max(durable_before), "a record durable before the run is missing"
    assert not list(xfs_stack.image.parent.glob(".disk.img*")), "a clone was left behind"
