"""Linux facilities the providers use: mounts, loop devices, FIFREEZE/FITHAW and FICLONE.

Everything is read from ``/proc/self/mountinfo`` and ``/sys/block`` (no command output to
parse); the roots are parameters so tests can point them at recorded trees.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

# <linux/fs.h>: _IOWR('X', 119, int), _IOWR('X', 120, int), _IOW(0x94, 9, int)
FIFREEZE = 0xC0045877
FITHAW = 0xC0045878
FICLONE = 0x40049409

#: filesystems whose files FICLONE can share extents of
REFLINK_FILESYSTEMS = ("xfs", "btrfs", "ocfs2", "bcachefs")

MOUNTINFO = Path("/proc/self/mountinfo")
SYS_BLOCK = Path("/sys/block")


@dataclass(frozen=True)
class Mount:
    """One line of mountinfo: device number, mount point, filesystem type, source."""

    dev: tuple[int, int]
    mountpoint: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \\ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1 : i + 4]) == 3 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts(mountinfo: Path = MOUNTINFO) -> list[Mount]:
    found = []
    for line in mountinfo.read_text().splitlines():
        left, _, right = line.partition(" - ")
        f = left.split()
        r = right.split()
        if len(f) < 5 or len(r) < 2:
            continue
        major, _, minor = f[2].partition(":")
        found.append(Mount((int(major), int(minor)), _unescape(f[4]), r[0], _unescape(r[1])))
    return found


def mount_of(path: str | Path, mountinfo: Path = MOUNTINFO) -> Mount | None:
    """The mount holding ``path`` (the longest mount point that is a prefix of its real path)."""
    real = os.path.realpath(path)
    best: Mount | None = None
    for m in mounts(mountinfo):
        mp = m.mountpoint
        if (real == mp or real.startswith(mp.rstrip("/") + "/")) and (
            best is None or len(mp) >= len(best.mountpoint)
        ):
            best = m
    return best


def mounts_of_device(dev: tuple[int, int], mountinfo: Path = MOUNTINFO) -> list[Mount]:
    return [m for m in mounts(mountinfo) if m.dev == dev]


def block_dev(path: str | Path) -> tuple[int, int] | None:
    """(major, minor) of a block device node, None for anything else."""
    st = os.stat(path)
    if not stat.S_ISBLK(st.st_mode):
        return None
    return os.major(st.st_rdev), os.minor(st.st_rdev)


def _dev_of(sysdir: Path) -> tuple[int, int] | None:
    try:
        major, _, minor = (sysdir / "dev").read_text().strip().partition(":")
        return int(major), int(minor)
    except (OSError, ValueError):
        return None


def loop_devices_of(image: str | Path, sys_block: Path = SYS_BLOCK) -> list[tuple[int, int]]:
    """Device numbers of every loop device backed by ``image`` and of their partitions."""
    real = os.path.realpath(image)
    found: list[tuple[int, int]] = []
    for loop in sorted(sys_block.glob("loop*")):
        try:
            backing = (loop / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue  # not attached
        if backing != real:  # a deleted backing file reads "... (deleted)": not ours
            continue
        for part in [loop, *sorted(loop.glob(f"{loop.name}p*"))]:
            dev = _dev_of(part)
            if dev is not None:
                found.append(dev)
    return found


def loop_mounts_of(
    image: str | Path, sys_block: Path = SYS_BLOCK, mountinfo: Path = MOUNTINFO
) -> list[Mount]:
    """Every mounted filesystem that lives in ``image`` through a loop device (one mount per
    filesystem: bind mounts of the same device share its superblock and freeze with it)."""
    devs = set(loop_devices_of(image, sys_block))
    seen: dict[tuple[int, int], Mount] = {}
    for m in mounts(mountinfo):
        if m.dev in devs and m.dev not in seen:
            seen[m.dev] = m
    return list(seen.values())


def device_size(path: str | Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


class FsFreeze:
    """FIFREEZE/FITHAW of one mounted filesystem. ``thaw`` is idempotent and thread-safe (the
    watchdog and the normal path may both call it); the kernel syncs the filesystem and leaves
    it clean (for ext4: journal flushed, no recovery needed) before FIFREEZE returns."""

    def __init__(self, mountpoint: str) -> None:
        self.mountpoint = mountpoint
        self._fd: int | None = None
        self._lock = threading.Lock()

    def freeze(self) -> None:
        fd = os.open(self.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
        with self._lock:
            self._fd = fd
        fcntl.ioctl(fd, FIFREEZE, 0)

    def thaw(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
            if fd is None:
                return
            try:
                fcntl.ioctl(fd, FITHAW, 0)
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: not frozen (the freeze itself failed)
                    raise
            finally:
                os.close(fd)


def thaw_mountpoint(mountpoint: str | Path) -> bool:
    """Thaw a filesystem whoever froze it (cleanup in tests and after a crash); true when it was
    frozen."""
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, FITHAW, 0)
        return True
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    finally:
        os.close(fd)


def clone_file(src: str | Path, dst: str | Path) -> None:
    """Make ``dst`` (created, must not exist) share ``src``'s extents: an atomic copy in O(1)
    data. Raises OSError (EOPNOTSUPP, EXDEV, ...) when the filesystem cannot."""
    sfd = os.open(src, os.O_RDONLY)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.ioctl(dfd, FICLONE, sfd)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
