"""A vault's directory and its configuration ``vault.json``.

Layout of a vault directory (default ``/var/lib/dingyuan``)::

    vault.json          this configuration (JSON, format version 1)
    repository/         the repository (a LocalBackend), unless configured elsewhere
    catalog.sqlite      the catalog, unless the catalog URL points elsewhere (PostgreSQL)
    cache/              the repository's local index cache
    clones/             the overlays of clones (their records are in the repository)
    tls/ca.pem          the vault CA made at init; agents and clients trust it
    tls/ca.key          its private key (0600)
    tls/server.pem      the server certificate signed by the CA
    tls/server.key      its private key (0600)

Paths in ``vault.json`` are stored relative to the vault directory when inside it; the catalog URL
is stored as given (the default SQLite URL is absolute, so a moved vault needs it edited).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..catalog.db import open_catalog, sqlite_url
from ..errors import VaultConfigError, VaultExists, VaultNotFound
from ..repository.backends.local import LocalBackend
from ..repository.repo import Repository
from .tls import create_tls, fingerprint, load_cert, write_atomic

CONFIG_NAME = "vault.json"
CONFIG_VERSION = 1
DEFAULT_VAULT_DIR = Path("/var/lib/dingyuan")
DEFAULT_LISTEN = "127.0.0.1:8443"
DEFAULT_NBD_LISTEN = "127.0.0.1:10809"  # the IANA port of NBD
DEFAULT_ISCSI_LISTEN = "127.0.0.1:3260"  # the IANA port of iSCSI
_PATHS = ("repository", "cache_dir", "tls_ca_cert", "tls_ca_key", "tls_cert", "tls_key")


@dataclass
class VaultConfig:
    """Where a vault keeps its parts. Paths are absolute in memory, stored relative when inside."""

    dir: Path
    repository: Path
    catalog_url: str
    cache_dir: Path
    tls_ca_cert: Path
    tls_ca_key: Path
    tls_cert: Path
    tls_key: Path
    listen: str = DEFAULT_LISTEN
    nbd_listen: str = DEFAULT_NBD_LISTEN  # exports; "off" serves none
    nbd_advertise: str = ""  # the host name in export URIs, when clients reach the vault by another
    iscsi_listen: str = DEFAULT_ISCSI_LISTEN  # the iSCSI portal; "off" serves none
    iscsi_advertise: str = ""  # the portal address initiators are given, as nbd_advertise
    repository_id: str = ""
    version: int = field(default=CONFIG_VERSION)

    @classmethod
    def defaults(cls, vault_dir: str | Path) -> VaultConfig:
        d = Path(vault_dir).resolve()
        return cls(
            dir=d,
            repository=d / "repository",
            catalog_url=sqlite_url(d / "catalog.sqlite"),
            cache_dir=d / "cache",
            tls_ca_cert=d / "tls" / "ca.pem",
            tls_ca_key=d / "tls" / "ca.key",
            tls_cert=d / "tls" / "server.pem",
            tls_key=d / "tls" / "server.key",
        )

    @property
    def path(self) -> Path:
        return self.dir / CONFIG_NAME

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "version": self.version,
            "catalog_url": self.catalog_url,
            "listen": self.listen,
            "nbd_listen": self.nbd_listen,
            "nbd_advertise": self.nbd_advertise,
            "iscsi_listen": self.iscsi_listen,
            "iscsi_advertise": self.iscsi_advertise,
            "repository_id": self.repository_id,
        }
        for name in _PATHS:
            p: Path = getattr(self, name)
            out[name] = str(p.relative_to(self.dir)) if p.is_relative_to(self.dir) else str(p)
        return out

    @classmethod
    def from_json(cls, vault_dir: Path, doc: Any) -> VaultConfig:
        where = str(vault_dir / CONFIG_NAME)
        if not isinstance(doc, dict):
            raise VaultConfigError(path=where, detail="not a JSON object")
        if doc.get("version") != CONFIG_VERSION:
            raise VaultConfigError(
                path=where,
                detail=f"version {doc.get('version')!r} is not supported (this dingyuan reads "
                f"version {CONFIG_VERSION}); upgrade dingyuan",
            )
        d = vault_dir.resolve()
        try:
            return cls(
                dir=d,
                repository=d / str(doc["repository"]),
                catalog_url=str(doc["catalog_url"]),
                cache_dir=d / str(doc["cache_dir"]),
                tls_ca_cert=d / str(doc["tls_ca_cert"]),
                tls_ca_key=d / str(doc["tls_ca_key"]),
                tls_cert=d / str(doc["tls_cert"]),
                tls_key=d / str(doc["tls_key"]),
                listen=str(doc.get("listen", DEFAULT_LISTEN)),
                nbd_listen=str(doc.get("nbd_listen", DEFAULT_NBD_LISTEN)),
                nbd_advertise=str(doc.get("nbd_advertise", "")),
                iscsi_listen=str(doc.get("iscsi_listen", DEFAULT_ISCSI_LISTEN)),
                iscsi_advertise=str(doc.get("iscsi_advertise", "")),
                repository_id=str(doc.get("repository_id", "")),
            )
        except KeyError as e:
            raise VaultConfigError(path=where, detail=f"missing key {e.args[0]!r}") from None

    def ca_fingerprint(self) -> str:
        """SHA-256 fingerprint of the vault CA, to check out of band when a client first trusts it."""
        return fingerprint(load_cert(self.tls_ca_cert))

    def save(self) -> None:
        write_atomic(self.path, (json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n").encode())


def init_vault(
    vault_dir: str | Path,
    passphrase: bytes | None,
    encryption: str = "aes-256-gcm",
    hostnames: Iterable[str] = (),
    catalog_url: str | None = None,
) -> VaultConfig:
    """Create a vault in ``vault_dir``: its repository, catalog, TLS material and ``vault.json``.

    The catalog is ``catalog.sqlite`` in the vault directory unless ``catalog_url`` names another
    database (``postgresql+psycopg://user@host/dbname``: an existing, empty or already migrated
    database; the migrations create the tables).

    Refuses a directory that already holds a vault or a repository. ``vault.json`` is written
    last, so a failed init leaves no vault behind (run it again after removing the leftovers).
    """
    cfg = VaultConfig.defaults(vault_dir)
    if catalog_url is not None:
        cfg.catalog_url = catalog_url
    if cfg.path.exists():
        raise VaultExists(location=str(cfg.dir))
    cfg.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(cfg.dir, 0o700)
    repo = Repository.init(LocalBackend(cfg.repository), passphrase, encryption, cfg.cache_dir)
    try:
        cfg.repository_id = repo.id
    finally:
        repo.close()
    open_catalog(cfg.catalog_url).dispose()
    create_tls(cfg.tls_ca_cert, cfg.tls_ca_key, cfg.tls_cert, cfg.tls_key, hostnames)
    cfg.save()
    return cfg


def load_vault(vault_dir: str | Path) -> VaultConfig:
    """Read ``vault.json`` of ``vault_dir``; a clear error if it is missing or unsupported."""
    d = Path(vault_dir)
    path = d / CONFIG_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise VaultNotFound(location=str(d)) from None
    except OSError as e:
        raise VaultConfigError(path=str(path), detail=e.strerror or str(e)) from None
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise VaultConfigError(path=str(path), detail=f"not valid JSON ({e})") from None
    return VaultConfig.from_json(d, doc)
