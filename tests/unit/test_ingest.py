"""The transfer protocol end to end in one process: the agent's scan and upload sink against the
vault's Ingest, bound by a client that calls Ingest directly (the HTTP layer is tested in
tests/integration). What a user relies on: restored bytes equal the source, an incremental run
sends only what changed, a killed vault keeps what arrived, and nothing incomplete is committed."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from blake3 import blake3

from dingyuan.agent.leafcache import HEADER, LeafCache
from dingyuan.agent.runner import RunSpec, leaf_path, run_backup
from dingyuan.agent.upload import UPLOAD_BYTES
from dingyuan.errors import IncompleteSnapshot, SessionNotFound, StorageFull, UploadRejected
from dingyuan.protocol import Frame, frame_header, parse_frames
from dingyuan.repository.backends.local import LocalBackend
from dingyuan.repository.crypto import KdfParams
from dingyuan.repository.format import BlobType, Codec, encode_tree_node
from dingyuan.repository.manifest import parse_time
from dingyuan.repository.repo import Repository
from dingyuan.repository.restore import restore
from dingyuan.vault.ingest import CommitInfo, Ingest
from transferkit import HOST, DirectClient

CS = 16 << 10


def _image(path: Path, size: int, seed: int) -> None:
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        for i in range(size // CS):
            kind = rnd.random()
            if kind < 0.3:
                f.write(bytes(CS))
            elif kind < 0.6:
                f.write((b"row %08d " % i) * (CS // 13) + bytes(CS % 13))
            else:
                f.write(rnd.randbytes(CS))


def _scribble(path: Path, seed: int, count: int) -> None:
    rnd = random.Random(seed)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        for _ in range(count):
            f.seek(rnd.randrange(0, size - 4096) & ~4095)
            f.write(rnd.randbytes(4096))


def _restored_digest(repo: Repository, sid: str, tmp: Path) -> str:
    out = tmp / f"restored-{sid[:8]}"
    restore(repo, repo.read_snapshot(sid), str(out), fsync=False)
    return hashlib.sha256(out.read_bytes()).hexdigest()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def world(repo_local: Repository, tmp_path: Path) -> tuple[Repository, Ingest, DirectClient, Path]:
    ingest = Ingest(repo_local, tmp_path / "spool")
    return repo_local, ingest, DirectClient(ingest), tmp_path / "agent"


def _run(client: DirectClient, repo: Repository, state: Path, src: Path) -> dict[str, Any]:
    spec = RunSpec(volume="disk0", source=str(src), chunk_size=CS)
    return run_backup(client, repo.cipher.id_key, state, spec).snapshot  # type: ignore[arg-type]


def test_full_and_incremental_runs_restore_bit_exact_and_send_only_changes(
    world: tuple[Repository, Ingest, DirectClient, Path], tmp_path: Path
) -> None:
    repo, _, client, state = world
    src = tmp_path / "disk.img"
    _image(src, 4 << 20, seed=1)
    first = _run(client, repo, state, src)
    assert _restored_digest(repo, first["id"], tmp_path) == _digest(src)
    full = client.uploaded

    _scribble(src, seed=2, count=8)
    client.uploaded = 0
    second = _run(client, repo, state, src)
    assert _restored_digest(repo, second["id"], tmp_path) == _digest(src)
    # 8 scattered 4 KiB writes touch at most 8 chunks of 16 KiB, plus tree nodes
    assert client.uploaded <= 8 * (CS + 64) + 4096
    assert client.uploaded < full / 20
    snap = repo.read_snapshot(second["id"])
    assert snap.parent == first["id"] and snap.host == HOST and snap.volume == "disk0"
    cache = LeafCache.load(leaf_path(state, "disk0"))
    assert cache is not None and cache.snapshot_id == second["id"]


def test_a_killed_vault_keeps_what_arrived_and_the_next_run_does_not_resend_it(
    world: tuple[Repository, Ingest, DirectClient, Path], tmp_path: Path
) -> None:
    repo, ingest, client, state = world
    src = tmp_path / "disk.img"
    _image(src, 4 << 20, seed=3)
    client.fail_uploads_after = 1 << 20  # the connection drops after about 1 MiB
    with pytest.raises(ConnectionError):
        _run(client, repo, state, src)
    arrived = client.uploaded
    assert arrived > 0
    # the vault process dies: its sessions and their lock vanish, its packs and spool stay
    for s in ingest.sessions():
        s.lock.release()
    restarted = Ingest(repo, ingest.spool_dir)
    assert restarted.recover() > 0
    client2 = DirectClient(restarted)
    snap = _run(client2, repo, state, src)
    assert _restored_digest(repo, snap["id"], tmp_path) == _digest(src)
    # what arrived before the drop is not sent again (only tree nodes may be)
    assert client2.uploaded <= _full_upload_size(tmp_path, src) - arrived + 16 * 1024


def _full_upload_size(tmp_path: Path, src: Path) -> int:
    """Bytes a first run of ``src`` sends to an empty vault."""
    repo = Repository.init(
        LocalBackend(tmp_path / "other-repo"),
        b"test",
        cache_dir=tmp_path / "other-cache",
        pack_size=256 << 10,
        kdf=KdfParams(1024, 1, 1),
    )
    try:
        client = DirectClient(Ingest(repo, tmp_path / "other-spool"))
        _run(client, repo, tmp_path / "other-agent", src)
        return client.uploaded
    finally:
        repo.close()


def test_a_commit_refers_only_to_blobs_the_vault_holds(
    world: tuple[Repository, Ingest, DirectClient, Path], tmp_path: Path
) -> None:
    repo, ingest, client, state = world
    src = tmp_path / "disk.img"
    _image(src, 1 << 20, seed=4)
    first = _run(client, repo, state, src)
    # chunk 0 gets content the vault has never seen, and the leaf cache wrongly claims the last
    # snapshot had it: the run skips it, the vault refuses the commit, the runner sends again
    # without the cache
    new0 = os.urandom(CS)
    with open(src, "r+b") as f:
        f.write(new0)
    cache = leaf_path(state, "disk0")
    data = bytearray(cache.read_bytes())
    data[HEADER.size : HEADER.size + 32] = blake3(new0, key=repo.cipher.id_key).digest()
    cache.write_bytes(bytes(data))
    snap = _run(client, repo, state, src)
    assert snap["id"] != first["id"]
    assert _restored_digest(repo, snap["id"], tmp_path) == _digest(src)

    # and directly: a tree naming a chunk the vault lacks is refused, no snapshot is written
    s = ingest.start(HOST, "disk1", CS, CS)
    node = encode_tree_node(0, [b"\x07" * 32])
    nid = blake3(node, key=repo.cipher.id_key).digest()
    ingest.receive(s, [Frame(nid, BlobType.TREE, Codec.RAW, len(node), memoryview(node))])
    with pytest.raises(IncompleteSnapshot):
        ingest.commit(s, CommitInfo(root=nid, height=1, time=parse_time("2026-01-01T00:00:00.000000Z")))
    assert [x.volume for x in repo.snapshots()] == ["disk0", "disk0"]


def test_a_frame_whose_content_does_not_match_its_id_changes_nothing(
    world: tuple[Repository, Ingest, DirectClient, Path],
) -> None:
    repo, ingest, _, _ = world
    s = ingest.start(HOST, "disk0", CS, CS)
    good = os.urandom(CS)
    gid = blake3(good, key=repo.cipher.id_key).digest()
    bad = Frame(bytes(32 - 1) + b"\x01", BlobType.CHUNK, Codec.RAW, CS, memoryview(os.urandom(CS)))
    with pytest.raises(UploadRejected):
        ingest.receive(s, [Frame(gid, BlobType.CHUNK, Codec.RAW, CS, memoryview(good)), bad])
    assert ingest.missing([gid]) == [0]
    body = frame_header(gid, BlobType.CHUNK, Codec.ZSTD, CS, 10) + b"x" * 10
    frames, _ = parse_frames(memoryview(body))
    with pytest.raises(UploadRejected):
        ingest.receive(s, frames)
    ingest.abort(s)
    with pytest.raises(SessionNotFound):
        ingest.get(s.id)


def test_a_commit_may_rely_on_a_blob_another_open_session_received(
    world: tuple[Repository, Ingest, DirectClient, Path],
) -> None:
    """An agent killed mid-run leaves its session open; the next run's session skips what the old
    one received, and its commit must still find it."""
    repo, ingest, _, _ = world
    chunk = os.urandom(CS)
    cid = blake3(chunk, key=repo.cipher.id_key).digest()
    node = encode_tree_node(0, [cid])
    nid = blake3(node, key=repo.cipher.id_key).digest()
    old = ingest.start(HOST, "disk0", CS, CS)
    assert ingest.receive(old, [Frame(cid, BlobType.CHUNK, Codec.RAW, CS, memoryview(chunk))]) == 1
    new = ingest.start(HOST, "disk0", CS, CS)
    assert ingest.missing([cid]) == []
    assert ingest.receive(new, [Frame(cid, BlobType.CHUNK, Codec.RAW, CS, memoryview(chunk))]) == 0
    ingest.receive(new, [Frame(nid, BlobType.TREE, Codec.RAW, len(node), memoryview(node))])
    snap = ingest.commit(new, CommitInfo(root=nid, height=1, time=parse_time("2026-01-01T00:00:00.000000Z")))
    assert repo.read_snapshot(snap.id).root == nid
    ingest.abort(old)


def test_the_bandwidth_limit_paces_the_upload(
    world: tuple[Repository, Ingest, DirectClient, Path], tmp_path: Path
) -> None:
    repo, _, client, state = world
    src = tmp_path / "disk.img"
    src.write_bytes(os.urandom(2 << 20))
    rate = 4 << 20  # bytes per second
    spec = RunSpec(volume="disk0", source=str(src), chunk_size=CS, bandwidth_limit=rate)
    t0 = time.monotonic()
    result = run_backup(client, repo.cipher.id_key, state, spec)  # type: ignore[arg-type]
    elapsed = time.monotonic() - t0
    # the first request may go at once; every byte after it waits for its turn
    assert result.bytes_sent > 2 << 20
    assert elapsed >= (result.bytes_sent - UPLOAD_BYTES) / rate * 0.95


@pytest.mark.skipif(shutil.which("losetup") is None or os.geteuid() != 0, reason="needs losetup as root")
def test_a_block_device_is_backed_up_like_a_file(
    world: tuple[Repository, Ingest, DirectClient, Path], tmp_path: Path
) -> None:
    repo, _, client, state = world
    img = tmp_path / "disk.img"
    _image(img, 2 << 20, seed=9)
    dev = subprocess.run(
        ["losetup", "-f", "--show", str(img)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        snap = run_backup(  # type: ignore[arg-type]
            client, repo.cipher.id_key, state, RunSpec(volume="sdb", source=dev, chunk_size=CS)
        ).snapshot
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)
    assert repo.read_snapshot(snap["id"]).size == 2 << 20
    assert _restored_digest(repo, snap["id"], tmp_path) == _digest(img)


def test_a_full_spool_disk_refuses_the_upload_clearly_and_keeps_nothing_half_written(
    world: tuple[Repository, Ingest, DirectClient, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    repo, ingest, _, _ = world
    s = ingest.start(HOST, "disk0", CS, CS)
    chunk = os.urandom(CS)
    cid = blake3(chunk, key=repo.cipher.id_key).digest()

    def full(fd: int, buffers: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "writev", full)
    with pytest.raises(StorageFull):
        ingest.receive(s, [Frame(cid, BlobType.CHUNK, Codec.RAW, CS, memoryview(chunk))])
    monkeypatch.undo()
    assert ingest.missing([cid]) == [0], "a blob that was never written must not count as present"
    ingest.abort(s)
