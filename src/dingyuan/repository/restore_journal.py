"""The journal of a restore in progress: what lets an interrupted restore resume.

A restore with ``fsync`` keeps one small JSON file per target: beside a regular file
(``TARGET.dyrestore``, on the same filesystem, so it shares the target's fate), and for a block
device in the repository's cache directory (``restores/<hash of the device path>.dyrestore``)::

    {"version": 1, "snapshot": "<id>", "chunk_size": 65536, "size": 2147483648,
     "mode": "full" | "delta", "done": 1024}

``done`` is a chunk count: chunks ``[0, done)`` of the target hold the snapshot's bytes and are on
stable storage. Write ordering, the contract a resume relies on:

1. the target is ``fdatasync``'ed, then
2. the journal is written to a temporary file, fsynced, renamed over the previous journal, and its
   directory fsynced.

So a journal never claims more than the disk holds, whether the restore was killed, lost its
connection to the storage, or the machine lost power. The journal is removed only after the final
fsync of a completed restore. A restore without fsync keeps no journal: nothing it writes is
known to be durable.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import blake3

from ..errors import RestoreTargetError

JOURNAL_VERSION = 1
SUFFIX = ".dyrestore"
MODES = ("full", "delta")


@dataclass(frozen=True)
class JournalState:
    snapshot: str
    chunk_size: int
    size: int
    mode: str
    done: int


def journal_path(target: str, cache_root: Path) -> Path:
    """Where the journal of ``target`` lives (``cache_root``: the repository's cache directory)."""
    try:
        is_device = stat.S_ISBLK(os.stat(target).st_mode)
    except FileNotFoundError:
        is_device = False
    if not is_device:
        return Path(target + SUFFIX)
    key = blake3.blake3(os.path.realpath(target).encode()).hexdigest()[:32]
    return cache_root / "restores" / (key + SUFFIX)


def read_journal(path: Path, target: str) -> JournalState | None:
    """The journal at ``path``, or None if there is none; a journal that cannot be read stops the
    restore (it was not written by this version, or by dingyuan): ``--force`` ignores it."""
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise RestoreTargetError(
            target=target, detail=f"its restore journal {path} is unreadable ({e})"
        ) from None
    try:
        if doc.get("version") != JOURNAL_VERSION or doc.get("mode") not in MODES:
            raise ValueError("unknown version or mode")
        state = JournalState(
            str(doc["snapshot"]), int(doc["chunk_size"]), int(doc["size"]), str(doc["mode"]), int(doc["done"])
        )
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise RestoreTargetError(
            target=target, detail=f"its restore journal {path} is malformed ({e})"
        ) from None
    if state.chunk_size <= 0 or not 0 <= state.done <= -(-state.size // state.chunk_size):
        raise RestoreTargetError(target=target, detail=f"its restore journal {path} is inconsistent")
    return state


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """The journal of one running restore; :meth:`advance` is called as chunks are written."""

    def __init__(self, path: Path, state: JournalState, fd: int, interval: int) -> None:
        self.path = path
        self.state = state
        self.fd = fd
        self.interval = max(1, interval // state.chunk_size)  # chunks between checkpoints
        path.parent.mkdir(parents=True, exist_ok=True)
        self._save()

    def _save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps({"version": JOURNAL_VERSION, **asdict(self.state)}).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)

    def advance(self, done: int) -> None:
        """Chunks ``[0, done)`` are written (not yet flushed): every ``interval`` bytes, flush the
        target and then record them."""
        if done - self.state.done >= self.interval:
            os.fdatasync(self.fd)
            self.state = replace(self.state, done=done)
            self._save()

    def remove(self) -> None:
        """The restore is complete and flushed: forget it."""
        remove_journal(self.path)


def remove_journal(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        return
    _fsync_dir(path.parent)
