"""Keys, passphrases, encryption modes and tamper detection, through the Repository API."""

from __future__ import annotations

import contextlib
import json
import os
import random
from pathlib import Path

import pytest
from support import KDF, PASSPHRASE, new_repo, write_sparse

from dingyuan.errors import (
    CorruptObject,
    PassphraseRequired,
    RepositoryExists,
    RepositoryNotFound,
    UnsupportedFormat,
    UsageError,
    WrongPassphrase,
)
from dingyuan.repository.backends.local import LocalBackend
from dingyuan.repository.backends.memory import MemoryBackend
from dingyuan.repository.backup import backup
from dingyuan.repository.format import (
    INDEX_MAGIC,
    MANIFEST_MAGIC,
    PACK_HEADER,
    PACK_TRAILER,
    TOC_MAGIC,
    BlobType,
    Codec,
    snapshot_name,
)
from dingyuan.repository.repo import Repository
from dingyuan.repository.restore import restore

ENCRYPTIONS = ["aes-256-gcm", "none"]


def random_image(path: Path, size: int, seed: int = 1) -> bytes:
    data = random.Random(seed).randbytes(size)
    write_sparse(path, size, [(0, data)])
    return data


def reopen(repo: Repository, tmp_path: Path, passphrase: bytes | None = PASSPHRASE) -> Repository:
    return Repository.open(repo.backend, passphrase, cache_dir=tmp_path / "other-cache")


def memory(repo: Repository) -> MemoryBackend:
    assert isinstance(repo.backend, MemoryBackend)
    return repo.backend


# --- passphrases ---------------------------------------------------------------------------------


def test_open_with_the_right_passphrase(repo: Repository, tmp_path: Path) -> None:
    other = reopen(repo, tmp_path)
    assert other.id == repo.id
    assert other.cipher.id_key == repo.cipher.id_key and other.cipher.enc_key == repo.cipher.enc_key
    other.close()


def test_wrong_passphrase(repo: Repository, tmp_path: Path) -> None:
    with pytest.raises(WrongPassphrase):
        reopen(repo, tmp_path, b"not the passphrase")
    with pytest.raises(WrongPassphrase):
        reopen(repo, tmp_path, b"")


def test_missing_passphrase_on_an_encrypted_repository(repo: Repository, tmp_path: Path) -> None:
    with pytest.raises(PassphraseRequired):
        reopen(repo, tmp_path, None)


def test_init_of_an_encrypted_repository_needs_a_passphrase(tmp_path: Path) -> None:
    for passphrase in (None, b""):
        with pytest.raises(PassphraseRequired):
            Repository.init(MemoryBackend(), passphrase, cache_dir=tmp_path, kdf=KDF)
    with pytest.raises(UsageError):
        Repository.init(MemoryBackend(), b"x", encryption="rot13", cache_dir=tmp_path, kdf=KDF)


def test_kdf_parameters_come_from_the_environment(tmp_path: Path) -> None:
    # the hermetic fixture sets DINGYUAN_KDF=1024,1,1; Repository.init without kdf= uses it
    backend = MemoryBackend()
    Repository.init(backend, b"pw", cache_dir=tmp_path).close()
    [key] = [json.loads(backend.objects[n]) for n in backend.objects if n.startswith("keys/")]
    assert (key["kdf"], key["memory_kib"], key["iterations"], key["lanes"]) == ("argon2id", 1024, 1, 1)


def test_none_repository_needs_no_passphrase(tmp_path: Path) -> None:
    r = new_repo(MemoryBackend(), tmp_path / "c1", encryption="none")
    for passphrase in (None, b"anything"):
        other = Repository.open(r.backend, passphrase, cache_dir=tmp_path / "c2")
        assert other.cipher.id_key == r.cipher.id_key and not other.cipher.encrypted
        other.close()
    r.close()


# --- what is stored ------------------------------------------------------------------------------


@pytest.mark.parametrize("encryption", ENCRYPTIONS)
def test_plaintext_appears_only_without_encryption(tmp_path: Path, encryption: str) -> None:
    r = new_repo(MemoryBackend(), tmp_path / "cache", encryption=encryption)
    data = random_image(tmp_path / "img", 64 << 10, seed=7)
    res = backup(r, str(tmp_path / "img"), "vol", chunk_size=4 << 10)
    assert res.chunks_new == 16
    probes = [data[i : i + 4096] for i in range(0, len(data), 4096)] + [data[100:132], data[-40:]]
    everything = memory(r).objects
    found = [any(p in obj for obj in everything.values()) for p in probes]
    if encryption == "none":
        assert all(found), "unencrypted chunks are stored as they are (random data does not compress)"
    else:
        assert not any(found), "plaintext leaked into the encrypted repository"
    restore(r, res.snapshot, str(tmp_path / "out"))
    assert (tmp_path / "out").read_bytes() == data
    r.close()


def test_volume_names_and_labels_are_not_in_clear_when_encrypted(repo: Repository, tmp_path: Path) -> None:
    random_image(tmp_path / "img", 8192)
    backup(repo, str(tmp_path / "img"), "secret-volume-name", chunk_size=4096, labels={"who": "alice-label"})
    for name, obj in memory(repo).objects.items():
        assert b"secret-volume-name" not in obj and b"alice-label" not in obj, name


# --- tampering -----------------------------------------------------------------------------------


def one_pack(repo: Repository) -> tuple[str, bytes]:
    packs = {n: v for n, v in memory(repo).objects.items() if n.startswith("packs/")}
    assert len(packs) == 1
    return next(iter(packs.items()))


@pytest.mark.parametrize("encryption", ENCRYPTIONS)
def test_flipping_any_byte_of_a_blob_is_detected(tmp_path: Path, encryption: str) -> None:
    r = new_repo(MemoryBackend(), tmp_path / "cache", encryption=encryption)
    # one compressible chunk and one random one: both codecs
    write_sparse(tmp_path / "img", 8192, [(0, b"abc" * 1365), (4096, os.urandom(4096))])
    res = backup(r, str(tmp_path / "img"), "vol", chunk_size=4096)
    pname, pack = one_pack(r)
    codecs: set[Codec] = set()
    for bid in (*r.tree(res.snapshot).ids_range(0, 2), res.snapshot.root):
        loc = r.locate(bid)
        stored = pack[loc.entry.offset : loc.entry.offset + loc.entry.length]
        plain = r.decode_blob(loc.entry, stored, pname)
        for i in range(len(stored)):
            bad = bytearray(stored)
            bad[i] ^= 0x01 << (i % 8)
            if encryption == "none" and loc.entry.codec == Codec.ZSTD:
                # a few zstd frame-header bits (the window size) do not change the output; such a
                # flip is harmless, as what is returned is still proven by the id
                with contextlib.suppress(CorruptObject):
                    assert r.decode_blob(loc.entry, bytes(bad), pname) == plain
                continue
            with pytest.raises(CorruptObject):
                r.decode_blob(loc.entry, bytes(bad), pname)
        codecs.add(loc.entry.codec)
    assert codecs == {Codec.RAW, Codec.ZSTD}
    r.close()


@pytest.mark.parametrize("encryption", ENCRYPTIONS)
def test_flipping_any_byte_of_a_sealed_object_is_detected(tmp_path: Path, encryption: str) -> None:
    """Manifests, index objects and pack TOCs: a flip in the magic is UnsupportedFormat (it no longer
    names the object's kind), a flip anywhere else CorruptObject."""
    r = new_repo(MemoryBackend(), tmp_path / "cache", encryption=encryption)
    random_image(tmp_path / "img", 8192)
    res = backup(r, str(tmp_path / "img"), "vol", chunk_size=4096)
    objects = memory(r).objects
    sid = res.snapshot.id
    manifest = objects[snapshot_name(sid)]
    [index_name] = [n for n in objects if n.startswith("index/")]
    index = objects[index_name]
    pname, pack = one_pack(r)
    (toc_len, _) = PACK_TRAILER.unpack(pack[-PACK_TRAILER.size :])
    toc_start = len(pack) - PACK_TRAILER.size - toc_len
    toc = pack[toc_start : len(pack) - PACK_TRAILER.size]
    assert manifest[:8] == MANIFEST_MAGIC and index[:8] == INDEX_MAGIC and toc[:8] == TOC_MAGIC
    pid = bytes.fromhex(pname.rsplit("/", 1)[-1])

    def flipped(data: bytes, i: int) -> bytes:
        bad = bytearray(data)
        bad[i] ^= 0x80 >> (i % 8)
        return bytes(bad)

    for i in range(len(manifest)):
        objects[snapshot_name(sid)] = flipped(manifest, i)
        with pytest.raises(UnsupportedFormat if i < 8 else CorruptObject):
            r.read_snapshot(sid)
    objects[snapshot_name(sid)] = manifest
    assert r.read_snapshot(sid).root == res.snapshot.root
    for i in range(len(index)):
        objects[index_name] = flipped(index, i)
        with pytest.raises(CorruptObject):  # the name is the hash of the content: checked first
            r.read_index(index_name)
        with pytest.raises(UnsupportedFormat if i < 8 else CorruptObject):
            r.cipher.unseal(INDEX_MAGIC, flipped(index, i), index_name)
    objects[index_name] = index
    assert r.read_index(index_name)[0].id == pid
    for i in range(len(toc)):
        objects[pname] = pack[:toc_start] + flipped(toc, i) + pack[len(pack) - PACK_TRAILER.size :]
        with pytest.raises(UnsupportedFormat if i < 8 else CorruptObject):
            r.read_pack_toc(pid, len(pack))
    for i in range(len(pack) - PACK_TRAILER.size + 8, len(pack)):  # the end magic
        objects[pname] = flipped(pack, i)
        with pytest.raises(CorruptObject):
            r.read_pack_toc(pid, len(pack))
    for i in range(PACK_HEADER.size):
        with pytest.raises((CorruptObject, UnsupportedFormat)):
            Repository.check_pack_bytes(pid, flipped(pack, i))
    objects[pname] = pack
    Repository.check_pack_bytes(pid, pack)
    assert len(r.read_pack_toc(pid, len(pack))) == 3  # two chunks and one tree node
    r.close()


@pytest.mark.parametrize("encryption", ENCRYPTIONS)
def test_a_blob_moved_under_another_id_fails(tmp_path: Path, encryption: str) -> None:
    r = new_repo(MemoryBackend(), tmp_path / "cache", encryption=encryption)
    a, b = os.urandom(4096), os.urandom(4096)
    write_sparse(tmp_path / "img", 8192, [(0, a), (4096, b)])
    res = backup(r, str(tmp_path / "img"), "vol", chunk_size=4096)
    ida, idb = r.tree(res.snapshot).ids_range(0, 2)
    la, lb = r.locate(ida), r.locate(idb)
    assert la.entry.length == lb.entry.length and la.pack == lb.pack
    pname, pack = one_pack(r)
    sa = pack[la.entry.offset : la.entry.offset + la.entry.length]
    sb = pack[lb.entry.offset : lb.entry.offset + lb.entry.length]
    with pytest.raises(CorruptObject):
        r.decode_blob(lb.entry, sa, pname)
    # the same id with another type: the AAD binds the type too (plaintext blobs have no AAD)
    if encryption != "none":
        as_tree = type(la.entry)(ida, BlobType.TREE, la.entry.codec, la.entry.raw_length, 0, 0)
        with pytest.raises(CorruptObject):
            r.decode_blob(as_tree, sa, pname)
    # swap the two blobs inside the pack: the restore must refuse, never write b where a was
    swapped = bytearray(pack)
    swapped[la.entry.offset : la.entry.offset + len(sa)] = sb
    swapped[lb.entry.offset : lb.entry.offset + len(sb)] = sa
    memory(r).objects[pname] = bytes(swapped)
    with pytest.raises(CorruptObject):
        restore(r, res.snapshot, str(tmp_path / "out"))
    r.close()


def test_a_key_from_another_repository_is_useless(repo: Repository, tmp_path: Path) -> None:
    other = new_repo(MemoryBackend(), tmp_path / "c2")
    be = memory(repo)
    for n in [n for n in be.objects if n.startswith("keys/")]:
        del be.objects[n]
    for n, v in memory(other).objects.items():
        if n.startswith("keys/"):
            be.objects[n] = v
    with pytest.raises(CorruptObject):  # the key opens, but the config's MAC does not match it
        reopen(repo, tmp_path)
    other.close()


@pytest.mark.parametrize(
    "change",
    [
        {"pack_size": 1 << 20},
        {"pack_size": 256 << 10, "id": "0" * 32},
        {"created": "1970-01-01T00:00:00+00:00"},
        {"extra": True},
        {"mac": "00" * 16},
    ],
    ids=["pack_size", "id", "created", "extra-field", "mac"],
)
def test_config_tampering_is_detected_on_open(
    repo: Repository, tmp_path: Path, change: dict[str, object]
) -> None:
    be = memory(repo)
    cfg = json.loads(be.objects["config"])
    cfg.update(change)
    be.objects["config"] = json.dumps(cfg, sort_keys=True).encode()
    with pytest.raises(CorruptObject):
        reopen(repo, tmp_path)


def test_config_claiming_no_encryption_is_rejected(repo: Repository, tmp_path: Path) -> None:
    be = memory(repo)
    cfg = json.loads(be.objects["config"])
    cfg["encryption"] = "none"
    be.objects["config"] = json.dumps(cfg).encode()
    with pytest.raises(CorruptObject):
        reopen(repo, tmp_path)
    with pytest.raises((CorruptObject, WrongPassphrase)):
        reopen(repo, tmp_path, None)


@pytest.mark.parametrize("raw", [b"", b"{not json", b"\xff\xfe", b'{"format": 99}', b'{"format": "1"}'])
def test_unreadable_config(repo: Repository, tmp_path: Path, raw: bytes) -> None:
    memory(repo).objects["config"] = raw
    with pytest.raises((CorruptObject, UnsupportedFormat)):
        reopen(repo, tmp_path)


@pytest.mark.parametrize("raw", [b"[]", b"null", b"42", b'"config"'])
def test_non_object_config_is_corrupt(repo: Repository, tmp_path: Path, raw: bytes) -> None:
    memory(repo).objects["config"] = raw
    with pytest.raises(CorruptObject):
        reopen(repo, tmp_path)


def only_key(repo: Repository) -> str:
    [name] = [n for n in memory(repo).objects if n.startswith("keys/")]
    return name


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"[]",
        b"42",
        b'"key"',
        b'{"version": 1, "kdf": "argon2id"}',
        b'{"version": 1, "kdf": "argon2id", "memory_kib": 1024, "iterations": 1, "lanes": 1}',
        b'{"version": 1, "kdf": "argon2id", "memory_kib": 1024, "iterations": 1, "lanes": 1, '
        b'"salt": "!!", "nonce": "AAAAAAAAAAAAAAAA", "key": "AAAA"}',
    ],
)
def test_corrupt_key_object(repo: Repository, tmp_path: Path, raw: bytes) -> None:
    memory(repo).objects[only_key(repo)] = raw
    with pytest.raises(CorruptObject):
        reopen(repo, tmp_path)


@pytest.mark.parametrize("key", ["not base64!", "AAAA"])
def test_corrupt_clear_key(tmp_path: Path, key: str) -> None:
    r = new_repo(MemoryBackend(), tmp_path / "c1", encryption="none")
    memory(r).objects[only_key(r)] = json.dumps({"version": 1, "kdf": "none", "key": key}).encode()
    with pytest.raises(CorruptObject):
        Repository.open(r.backend, None, cache_dir=tmp_path / "c2")
    r.close()


def test_a_planted_clear_key_does_not_open_an_encrypted_repository(repo: Repository, tmp_path: Path) -> None:
    from dingyuan.repository.crypto import wrap_master_key

    be = memory(repo)
    planted = json.dumps(wrap_master_key(os.urandom(64), None, KDF)).encode()
    be.objects["keys/0000-planted"] = planted  # sorts before the real key
    other = reopen(repo, tmp_path)
    assert other.cipher.enc_key == repo.cipher.enc_key
    other.close()
    real = [n for n in be.objects if n.startswith("keys/") and n != "keys/0000-planted"]
    for n in real:
        del be.objects[n]
    with pytest.raises(WrongPassphrase):
        reopen(repo, tmp_path)


@pytest.mark.parametrize(
    "doc", [{"version": 2, "kdf": "argon2id"}, {"version": 1, "kdf": "scrypt"}], ids=["version", "kdf"]
)
def test_an_unsupported_key_object_is_reported_as_unsupported(
    repo: Repository, tmp_path: Path, doc: dict[str, object]
) -> None:
    memory(repo).objects[only_key(repo)] = json.dumps(doc).encode()
    with pytest.raises(UnsupportedFormat):
        reopen(repo, tmp_path)


def test_a_second_key_for_another_passphrase(repo: Repository, tmp_path: Path) -> None:
    from dingyuan.repository.crypto import wrap_master_key

    master = repo.cipher.id_key + repo.cipher.enc_key
    memory(repo).objects["keys/second"] = json.dumps(wrap_master_key(master, b"second", KDF)).encode()
    for pw in (PASSPHRASE, b"second"):
        other = reopen(repo, tmp_path, pw)
        assert other.cipher.enc_key == repo.cipher.enc_key
        other.close()
    with pytest.raises(WrongPassphrase):
        reopen(repo, tmp_path, b"third")


# --- existence -----------------------------------------------------------------------------------


def test_init_on_an_existing_repository(repo_local: Repository, tmp_path: Path) -> None:
    before = sorted(n for n, _ in repo_local.backend.list())
    for encryption in ENCRYPTIONS:
        with pytest.raises(RepositoryExists):
            new_repo(LocalBackend(tmp_path / "repo"), tmp_path / "c2", encryption=encryption)
    assert sorted(n for n, _ in repo_local.backend.list()) == before, "a failed init left objects behind"
    Repository.open(LocalBackend(tmp_path / "repo"), PASSPHRASE, cache_dir=tmp_path / "c3").close()


def test_open_of_an_empty_or_missing_directory(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for where in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(RepositoryNotFound):
            Repository.open(LocalBackend(where), PASSPHRASE, cache_dir=tmp_path / "cache")
    with pytest.raises(RepositoryNotFound):
        Repository.open(MemoryBackend(), None, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "missing").exists()


def test_local_repository_roundtrip(repo_local: Repository, tmp_path: Path) -> None:
    data = random_image(tmp_path / "img", 100_000)
    res = backup(repo_local, str(tmp_path / "img"), "vol", chunk_size=4096)
    other = Repository.open(LocalBackend(tmp_path / "repo"), PASSPHRASE, cache_dir=tmp_path / "c2")
    restore(other, other.resolve("vol@latest"), str(tmp_path / "out"))
    assert (tmp_path / "out").read_bytes() == data
    assert other.resolve(res.snapshot.id).root == res.snapshot.root
    other.close()
