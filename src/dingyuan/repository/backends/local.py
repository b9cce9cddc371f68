"""A backend storing each object as a file under a local directory, at its name's path.

Writes go to a ``.tmp-`` file in the target directory, are fsynced, then renamed (``put``) or
hard-linked (``create``: atomic create-if-absent) into place, and the directory is fsynced.
Names with a component starting with ``.tmp-`` are reserved and rejected.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
from collections.abc import Iterator

from ...errors import ObjectExists, ObjectNotFound, StorageError, StorageFull, StorageIOError, UsageError
from .base import Backend, Data, check_name

TMP_PREFIX = ".tmp-"
_PARTIAL = re.compile(r"[A-Za-z0-9_.\-]*\Z")


def storage_error(name: str, exc: OSError) -> StorageError:
    """Map an OSError on object ``name`` to StorageFull (out of space/quota) or StorageIOError."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(str(exc), name=name)
    return StorageIOError(name=name, detail=str(exc))


def check_prefix(prefix: str) -> str:
    """Return ``prefix`` if it is a valid ``list`` prefix (complete components, then a partial one)."""
    head, slash, last = prefix.rpartition("/")
    if slash:
        check_name(head)
    if not _PARTIAL.match(last):
        raise UsageError(f"invalid object name prefix {prefix!r}")
    return prefix


@contextlib.contextmanager
def _mapped(name: str, *, missing: bool = False) -> Iterator[None]:
    """Turn OSError into StorageError; with ``missing``, a missing file into ObjectNotFound."""
    try:
        yield
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
        raise (ObjectNotFound(name=name) if missing else storage_error(name, exc)) from exc
    except OSError as exc:
        raise storage_error(name, exc) from exc


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs(path: str) -> None:
    """Create ``path`` and missing parents, fsyncing the parent of each directory created."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    _makedirs(parent)
    with contextlib.suppress(FileExistsError):  # created concurrently: still make it durable
        os.mkdir(path)
    _fsync_dir(parent)


def _write_all(fd: int, parts: list[bytes | bytearray | memoryview]) -> None:
    """Write every part, in order, with few system calls and no copy."""
    for i in range(0, len(parts), 512):
        group = parts[i : i + 512]
        written = os.writev(fd, group)
        if written == sum(len(p) for p in group):
            continue
        os.lseek(fd, -written, os.SEEK_CUR)  # short write: redo this group plainly
        for part in group:
            view = memoryview(part).cast("B")
            while view:
                view = view[os.write(fd, view) :]


class LocalBackend(Backend):
    """Objects as files under ``root`` (created on the first write if missing)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.location = self.root

    def _path(self, name: str) -> str:
        check_name(name)
        if any(part.startswith(TMP_PREFIX) for part in name.split("/")):
            raise UsageError(f"invalid object name {name!r}: components starting {TMP_PREFIX!r} are reserved")
        return os.path.join(self.root, name)

    def _write(self, name: str, data: Data, *, exclusive: bool) -> None:
        path = self._path(name)
        directory = os.path.dirname(path)
        tmp = os.path.join(directory, TMP_PREFIX + secrets.token_hex(8))
        linked = False
        try:
            _makedirs(directory)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            try:
                _write_all(fd, data if isinstance(data, list) else [data])
                os.fsync(fd)
            finally:
                os.close(fd)
            if exclusive:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise ObjectExists(name=name) from None
                linked = True
                os.unlink(tmp)
            else:
                os.replace(tmp, path)
            _fsync_dir(directory)
        except BaseException as exc:
            for leftover in (tmp, path) if linked else (tmp,):
                with contextlib.suppress(OSError):
                    os.unlink(leftover)
            if isinstance(exc, OSError):
                raise storage_error(name, exc) from exc
            raise

    def put(self, name: str, data: Data) -> None:
        self._write(name, data, exclusive=False)

    def create(self, name: str, data: Data) -> None:
        self._write(name, data, exclusive=True)

    def remove_temporaries(self) -> int:
        removed = 0
        for directory, _, files in os.walk(self.root):
            for f in files:
                if f.startswith(TMP_PREFIX):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(directory, f))
                        removed += 1
        return removed

    def get(self, name: str) -> bytes:
        path = self._path(name)
        with _mapped(name, missing=True), open(path, "rb") as f:
            return f.read()

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        path = self._path(name)
        if offset < 0 or length < 0:
            raise UsageError(f"invalid range offset={offset} length={length} of {name}")
        with _mapped(name, missing=True):
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                data = os.pread(fd, length, offset)
                while len(data) < length and (more := os.pread(fd, length - len(data), offset + len(data))):
                    data += more
            finally:
                os.close(fd)
        if len(data) != length:
            raise StorageIOError(name=name, detail=f"short read: {len(data)} of {length} bytes at {offset}")
        return data

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        check_prefix(prefix)
        head = prefix.rpartition("/")[0]
        stack = [head + "/" if head else ""]
        while stack:
            rel = stack.pop()
            with _mapped(rel or "."):
                try:
                    entries = os.scandir(os.path.join(self.root, rel))
                except (FileNotFoundError, NotADirectoryError):
                    continue
                with entries:
                    for entry in entries:
                        name = rel + entry.name
                        if entry.name.startswith(TMP_PREFIX):
                            continue
                        if entry.is_dir(follow_symlinks=False):
                            if (sub := name + "/").startswith(prefix) or prefix.startswith(sub):
                                stack.append(sub)
                        elif name.startswith(prefix) and entry.is_file(follow_symlinks=False):
                            try:
                                size = entry.stat(follow_symlinks=False).st_size
                            except FileNotFoundError:
                                continue  # deleted while listing
                            yield name, size

    def delete(self, name: str) -> None:
        path = self._path(name)
        with _mapped(name):
            try:
                os.unlink(path)
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                return
            _fsync_dir(os.path.dirname(path))

    def exists(self, name: str) -> bool:
        return os.path.isfile(self._path(name))
