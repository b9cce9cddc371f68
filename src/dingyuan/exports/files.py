"""Restoring single files and directories out of an exported disk.

The export's filesystem is mounted read-only on a private directory (:func:`~dingyuan.exports.mount.mounted`),
each PATH is copied into the destination under its own relative path, and the filesystem is
unmounted however the copy ends.

A PATH names something inside the snapshot's filesystem, never outside it: ``..`` is refused, and
a symlink on the way to it is followed only while it stays inside (a relative link whose ``..``
would climb above the filesystem's root, or an absolute link, which means another filesystem's
root on the machine it came from, is refused). The PATH itself, and everything under a directory,
is copied as it is: a symlink as a symlink, never followed. All PATHs are checked before anything
is copied, and nothing in the destination is overwritten.

What is kept: contents, modes, access and modification times, extended attributes, hard links
within one restore, and the owner and group when running as root. Sockets are skipped (they are
made by the program that listens on them); sparse files are written whole.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path, PurePosixPath

from ..errors import RestoreTargetError, SourceError, UsageError
from .mount import mounted

#: symlinks followed while resolving one PATH before it counts as a loop (as Linux's MAXSYMLINKS)
MAX_SYMLINKS = 40


def restore_files(
    uri: str, paths: list[str], to: Path, *, partition: int | None = None, state_dir: Path
) -> list[Path]:
    """Copy each of ``paths`` (files, directories, symlinks) out of the filesystem of the NBD
    export ``uri`` into ``to``, keeping their paths relative to the filesystem's root (``/etc/fstab``
    goes to ``to/etc/fstab``). Returns the restored paths in ``to``, in the order given."""
    if not paths:
        raise UsageError("give at least one PATH to restore")
    relative = [_relative(p) for p in paths]
    destinations = [to / rel for rel in relative]
    for path, dest in zip(paths, destinations, strict=True):
        if os.path.lexists(dest):
            raise RestoreTargetError(
                target=dest, detail=f"it exists (restoring {path}); choose an empty --to directory"
            )
    with mounted(uri, partition=partition, state_dir=state_dir) as info:
        root = info.target
        sources = [_resolve(root, path, rel) for path, rel in zip(paths, relative, strict=True)]
        links: dict[tuple[int, int], Path] = {}
        for source, dest in zip(sources, destinations, strict=True):
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                _copy(source, dest, links)
            except OSError as e:
                if e.filename is not None and str(e.filename).startswith(f"{root}/"):
                    inside = "/" + os.path.relpath(e.filename, root)
                    raise SourceError(
                        source=f"{inside} in the snapshot", detail=e.strerror or str(e)
                    ) from None
                raise RestoreTargetError(target=e.filename or dest, detail=e.strerror or str(e)) from None
    return destinations


def _relative(path: str) -> PurePosixPath:
    """``path`` relative to the filesystem's root, refusing ``..`` and the root itself."""
    parts = [p for p in PurePosixPath(path).parts if p not in ("/", ".")]
    if ".." in parts:
        raise UsageError(
            f"'{path}' uses '..', which could leave the snapshot's filesystem; give the path from its root"
        )
    if not parts:
        raise UsageError(
            f"'{path}' is the whole filesystem: restore the snapshot as a disk, or name what is under it"
        )
    return PurePosixPath(*parts)


def _resolve(root: Path, path: str, rel: PurePosixPath) -> Path:
    """Where ``rel`` is under ``root``, following symlinks in its directories inside ``root`` only
    (the last component is not followed). Raises UsageError naming ``path`` when it does not
    exist or would leave the filesystem."""
    done: list[str] = []  # resolved components, each a real directory under root (no symlinks)
    todo = list(rel.parts)
    followed = 0
    while todo:
        name = todo.pop(0)
        if name == "..":  # only from a symlink's target
            if not done:
                raise UsageError(
                    f"'{path}' goes through a symlink that points outside the snapshot's filesystem"
                )
            done.pop()
            continue
        if name == ".":
            continue
        here = root.joinpath(*done, name)
        try:
            st = os.lstat(here)
        except FileNotFoundError:
            raise UsageError(f"'{path}' does not exist in the snapshot's filesystem") from None
        if not todo:
            return here
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(here)
            followed += 1
            if os.path.isabs(target):
                raise UsageError(
                    f"'{path}' goes through the symlink /{'/'.join([*done, name])} -> {target}, "
                    "which points outside the snapshot's filesystem; give the path it points to"
                )
            if followed > MAX_SYMLINKS:
                raise UsageError(f"'{path}': too many levels of symlinks")
            todo = [*PurePosixPath(target).parts, *todo]
        elif stat.S_ISDIR(st.st_mode):
            done.append(name)
        else:
            raise UsageError(
                f"'{path}' does not exist in the snapshot's filesystem (/{'/'.join([*done, name])} "
                "is not a directory)"
            )
    raise AssertionError("unreachable: the last component of a PATH is a name, never '..'")


def _copy(src: Path, dst: Path, links: dict[tuple[int, int], Path]) -> None:
    """Copy ``src`` to ``dst`` (which does not exist) with its metadata; a directory with
    everything under it."""
    st = os.lstat(src)
    mode = st.st_mode
    if stat.S_ISSOCK(mode):
        return
    if not stat.S_ISDIR(mode) and st.st_nlink > 1:
        first = links.get((st.st_dev, st.st_ino))
        if first is not None:
            os.link(first, dst, follow_symlinks=False)
            return
        links[(st.st_dev, st.st_ino)] = dst
    if stat.S_ISDIR(mode):
        os.mkdir(dst, 0o700)
        for entry in sorted(os.listdir(src)):
            _copy(src / entry, dst / entry, links)
    elif stat.S_ISLNK(mode):
        os.symlink(os.readlink(src), dst)
    elif stat.S_ISREG(mode):
        shutil.copyfile(src, dst, follow_symlinks=False)
    else:  # fifo, character or block device
        os.mknod(dst, mode, st.st_rdev)
    if os.geteuid() == 0:
        os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
    # after chown (which clears setuid bits), and for a directory after its entries (which change its times)
    shutil.copystat(src, dst, follow_symlinks=False)
