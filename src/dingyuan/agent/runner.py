"""One backup run of one volume to the vault (the agent's side of a policy run)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import IncompleteSnapshot, SourceError, UsageError
from ..repository.backup import Progress, ScanResult, check_chunk_size, scan, scan_stats, source_size
from ..repository.manifest import fmt_time, utcnow
from ..repository.threads import responsive_threads
from .client import VaultClient
from .consistency import ProviderOptions, choose
from .leafcache import LeafCache, LeafWriter
from .quiesce import quiescer_for
from .upload import RateLimiter, UploadSink

log = logging.getLogger("dingyuan.agent")

#: bytes scanned per "missing" query: a round trip to the vault per 16 MiB (the local backup's
#: 4 MiB would make four times as many; the buffers cost 5 x 16 MiB)
SCAN_BATCH = 16 << 20


@dataclass
class RunSpec:
    """What to back up, as the vault hands it out."""

    volume: str
    source: str
    chunk_size: int
    job: int | None = None
    bandwidth_limit: int | None = None
    consistency: str = "crash"
    quiesce: str | None = None  # the policy's quiesce setting (agent/quiesce/spec.py)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> RunSpec:
        return cls(
            volume=str(doc["volume"]),
            source=str(doc["source"]),
            chunk_size=check_chunk_size(int(doc["chunk_size"])),
            job=int(doc["job"]) if doc.get("job") is not None else None,
            bandwidth_limit=int(doc["bandwidth_limit"]) if doc.get("bandwidth_limit") else None,
            consistency=str(doc.get("consistency") or "crash"),
            quiesce=str(doc["quiesce"]) if doc.get("quiesce") else None,
        )


@dataclass
class RunResult:
    snapshot: dict[str, Any]
    bytes_sent: int
    seconds: float


def leaf_path(state_dir: Path, volume: str) -> Path:
    return state_dir / "volumes" / f"{volume}.leaves"


def run_backup(
    client: VaultClient,
    id_key: bytes,
    state_dir: Path,
    spec: RunSpec,
    progress: Progress | None = None,
    on_session: Callable[[str], None] | None = None,
) -> RunResult:
    """Back ``spec.source`` up as a new snapshot of ``spec.volume``; incremental against the
    leaf cache when it describes the vault's latest snapshot. If the vault finds the snapshot
    incomplete (it lost blobs the cache says it has), run once more without the cache."""
    try:
        return _run(client, id_key, state_dir, spec, progress, use_cache=True, on_session=on_session)
    except IncompleteSnapshot as e:
        log.warning("vault reports an incomplete snapshot (%s); sending again without the leaf cache", e)
        leaf_path(state_dir, spec.volume).unlink(missing_ok=True)
        return _run(client, id_key, state_dir, spec, progress, use_cache=False, on_session=on_session)


def _run(
    client: VaultClient,
    id_key: bytes,
    state_dir: Path,
    spec: RunSpec,
    progress: Progress | None,
    use_cache: bool,
    on_session: Callable[[str], None] | None,
) -> RunResult:
    """Choose the consistency provider (it refuses up front), open the upload session, take the
    point in time and scan it, and commit only once the point in time is released (filesystems
    thawed, clone deleted) and still valid."""
    t0 = time.monotonic()
    try:
        quiescer = quiescer_for(spec.quiesce)
    except ValueError as e:
        raise UsageError(f"the policy's quiesce setting {spec.quiesce!r}: {e}") from None
    provider = choose(spec.consistency, spec.source, ProviderOptions(keep_writable=(state_dir,)))
    writer: LeafWriter | None = None
    try:
        with provider.take(spec.source, quiescer) as pit:
            taken = utcnow()
            sid, res, writer, sent = _scan(
                client, id_key, state_dir, spec, pit.path, progress, use_cache, on_session
            )
            pit.check()
        info = {
            "root": res.root.hex(),
            "height": res.height,
            "time": fmt_time(taken),
            "consistency": pit.level,
            "source": spec.source,
            "stats": {**scan_stats(res, time.monotonic() - t0), "bytes_sent": sent, **pit.stats()},
        }
        snap = client.commit(sid, info)
        writer.commit(str(snap["id"]))
    except BaseException:
        if writer is not None:
            writer.discard()
        raise
    return RunResult(snap, sent, time.monotonic() - t0)


def _scan(
    client: VaultClient,
    id_key: bytes,
    state_dir: Path,
    spec: RunSpec,
    path: Path,
    progress: Progress | None,
    use_cache: bool,
    on_session: Callable[[str], None] | None,
) -> tuple[str, ScanResult, LeafWriter, int]:
    """Upload what changed in ``path`` (the point in time of ``spec.source``) in a new session;
    returns the session, the scan's result, the leaf writer to commit and the bytes sent."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise SourceError(source=spec.source, detail=e.strerror or str(e)) from None
    try:
        size = source_size(fd, spec.source)
        cs = spec.chunk_size
        start = client.start_session(spec.volume, size, cs, spec.job)
        sid = str(start["session"])
        if on_session:
            on_session(sid)
        parent = start.get("parent") or {}
        cache = LeafCache.load(leaf_path(state_dir, spec.volume)) if use_cache else None
        if cache and (cache.snapshot_id != parent.get("id") or cache.chunk_size != cs):
            cache.close()
            cache = None
        writer = LeafWriter(leaf_path(state_dir, spec.volume), cs, -(-size // cs))
        limiter = RateLimiter(spec.bandwidth_limit) if spec.bandwidth_limit else None
        try:
            with responsive_threads(), UploadSink(client, sid, id_key, limiter) as sink:
                res = scan(
                    sink,
                    fd,
                    spec.source,
                    size,
                    cs,
                    cache.ids_range if cache else None,
                    progress=progress,
                    on_leaves=writer.write,
                    batch_bytes=SCAN_BATCH,
                )
        except BaseException:
            writer.discard()
            raise
        finally:
            if cache:
                cache.close()
    finally:
        os.close(fd)
    return sid, res, writer, sink.bytes_sent
