"""An interrupted ``dingyuan restore`` resumes where its journal says it stopped.

A 256 MiB snapshot (random data and holes) is restored by the CLI in a child process, which is
SIGKILLed once its journal records a given amount as on disk (or as soon as it has a journal at
all). ``dingyuan restore --resume`` must then complete the target bit-exact, report that it
started at the journal's mark, and write (so fetch) nothing before it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import CHUNK, CLI, cli_env, describe, init_repo, run_cli

from dingyuan.repository.backends.local import LocalBackend
from dingyuan.repository.backup import backup
from dingyuan.repository.restore import CHECKPOINT_BYTES
from dingyuan.repository.restore_journal import JournalState, journal_path, read_journal

SIZE = 256 << 20

pytestmark = pytest.mark.slow


@dataclass
class Volume:
    image: bytes
    snapshot: str
    env: dict[str, str]


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Volume:
    """The image (about 70 % random data, the rest holes, in runs of 1 to 24 chunks), backed up."""
    tmp = tmp_path_factory.mktemp("resume")
    rng = random.Random(7)
    parts, pos = [], 0
    while pos < SIZE:
        n = min(SIZE - pos, rng.randint(1, 24) * CHUNK)
        parts.append(os.urandom(n) if rng.random() < 0.7 else bytes(n))
        pos += n
    image = b"".join(parts)
    (tmp / "src.img").write_bytes(image)
    repo = init_repo(LocalBackend(tmp / "repo"), tmp / "cache", pack_size=8 << 20)
    snap = backup(repo, str(tmp / "src.img"), "disk", chunk_size=CHUNK).snapshot
    repo.close()
    (tmp / "src.img").unlink()
    return Volume(image, snap.id, cli_env(tmp / "repo", tmp / "cache"))


def kill_when(proc: subprocess.Popen[str], journal: Path, target: str, done_bytes: int) -> JournalState:
    """SIGKILL ``proc`` as soon as its journal records ``done_bytes`` (0: once it exists)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = read_journal(journal, target) if journal.exists() else None
        if state is not None and state.done * CHUNK >= done_bytes:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return state
        assert proc.poll() is None, "the restore ended before it could be killed"
        time.sleep(0.001)
    raise AssertionError("the restore's journal never got there")


@pytest.mark.parametrize("checkpoints", [0, 1, 2, 3])
def test_a_killed_restore_resumes_without_refetching_what_it_wrote(
    volume: Volume, tmp_path: Path, checkpoints: int
) -> None:
    target = str(tmp_path / "restored.img")
    journal = journal_path(target, tmp_path)  # a regular file's journal lives beside it
    proc = subprocess.Popen(
        [*CLI, "restore", volume.snapshot, target, "--json"],
        env=volume.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        killed_at = kill_when(proc, journal, target, checkpoints * CHECKPOINT_BYTES)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    state = read_journal(journal, target)  # what it said last, perhaps after the poll saw it
    assert state is not None and state.done >= killed_at.done and state.snapshot == volume.snapshot

    other = run_cli(["restore", volume.snapshot[:12], str(tmp_path / "elsewhere.img"), "--json"], volume.env)
    assert other.returncode == 0, describe(other)  # the journal concerns this target only

    proc2 = run_cli(["restore", volume.snapshot, target, "--resume", "--json"], volume.env)
    assert proc2.returncode == 0, describe(proc2)
    stats = json.loads(proc2.stdout)

    assert Path(target).read_bytes() == volume.image
    assert not journal.exists()
    mark = state.done * CHUNK
    assert stats["resumed_at"] == mark and stats["mode"] == "full"
    after = [volume.image[p : p + CHUNK] for p in range(mark, SIZE, CHUNK)]
    data_after = [c for c in after if c.count(0) != len(c)]
    assert stats["bytes_written"] == sum(len(c) for c in data_after)
    assert stats["chunks_fetched"] == len(data_after)  # random data: no two chunks alike
