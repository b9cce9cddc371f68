"""Reflink: a disk-image file on a filesystem that clones files (XFS, btrfs).

``FICLONE`` makes a hidden file next to the image (``.NAME.dy-pit-PID-RANDOM``) that shares
all of the image's extents: an atomic copy that costs no data and a few milliseconds of
metadata, whatever the image's size. The runner reads the clone at leisure while the image keeps
changing (copy-on-write), and the clone is deleted when the ``with`` block exits.

When the image is **loop-mounted** on this host (a loop device whose ``backing_file`` is the
image, or one of its partitions, appears in ``/proc/self/mountinfo``), the filesystem in it is
frozen with FIFREEZE around the clone: the kernel writes everything out (for ext4: flushes the
journal and marks the filesystem clean), blocks new writes, and FICLONE flushes the image's
dirty pages before sharing them. The clone is then filesystem-consistent (``filesystem``, or
``application`` with quiesce plugins) and writers wait only for the clone, milliseconds. A
watchdog thaws at ``freeze_timeout`` (default 10 s) if anything hangs; then the run fails.

An image nobody mounted here (a virtual machine's disk, say) is cloned without a freeze: an
atomic copy, crash-consistent (what a power cut at that instant would leave).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ...errors import ProviderFailed
from ..quiesce.base import Quiescer
from .base import PointInTime, Provider, paused
from .linux import REFLINK_FILESYSTEMS, clone_file, loop_mounts_of, mount_of

log = logging.getLogger("dingyuan.agent.consistency")

CLONE_MARK = ".dy-pit-"


def clone_name(image: Path) -> Path:
    return image.parent / f".{image.name}{CLONE_MARK}{os.getpid()}-{secrets.token_hex(4)}"


def remove_stale_clones(image: Path) -> list[Path]:
    """Delete clones of ``image`` left by agents that died before their cleanup (their process
    is gone); the removed paths."""
    removed = []
    for p in image.parent.glob(f".{image.name}{CLONE_MARK}*"):
        pid_text = p.name.rsplit(CLONE_MARK, 1)[1].split("-", 1)[0]
        try:
            pid = int(pid_text)
        except ValueError:
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # alive: its clone
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    return removed


class ReflinkProvider(Provider):
    name = "reflink"
    filesystems: tuple[str, ...] = REFLINK_FILESYSTEMS

    def check(self, source: str | Path) -> str | None:
        src = Path(source)
        if not src.is_file():
            return "it is not a regular file (reflink clones disk-image files)"
        m = mount_of(src)
        fstype = m.fstype if m else "an unknown filesystem"
        if m is None or m.fstype not in self.filesystems:
            return f"it lies on {fstype}, which cannot clone files (needs {', '.join(self.filesystems)})"
        if loop_mounts_of(src) and os.geteuid() != 0:
            return "the image is loop-mounted and freezing its filesystem needs root (CAP_SYS_ADMIN)"
        return None

    def _clone(self, src: Path, dst: Path) -> None:
        clone_file(src, dst)

    @contextmanager
    def take(self, source: str | Path, quiescer: Quiescer | None = None) -> Iterator[PointInTime]:
        src = Path(source)
        for p in remove_stale_clones(src):
            log.info("removed a stale clone %s", p)
        mountpoints = [m.mountpoint for m in loop_mounts_of(src)]
        clone = clone_name(src)
        try:
            with paused(quiescer, mountpoints, self.options.freeze_timeout, f"the clone of {src}") as pause:
                try:
                    self._clone(src, clone)
                except OSError as e:
                    hint = (
                        " (the filesystem cannot clone files; use 'freeze' or 'live')"
                        if e.errno in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL)
                        else ""
                    )
                    raise ProviderFailed(
                        provider=self.name, source=str(src), detail=f"FICLONE: {e.strerror or e}{hint}"
                    ) from None
            notes = pause.notes()
            if not mountpoints:
                notes.append("not mounted on this host: an atomic clone, nothing frozen")
            yield PointInTime(
                clone,
                pause.level(),
                self.name,
                paused_seconds=pause.seconds,
                plugin=pause.report.plugin,
                notes=notes,
                pause=pause,
            )
        finally:
            clone.unlink(missing_ok=True)


class BtrfsProvider(ReflinkProvider):
    """``btrfs`` in a policy: the reflink provider, restricted to images on btrfs (subvolume
    snapshots are not needed for a disk-image file; a whole subvolume as a source is not
    supported)."""

    name = "btrfs"
    filesystems = ("btrfs",)
