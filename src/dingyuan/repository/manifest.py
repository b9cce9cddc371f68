"""Snapshot manifests: the metadata of one point-in-time image and the root of its tree.

A manifest has an immutable *core* (volume, host, time, geometry, root, parent, ...) and a small
mutable part (retention lock, annotations such as drill results). The snapshot id is the keyed
BLAKE3 of the canonical JSON of the core, so it proves the whole image; the mutable part may be
rewritten (``put``) without changing the id, and a reader checks the id against the core.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..errors import CorruptObject, UnsupportedFormat
from .format import FORMAT_VERSION

CONSISTENCY_LEVELS = ("crash", "filesystem", "application")


def utcnow() -> datetime:
    return datetime.now(UTC)


def fmt_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(s: str) -> datetime:
    """Parse ``fmt_time`` output (ISO 8601, UTC, 'Z'); anything else raises ValueError."""
    if not s.endswith("Z") or len(s) != 27:
        raise ValueError(f"time {s!r} is not in the form YYYY-MM-DDTHH:MM:SS.ffffffZ")
    return datetime.fromisoformat(s)


@dataclass
class Snapshot:
    volume: str
    host: str
    time: datetime
    size: int
    chunk_size: int
    fanout: int
    height: int
    root: bytes
    consistency: str = "crash"
    labels: dict[str, str] = field(default_factory=dict)
    parent: str | None = None
    source: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    # mutable part
    retention_until: datetime | None = None
    annotations: dict[str, Any] = field(default_factory=dict)
    revision: int = 0  # of the note the mutable part came from (0: none)
    id: str = ""

    def core(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "volume": self.volume,
            "host": self.host,
            "time": fmt_time(self.time),
            "size": self.size,
            "chunk_size": self.chunk_size,
            "fanout": self.fanout,
            "height": self.height,
            "root": self.root.hex(),
            "consistency": self.consistency,
            "labels": self.labels,
            "parent": self.parent,
            "source": self.source,
            "stats": self.stats,
        }

    def mutable(self) -> dict[str, Any]:
        return {
            "retention_until": fmt_time(self.retention_until) if self.retention_until else None,
            "annotations": self.annotations,
        }

    def doc(self) -> dict[str, Any]:
        return {"id": self.id, "core": self.core(), "mutable": self.mutable(), "revision": self.revision}

    def apply_mutable(self, doc: dict[str, Any], name: str) -> None:
        """Take retention lock and annotations from a note (or a cached document)."""
        try:
            until = doc.get("retention_until")
            self.retention_until = parse_time(until) if until else None
            self.annotations = dict(doc.get("annotations") or {})
        except (ValueError, TypeError, AttributeError) as e:
            raise CorruptObject(name=name, detail=f"malformed note: {e}") from None

    @property
    def nchunks(self) -> int:
        return -(-self.size // self.chunk_size)

    def locked_at(self, now: datetime) -> bool:
        return self.retention_until is not None and self.retention_until > now

    def summary(self) -> dict[str, Any]:
        """A flat JSON view for listings (the stable ``--json`` shape)."""
        return {
            "id": self.id,
            "volume": self.volume,
            "host": self.host,
            "time": fmt_time(self.time),
            "size": self.size,
            "chunk_size": self.chunk_size,
            "consistency": self.consistency,
            "labels": self.labels,
            "parent": self.parent,
            "retention_until": fmt_time(self.retention_until) if self.retention_until else None,
            "stats": self.stats,
            "annotations": self.annotations,
        }

    @classmethod
    def from_doc(cls, doc: dict[str, Any], name: str) -> Snapshot:
        try:
            core = doc["core"]
            if core.get("format") != FORMAT_VERSION:
                raise UnsupportedFormat(what=name, detail=f"manifest format {core.get('format')}")
            snap = cls(
                volume=core["volume"],
                host=core["host"],
                time=parse_time(core["time"]),
                size=int(core["size"]),
                chunk_size=int(core["chunk_size"]),
                fanout=int(core["fanout"]),
                height=int(core["height"]),
                root=bytes.fromhex(core["root"]),
                consistency=core["consistency"],
                labels=dict(core["labels"]),
                parent=core["parent"],
                source=core.get("source", ""),
                stats=dict(core.get("stats", {})),
                revision=int(doc.get("revision", 0)),
                id=doc.get("id", ""),
            )
            snap.apply_mutable(doc.get("mutable") or {}, name)
            return snap
        except (KeyError, ValueError, TypeError, AttributeError, OverflowError) as e:
            raise CorruptObject(name=name, detail=f"malformed manifest: {e}") from None


def canonical(core: dict[str, Any]) -> bytes:
    return json.dumps(core, sort_keys=True, separators=(",", ":")).encode()


@dataclass
class CloneInfo:
    """A clone's record (``clones/<id>``, format.md section 17): a writable volume born from a
    snapshot. Written once when the clone is made and deleted whole; the written data (the
    overlay) lives outside the repository, with whoever serves the clone.

    The record carries its base's core, so a clone and gc can read the base's tree even if the
    base's manifest were gone; ``Repository.read_clone`` checks that core against the base id.
    """

    id: str
    name: str
    base: Snapshot
    created: datetime
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.base.size

    @property
    def chunk_size(self) -> int:
        return self.base.chunk_size

    def doc(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "id": self.id,
            "name": self.name,
            "base": self.base.id,
            "base_core": self.base.core(),
            "size": self.size,
            "chunk_size": self.chunk_size,
            "created": fmt_time(self.created),
            "labels": self.labels,
        }

    def summary(self) -> dict[str, Any]:
        """A flat JSON view for listings."""
        return {
            "id": self.id,
            "name": self.name,
            "base": self.base.id,
            "volume": self.base.volume,
            "host": self.base.host,
            "size": self.size,
            "chunk_size": self.chunk_size,
            "created": fmt_time(self.created),
            "labels": self.labels,
        }

    @classmethod
    def from_doc(cls, doc: dict[str, Any], name: str) -> CloneInfo:
        if doc.get("format") != FORMAT_VERSION:
            raise UnsupportedFormat(what=name, detail=f"clone format {doc.get('format')}")
        try:
            base = Snapshot.from_doc({"core": doc["base_core"]}, name)
            base.id = str(doc["base"])
            info = cls(
                id=str(doc["id"]),
                name=str(doc["name"]),
                base=base,
                created=parse_time(doc["created"]),
                labels={str(k): str(v) for k, v in dict(doc["labels"]).items()},
            )
            if int(doc["size"]) != info.size or int(doc["chunk_size"]) != info.chunk_size:
                raise ValueError("size or chunk size differs from the base's")
            return info
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            raise CorruptObject(name=name, detail=f"malformed clone record: {e}") from None
