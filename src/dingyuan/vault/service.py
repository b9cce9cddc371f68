"""The vault's own work while it serves: recovery at start, then housekeeping in the background.

At start (before the first request): pack what a killed vault left in its spool, bring the
catalog in line with the repository (a snapshot committed just before a crash), and fail the
vault's own jobs that a stopped vault left running. Then, every ``TICK`` seconds: end idle upload
sessions, fail backup jobs whose agent went silent, and run gc once a day when nothing uploads.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime, timedelta

from sqlalchemy.orm import Session

from ..catalog.rebuild import rebuild_catalog
from ..errors import DingyuanError
from .context import VaultContext
from .ingest import Ingest
from .jobs import abandon_vault_jobs, expire_stale_jobs, run_gc

log = logging.getLogger(__name__)

TICK = 15.0
GC_EVERY = timedelta(days=1)


class Housekeeper:
    """Starts with :meth:`start`, stops with :meth:`stop` (ends the upload sessions too)."""

    def __init__(self, ctx: VaultContext, tick: float = TICK) -> None:
        self.ctx = ctx
        self.tick = tick
        self.ingest = Ingest(ctx.repo, ctx.cfg.dir / "spool")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_gc = datetime.now(UTC)

    def start(self) -> None:
        recovered = self.ingest.recover()
        if recovered:
            log.info("recovered %d blob(s) and pack(s) a previous vault process left", recovered)
        report = rebuild_catalog(self.ctx.repo, self.ctx.engine)
        if report.changed:
            log.info("catalog brought in line with the repository: %s", report)
        with Session(self.ctx.engine) as s, s.begin():
            abandon_vault_jobs(s, datetime.now(UTC))
        self.ctx.extras["ingest"] = self.ingest
        self._thread = threading.Thread(target=self._loop, name="housekeeping", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.ingest.close()

    def _loop(self) -> None:
        while not self._stop.wait(self.tick):
            try:
                self.run_once(datetime.now(UTC))
            except DingyuanError as e:
                log.error("housekeeping: %s", e)
            except Exception:
                log.exception("housekeeping failed")

    def run_once(self, now: datetime) -> None:
        for sid in self.ingest.expire():
            log.info("upload session %s expired (idle)", sid)
        with Session(self.ctx.engine) as s, s.begin():
            for job in expire_stale_jobs(s, now):
                log.warning("job %d: %s", job.id, job.error)
        if now - self._last_gc >= GC_EVERY and not self.ingest.sessions():
            self._last_gc = now
            result = run_gc(self.ctx.repo, self.ctx.engine, now)
            log.info("gc: %s", result)
