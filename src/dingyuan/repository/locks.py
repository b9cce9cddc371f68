"""Repository locks: shared for writers that only add (backup), exclusive for gc and repairs.

A lock is an object ``locks/<random>`` holding JSON ``{host, pid, exclusive, time, purpose}``,
created with create-if-absent and refreshed every few minutes while held. To acquire, a process
writes its lock and then lists the others; on a conflict it removes its own and retries until a
deadline. A lock is stale when its process is gone (same host) or it was not refreshed for
``STALE_AFTER``; stale locks are removed by whoever finds them.

Which operations lock against which:

=============  ==========  ==========
operation      takes       conflicts
=============  ==========  ==========
backup         shared      gc
restore        shared      gc
verify         shared      gc
diff           shared      gc
gc             exclusive   everything
list, show     none        --
=============  ==========  ==========

Restore, verify and diff take a shared lock because gc rewrites packs (a live blob moves to a new
pack). Listing needs no lock: manifests are only created or replaced atomically.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import threading
import time
import uuid
from types import TracebackType
from typing import Any

from ..errors import LockedError, ObjectNotFound, StorageError
from .backends.base import Backend

STALE_AFTER = 30 * 60
REFRESH_EVERY = 5 * 60

#: Names of the locks this process holds right now. A lock record naming this host and this pid
#: but not listed here was left by a release that failed: it is stale.
_HELD: set[str] = set()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RepoLock:
    def __init__(self, backend: Backend, exclusive: bool, purpose: str, wait: float = 10.0) -> None:
        self.backend = backend
        self.exclusive = exclusive
        self.purpose = purpose
        self.wait = wait
        self.name = f"locks/{uuid.uuid4().hex}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _doc(self) -> bytes:
        return json.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "exclusive": self.exclusive,
                "time": time.time(),
                "purpose": self.purpose,
            }
        ).encode()

    @staticmethod
    def is_stale(doc: dict[str, Any], now: float, name: str = "") -> bool:
        try:
            if doc.get("host") == socket.gethostname():
                pid = int(doc.get("pid", 0))
                if not _alive(pid) or (pid == os.getpid() and name not in _HELD):
                    return True
            return now - float(doc.get("time", 0)) > STALE_AFTER
        except (TypeError, ValueError):
            return True  # not a lock record we wrote

    def _conflict(self) -> dict[str, Any] | None:
        now = time.time()
        for name, _ in list(self.backend.list("locks/")):
            if name == self.name:
                continue
            try:
                doc = json.loads(self.backend.get(name))
            except ObjectNotFound:
                continue
            except StorageError:  # cannot tell: assume it is held
                return {"purpose": "unknown (unreadable lock)", "exclusive": True}
            except ValueError:
                doc = None  # not a lock record: garbage
            if not isinstance(doc, dict) or self.is_stale(doc, now, name):
                self.backend.delete(name)
                continue
            if self.exclusive or doc.get("exclusive"):
                return doc
        return None

    def acquire(self) -> None:
        deadline = time.monotonic() + self.wait
        while True:
            self.backend.create(self.name, self._doc())
            holder = self._conflict()
            if holder is None:
                break
            self.backend.delete(self.name)
            if time.monotonic() >= deadline:
                raise LockedError(
                    holder=f"{holder.get('purpose', '?')} on {holder.get('host')} pid {holder.get('pid')}",
                    detail="exclusive" if holder.get("exclusive") else "shared",
                )
            time.sleep(random.uniform(0.1, 0.4))  # jitter: two contenders do not collide forever
        _HELD.add(self.name)
        self._thread = threading.Thread(target=self._refresh_loop, daemon=True)
        self._thread.start()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(REFRESH_EVERY):
            with contextlib.suppress(StorageError):
                self.backend.put(self.name, self._doc())

    def release(self) -> None:
        """Remove the lock record, best effort: a record left behind is stale once this process
        ends (or at once for this process), so a failed delete must not mask the real outcome."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        _HELD.discard(self.name)
        for _ in range(2):
            try:
                self.backend.delete(self.name)
                return
            except StorageError:
                continue

    def __enter__(self) -> RepoLock:
        self.acquire()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    @staticmethod
    def others(backend: Backend, mine: str) -> int:
        return sum(1 for n, _ in backend.list("locks/") if n != mine)
