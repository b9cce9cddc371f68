"""Real filesystems for the consistency tests: loop-mounted images, a writer of numbered records.

Everything is undone in ``finally``: filesystems are thawed (whoever froze them), unmounted and
their loop devices detached, so a failing test leaves nothing frozen or mounted behind.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dingyuan.agent.consistency.linux import thaw_mountpoint

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("losetup") is None, reason="needs root and loop devices"
)


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def sh(*argv: str | Path) -> str:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))}: {done.returncode}: {done.stderr or done.stdout}")
    return done.stdout


def make_fs(image: Path, size: int, fstype: str) -> None:
    with open(image, "wb") as f:
        f.truncate(size)
    if fstype == "ext4":
        sh("mkfs.ext4", "-q", "-F", "-E", "nodiscard", image)
    elif fstype == "xfs":
        sh("mkfs.xfs", "-q", "-f", "-m", "reflink=1", image)
    elif fstype == "btrfs":
        sh("mkfs.btrfs", "-q", "-f", image)
    else:
        raise ValueError(fstype)


@contextlib.contextmanager
def loop_mount(image: Path, mountpoint: Path) -> Iterator[str]:
    """Attach ``image`` to a loop device and mount it on ``mountpoint``; yields the device."""
    dev = sh("losetup", "--find", "--show", image).strip()
    try:
        mountpoint.mkdir(parents=True, exist_ok=True)
        sh("mount", dev, mountpoint)
        try:
            yield dev
        finally:
            with contextlib.suppress(OSError):
                thaw_mountpoint(mountpoint)
            if subprocess.run(["umount", str(mountpoint)], capture_output=True, check=False).returncode:
                time.sleep(0.5)
                subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, check=False)
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)


@dataclass
class Stack:
    """An outer filesystem (``outer``, mounted) holding ``image``, an ext4 image that is itself
    loop-mounted on ``inner``."""

    outer: Path
    image: Path
    inner: Path
    inner_dev: str


@contextlib.contextmanager
def image_stack(base: Path, outer_fs: str, inner_size: int = 64 << 20) -> Iterator[Stack]:
    outer_img = base / f"{outer_fs}.img"
    make_fs(outer_img, max(320 << 20, 2 * inner_size), outer_fs)  # mkfs.xfs wants at least 300 MiB
    with loop_mount(outer_img, base / "outer"):
        image = base / "outer" / "disk.img"
        make_fs(image, inner_size, "ext4")
        with loop_mount(image, base / "inner") as dev:
            yield Stack(base / "outer", image, base / "inner", dev)


WRITER = r"""
import os, sys, time
path, log = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
with open(log, "w", buffering=1) as out:
    n = 0
    while True:
        os.write(fd, b"%08d\n" % n)
        os.fsync(fd)
        out.write(f"{n} {time.monotonic()}\n")
        n += 1
        time.sleep(0.002)
"""

SQLITE_WRITER = r"""
import sqlite3, sys, time
path, log = sys.argv[1], sys.argv[2]
clock = time.time if sys.argv[3:] == ["wall"] else time.monotonic  # wall: compared with the snapshot's notes
db = sqlite3.connect(path, timeout=60, isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, payload BLOB)")
db.execute("CREATE TABLE IF NOT EXISTS counter (n INTEGER)")
if db.execute("SELECT count(*) FROM counter").fetchone()[0] == 0:
    db.execute("INSERT INTO counter VALUES (-1)")
with open(log, "w", buffering=1) as out:
    n = 0
    while True:
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO t VALUES (?, randomblob(200))", (n,))
        db.execute("UPDATE counter SET n = ?", (n,))
        db.execute("COMMIT")
        out.write(f"{n} {clock()}\n")
        n += 1
        time.sleep(0.001)  # a steady load, not a flood that could fill the small image
"""


class Writer:
    """A process that keeps writing (``script`` with a target and a log of ``n monotonic-time``
    lines, one per durable record or committed transaction; ``args`` go to the script, e.g.
    ``"wall"``: the SQLite writer logs wall-clock times)."""

    def __init__(self, script: str, target: Path, log: Path, *args: str) -> None:
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-c", script, str(target), str(log), *args])

    def entries(self) -> list[tuple[int, float]]:
        out = []
        with contextlib.suppress(FileNotFoundError):
            for line in self.log.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2:
                    out.append((int(parts[0]), float(parts[1])))
        return out

    def wait_for(self, count: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.entries()) < count:
            assert self.proc.poll() is None, "the writer died"
            assert time.monotonic() < deadline, (
                f"the writer wrote {len(self.entries())} < {count} in {timeout} s"
            )
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def max_gap(entries: list[tuple[int, float]], start: float, end: float) -> float:
    """The longest time between two consecutive records around [start, end]."""
    times = [t for _, t in entries]
    gaps = [b - a for a, b in itertools.pairwise(times) if b >= start and a <= end]
    return max(gaps, default=0.0)


def debugfs_cat(image: Path, path: str) -> bytes:
    return subprocess.run(
        ["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, check=True
    ).stdout


def debugfs_dump(image: Path, path: str, dest: Path) -> bool:
    subprocess.run(["debugfs", "-R", f"dump {path} {dest}", str(image)], capture_output=True, check=True)
    return dest.exists() and (dest.stat().st_size > 0 or path.endswith("-wal"))


def e2fsck_clean(image: Path) -> tuple[bool, str]:
    done = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True, check=False)
    return done.returncode == 0, done.stdout + done.stderr


def writable_within(directory: Path, seconds: float) -> bool:
    """Whether a small durable write in ``directory`` completes within ``seconds`` (a frozen
    filesystem blocks it; the thread finishes once the filesystem is thawed)."""
    done = threading.Event()

    def probe() -> None:
        fd = os.open(directory / f"probe-{time.monotonic_ns()}", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.write(fd, b"x")
            os.fsync(fd)
        finally:
            os.close(fd)
        done.set()

    threading.Thread(target=probe, daemon=True).start()
    return done.wait(seconds)


@pytest.fixture
def xfs_stack(tmp_path: Path) -> Iterator[Stack]:
    """An XFS filesystem holding a loop-mounted ext4 image (see :func:`image_stack`)."""
    if not have("mkfs.xfs"):
        pytest.skip("needs xfsprogs")
    with image_stack(tmp_path, "xfs") as st:
        yield st
