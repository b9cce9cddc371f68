"""Mounting NBD exports (served by qemu-nbd) through nbdfuse, loop devices and partition tables:
the files read back, read-only mounts leave the export's bytes alone, writable ones persist and
keep the filesystem clean, and an interrupted mount can always be undone."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from fskit import debugfs_cat, e2fsck_clean, have, loop_mount, sh
from helpers import sha256_file
from mountkit import (
    Disk,
    free_port,
    leftovers,
    loop_device,
    make_disk,
    mounted_device,
    nbd_server,
    need_tool,
    needs_mount_tools,
    partition_range,
    read_tree,
    unmounting,
)

from dingyuan.errors import MountError
from dingyuan.exports.mount import mount, mounts, partitions, unmount

pytestmark = needs_mount_tools


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    yield from unmounting(tmp_path / "state")


def mount_options(target: Path) -> list[str]:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(target):
            return fields[5].split(",")
    raise AssertionError(f"{target} is not mounted")


def check_read_only(uri: str, tmp_path: Path, disk: Disk, partition: int | None, tree_of: int) -> None:
    """Mount read-only, compare the tree, check writes fail, unmount, check nothing is left."""
    state, target = tmp_path / "state", tmp_path / "mnt"
    target.mkdir(exist_ok=True)
    info = mount(uri, target, partition=partition, state_dir=state)
    try:
        assert info.complete and not info.writable
        assert "ro" in mount_options(target)
        assert read_tree(target) == disk.trees[tree_of]
        with pytest.raises(OSError) as e:
            (target / "new-file").write_bytes(b"x")
        assert e.value.errno == errno.EROFS
    finally:
        assert unmount(target, state_dir=state) == info
    assert leftovers(tmp_path) == []
    assert list(state.iterdir()) == []


@pytest.mark.parametrize("fstype", ["ext4", "xfs", "btrfs"])
def test_whole_disk_filesystem_read_only_leaves_the_export_unchanged(tmp_path: Path, fstype: str) -> None:
    need_tool(f"mkfs.{fstype}")
    disk = make_disk(tmp_path / "disk.img", None, [fstype], seed=1)
    before = sha256_file(disk.image)
    with nbd_server(disk.image) as uri:  # the server would accept writes: the mount must not send any
        check_read_only(uri, tmp_path, disk, None, tree_of=0)
    assert sha256_file(disk.image) == before


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_crash_consistent_snapshot_shows_its_journalled_files(tmp_path: Path, fstype: str) -> None:
    """A copy of a mounted filesystem holds fsync'ed files only in its journal: a read-only mount
    replays the journal (into a throw-away overlay) and shows them, and the export is unchanged."""
    need_tool(f"mkfs.{fstype}")
    disk = make_disk(tmp_path / "disk.img", None, [fstype], seed=10, live_copy=True)
    if fstype == "ext4":
        assert "needs_recovery" in sh("dumpe2fs", "-h", disk.image)
    before = sha256_file(disk.image)
    with nbd_server(disk.image) as uri:
        check_read_only(uri, tmp_path, disk, None, tree_of=0)
    assert sha256_file(disk.image) == before


def test_xfs_snapshot_mounts_next_to_its_original(tmp_path: Path, state_dir: Path) -> None:
    """A snapshot has its filesystem's UUID, which XFS refuses to mount twice without nouuid."""
    need_tool("mkfs.xfs")
    disk = make_disk(tmp_path / "disk.img", None, ["xfs"], seed=12)
    original = tmp_path / "original.img"
    shutil.copyfile(disk.image, original)
    target = tmp_path / "mnt"
    target.mkdir()
    with loop_mount(original, tmp_path / "original"), nbd_server(disk.image) as uri:
        mount(uri, target, state_dir=state_dir)
        assert read_tree(target) == disk.trees[0]
        unmount(target, state_dir=state_dir)
    assert leftovers(tmp_path) == []


def test_mbr_disk_mounts_its_only_filesystem(tmp_path: Path, state_dir: Path) -> None:
    disk = make_disk(tmp_path / "disk.img", "dos", ["swap", "ext4"], seed=2)
    before = sha256_file(disk.image)
    found = partitions(disk.image)
    assert [(p.number, p.type, p.fstype) for p in found] == [(1, "83", "swap"), (2, "83", "ext4")]
    assert (found[1].start, found[1].size) == partition_range(disk.image, 2)
    with nbd_server(disk.image, read_only=True) as uri:
        check_read_only(uri, tmp_path, disk, None, tree_of=2)  # swap is not a filesystem: partition 2
        with pytest.raises(MountError, match=r"partition 1 holds swap.*1: 64\.0 MiB swap; 2: 64\.0 MiB ext4"):
            mount(uri, tmp_path / "mnt", partition=1, state_dir=state_dir)
        with pytest.raises(MountError, match=r"no partition 3"):
            mount(uri, tmp_path / "mnt", partition=3, state_dir=state_dir)
    assert leftovers(tmp_path) == []
    assert sha256_file(disk.image) == before


def test_gpt_disk_with_two_filesystems_needs_a_partition_number(tmp_path: Path, state_dir: Path) -> None:
    need_tool("mkfs.xfs")
    disk = make_disk(tmp_path / "disk.img", "gpt", ["ext4", "xfs"], seed=3)
    (tmp_path / "mnt").mkdir()
    before = sha256_file(disk.image)
    with nbd_server(disk.image) as uri:
        with pytest.raises(MountError) as e:
            mount(uri, tmp_path / "mnt", state_dir=state_dir)
        assert "several partitions" in str(e.value)
        assert "1: 64.0 MiB ext4; 2: 300.0 MiB xfs" in str(e.value)
        assert "--partition N" in str(e.value)
        assert leftovers(tmp_path) == []
        for number in (1, 2):
            check_read_only(uri, tmp_path, disk, number, tree_of=number)
    assert sha256_file(disk.image) == before


def test_ntfs_partition_read_only_and_writable(tmp_path: Path, state_dir: Path) -> None:
    for tool in ("mkntfs", "ntfs-3g", "ntfsfix"):
        need_tool(tool)
    disk = make_disk(tmp_path / "disk.img", "gpt", ["ntfs"], seed=4)
    before = sha256_file(disk.image)
    target = tmp_path / "mnt"
    with nbd_server(disk.image) as uri:
        check_read_only(uri, tmp_path, disk, None, tree_of=1)
        assert sha256_file(disk.image) == before
        target.mkdir(exist_ok=True)
        info = mount(uri, target, writable=True, state_dir=state_dir)
        assert info.fstype == "ntfs" and info.partition == 1
        (target / "tree/written.txt").write_bytes(b"written through the export\n")
        unmount(target, state_dir=state_dir)
    assert leftovers(tmp_path) == []
    offset, size = partition_range(disk.image, 1)
    with loop_device(disk.image, offset, size, read_only=True) as dev:
        clean = subprocess.run(["ntfsfix", "-n", dev], capture_output=True, text=True, check=False)
        assert clean.returncode == 0, clean.stdout + clean.stderr
        with mounted_device(dev, tmp_path / "check", "ntfs", "ro") as mnt:
            assert (mnt / "tree/written.txt").read_bytes() == b"written through the export\n"
            assert (mnt / "data.bin").read_bytes() == disk.trees[1]["data.bin"][1]


def test_writable_ext4_mount_persists_and_stays_clean(tmp_path: Path, state_dir: Path) -> None:
    disk = make_disk(tmp_path / "disk.img", None, ["ext4"], seed=5)
    target = tmp_path / "mnt"
    target.mkdir()
    payload = os.urandom(300_000)
    with nbd_server(disk.image) as uri:
        info = mount(uri, target, writable=True, state_dir=state_dir)
        assert info.writable and "rw" in mount_options(target)
        (target / "tree/new.bin").write_bytes(payload)
        unmount(target, state_dir=state_dir)
        assert leftovers(tmp_path) == []
        ok, report = e2fsck_clean(disk.image)  # while the server runs: unmounting sent everything
        assert ok, report
        assert debugfs_cat(disk.image, "/tree/new.bin") == payload


def test_writable_mount_of_a_read_only_export_is_refused(tmp_path: Path, state_dir: Path) -> None:
    disk = make_disk(tmp_path / "disk.img", None, ["ext4"], seed=6)
    (tmp_path / "mnt").mkdir()
    refused = pytest.raises(MountError, match="the export is read-only: mount it without --rw")
    with nbd_server(disk.image, read_only=True) as uri, refused:
        mount(uri, tmp_path / "mnt", writable=True, state_dir=state_dir)
    assert leftovers(tmp_path) == []
    assert list(state_dir.iterdir()) == []


def test_a_failed_mount_undoes_every_step(tmp_path: Path, state_dir: Path) -> None:
    image = tmp_path / "damaged.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    sh("mkfs.ext4", "-q", "-F", "-b", "4096", image)
    with open(image, "r+b") as f:  # the group descriptors: blkid still sees ext4, the kernel refuses it
        f.seek(4096)
        f.write(bytes(4096))
    (tmp_path / "mnt").mkdir()
    refused = pytest.raises(MountError, match=r"Cannot mount ext4 on .*Structure needs cleaning.*dmesg")
    with nbd_server(image) as uri, refused:
        mount(uri, tmp_path / "mnt", state_dir=state_dir)
    assert leftovers(tmp_path) == []
    assert list(state_dir.iterdir()) == []


def test_unreachable_server_reports_nbdfuse_error(tmp_path: Path, state_dir: Path) -> None:
    (tmp_path / "mnt").mkdir()
    with pytest.raises(MountError, match=r"nbdfuse exited .*(refused|connect)"):
        mount(f"nbd://127.0.0.1:{free_port()}/disk", tmp_path / "mnt", state_dir=state_dir)
    assert leftovers(tmp_path) == []
    assert list(state_dir.iterdir()) == []


def test_busy_mount_names_the_process_and_can_be_unmounted_later(tmp_path: Path, state_dir: Path) -> None:
    disk = make_disk(tmp_path / "disk.img", None, ["ext4"], seed=7)
    target = tmp_path / "mnt"
    target.mkdir()
    with nbd_server(disk.image, read_only=True) as uri:
        mount(uri, target, state_dir=state_dir)
        with open(target / "data.bin", "rb"):
            with pytest.raises(MountError, match=rf"busy: .*\(pid {os.getpid()}\)"):
                unmount(target, state_dir=state_dir)
            assert read_tree(target) == disk.trees[0]  # still mounted, still recorded
            assert [m.target for m in mounts(state_dir)] == [target]
        assert unmount(target, state_dir=state_dir) is not None
        assert unmount(target, state_dir=state_dir) is None  # a second call has nothing to do
    assert leftovers(tmp_path) == []


CRASHING_MOUNT = """
import os, sys
from pathlib import Path
from dingyuan.exports import mount as m

uri, target, state, crash_after = sys.argv[1:]
if crash_after == "loop":  # die after attaching the loop device, before recording it
    attach = m._attach_loop
    def attach_and_die(info):
        attach(info)
        os._exit(9)
    m._attach_loop = attach_and_die
m.mount(uri, Path(target), state_dir=Path(state))
os._exit(0)  # a CLI that mounted and exited: nbdfuse keeps running
"""


@pytest.mark.parametrize("crash_after", ["loop", "mount"])
def test_unmount_after_the_mounting_process_died(tmp_path: Path, crash_after: str, state_dir: Path) -> None:
    disk = make_disk(tmp_path / "disk.img", None, ["ext4"], seed=8)
    target = tmp_path / "mnt"
    target.mkdir()
    with nbd_server(disk.image) as uri:
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                textwrap.dedent(CRASHING_MOUNT),
                uri,
                str(target),
                str(state_dir),
                crash_after,
            ],
            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == (9 if crash_after == "loop" else 0), done.stderr
        (recorded,) = mounts(state_dir)
        assert recorded.complete == (crash_after == "mount")
        assert recorded.loop_device is None if crash_after == "loop" else recorded.loop_device
        assert leftovers(tmp_path) != []
        with pytest.raises(MountError, match="unmount it first"):
            mount(uri, target, state_dir=state_dir)
        assert unmount(target, state_dir=state_dir) is not None
        assert leftovers(tmp_path) == []
        assert list(state_dir.iterdir()) == []
        assert not os.path.ismount(target)


def test_unknown_state_version_is_refused(tmp_path: Path, state_dir: Path) -> None:
    target = tmp_path / "mnt"
    disk = make_disk(tmp_path / "disk.img", None, ["ext4"], seed=9)
    target.mkdir()
    with nbd_server(disk.image, read_only=True) as uri:
        mount(uri, target, state_dir=state_dir)
        (state_file,) = state_dir.glob("*.json")
        doc = json.loads(state_file.read_text())
        state_file.write_text(json.dumps(dict(doc, version=99)))
        with pytest.raises(MountError, match="state version 99"):
            unmount(target, state_dir=state_dir)
        state_file.write_text(json.dumps(doc))
        unmount(target, state_dir=state_dir)
    assert leftovers(tmp_path) == []


@pytest.mark.skipif(not have("mkfs.xfs"), reason="needs xfsprogs")
def test_partition_listing_of_a_disk_without_table(tmp_path: Path, state_dir: Path) -> None:
    disk = make_disk(tmp_path / "disk.img", None, ["xfs"])
    assert partitions(disk.image) == []
    with open(tmp_path / "zero.img", "wb") as f:
        f.truncate(8 << 20)
    (tmp_path / "mnt").mkdir()
    refused = pytest.raises(MountError, match="neither a partition table nor a filesystem")
    with nbd_server(tmp_path / "zero.img", read_only=True) as uri, refused:
        mount(uri, tmp_path / "mnt", state_dir=state_dir)
    assert leftovers(tmp_path) == []
