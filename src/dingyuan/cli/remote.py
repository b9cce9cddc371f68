"""The CLI's way to a running vault's API, for commands that need the vault process (exports,
clones, mounts): the URL, CA and token come from the vault directory on this machine, or from
``DINGYUAN_VAULT_URL``, ``DINGYUAN_CA`` and ``DINGYUAN_TOKEN`` for a vault elsewhere."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from ..agent.client import VaultClient
from ..errors import UsageError, VaultNotFound
from ..vault.config import DEFAULT_VAULT_DIR, load_vault
from ..vault.local import ADMIN_TOKEN_FILE
from .common import F


def vault_option(f: F) -> F:
    return click.option(
        "--vault",
        "vault_dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="DINGYUAN_VAULT_DIR",
        default=DEFAULT_VAULT_DIR,
        show_default=True,
        help="The vault's directory on this machine, for its address, CA and admin token [env "
        "DINGYUAN_VAULT_DIR; or set DINGYUAN_VAULT_URL, DINGYUAN_CA and DINGYUAN_TOKEN].",
    )(f)


def _local_url(listen: str) -> str:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"https://{f'[{host}]' if ':' in host else host}:{port}"


def vault_client(vault_dir: Path) -> VaultClient:
    """A client of the vault in ``vault_dir`` (or the one the environment names)."""
    url = os.environ.get("DINGYUAN_VAULT_URL")
    token = os.environ.get("DINGYUAN_TOKEN")
    ca_env = os.environ.get("DINGYUAN_CA")
    ca = Path(ca_env) if ca_env else None
    if url is None or ca is None or token is None:
        try:
            cfg = load_vault(vault_dir)
        except VaultNotFound:
            if url is None:
                raise UsageError(
                    f"no vault in {vault_dir}: give its directory with --vault, or set "
                    "DINGYUAN_VAULT_URL (and DINGYUAN_CA, DINGYUAN_TOKEN) for a vault elsewhere"
                ) from None
            cfg = None
        if cfg is not None:
            url = url or _local_url(cfg.listen)
            ca = ca or cfg.tls_ca_cert
            if token is None:
                try:
                    token = (cfg.dir / ADMIN_TOKEN_FILE).read_text().strip()
                except OSError:
                    raise UsageError(
                        f"cannot read the admin token {cfg.dir / ADMIN_TOKEN_FILE}: run as root, or set "
                        "DINGYUAN_TOKEN to an API token"
                    ) from None
    if token is None:
        raise UsageError("set DINGYUAN_TOKEN to an API token of the vault")
    assert url is not None
    return VaultClient(url, token, ca, user_agent="cli")


def api_call(vault_dir: Path, method: str, path: str, **kw: Any) -> Any:
    client = vault_client(vault_dir)
    try:
        r = client.call(method, path, **kw)
        return r.json() if r.content else None
    finally:
        client.close()
