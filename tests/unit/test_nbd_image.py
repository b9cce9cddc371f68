"""A snapshot image served over NBD: the server answers its reads on the event loop (read_soon),
so these check what a client relies on through that path: nbdcopy with several connections and
many requests in flight copies exactly the snapshot's bytes, a libnbd client with reads in flight
out of order gets each one right, and a chunk that fails its check fails its read with EIO while
the connection goes on serving the others.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest
from support import damage_blob, new_repo, write_sparse

from dingyuan.exports.nbd.server import ThreadedNbdServer
from dingyuan.repository.backends.memory import MemoryBackend
from dingyuan.repository.backup import backup
from dingyuan.repository.image import SnapshotImage
from dingyuan.repository.repo import Repository

KiB, MiB = 1 << 10, 1 << 20
SIZE = 40 * MiB

pytestmark = pytest.mark.skipif(shutil.which("nbdcopy") is None, reason="nbdcopy missing")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, bytes, MemoryBackend, Repository, SnapshotImage]]:
    """A 40 MiB snapshot (data runs between holes) exported as ``snap``: its URI, bytes,
    backend, repository and image."""
    rnd = random.Random(11)
    writes = [(off, rnd.randbytes(n)) for off, n in [(0, 9 * MiB), (12 * MiB, 5 * MiB), (30 * MiB, 10 * MiB)]]
    write_sparse(tmp_path / "src", SIZE, writes)
    content = bytearray(SIZE)
    for off, data in writes:
        content[off : off + len(data)] = data
    backend = MemoryBackend()
    repo = new_repo(backend, tmp_path / "cache")
    snap = backup(repo, str(tmp_path / "src"), "vol", host="h").snapshot
    image = SnapshotImage(repo, snap, cache_bytes=8 * MiB, max_readahead=2 * MiB)
    try:
        with ThreadedNbdServer(host="127.0.0.1", port=0) as server:
            server.add("snap", image)
            yield f"nbd://127.0.0.1:{server.port}/snap", bytes(content), backend, repo, image
    finally:
        image.close()
        repo.close()


def test_nbdcopy_with_many_requests_in_flight_copies_the_snapshot(
    served: tuple[str, bytes, MemoryBackend, Repository, SnapshotImage], tmp_path: Path
) -> None:
    uri, content, *_ = served
    for n in range(2):  # the second time, part of it comes from the cache
        out = tmp_path / f"out{n}.img"
        copy = ["nbdcopy", "--connections=4", "--requests=64", "--request-size=131072", uri, str(out)]
        subprocess.run(copy, check=True)
        assert out.read_bytes() == content


def test_reads_in_flight_out_of_order_each_get_their_bytes(
    served: tuple[str, bytes, MemoryBackend, Repository, SnapshotImage],
) -> None:
    uri, content, *_ = served
    rnd = random.Random(12)
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        # sequential streams interleaved with random reads, 48 in flight
        ranges = [(off, 256 * KiB) for off in range(0, SIZE, 256 * KiB)]
        ranges += [(rnd.randrange(SIZE - 70 * KiB), rnd.randint(1, 70 * KiB)) for _ in range(200)]
        rnd.shuffle(ranges[: len(ranges) // 2])
        pending: dict[int, tuple[nbd.Buffer, int, int]] = {}
        for off, n in ranges:
            while len(pending) >= 48:
                h.poll(-1)
                for cookie in [c for c in pending if h.aio_command_completed(c)]:
                    buf, o, length = pending.pop(cookie)
                    assert buf.to_bytearray() == content[o : o + length], f"read at {o}+{length}"
            buf = nbd.Buffer(n)
            pending[h.aio_pread(buf, off)] = (buf, off, n)
        while pending:
            h.poll(-1)
            for cookie in [c for c in pending if h.aio_command_completed(c)]:
                buf, o, length = pending.pop(cookie)
                assert buf.to_bytearray() == content[o : o + length], f"read at {o}+{length}"
    finally:
        h.shutdown()


def test_a_corrupt_chunk_fails_its_reads_with_eio_and_the_rest_still_reads(
    served: tuple[str, bytes, MemoryBackend, Repository, SnapshotImage],
) -> None:
    uri, content, backend, repo, image = served
    cs = image.block_size
    bad = 20  # the chunk at 1.25 MiB
    damage_blob(repo, backend, image.tree.ids_range(bad, 1)[0], 0x80)
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        for off in range(0, 4 * MiB, 256 * KiB):  # sequential: the bad chunk is read ahead
            if off <= bad * cs < off + 256 * KiB:
                with pytest.raises(nbd.Error) as failed:
                    h.pread(256 * KiB, off)
                assert failed.value.errno == "EIO"
            else:
                assert h.pread(256 * KiB, off) == content[off : off + 256 * KiB]
        with pytest.raises(nbd.Error):
            h.pread(1, bad * cs + 5)
        assert h.pread(cs, (bad + 1) * cs) == content[(bad + 1) * cs : (bad + 2) * cs]
    finally:
        h.shutdown()
