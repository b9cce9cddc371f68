"""The transfer protocol in one process: the agent's client calls served by an Ingest directly
(for tests of the agent's runner and of Ingest without HTTP; tests/integration covers HTTP)."""

from __future__ import annotations

from typing import Any

from dingyuan.protocol import parse_frames
from dingyuan.repository.backends.base import Buffer
from dingyuan.repository.manifest import parse_time
from dingyuan.vault.ingest import CommitInfo, Ingest

HOST = "web1"


class DirectClient:
    """VaultClient's transfer calls, served by an Ingest in the same process."""

    def __init__(self, ingest: Ingest) -> None:
        self.ingest = ingest
        self.uploaded = 0
        self.fail_uploads_after: int | None = None

    def start_session(self, volume: str, size: int, chunk_size: int, job_id: int | None) -> dict[str, Any]:
        s = self.ingest.start(HOST, volume, size, chunk_size, job_id)
        return {"session": s.id, "parent": {"id": s.parent.id} if s.parent else None}

    def missing(self, sid: str, ids: list[bytes]) -> list[int]:
        self.ingest.get(sid, HOST)
        return self.ingest.missing(ids)

    def upload(self, sid: str, parts: list[Buffer]) -> dict[str, Any]:
        if self.fail_uploads_after is not None and self.uploaded >= self.fail_uploads_after:
            raise ConnectionError("dropped")
        body = memoryview(b"".join(parts))
        frames, used = parse_frames(body)
        assert used == len(body)
        self.uploaded += len(body)
        return {"stored": self.ingest.receive(self.ingest.get(sid, HOST), frames)}

    def commit(self, sid: str, info: dict[str, Any]) -> dict[str, Any]:
        ci = CommitInfo(
            root=bytes.fromhex(info["root"]),
            height=info["height"],
            time=parse_time(info["time"]),
            consistency=info["consistency"],
            source=info["source"],
            stats=info["stats"],
        )
        snap = self.ingest.commit(self.ingest.get(sid, HOST), ci)
        return {"id": snap.id}
