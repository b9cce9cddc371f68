"""``dingyuan agent run``: poll the vault for due backups of this host, run them, report.

The vault decides what is due (policies live there); the agent asks every ``poll`` seconds,
runs each job it is given, sends progress (which is also its heartbeat) while it runs, and
reports a failure with its message. A vault that cannot be reached is retried with back-off;
a killed agent's job is expired by the vault and handed out again.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from ..errors import DingyuanError, TransferError
from .config import AgentConfig
from .runner import RunSpec, run_backup

log = logging.getLogger("dingyuan.agent")

HEARTBEAT = 2.0
MAX_BACKOFF = 10.0


class Agent:
    def __init__(self, state_dir: Path, poll: float = 2.0) -> None:
        self.state_dir = state_dir
        self.cfg = AgentConfig.load(state_dir)
        self.client = self.cfg.client(state_dir)
        self.id_key = bytes.fromhex(self.cfg.id_key)
        self.poll = poll
        self.stop = threading.Event()

    def run_forever(self) -> None:
        backoff = self.poll
        log.info("agent for host %s polling %s", self.cfg.host, self.cfg.url)
        while not self.stop.is_set():
            try:
                jobs = self.client.work()
                backoff = self.poll
            except TransferError as e:
                log.warning("%s (retrying in %.0f s)", e, backoff)
                self.stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            for doc in jobs:
                if self.stop.is_set():
                    break
                self.run_job(RunSpec.from_json(doc))
            if not jobs:
                self.stop.wait(self.poll)
        self.client.close()

    def run_job(self, spec: RunSpec) -> None:
        done = [0, 0]
        beat_stop = threading.Event()

        def progress(d: int, t: int) -> None:
            done[0], done[1] = d, t

        def heartbeat() -> None:
            while not beat_stop.wait(HEARTBEAT):
                if spec.job is not None:
                    try:
                        self.client.progress(spec.job, done[0], done[1])
                    except DingyuanError as e:
                        log.debug("progress report failed: %s", e)

        beat = threading.Thread(target=heartbeat, name="heartbeat", daemon=True)
        beat.start()
        t0 = time.monotonic()
        try:
            res = run_backup(self.client, self.id_key, self.state_dir, spec, progress)
            log.info(
                "job %s: snapshot %s of %s saved (%d bytes sent, %.1f s)",
                spec.job,
                res.snapshot.get("id"),
                spec.volume,
                res.bytes_sent,
                time.monotonic() - t0,
            )
        except DingyuanError as e:
            log.error("job %s (%s) failed: %s", spec.job, spec.volume, e)
            if spec.job is not None:
                try:
                    self.client.fail(spec.job, str(e))
                except DingyuanError as e2:
                    log.warning("could not report the failure: %s", e2)
        finally:
            beat_stop.set()
            beat.join()
