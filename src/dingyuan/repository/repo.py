"""The repository: config, keys, blobs in packs, index objects and snapshot manifests.

Layout of object names (see docs/format.md)::

    config                      plaintext JSON, authenticated by a MAC under the master key
    keys/<id>                   the master key wrapped by a passphrase (Argon2id + AES-256-GCM)
    packs/<xx>/<pack id>        blobs (chunks, tree nodes) + sealed table of contents
    index/<index id>            sealed list of packs and their blobs
    snapshots/<snapshot id>     sealed manifest
    notes/<snapshot id>/<rev>   sealed note: a snapshot's mutable metadata
    clones/<clone id>           sealed clone record: a writable volume born from a snapshot
    locks/<random>              JSON lock records

Write ordering (MUST): packs are durable before an index object lists them; index objects are
durable before a manifest refers to their blobs; a manifest is created last, atomically.
Deletion runs in reverse: manifests, then index objects, then packs.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import blake3
import zstandard

from ..errors import (
    AmbiguousSnapshot,
    CloneNotFound,
    CorruptObject,
    LockedError,
    MissingObject,
    ObjectExists,
    ObjectNotFound,
    PassphraseRequired,
    RepositoryExists,
    RepositoryNotFound,
    RetentionLocked,
    SnapshotNotFound,
    UnsupportedFormat,
    UsageError,
    WrongPassphrase,
)
from .backends.base import Backend
from .cache import IndexCache, Location
from .crypto import Cipher, KdfParams, unwrap_master_key, wrap_master_key
from .format import (
    CLONE_MAGIC,
    FORMAT_VERSION,
    INDEX_MAGIC,
    MANIFEST_MAGIC,
    NOTE_MAGIC,
    PACK_END_MAGIC,
    PACK_HEADER,
    PACK_MAGIC,
    PACK_TRAILER,
    TOC_MAGIC,
    BlobEntry,
    BlobType,
    Codec,
    PackRef,
    clone_name,
    decode_index,
    decode_toc,
    decode_tree_node,
    encode_index,
    index_name,
    note_name,
    pack_name,
    snapshot_name,
)
from .locks import RepoLock
from .manifest import CloneInfo, Snapshot, canonical, fmt_time, utcnow
from .tree import TreeReader, changed_chunks, runs

DEFAULT_PACK_SIZE = 8 << 20
DEFAULT_CHUNK_SIZE = 64 << 10
DEFAULT_FANOUT = 256
ENCRYPTIONS = ("aes-256-gcm", "none")


def default_cache_dir() -> Path:
    env = os.environ.get("DINGYUAN_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dingyuan"


def _config_mac_input(cfg: dict[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in cfg.items() if k != "mac"}, sort_keys=True).encode()


class Repository:
    """An open repository. Thread-safe for reads; writers coordinate through locks."""

    def __init__(self, backend: Backend, cipher: Cipher, config: dict[str, Any], cache_dir: Path) -> None:
        self.backend = backend
        self.cipher = cipher
        self.config = config
        self.id: str = config["id"]
        self.pack_size: int = int(config.get("pack_size", DEFAULT_PACK_SIZE))
        self.cache = IndexCache(cache_dir / self.id / "cache.sqlite")
        self._local = threading.local()

    # opening ---------------------------------------------------------------------------------
    @classmethod
    def init(
        cls,
        backend: Backend,
        passphrase: bytes | None,
        encryption: str = "aes-256-gcm",
        cache_dir: Path | None = None,
        pack_size: int = DEFAULT_PACK_SIZE,
        kdf: KdfParams | None = None,
    ) -> Repository:
        if encryption not in ENCRYPTIONS:
            raise UsageError(f"unknown encryption {encryption!r}; choose one of {', '.join(ENCRYPTIONS)}")
        if backend.exists("config"):
            raise RepositoryExists(location=backend.location)
        if encryption != "none" and not passphrase:
            raise PassphraseRequired()
        master = secrets.token_bytes(64)
        cipher = Cipher(master, encrypted=encryption != "none")
        config: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "id": secrets.token_hex(16),
            "encryption": encryption,
            "pack_size": pack_size,
            "created": utcnow().isoformat(),
        }
        config["mac"] = cipher.mac(_config_mac_input(config)).hex()
        keydoc = wrap_master_key(
            master, passphrase if encryption != "none" else None, kdf or KdfParams.from_env()
        )
        backend.create(f"keys/{secrets.token_hex(8)}", json.dumps(keydoc).encode())
        try:
            backend.create("config", json.dumps(config, sort_keys=True).encode())
        except ObjectExists:
            raise RepositoryExists(location=backend.location) from None
        return cls(backend, cipher, config, cache_dir or default_cache_dir())

    @classmethod
    def open(cls, backend: Backend, passphrase: bytes | None, cache_dir: Path | None = None) -> Repository:
        try:
            raw = backend.get("config")
        except ObjectNotFound:
            raise RepositoryNotFound(location=backend.location) from None
        try:
            config = json.loads(raw)
        except ValueError as e:
            raise CorruptObject(name="config", detail=str(e)) from None
        if not isinstance(config, dict):
            raise CorruptObject(name="config", detail="not a JSON object")
        if config.get("format") != FORMAT_VERSION:
            raise UnsupportedFormat(what="config", detail=f"format {config.get('format')!r}")
        if config.get("encryption") not in ENCRYPTIONS:
            raise UnsupportedFormat(what="config", detail=f"encryption {config.get('encryption')!r}")
        encrypted = config["encryption"] != "none"
        if encrypted and passphrase is None:
            raise PassphraseRequired()
        master = None
        unsupported: UnsupportedFormat | None = None
        wrong = False
        for name, _ in sorted(backend.list("keys/")):
            try:
                doc = json.loads(backend.get(name))
                if encrypted and isinstance(doc, dict) and doc.get("kdf") == "none":
                    continue  # a clear key cannot open an encrypted repository: planted or wrong
                master = unwrap_master_key(doc, passphrase, name)
                break
            except WrongPassphrase:
                wrong = True
            except UnsupportedFormat as e:
                unsupported = e
            except ValueError as e:
                raise CorruptObject(name=name, detail=str(e)) from None
        if master is None:
            if unsupported is not None and not wrong:
                raise unsupported
            raise WrongPassphrase()
        cipher = Cipher(master, encrypted=encrypted)
        if cipher.mac(_config_mac_input(config)).hex() != config.get("mac"):
            raise CorruptObject(name="config", detail="authentication failed")
        return cls(backend, cipher, config, cache_dir or default_cache_dir())

    def close(self) -> None:
        self.cache.close()
        self.backend.close()

    def lock(self, exclusive: bool, purpose: str, wait: float = 10.0) -> RepoLock:
        return RepoLock(self.backend, exclusive, purpose, wait)

    def lock_is_sole(self, mine: str) -> bool:
        """True if no process but the holder of lock ``mine`` holds a lock."""
        return RepoLock.others(self.backend, mine) == 0

    # blobs -----------------------------------------------------------------------------------
    def decode_blob(self, entry: BlobEntry, stored: bytes | memoryview, where: str) -> bytes:
        """Decrypt, decompress and verify one stored blob; raise CorruptObject on any mismatch."""
        name = f"{where} blob {entry.id.hex()[:16]}"
        payload = self.cipher.open_blob(stored, entry.id + bytes([entry.type]), name)
        if entry.codec == Codec.ZSTD:
            try:
                declared = zstandard.frame_content_size(payload)
            except zstandard.ZstdError as e:
                raise CorruptObject(name=name, detail=f"bad compressed frame: {e}") from None
            if declared > entry.raw_length:  # -1 when the frame does not say
                raise CorruptObject(name=name, detail="compressed frame declares too much output")
            dctx = getattr(self._local, "dctx", None)
            if dctx is None:
                dctx = self._local.dctx = zstandard.ZstdDecompressor()
            try:
                data = dctx.decompress(payload, max_output_size=entry.raw_length)
            except zstandard.ZstdError as e:
                raise CorruptObject(name=name, detail=f"cannot decompress: {e}") from None
        else:
            data = payload
        if len(data) != entry.raw_length or self.cipher.blob_id(data) != entry.id:
            raise CorruptObject(name=name, detail="content does not match its id")
        return bytes(data)

    def locate(self, bid: bytes) -> Location:
        loc = self.cache.lookup(bid)
        if loc is None:
            raise MissingObject(name=f"blob {bid.hex()}", detail="not in any index")
        return loc

    def read_blob(self, bid: bytes) -> bytes:
        loc = self.locate(bid)
        name = pack_name(loc.pack)
        try:
            stored = self.backend.get_range(name, loc.entry.offset, loc.entry.length)
        except ObjectNotFound:
            raise MissingObject(name=name, detail=f"holds blob {bid.hex()[:16]}") from None
        return self.decode_blob(loc.entry, stored, name)

    def load_tree_node(self, bid: bytes, level: int) -> list[bytes]:
        data = self.read_blob(bid)
        got, ids = decode_tree_node(data, f"tree node {bid.hex()[:16]}")
        if got != level:
            raise CorruptObject(name=f"tree node {bid.hex()[:16]}", detail=f"level {got}, expected {level}")
        return ids

    def tree(self, snap: Snapshot) -> TreeReader:
        return TreeReader(snap.root, snap.height, snap.fanout, snap.nchunks, self.load_tree_node)

    def diff(self, a: Snapshot, b: Snapshot) -> list[tuple[int, int]]:
        """Byte ranges ``(offset, length)`` whose chunks differ between two snapshots of the same
        chunk size; equal subtrees are skipped. Holds a shared lock: gc may move tree nodes."""
        if a.chunk_size != b.chunk_size:
            raise UsageError(
                "the snapshots have different chunk sizes; compare their restored images instead"
            )
        cs, end = a.chunk_size, max(a.size, b.size)
        with self.lock(exclusive=False, purpose="diff"):
            self.sync_index()
            return [
                (i * cs, min((i + n) * cs, end) - i * cs)
                for i, n in runs(changed_chunks(self.tree(a), self.tree(b)))
            ]

    def read_pack_toc(self, pack: bytes, size: int) -> list[BlobEntry]:
        """Read a pack's own table of contents (from its trailer)."""
        name = pack_name(pack)
        if size < PACK_HEADER.size + PACK_TRAILER.size:
            raise CorruptObject(name=name, detail="pack too short")
        toc_len, end_magic = PACK_TRAILER.unpack(
            self.backend.get_range(name, size - PACK_TRAILER.size, PACK_TRAILER.size)
        )
        if end_magic != PACK_END_MAGIC:
            raise CorruptObject(name=name, detail="bad pack trailer")
        if toc_len > size - PACK_HEADER.size - PACK_TRAILER.size:
            raise CorruptObject(name=name, detail="table of contents length out of range")
        sealed = self.backend.get_range(name, size - PACK_TRAILER.size - toc_len, toc_len)
        entries = decode_toc(self.cipher.unseal(TOC_MAGIC, sealed, name), name)
        pos = PACK_HEADER.size  # blobs tile [header, TOC) in order, without gaps or overlaps
        for e in entries:
            if e.offset != pos:
                raise CorruptObject(
                    name=name, detail=f"table of contents entry at {e.offset}, expected {pos}"
                )
            pos += e.length
        if pos != size - PACK_TRAILER.size - toc_len:
            raise CorruptObject(name=name, detail="table of contents does not cover the pack")
        return entries

    @staticmethod
    def check_pack_bytes(pack: bytes, data: bytes) -> None:
        name = pack_name(pack)
        if blake3.blake3(data).digest() != pack:
            raise CorruptObject(name=name, detail="pack content does not match its name")
        if data[:8] != PACK_MAGIC:
            raise UnsupportedFormat(what=name, detail="pack magic")

    # index -----------------------------------------------------------------------------------
    def write_index_object(self, packs: list[PackRef]) -> str:
        """Durably write one index object for durable packs; return its name."""
        sealed = self.cipher.seal(INDEX_MAGIC, encode_index(packs))
        name = index_name(blake3.blake3(sealed).digest())
        with contextlib.suppress(ObjectExists):  # content-named: an equal object is already there
            self.backend.create(name, sealed)
        return name

    def write_index(self, packs: list[PackRef]) -> str:
        """Write one index object for durable packs and record it in the cache."""
        name = self.write_index_object(packs)
        self.cache.add_index(name, packs)
        return name

    def read_index(self, name: str) -> list[PackRef]:
        sealed = self.backend.get(name)
        if blake3.blake3(sealed).hexdigest() != name.rsplit("/", 1)[-1]:
            raise CorruptObject(name=name, detail="content does not match its name")
        return decode_index(self.cipher.unseal(INDEX_MAGIC, sealed, name), name)

    def sync_index(self) -> list[str]:
        """Bring the cache's index up to date with the repository's index objects.

        Returns the names of index objects that could not be read (their blobs count as missing).
        """
        names = {n for n, _ in self.backend.list("index/")}
        known = self.cache.index_files()
        if known - names:
            self.cache.clear_index()
            known = set()
        unreadable = []
        for name in sorted(names - known):
            try:
                packs = self.read_index(name)
            except (CorruptObject, UnsupportedFormat, ObjectNotFound):
                unreadable.append(name)  # 'dingyuan verify' reports it
                continue
            self.cache.add_index(name, packs)
        return unreadable

    # snapshots -------------------------------------------------------------------------------
    def snapshot_id(self, snap: Snapshot) -> str:
        return str(blake3.blake3(canonical(snap.core()), key=self.cipher.id_key).hexdigest())

    def _encode_manifest(self, snap: Snapshot) -> bytes:
        return self.cipher.seal_json(MANIFEST_MAGIC, {"core": snap.core()})

    def snapshot_names(self) -> set[str]:
        """The ids of every manifest in the repository, from one listing."""
        return {n.rsplit("/", 1)[-1] for n, _ in self.backend.list("snapshots/")}

    def note_names(self, prefix: str = "notes/") -> list[tuple[str, int]]:
        """``(snapshot id, revision)`` of every note under ``prefix``, from one listing; names that
        are not ``notes/<id>/<digits>`` are ignored."""
        out = []
        for name, _ in self.backend.list(prefix):
            parts = name.split("/")
            if len(parts) == 3 and parts[2].isdigit():
                out.append((parts[1], int(parts[2])))
        return out

    @staticmethod
    def note_revisions(notes: list[tuple[str, int]]) -> dict[str, int]:
        """Snapshot id -> its newest note revision."""
        out: dict[str, int] = {}
        for sid, rev in notes:
            out[sid] = max(out.get(sid, 0), rev)
        return out

    def _apply_note(self, snap: Snapshot, revision: int) -> None:
        name = note_name(snap.id, revision)
        doc = self.cipher.unseal_json(NOTE_MAGIC, self.backend.get(name), name)
        if doc.get("snapshot") != snap.id:
            raise CorruptObject(name=name, detail="note belongs to another snapshot")
        snap.apply_mutable(doc, name)
        snap.revision = revision

    def read_snapshot(self, sid: str) -> Snapshot:
        """Read a manifest (checked against its id) and its newest note."""
        name = snapshot_name(sid)
        try:
            sealed = self.backend.get(name)
        except ObjectNotFound:
            raise SnapshotNotFound(ref=sid) from None
        doc = self.cipher.unseal_json(MANIFEST_MAGIC, sealed, name)
        snap = Snapshot.from_doc(doc, name)
        snap.id = self.snapshot_id(snap)
        if snap.id != sid:
            raise CorruptObject(name=name, detail="manifest does not match its id")
        revision = self.note_revisions(self.note_names(f"notes/{sid}/")).get(sid)
        if revision is not None:
            self._apply_note(snap, revision)
        return snap

    def save_snapshot(self, snap: Snapshot) -> Snapshot:
        """Commit a new snapshot: the manifest is created atomically, last, and never rewritten."""
        snap.id = self.snapshot_id(snap)
        if snap.retention_until is not None or snap.annotations:
            self._write_note(snap, 1)
        self.backend.create(snapshot_name(snap.id), self._encode_manifest(snap))
        self._cache_snapshots([snap])
        return snap

    def _write_note(self, snap: Snapshot, revision: int) -> None:
        doc = {"snapshot": snap.id, "revision": revision, **snap.mutable()}
        self.backend.create(note_name(snap.id, revision), self.cipher.seal_json(NOTE_MAGIC, doc))
        snap.revision = revision

    def update_snapshot(self, snap: Snapshot) -> None:
        """Record new mutable metadata (retention lock, annotations) as the snapshot's next note.

        The manifest, and so the id, never changes. A retention lock can only be extended.
        """
        if self.snapshot_id(snap) != snap.id:
            raise UsageError("the immutable part of a snapshot cannot change")
        for _ in range(10):
            current = self.read_snapshot(snap.id)
            until = current.retention_until
            shortened = snap.retention_until is None or (until is not None and snap.retention_until < until)
            if until is not None and until > utcnow() and shortened:
                raise RetentionLocked(snapshot=snap.id[:12], until=until.isoformat())
            try:
                self._write_note(snap, current.revision + 1)
            except ObjectExists:
                continue  # a concurrent update took that revision: check again against it
            if current.revision:  # superseded; older ones were removed by earlier updates (or gc)
                self.backend.delete(note_name(snap.id, current.revision))
            self._cache_snapshots([snap])
            return
        raise LockedError(holder="concurrent snapshot updates", detail=snap.id[:12])

    def delete_snapshot(self, snap: Snapshot, now: datetime | None = None) -> None:
        current = self.read_snapshot(snap.id)  # the lock in the repository is authoritative
        if current.locked_at(now or utcnow()):
            assert current.retention_until is not None
            raise RetentionLocked(snapshot=snap.id[:12], until=current.retention_until.isoformat())
        clones = self.clone_bases().get(snap.id)
        if clones:
            raise UsageError(
                f"snapshot {snap.id[:12]} is the base of clone {', '.join(clones)}: delete or promote "
                "the clone first"
            )
        self.backend.delete(snapshot_name(snap.id))
        for name, _ in list(self.backend.list(f"notes/{snap.id}/")):
            self.backend.delete(name)
        self.cache.drop_snapshots([snap.id])

    # clones ----------------------------------------------------------------------------------
    def save_clone(self, info: CloneInfo) -> None:
        """Create a clone's record (create-if-absent: a clone id is never reused)."""
        self.backend.create(clone_name(info.id), self.cipher.seal_json(CLONE_MAGIC, info.doc()))

    def read_clone(self, cid: str) -> CloneInfo:
        """A clone's record, checked: its id is its name's, its base core gives its base id."""
        name = clone_name(cid)
        try:
            sealed = self.backend.get(name)
        except ObjectNotFound:
            raise CloneNotFound(name=cid) from None
        info = CloneInfo.from_doc(self.cipher.unseal_json(CLONE_MAGIC, sealed, name), name)
        if info.id != cid:
            raise CorruptObject(name=name, detail="record belongs to another clone")
        if self.snapshot_id(info.base) != info.base.id:
            raise CorruptObject(name=name, detail="base core does not match the base snapshot id")
        return info

    def clones(self) -> list[CloneInfo]:
        """Every clone, oldest first. A record that cannot be read fails the call: it may protect
        a base snapshot, so nothing that decides about bases may go on without it."""
        infos = [self.read_clone(name.rsplit("/", 1)[-1]) for name, _ in self.backend.list("clones/")]
        return sorted(infos, key=lambda c: (c.created, c.id))

    def delete_clone(self, cid: str) -> None:
        self.backend.delete(clone_name(cid))

    def clone_bases(self) -> dict[str, list[str]]:
        """Snapshot id -> names of the clones made from it (such a snapshot cannot be deleted)."""
        out: dict[str, list[str]] = {}
        for info in self.clones():
            out.setdefault(info.base.id, []).append(info.name)
        return out

    def _cache_snapshots(self, snaps: list[Snapshot]) -> None:
        self.cache.put_snapshots(
            (s.id, s.volume, s.host, fmt_time(s.time), json.dumps(s.doc()), s.revision) for s in snaps
        )

    def sync_snapshots(self) -> None:
        """Bring the cached manifests up to date: new, deleted, and those with a newer note.

        A manifest that cannot be read is left out here; 'dingyuan verify' reports it.
        """
        listed = self.snapshot_names()
        revisions = self.note_revisions(self.note_names())
        known = self.cache.snapshot_revisions()
        gone = known.keys() - listed
        if gone:
            self.cache.drop_snapshots(gone)
        fresh = []
        for sid in sorted(listed):
            if sid not in known or known[sid] != revisions.get(sid, 0):
                with contextlib.suppress(CorruptObject, UnsupportedFormat, SnapshotNotFound, ObjectNotFound):
                    fresh.append(self.read_snapshot(sid))
        if fresh:
            self._cache_snapshots(fresh)

    def snapshots(self, sync: bool = True) -> list[Snapshot]:
        """All snapshots, oldest first."""
        if sync:
            self.sync_snapshots()
        out = []
        for raw in self.cache.snapshot_docs():
            doc = json.loads(raw)
            snap = Snapshot.from_doc(doc, "cache")
            out.append(snap)
        return out

    def latest(self, volume: str, host: str | None = None) -> Snapshot | None:
        """The newest snapshot of a volume (of one host, if given), found in the cache by index."""
        self.sync_snapshots()
        doc = self.cache.latest_doc(volume, host)
        return None if doc is None else Snapshot.from_doc(json.loads(doc), "cache")

    def resolve(self, ref: str) -> Snapshot:
        """A snapshot by id, unique id prefix, ``VOLUME@latest`` or ``HOST:VOLUME@latest``."""
        if ref.endswith("@latest"):
            vol = ref[: -len("@latest")]
            host = None
            if ":" in vol:
                host, vol = vol.split(":", 1)
            snap = self.latest(vol, host)
            if snap is None:
                raise SnapshotNotFound(ref=ref)
            return self.read_snapshot(snap.id)  # the mutable part may be newer than the cache
        ref = ref.lower()
        if len(ref) < 4 or any(c not in "0123456789abcdef" for c in ref):
            raise SnapshotNotFound(ref=ref)
        self.sync_snapshots()
        # the listing, not the cache: a manifest that cannot be read must say so when named
        hits = sorted(sid for sid in self.snapshot_names() if sid.startswith(ref))
        if not hits:
            raise SnapshotNotFound(ref=ref)
        if len(hits) > 1:
            raise AmbiguousSnapshot(ref=ref, detail=", ".join(h[:12] for h in hits[:5]))
        return self.read_snapshot(hits[0])

    def iter_packs(self) -> Iterator[tuple[bytes, int]]:
        for name, size in self.backend.list("packs/"):
            try:
                yield bytes.fromhex(name.rsplit("/", 1)[-1]), size
            except ValueError:
                continue

    def recover_packs(self, delete_useless: bool = False) -> int:
        """Index packs that are durable but listed by no index object (after a crash).

        Only chunk blobs are re-indexed: they carry no references, so reviving one is always
        safe. Tree nodes of an interrupted backup are cheap to write again. Run only while no
        other process holds a lock, so in-flight packs of a concurrent backup are not touched.
        With ``delete_useless`` (gc), a pack without any chunk is deleted instead.
        """
        known = self.cache.known_packs()
        refs = []
        for pack, size in self.iter_packs():
            if pack in known:
                continue
            try:
                entries = [e for e in self.read_pack_toc(pack, size) if e.type == BlobType.CHUNK]
            except (CorruptObject, UnsupportedFormat):
                continue  # verify reports it; never index what we cannot read
            if entries:
                refs.append(PackRef(pack, size, entries))
            elif delete_useless:  # only tree nodes of an interrupted backup: garbage
                self.backend.delete(pack_name(pack))
        if refs:
            self.write_index(refs)
        return len(refs)
