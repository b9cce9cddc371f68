"""Delta restore at page granularity: a chunk damaged in a few pages costs writes of those pages.

A delta restore is aimed at a disk that is mostly right; what it writes is what the flush at the
end must carry to the disk. So a chunk that differs in one 4 KiB page gets that page written, and
a page written into a hole of the snapshot gets that page zeroed, not the whole chunk.
"""

from __future__ import annotations

import os
from pathlib import Path

from support import new_repo

from dingyuan.repository.backends.memory import MemoryBackend
from dingyuan.repository.backup import backup
from dingyuan.repository.restore import restore

CS = 16 << 10
PAGE = 4096


def test_only_the_damaged_pages_are_written_or_zeroed(tmp_path: Path) -> None:
    repo = new_repo(MemoryBackend(), tmp_path / "cache")
    # data chunk, hole chunk, data chunk, short last data chunk of 1000 bytes
    image = os.urandom(CS) + bytes(CS) + os.urandom(CS) + os.urandom(1000)
    (tmp_path / "src.img").write_bytes(image)
    snap = backup(repo, str(tmp_path / "src.img"), "vol", chunk_size=CS).snapshot
    target = tmp_path / "target.img"
    restore(repo, snap, str(target))

    fd = os.open(target, os.O_WRONLY)
    try:
        os.pwrite(fd, os.urandom(PAGE), PAGE + 100)  # chunk 0: pages 1 and 2
        os.pwrite(fd, b"x", CS + 3 * PAGE + 7)  # chunk 1, a hole of the snapshot: page 3
        os.pwrite(fd, b"y", 3 * CS + 999)  # the short last chunk
    finally:
        os.close(fd)

    stats = restore(repo, snap, str(target), delta=True)

    assert target.read_bytes() == image
    assert (stats.chunks_differing, stats.chunks_fetched) == (3, 2)
    assert stats.bytes_written == 2 * PAGE + 1000
    assert stats.bytes_zeroed == PAGE


def test_a_chunk_rewritten_whole_is_written_whole(tmp_path: Path) -> None:
    repo = new_repo(MemoryBackend(), tmp_path / "cache")
    image = os.urandom(4 * CS)
    (tmp_path / "src.img").write_bytes(image)
    snap = backup(repo, str(tmp_path / "src.img"), "vol", chunk_size=CS).snapshot
    target = tmp_path / "target.img"
    target.write_bytes(image[:CS] + os.urandom(CS) + bytes(CS) + image[3 * CS :])

    stats = restore(repo, snap, str(target), delta=True)

    assert target.read_bytes() == image
    assert stats.bytes_written == 2 * CS
    assert stats.bytes_zeroed == 0
