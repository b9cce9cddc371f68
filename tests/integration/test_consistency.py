"""Consistency providers and quiesce plugins on real filesystems.

An ext4 image on XFS (or btrfs), loop-mounted, with a writer appending fsync'ed records (or
committing SQLite transactions) while a point in time is taken: the clone must be a clean ext4
holding a gap-free prefix of what was written, the writer paused for well under a second, and
the filesystem thawed afterwards.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fskit import (
    SQLITE_WRITER,
    WRITER,
    Stack,
    Writer,
    debugfs_cat,
    debugfs_dump,
    e2fsck_clean,
    have,
    image_stack,
    loop_mount,
    make_fs,
    max_gap,
    needs_root,
    writable_within,
)

from dingyuan.agent.consistency import ProviderOptions, choose
from dingyuan.agent.consistency.freeze import FreezeProvider
from dingyuan.agent.consistency.reflink import CLONE_MARK, ReflinkProvider
from dingyuan.agent.quiesce import Plugin, Quiescer, SqlitePlugin
from dingyuan.errors import FreezeTimeout, ProviderUnavailable, QuiesceFailed

pytestmark = needs_root


def clones_of(image: Path) -> list[Path]:
    return list(image.parent.glob(f".{image.name}{CLONE_MARK}*"))


def check_records(data: bytes, before: list[tuple[int, float]], since: float) -> int:
    """``data`` is a gap-free prefix of the records; it holds every record durable before
    ``since``; returns how many it holds."""
    lines = data.split(b"\n")
    assert lines[-1] == b"", "a partial record in the clone"
    records = lines[:-1]
    assert records == [b"%08d" % i for i in range(len(records))]
    durable = [n for n, t in before if t < since]
    assert len(records) > max(durable), "a record that was durable before the freeze is missing"
    return len(records)


@pytest.mark.parametrize("outer_fs", ["xfs", "btrfs"])
def test_reflink_freezes_a_loop_mounted_image(tmp_path: Path, outer_fs: str) -> None:
    if not have(f"mkfs.{outer_fs}"):
        pytest.skip(f"needs mkfs.{outer_fs}")
    with image_stack(tmp_path, outer_fs) as st, Writer(WRITER, st.inner / "records", tmp_path / "w.log") as w:
        w.wait_for(200)
        provider = choose("reflink" if outer_fs == "xfs" else "btrfs", st.image)
        t0 = time.monotonic()
        with provider.take(st.image) as pit:
            t1 = time.monotonic()
            assert pit.level == "filesystem" and pit.provider == provider.name and pit.plugin is None
            assert pit.path.parent == st.image.parent and pit.path.name.startswith(".")
            ok, out = e2fsck_clean(pit.path)
            assert ok, out
            data = debugfs_cat(pit.path, "/records")
        assert not pit.path.exists() and not clones_of(st.image)
        n_exit = len(w.entries())
        w.wait_for(n_exit + 50, timeout=10)  # thawed: the writer goes on
        entries = w.entries()
    assert any(f"froze {st.inner}" in n for n in pit.notes)
    held = check_records(data, entries, t0)
    assert held >= 200
    assert pit.paused_seconds < 1.0, pit.paused_seconds
    assert max_gap(entries, t0, t1) < 1.0, "the writer waited a second or more"
    assert pit.stats()["consistency_provider"] == provider.name


def test_an_image_nobody_mounted_is_cloned_without_a_freeze(tmp_path: Path) -> None:
    if not have("mkfs.xfs"):
        pytest.skip("needs xfsprogs")
    outer = tmp_path / "xfs.img"
    make_fs(outer, 320 << 20, "xfs")
    with loop_mount(outer, tmp_path / "outer"):
        image = tmp_path / "outer" / "vm.img"
        image.write_bytes(b"disk" * 4096)
        with ReflinkProvider().take(image) as pit:
            assert pit.level == "crash" and pit.paused_seconds == 0.0
            assert pit.path.read_bytes() == image.read_bytes()
            image.write_bytes(b"new!" * 4096)  # copy-on-write: the clone keeps the old bytes
            assert pit.path.read_bytes() == b"disk" * 4096
        assert not clones_of(image)
        # a clone left by a dead agent is removed by the next run
        stale = image.parent / f".{image.name}{CLONE_MARK}999999999-abcd"
        stale.write_bytes(b"x")
        with ReflinkProvider().take(image):
            assert not stale.exists()


def test_reflink_refuses_a_filesystem_that_cannot_clone(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"  # tmp_path is on ext4 here
    image.write_bytes(b"x" * 4096)
    if ReflinkProvider().check(image) is None:
        pytest.skip("the temporary directory is on a filesystem that clones files")
    with pytest.raises(ProviderUnavailable, match="cannot clone files"):
        choose("reflink", image)
    with pytest.raises(ProviderUnavailable, match="reflink: "):
        choose("auto", image)


class HangingFreeze(Plugin):
    name = "hang"

    def __init__(self) -> None:
        super().__init__(timeout=0.5)
        self.release = threading.Event()
        self.thawed = threading.Event()

    def freeze(self) -> None:
        self.release.wait(30)

    def thaw(self) -> None:
        self.thawed.set()
        self.release.set()


@pytest.mark.parametrize("on_failure", ["crash", "skip"])
def test_a_hanging_plugin_is_thawed_and_the_policy_decides(
    xfs_stack: Stack, tmp_path: Path, on_failure: str
) -> None:
    plugin = HangingFreeze()
    q = Quiescer([plugin], on_failure="crash" if on_failure == "crash" else "skip")
    t0 = time.monotonic()
    with Writer(WRITER, xfs_stack.inner / "records", tmp_path / "w.log") as w:
        w.wait_for(20)
        if on_failure == "skip":
            with pytest.raises(QuiesceFailed, match="hang"), ReflinkProvider().take(xfs_stack.image, q):
                pytest.fail("no point in time after a failed quiesce with on_failure=skip")
        else:
            with ReflinkProvider().take(xfs_stack.image, q) as pit:
                assert pit.level == "crash"
                assert any("freeze failed: no answer after 1 s" in n for n in pit.notes)
                assert pit.plugin == "hang"
        elapsed = time.monotonic() - t0
        assert plugin.thawed.is_set()
        assert elapsed < 3.0
        assert q.report.errors and not q.report.ok
        assert not clones_of(xfs_stack.image)
        assert writable_within(xfs_stack.inner, 5.0)
        n = len(w.entries())
        w.wait_for(n + 10)


class SlowClone(ReflinkProvider):
    def _clone(self, src: Path, dst: Path) -> None:
        time.sleep(2.0)
        super()._clone(src, dst)


def test_the_watchdog_thaws_a_hung_clone(xfs_stack: Stack, tmp_path: Path) -> None:
    provider = SlowClone(ProviderOptions(freeze_timeout=0.5))
    with Writer(WRITER, xfs_stack.inner / "records", tmp_path / "w.log") as w:
        w.wait_for(20)
        result: list[BaseException] = []

        def take() -> None:
            try:
                with provider.take(xfs_stack.image):
                    pass
            except BaseException as e:
                result.append(e)

        t = threading.Thread(target=take)
        t.start()
        time.sleep(0.2)
        n = len(w.entries())
        time.sleep(1.0)  # the clone still sleeps; the watchdog thawed at 0.5 s
        assert len(w.entries()) > n + 5, "the filesystem stayed frozen past the watchdog"
        t.join(10)
        assert not t.is_alive()
    assert len(result) == 1 and isinstance(result[0], FreezeTimeout)
    assert "0.5 s" in str(result[0])
    assert not clones_of(xfs_stack.image)


@pytest.mark.slow
def test_sqlite_plugin_gives_an_application_consistent_clone(xfs_stack: Stack, tmp_path: Path) -> None:
    db = xfs_stack.inner / "app.db"
    with Writer(SQLITE_WRITER, db, tmp_path / "w.log") as w:
        w.wait_for(300)
        plugin = SqlitePlugin(db, timeout=5)
        q = Quiescer([plugin], on_failure="skip")
        with ReflinkProvider().take(xfs_stack.image, q) as pit:
            assert pit.level == "application" and pit.plugin == "sqlite:app.db"
            frozen_at = q.report.frozen_at
            assert frozen_at is not None
            ok, out = e2fsck_clean(pit.path)
            assert ok, out
            got = tmp_path / "restored"
            got.mkdir()
            assert debugfs_dump(pit.path, "/app.db", got / "app.db")
            alone = tmp_path / "alone"
            alone.mkdir()
            (alone / "app.db").write_bytes((got / "app.db").read_bytes())
            debugfs_dump(pit.path, "/app.db-wal", got / "app.db-wal")
        n = len(w.entries())
        w.wait_for(n + 50)  # the writer goes on after the thaw
        entries = w.entries()
    committed = [k for k, t in entries if t < frozen_at]
    assert len(committed) >= 300
    assert plugin.checkpoint is not None and plugin.checkpoint[1] == plugin.checkpoint[2]
    assert pit.paused_seconds < 1.0
    for directory in (got, alone):  # with its -wal file, and the database file alone
        conn = sqlite3.connect(directory / "app.db")
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            count, top = conn.execute("SELECT count(*), max(id) FROM t").fetchone()
            (counter,) = conn.execute("SELECT n FROM counter").fetchone()
            assert count == top + 1 == counter + 1  # whole transactions only
            assert top >= max(committed), "a transaction committed before the freeze is missing"
        finally:
            conn.close()


@pytest.fixture
def mounted_ext4(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    image = tmp_path / "ext4.img"
    make_fs(image, 32 << 20, "ext4")
    with loop_mount(image, tmp_path / "mnt") as dev:
        yield dev, tmp_path / "mnt"


def test_freeze_refuses_up_front_when_the_read_is_too_slow(mounted_ext4: tuple[str, Path]) -> None:
    dev, mnt = mounted_ext4
    slow = ProviderOptions(max_pause=5.0, scan_speed=1 << 20)  # 32 MiB at 1 MiB/s: 32 s
    with pytest.raises(ProviderUnavailable, match=r"too long for the policy's maximum pause of 5 s"):
        choose("freeze", dev, slow)
    with pytest.raises(ProviderUnavailable, match="which the agent writes"):
        choose("freeze", dev, ProviderOptions(keep_writable=(mnt / "state",)))
    assert FreezeProvider().check("/dev/null") is not None
    assert writable_within(mnt, 5.0)


def test_freeze_reads_a_consistent_device(mounted_ext4: tuple[str, Path], tmp_path: Path) -> None:
    dev, mnt = mounted_ext4
    copy = tmp_path / "copy.img"
    with Writer(WRITER, mnt / "records", tmp_path / "w.log") as w:
        w.wait_for(200)
        provider = choose("freeze", dev, ProviderOptions(max_pause=5.0))  # measures the device
        t0 = time.monotonic()
        with provider.take(dev) as pit:
            assert pit.level == "filesystem" and pit.path == Path(dev)
            assert not writable_within(mnt, 0.2), "the filesystem is not frozen"
            with open(pit.path, "rb") as src, open(copy, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
            pit.check()
        t1 = time.monotonic()
        n = len(w.entries())
        w.wait_for(n + 50)
        entries = w.entries()
    ok, out = e2fsck_clean(copy)
    assert ok, out
    check_records(debugfs_cat(copy, "/records"), entries, t0)
    assert 0 < pit.paused_seconds < 5.0
    assert pit.paused_seconds <= t1 - t0


def test_freeze_watchdog_thaws_at_the_maximum_pause(mounted_ext4: tuple[str, Path], tmp_path: Path) -> None:
    dev, mnt = mounted_ext4
    provider = FreezeProvider(ProviderOptions(max_pause=0.5, scan_speed=float(1 << 40)))
    assert provider.check(dev) is None
    t0 = time.monotonic()
    with pytest.raises(FreezeTimeout, match="not committed"), provider.take(dev) as pit:
        time.sleep(0.8)  # a read that takes too long
        assert writable_within(mnt, 2.0), "the watchdog did not thaw"
        with pytest.raises(FreezeTimeout):
            pit.check()
    assert time.monotonic() - t0 < 5
    assert writable_within(mnt, 2.0)
