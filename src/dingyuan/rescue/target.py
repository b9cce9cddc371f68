"""The disk or file a restore writes, checked before anything is written.

A block device is refused while it or one of its partitions is mounted (``/proc/self/mountinfo``)
and is opened ``O_EXCL``, which Linux refuses while anything else claims it (a mount, swap, a RAID
or LVM member): the restore never writes under a running file system. A target smaller than the
snapshot is refused; a larger one keeps its bytes past the snapshot's size. A new file is created
at the snapshot's size, sparse: its holes need no writing.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import RestoreTargetError

MOUNTINFO = Path("/proc/self/mountinfo")
SYS_BLOCK = Path("/sys/dev/block")


@dataclass
class Target:
    """An open target: ``created`` when this run made the file (so its holes are already zeros)."""

    path: str
    fd: int
    size: int
    device: bool
    created: bool

    def close(self) -> None:
        os.close(self.fd)


def _devnums(rdev: int) -> set[tuple[int, int]]:
    """The device ``rdev`` and its partitions, as (major, minor) pairs."""
    major, minor = os.major(rdev), os.minor(rdev)
    out = {(major, minor)}
    try:
        entries = list((SYS_BLOCK / f"{major}:{minor}").iterdir())
    except OSError:  # no sysfs: the device alone
        return out
    for sub in entries:
        try:
            if (sub / "partition").exists():
                a, _, b = (sub / "dev").read_text().strip().partition(":")
                out.add((int(a), int(b)))
        except (OSError, ValueError):
            continue
    return out


def mounts_of(rdev: int) -> list[str]:
    """Mount points of the device ``rdev`` or its partitions."""
    wanted = _devnums(rdev)
    found = []
    try:
        lines = MOUNTINFO.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split()
        if len(fields) < 5:
            continue
        a, _, b = fields[2].partition(":")
        if a.isdigit() and b.isdigit() and (int(a), int(b)) in wanted:
            found.append(fields[4].replace("\\040", " "))
    return found


def open_target(path: str, need: int, *, create: bool) -> Target:
    """Open ``path`` to write ``need`` bytes: an existing device or file, or (if ``create``) a new
    file. Raises :class:`RestoreTargetError` with what to do when it cannot be used."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if not create:
            raise RestoreTargetError(
                target=path, detail="it does not exist (a delta restore updates an existing disk or file)"
            ) from None
        return _create(path, need)
    except OSError as e:
        raise RestoreTargetError(target=path, detail=e.strerror or str(e)) from None
    if stat.S_ISBLK(st.st_mode):
        if mounted := mounts_of(st.st_rdev):
            raise RestoreTargetError(
                target=path, detail=f"it is mounted at {', '.join(mounted)}: unmount it first"
            )
        fd = _open(path, os.O_RDWR | os.O_EXCL)
        size = os.lseek(fd, 0, os.SEEK_END)
        device = True
    elif stat.S_ISREG(st.st_mode):
        fd = _open(path, os.O_RDWR)
        size, device = st.st_size, False
    else:
        raise RestoreTargetError(target=path, detail="it is neither a block device nor a regular file")
    if size < need:
        os.close(fd)
        raise RestoreTargetError(
            target=path,
            detail=f"it holds {size} bytes, less than the snapshot's {need}: choose a disk at least "
            "as large (or a new file name)",
        )
    return Target(path, fd, size, device, created=False)


def _open(path: str, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EBUSY:
            detail = "it is in use (mounted, swap, or in a RAID, LVM or device-mapper set): free it first"
        else:
            detail = e.strerror or str(e)
        raise RestoreTargetError(target=path, detail=detail) from None


def _create(path: str, need: int) -> Target:
    fd = _open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
    try:
        os.ftruncate(fd, need)
    except OSError as e:
        os.close(fd)
        os.unlink(path)
        raise RestoreTargetError(target=path, detail=e.strerror or str(e)) from None
    return Target(path, fd, need, device=False, created=True)
