"""The vault directory: init (repository, catalog, TLS material), load, and the CLI round trip."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from dingyuan.catalog.db import current_revision, head_revision
from dingyuan.cli.main import cli
from dingyuan.errors import DingyuanError, VaultConfigError, VaultExists, VaultNotFound
from dingyuan.repository.backends.local import LocalBackend
from dingyuan.repository.backup import backup
from dingyuan.repository.repo import Repository
from dingyuan.vault.config import CONFIG_NAME, VaultConfig, init_vault, load_vault
from dingyuan.vault.tls import create_tls, fingerprint, load_cert

PASSPHRASE = b"vault-test"


@pytest.fixture
def vault(tmp_path: Path) -> VaultConfig:
    return init_vault(tmp_path / "vault", PASSPHRASE, hostnames=["vault.example.test", "10.1.2.3"])


def test_init_creates_the_layout(vault: VaultConfig, tmp_path: Path) -> None:
    d = (tmp_path / "vault").resolve()
    assert vault.dir == d
    for name in ("vault.json", "repository/config", "catalog.sqlite", "tls/ca.pem", "tls/ca.key"):
        assert (d / name).is_file(), name
    assert (d / "tls/server.pem").is_file() and (d / "tls/server.key").is_file()
    assert (d / "cache").is_dir()
    assert vault.listen == "127.0.0.1:8443"
    assert vault.catalog_url == f"sqlite:///{d / 'catalog.sqlite'}"

    doc = json.loads((d / CONFIG_NAME).read_text())
    assert doc["version"] == 1 and doc["repository"] == "repository" and doc["tls_key"] == "tls/server.key"
    assert load_vault(d) == vault

    repo = Repository.open(LocalBackend(vault.repository), PASSPHRASE, vault.cache_dir)
    try:
        assert repo.id == vault.repository_id
    finally:
        repo.close()
    engine = sa.create_engine(vault.catalog_url)
    try:
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_tls_material(vault: VaultConfig) -> None:
    ca = load_cert(vault.tls_ca_cert)
    server = load_cert(vault.tls_cert)
    server.verify_directly_issued_by(ca)
    ca.verify_directly_issued_by(ca)

    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku

    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"vault.example.test", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.1.2.3"),
    }
    for path in (vault.tls_ca_key, vault.tls_key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        assert key.key_size == 256  # type: ignore[union-attr]
    assert vault.ca_fingerprint() == fingerprint(ca)
    assert len(vault.ca_fingerprint().split(":")) == 32


def _serve_once(cfg: VaultConfig) -> tuple[socket.socket, threading.Thread, list[BaseException]]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    listener = socket.create_server(("127.0.0.1", 0))
    errors: list[BaseException] = []

    def run() -> None:
        try:
            conn, _ = listener.accept()
            conn.settimeout(10)
            with ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"hello")
        except (OSError, ssl.SSLError) as e:
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return listener, t, errors


def _client(cafile: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED by default
    ctx.load_verify_locations(cafile=cafile)
    assert ctx.check_hostname
    return ctx


def test_tls_handshake_trusts_only_the_vault_ca(vault: VaultConfig, tmp_path: Path) -> None:
    listener, t, errors = _serve_once(vault)
    try:
        port = listener.getsockname()[1]
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            _client(vault.tls_ca_cert).wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            assert tls.recv(5) == b"hello"
        t.join(10)
        assert not errors
    finally:
        listener.close()

    other = tmp_path / "other"
    create_tls(other / "ca.pem", other / "ca.key", other / "s.pem", other / "s.key", [])
    listener, t, errors = _serve_once(vault)
    try:
        port = listener.getsockname()[1]
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            pytest.raises(ssl.SSLCertVerificationError),
        ):
            _client(other / "ca.pem").wrap_socket(raw, server_hostname="localhost")
        t.join(10)
    finally:
        listener.close()


def test_init_twice_refuses(vault: VaultConfig) -> None:
    before = vault.tls_ca_cert.read_bytes()
    with pytest.raises(VaultExists, match="already exists"):
        init_vault(vault.dir, PASSPHRASE)
    assert vault.tls_ca_cert.read_bytes() == before


def test_load_missing_or_unsupported(tmp_path: Path) -> None:
    with pytest.raises(VaultNotFound, match="dingyuan vault init") as e:
        load_vault(tmp_path / "nowhere")
    assert isinstance(e.value, DingyuanError)
    d = tmp_path / "v"
    d.mkdir()
    (d / CONFIG_NAME).write_text('{"version": 99}')
    with pytest.raises(VaultConfigError, match="version 99"):
        load_vault(d)
    (d / CONFIG_NAME).write_text("not json")
    with pytest.raises(VaultConfigError, match="not valid JSON"):
        load_vault(d)
    (d / CONFIG_NAME).write_text('{"version": 1}')
    with pytest.raises(VaultConfigError, match="missing key"):
        load_vault(d)


def test_cli_init_backup_rebuild_catalog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DINGYUAN_PASSPHRASE", "cli-test")
    d = tmp_path / "vault"
    monkeypatch.setenv("DINGYUAN_VAULT_DIR", str(d))
    runner = CliRunner()

    res = runner.invoke(cli, ["vault", "init", "--hostname", "backup.example.test", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["dir"] == str(d.resolve()) and info["listen"] == "127.0.0.1:8443"
    assert info["ca_fingerprint_sha256"] == fingerprint(load_cert(d / "tls/ca.pem"))

    cfg = load_vault(d)
    assert cfg.repository_id == info["repository_id"]
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(200_000))
    repo = Repository.open(LocalBackend(cfg.repository), b"cli-test", cfg.cache_dir)
    try:
        snap_id = backup(repo, str(image), "data", host="h1").snapshot.id
    finally:
        repo.close()

    res = runner.invoke(cli, ["vault", "rebuild-catalog", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["changed"] and report["snapshots_added"] == 1 and report["snapshots_total"] == 1
    assert report["hosts_added"] == 1 and report["volumes_added"] == 1

    engine = sa.create_engine(cfg.catalog_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT id FROM snapshots")).scalars().all() == [snap_id]
    finally:
        engine.dispose()

    res = runner.invoke(cli, ["vault", "rebuild-catalog", "--dir", str(d), "--json"])
    assert res.exit_code == 0, res.output
    again = json.loads(res.output)
    assert not again["changed"] and again["snapshots_added"] == 0 and again["snapshots_total"] == 1

    res = runner.invoke(cli, ["vault", "rebuild-catalog"])
    assert res.exit_code == 0 and "up to date (1 snapshot(s))" in res.output

    res = runner.invoke(cli, ["vault", "init"])
    assert isinstance(res.exception, VaultExists)
