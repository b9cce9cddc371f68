"""The frame of the application-consistency acceptance tests (PostgreSQL, SQLite, ...).

:func:`protect_under_load` runs a real vault and agent (processes) that protect an image with a
policy of ``INTERVAL`` seconds, ``consistency: auto`` and a quiesce setting, for ``seconds``,
while the application's load runs; it samples the RPO (the age of the newest snapshot) every
second. :func:`report` prints and asserts the figures every such test promises (a snapshot per
interval, all ``application``-consistent, pause p95 <= 1 s, RPO <= interval + 10 s), and
:func:`restored` restores snapshots chosen at random (the seed is printed) one after the other.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from protectkit import PASSPHRASE, Agent, Vault, wait_for

from dingyuan.repository.backends.local import LocalBackend
from dingyuan.repository.repo import Repository
from dingyuan.repository.restore import restore

INTERVAL = 10
PROTECT_SECONDS = 120
CHECKED = 3  # snapshots restored and checked
MAX_PAUSE_P95_MS = 1000.0


def choose_seed() -> int:
    """The seed that chooses the snapshots to check (DY_TEST_SEED repeats a run); printed."""
    seed = int(os.environ.get("DY_TEST_SEED", random.randrange(1 << 30)))
    print(f"\nseed {seed} (set DY_TEST_SEED to repeat)")
    return seed


@dataclass
class Protected:
    """What a protected run left: the vault (stopped), its snapshots and the RPO samples."""

    vault: Vault
    snaps: list[dict[str, Any]]
    ages: list[float]


def protect_under_load(
    tmp_path: Path,
    image: Path,
    quiesce: str,
    start_load: Callable[[], None],
    seconds: float = PROTECT_SECONDS,
) -> Protected:
    """Protect ``image`` (a volume ``disk`` of host ``db1``) every INTERVAL seconds for
    ``seconds``, ``start_load`` having been called just before the agent starts. The load is the
    caller's to stop (after this returns, or in its own cleanup when this raises)."""
    vault = Vault(tmp_path)
    agent: Agent | None = None
    ages: list[float] = []
    sampling = threading.Event()
    try:
        vault.start()
        vault.policy(
            "q10s", schedule="interval", interval_seconds=INTERVAL, consistency="auto", quiesce=quiesce
        )
        agent = Agent(tmp_path, vault, "db1")
        vault.protect("db1", "disk", image, "q10s")
        start_load()
        started = time.monotonic()
        agent.start()
        wait_for("the first snapshot", lambda: vault.snapshots("db1", "disk"), 60, step=0.5)

        def sample() -> None:
            while not sampling.wait(1.0):
                with contextlib.suppress(Exception):
                    snaps = vault.snapshots("db1", "disk")
                    newest = max(datetime.fromisoformat(s["time"]).timestamp() for s in snaps)
                    ages.append(time.time() - newest)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        time.sleep(max(0.0, seconds - (time.monotonic() - started)))
        sampling.set()
        sampler.join()
        agent.stop()
        snaps = vault.snapshots("db1", "disk")
        vault.stop()
        return Protected(vault, snaps, ages)
    finally:
        sampling.set()
        if agent is not None:
            agent.kill()
        vault.stop()


def report(run: Protected, plugin: str, transactions: int, seconds: float = PROTECT_SECONDS) -> None:
    """Print the run's figures and assert what every consistency test promises."""
    snaps, ages = run.snaps, run.ages
    paused = sorted(s["stats"]["paused_ms"] for s in snaps)
    p95 = paused[min(len(paused) - 1, int(0.95 * len(paused)))]
    print(
        f"{len(snaps)} snapshots in {seconds:g} s, {transactions} transactions; "
        f"pause ms: median {statistics.median(paused):.1f}, p95 {p95:.1f}, max {paused[-1]:.1f}; "
        f"RPO (age of the newest snapshot, {len(ages)} samples): max {max(ages):.1f} s, "
        f"median {statistics.median(ages):.1f} s"
    )
    assert len(snaps) >= seconds // INTERVAL - 2, "snapshots missing"
    for s in snaps:
        assert s["consistency"] == "application", s
        assert s["stats"]["consistency_provider"] == "reflink"
        assert s["stats"]["quiesce_plugin"].startswith(plugin)
    assert p95 <= MAX_PAUSE_P95_MS, paused
    assert max(ages) <= INTERVAL + 10, ages


def quiesce_note(snap: dict[str, Any], pattern: re.Pattern[str]) -> re.Match[str]:
    """The snapshot's quiesce-point note that ``pattern`` matches."""
    for note in snap["stats"].get("consistency_notes", []):
        m = pattern.search(note)
        if m:
            return m
    raise AssertionError(f"snapshot {snap['id']} records no quiesce point: {snap['stats']}")


def utc_seconds(text: str) -> float:
    """An ISO 8601 UTC time (``...Z``) as seconds since the epoch."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def restored(
    run: Protected, seed: int, base: Path, cache: Path, count: int = CHECKED
) -> Iterator[tuple[dict[str, Any], Path]]:
    """Restore ``count`` snapshots chosen with ``seed``, oldest first, each to an image in
    ``base`` that is removed once the caller moves on."""
    repo = Repository.open(LocalBackend(run.vault.dir / "repository"), PASSPHRASE.encode(), cache)
    try:
        chosen = random.Random(seed).sample(run.snaps, count)
        for i, s in enumerate(sorted(chosen, key=lambda s: s["time"])):
            out = base / f"restored-{i}.img"
            restore(repo, repo.read_snapshot(s["id"]), str(out), fsync=False)
            try:
                yield s, out
            finally:
                out.unlink(missing_ok=True)
    finally:
        repo.close()
