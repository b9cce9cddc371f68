"""End to end: a vault and two agents on loopback, each protecting two image files under a
10-second policy while a writer changes them. Every snapshot must restore bit-exact to a state
the image really held (the writer records the SHA-256 of each state it makes). And a vault applies
each volume's policy after every commit: lock-for, then retention."""

from __future__ import annotations

import os
import random
import threading
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path

import pytest
from protectkit import Agent, Vault, replace_atomically, sha256_file, wait_for
from sqlalchemy import select
from sqlalchemy.orm import Session

from dingyuan.catalog.db import open_catalog, sqlite_url
from dingyuan.catalog.models import Host, Volume
from dingyuan.catalog.models import Snapshot as CatalogSnapshot
from dingyuan.catalog.rebuild import rebuild_catalog
from dingyuan.repository.backends.local import LocalBackend
from dingyuan.repository.repo import Repository
from dingyuan.repository.restore import restore

HOSTS = ("web1", "db1")
VOLUMES = ("disk0", "disk1")
IMAGE = 8 << 20
BLOCK = 4096


def _scribble(rnd: random.Random) -> callable:  # type: ignore[valid-type]
    def change(path: Path) -> None:
        with open(path, "r+b") as f:
            for _ in range(rnd.randrange(1, 64)):
                f.seek(rnd.randrange(IMAGE // BLOCK) * BLOCK)
                f.write(
                    rnd.randbytes(BLOCK) if rnd.random() < 0.7 else (b"log line %d\n" % rnd.random()) * 200
                )

    return change


@pytest.mark.slow
def test_two_agents_protect_four_changing_images_and_every_snapshot_restores_bit_exact(
    tmp_path: Path,
) -> None:
    vault = Vault(tmp_path)
    vault.start()
    agents: list[Agent] = []
    states: dict[tuple[str, str], set[str]] = {}
    images: dict[tuple[str, str], Path] = {}
    stop = threading.Event()
    try:
        vault.policy("every-10s", schedule="interval", interval_seconds=10, chunk_size=16384)
        for host in HOSTS:
            agent = Agent(tmp_path, vault, host)
            agents.append(agent)
            for vol in VOLUMES:
                img = tmp_path / f"{host}-{vol}.img"
                rnd = random.Random(f"{host}/{vol}")
                img.write_bytes(rnd.randbytes(IMAGE // 2) + bytes(IMAGE // 2))
                images[(host, vol)] = img
                states[(host, vol)] = {sha256_file(img)}
                vault.protect(host, vol, img, "every-10s")

        def writer() -> None:
            rnd = random.Random(7)
            while not stop.is_set():
                key = rnd.choice(sorted(images))
                states[key].add(replace_atomically(images[key], _scribble(rnd)))
                stop.wait(rnd.uniform(0.05, 0.4))

        w = threading.Thread(target=writer, daemon=True)
        w.start()
        for agent in agents:
            agent.start()
        # three policy periods: every volume gets a full and at least two incremental snapshots
        wait_for(
            "three snapshots of every volume",
            lambda: all(len(vault.snapshots(h, v)) >= 3 for h in HOSTS for v in VOLUMES),
            timeout=120,
            step=1,
        )
        stop.set()
        w.join()
        for agent in agents:
            agent.stop()
        listed = {(h, v): vault.snapshots(h, v) for h in HOSTS for v in VOLUMES}
    finally:
        stop.set()
        for agent in agents:
            agent.kill()
        vault.stop()

    repo = Repository.open(LocalBackend(vault.dir / "repository"), b"protect-test", tmp_path / "check-cache")
    try:
        ids = {s.id for s in repo.snapshots()}
        # the catalog rebuilt from the repository alone lists the same snapshots with the same ids
        engine = open_catalog(sqlite_url(tmp_path / "rebuilt.sqlite"))
        try:
            rebuild_catalog(repo, engine)
            with Session(engine) as s:
                rebuilt = {
                    (h, v, sid)
                    for sid, v, h in s.execute(
                        select(CatalogSnapshot.id, Volume.name, Host.name)
                        .join(Volume, CatalogSnapshot.volume_id == Volume.id)
                        .join(Host, Volume.host_id == Host.id)
                    )
                }
        finally:
            engine.dispose()
        assert rebuilt == {(h, v, snap["id"]) for (h, v), snaps in listed.items() for snap in snaps}
        assert {sid for _, _, sid in rebuilt} == ids
        for (host, vol), snaps in listed.items():
            assert len(snaps) >= 3, (host, vol)
            assert len({snap.get("parent") for snap in snaps}) == len(snaps), "incrementals chain"
            for snap in snaps:
                assert snap["id"] in ids
                out = tmp_path / "restored.img"
                restore(repo, repo.read_snapshot(snap["id"]), str(out), fsync=False)
                assert sha256_file(out) in states[(host, vol)], f"snapshot {snap['id']} of {host}:{vol}"
    finally:
        repo.close()


@pytest.mark.slow
def test_the_policy_locks_new_snapshots_and_forgets_old_ones(tmp_path: Path) -> None:
    """After each commit the vault applies the volume's policy: the new snapshot is locked for
    ``lock_for_seconds`` and retention forgets what ``keep_last`` does not keep (never a locked one)."""
    vault = Vault(tmp_path)
    vault.start()
    agent: Agent | None = None
    try:
        vault.policy("keep2", schedule="interval", interval_seconds=3600, retention={"keep_last": 2})
        vault.policy(
            "locked",
            schedule="interval",
            interval_seconds=3600,
            retention={"keep_last": 1},
            lock_for_seconds=3600,
        )
        agent = Agent(tmp_path, vault, "web1")
        vids = {}
        for vol, policy in (("kept", "keep2"), ("locked", "locked")):
            img = tmp_path / f"{vol}.img"
            img.write_bytes(os.urandom(1 << 20))
            vids[vol] = vault.protect("web1", vol, img, policy)
        agent.start()
        for run in range(4):
            for vol, vid in vids.items():
                wait_for(f"{vol} run {run}", partial(_ran, vault, vid, run + 1), timeout=60, step=0.2)
                replace_atomically(tmp_path / f"{vol}.img", lambda p: p.write_bytes(os.urandom(1 << 20)))
                r = vault.api.post(f"/volumes/{vid}/run")
                assert r.status_code == 202, r.text
        for vol, vid in vids.items():
            wait_for(f"{vol} run 5", partial(_ran, vault, vid, 5), timeout=60, step=0.2)
        kept = wait_for(
            "retention",
            lambda: len(vault.snapshots("web1", "kept")) == 2 and vault.snapshots("web1", "kept"),
            timeout=30,
        )
        locked = vault.snapshots("web1", "locked")
    finally:
        if agent is not None:
            agent.kill()
        vault.stop()
    assert len(locked) == 5, "a locked snapshot was forgotten"
    for snap in locked:
        until = datetime.fromisoformat(snap["retention_until"])
        assert until - datetime.fromisoformat(snap["time"]) >= timedelta(minutes=59)
    repo = Repository.open(LocalBackend(vault.dir / "repository"), b"protect-test", tmp_path / "check-cache")
    try:
        in_repo = {(s.volume, s.id) for s in repo.snapshots()}
        assert {("kept", s["id"]) for s in kept} | {("locked", s["id"]) for s in locked} == in_repo
    finally:
        repo.close()


def _ran(vault: Vault, volume_id: int, count: int) -> bool:
    jobs = vault.call("GET", "/jobs", params={"volume": volume_id})
    return sum(j["kind"] == "backup" and j["state"] == "succeeded" for j in jobs) >= count
