"""What a running vault holds open: its configuration, catalog engine and repository.

One :class:`VaultContext` lives as long as the server process; the API reaches it through
``request.app.state.ctx`` (:func:`dingyuan.vault.auth.get_context`). Other subsystems keep their
long-lived state in ``extras`` under a name of their own (the transfer subsystem its upload
sessions, for example) instead of adding fields here.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from ..catalog.db import open_catalog
from ..repository.backends.local import LocalBackend
from ..repository.repo import Repository
from .config import VaultConfig, load_vault


@dataclass
class VaultContext:
    """The open parts of one vault. ``repo_lock`` serialises changes the API makes to the
    repository's snapshots (delete, lock), so two requests do not race on one snapshot's notes."""

    cfg: VaultConfig
    engine: Engine
    repo: Repository
    extras: dict[str, Any] = field(default_factory=dict)
    repo_lock: threading.Lock = field(default_factory=threading.Lock)

    def close(self) -> None:
        """Close the repository and dispose of the catalog's connections."""
        try:
            self.repo.close()
        finally:
            self.engine.dispose()


def open_vault_context(vault_dir: str | Path, passphrase: bytes | None) -> VaultContext:
    """Open the vault in ``vault_dir``: its repository (with ``passphrase``) and its catalog
    (migrated to the newest schema)."""
    cfg = load_vault(vault_dir)
    repo = Repository.open(LocalBackend(cfg.repository), passphrase, cfg.cache_dir)
    try:
        engine = open_catalog(cfg.catalog_url)
    except BaseException:
        repo.close()
        raise
    return VaultContext(cfg=cfg, engine=engine, repo=repo)
