"""Disks to mount and a real NBD server to serve them, for the mount and file-restore tests.

Disk images are built in the test's directory with the system's own tools (sfdisk, mkfs.*, a loop
device per partition, mount or ntfs-3g to fill them) and served by ``qemu-nbd``, a reference NBD
server, so these tests depend on nothing of dingyuan but the code under test.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fskit import sh

from dingyuan.exports.mount import mounts, unmount

TOOLS = ("qemu-nbd", "nbdfuse", "fusermount3", "losetup", "sfdisk", "blkid", "mkfs.ext4", "fuser")

needs_mount_tools = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse") or any(shutil.which(t) is None for t in TOOLS),
    reason=f"needs root, /dev/fuse and {', '.join(TOOLS)}",
)

#: what a tree holds: path -> ("file", bytes) | ("dir", b"") | ("link", target)
Tree = dict[str, tuple[str, bytes]]

MKFS = {
    "ext4": ["mkfs.ext4", "-q", "-F", "-E", "nodiscard"],
    "xfs": ["mkfs.xfs", "-q", "-f", "-K"],
    "btrfs": ["mkfs.btrfs", "-q", "-f", "-K"],
    "ntfs": ["mkntfs", "-q", "-Q", "-F"],
    "swap": ["mkswap", "-q"],
}

#: the smallest filesystem each mkfs accepts, in MiB
MIN_MIB = {"xfs": 300, "btrfs": 120}


def need_tool(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"needs {tool}")


# contents ---------------------------------------------------------------------------------------
def populate(root: Path, seed: int) -> Tree:
    """Fill ``root`` with files of known content: random bytes (one odd-sized, larger than a
    chunk), a directory tree with an empty directory, and a relative symlink. Returns the tree."""
    rng = random.Random(seed)
    files = {
        "data.bin": rng.randbytes(1_234_567),
        "tree/a/notes.txt": f"seed {seed}\n".encode() * 100,
        "tree/a/b/deep.bin": rng.randbytes(70_001),
        "tree/c.bin": rng.randbytes(4096),
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "tree/empty").mkdir()
    (root / "tree/link").symlink_to("a/notes.txt")
    return read_tree(root)


def read_tree(root: Path) -> Tree:
    """Everything under ``root`` (``lost+found`` and NTFS's system files excluded)."""
    tree: Tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        dirnames[:] = [
            d for d in dirnames if not (base == root and d in ("lost+found", "System Volume Information"))
        ]
        for name in dirnames + filenames:
            path = base / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                tree[rel] = ("link", os.readlink(path).encode())
            elif path.is_dir():
                tree[rel] = ("dir", b"")
            else:
                tree[rel] = ("file", path.read_bytes())
    return tree


# disks ------------------------------------------------------------------------------------------
@dataclass
class Disk:
    image: Path
    #: partition number (0: the whole disk) -> the tree written into its filesystem
    trees: dict[int, Tree]


def make_disk(
    image: Path, table: str | None, filesystems: list[str], seed: int = 0, live_copy: bool = False
) -> Disk:
    """An image holding ``filesystems`` in partitions of an MBR (``table="dos"``) or GPT
    (``"gpt"``) table, or one filesystem on the whole disk (``table=None``), each but swap filled
    by :func:`populate`. ``live_copy``: the image is copied while its (last) filesystem is mounted,
    after every file was fsync'ed but before the filesystem wrote its metadata in place, like a
    crash-consistent snapshot of a running machine: its journal must be replayed to see the files."""
    sizes = [max(64, MIN_MIB.get(fs, 0)) for fs in filesystems]
    with open(image, "wb") as f:
        f.truncate((sum(sizes) + 4) << 20)
    if table is None:
        assert len(filesystems) == 1
        ranges = [(0, 0, os.path.getsize(image))]
    else:
        script = f"label: {table}\n" + "".join(f"size={s}MiB\n" for s in sizes)
        subprocess.run(["sfdisk", "-q", str(image)], input=script.encode(), check=True, capture_output=True)
        parts = json.loads(sh("sfdisk", "--json", image))["partitiontable"]["partitions"]
        ranges = [(n, p["start"] * 512, p["size"] * 512) for n, p in enumerate(parts, 1)]
    trees = {}
    for (number, offset, size), fstype in zip(ranges, filesystems, strict=True):
        with loop_device(image, offset, size) as dev:
            sh(*MKFS[fstype], dev)
            if fstype != "swap":
                with mounted_device(dev, image.parent / f"fill-{number}", fstype) as mnt:
                    trees[number] = populate(mnt, seed + number)
                    if live_copy:
                        fsync_tree(mnt)
                        shutil.copyfile(image, image.with_suffix(".live"))
    if live_copy:
        os.replace(image.with_suffix(".live"), image)
    return Disk(image, trees)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (each one a journal commit, not a sync of
    the whole filesystem, which would also write the metadata in place)."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in [*filenames, "."]:
            path = Path(dirpath, name)
            if not path.is_symlink():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)


@contextlib.contextmanager
def loop_device(image: Path, offset: int, size: int, read_only: bool = False) -> Iterator[str]:
    ro = ["--read-only"] if read_only else []
    dev = sh(
        "losetup", "--find", "--show", *ro, "--offset", str(offset), "--sizelimit", str(size), image
    ).strip()
    try:
        yield dev
    finally:
        sh("losetup", "-d", dev)


@contextlib.contextmanager
def mounted_device(dev: str, mountpoint: Path, fstype: str, options: str = "rw") -> Iterator[Path]:
    mountpoint.mkdir(exist_ok=True)
    if fstype == "ntfs":
        sh("ntfs-3g", "-o", options, dev, mountpoint)
    else:
        sh("mount", "-o", options, dev, mountpoint)
    try:
        yield mountpoint
    finally:
        sh("umount", mountpoint)
        if fstype == "ntfs":  # ntfs-3g closes the device when its daemon exits
            deadline = time.monotonic() + 10
            while subprocess.run(["fuser", "-s", dev], check=False).returncode == 0:
                assert time.monotonic() < deadline, f"{dev} still open after unmounting ntfs-3g"
                time.sleep(0.05)
        mountpoint.rmdir()


def partition_range(image: Path, number: int) -> tuple[int, int]:
    parts = json.loads(sh("sfdisk", "--json", image))["partitiontable"]["partitions"]
    return parts[number - 1]["start"] * 512, parts[number - 1]["size"] * 512


# the NBD server ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def nbd_server(image: Path, read_only: bool = False, name: str = "disk") -> Iterator[str]:
    """Serve ``image`` with qemu-nbd on 127.0.0.1; yields its URI."""
    port = free_port()
    argv = ["qemu-nbd", "-f", "raw", "-t", "-p", str(port), "-b", "127.0.0.1", "-x", name, str(image)]
    if read_only:
        argv.append("-r")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, f"qemu-nbd exited: {proc.stderr.read() if proc.stderr else ''!r}"
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "qemu-nbd does not listen"
            time.sleep(0.05)
        yield f"nbd://127.0.0.1:{port}/{name}"
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stderr:
            proc.stderr.close()


# what is left -----------------------------------------------------------------------------------
def leftovers(base: Path) -> list[str]:
    """Mounts, loop devices and processes still using anything under ``base``."""
    found = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(base) in line]
    out = sh("losetup", "--list", "--json").strip()
    if out:
        found += [
            f"loop {d['name']} -> {d['back-file']}"
            for d in json.loads(out)["loopdevices"]
            if str(base) in (d.get("back-file") or "")
        ]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if cmdline.startswith("nbdfuse") and str(base) in cmdline:
                stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
                if stat != "Z":
                    found.append(f"process {pid}: {cmdline}")
    return found


def unmounting(state: Path) -> Iterator[Path]:
    """For a test's ``state_dir`` fixture: yields ``state``, then unmounts whatever a failing test
    left mounted there."""
    yield state
    if state.exists():
        for info in mounts(state):
            unmount(info.target, state_dir=state)
