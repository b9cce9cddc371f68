"""dingyuan vault init|rebuild-catalog."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..repository.repo import ENCRYPTIONS
from .common import F, emit_json, json_option, new_passphrase, open_repo


def vault_dir_option(f: F) -> F:
    return click.option(
        "--dir",
        "vault_dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="DINGYUAN_VAULT_DIR",
        default=Path("/var/lib/dingyuan"),
        show_default=True,
        help="Vault directory [env DINGYUAN_VAULT_DIR].",
    )(f)


def passphrase_file_option(f: F) -> F:
    return click.option(
        "--passphrase-file",
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        envvar="DINGYUAN_PASSPHRASE_FILE",
        help="Read the passphrase from this file [or env DINGYUAN_PASSPHRASE, or a prompt].",
    )(f)


@click.group()
def vault() -> None:
    """Create and maintain a vault (the backup server's repository, catalog and TLS CA)."""


@vault.command()
@vault_dir_option
@passphrase_file_option
@json_option
@click.option("--encryption", type=click.Choice(ENCRYPTIONS), default="aes-256-gcm", show_default=True)
@click.option(
    "--hostname",
    "hostnames",
    multiple=True,
    metavar="NAME",
    help="A name or address clients reach the vault by (repeatable; localhost and 127.0.0.1 always).",
)
def init(
    vault_dir: Path,
    passphrase_file: Path | None,
    as_json: bool,
    encryption: str,
    hostnames: tuple[str, ...],
) -> None:
    """Create a vault: its repository, catalog, TLS CA and server certificate."""
    from ..vault.config import init_vault

    passphrase = new_passphrase(passphrase_file, encryption, "this vault's repository")
    cfg = init_vault(vault_dir, passphrase, encryption, hostnames)
    info = {
        "dir": str(cfg.dir),
        "repository_id": cfg.repository_id,
        "repository": str(cfg.repository),
        "catalog_url": cfg.catalog_url,
        "ca_fingerprint_sha256": cfg.ca_fingerprint(),
        "ca_cert": str(cfg.tls_ca_cert),
        "listen": cfg.listen,
    }
    if as_json:
        emit_json(info)
    else:
        click.echo(f"created vault at {info['dir']}")
        click.echo(
            f"  repository     {info['repository_id']} ({info['repository']}, encryption: {encryption})"
        )
        click.echo(f"  catalog        {info['catalog_url']}")
        click.echo(f"  CA certificate {info['ca_cert']}")
        click.echo(f"  CA SHA-256     {info['ca_fingerprint_sha256']}")
        click.echo(f"  listen         {info['listen']}")


@vault.command("rebuild-catalog")
@vault_dir_option
@passphrase_file_option
@json_option
def rebuild_catalog_cmd(vault_dir: Path, passphrase_file: Path | None, as_json: bool) -> None:
    """Rebuild the catalog's hosts, volumes and snapshots from the repository alone."""
    from ..catalog.db import open_catalog
    from ..catalog.rebuild import rebuild_catalog
    from ..vault.config import load_vault

    cfg = load_vault(vault_dir)
    repo = open_repo(str(cfg.repository), passphrase_file, cfg.cache_dir)
    try:
        engine = open_catalog(cfg.catalog_url)
        try:
            report = rebuild_catalog(repo, engine)
        finally:
            engine.dispose()
    finally:
        repo.close()
    counts: dict[str, Any] = {
        "hosts_added": report.hosts_added,
        "volumes_added": report.volumes_added,
        "volumes_updated": report.volumes_updated,
        "snapshots_added": report.snapshots_added,
        "snapshots_updated": report.snapshots_updated,
        "snapshots_removed": report.snapshots_removed,
        "snapshots_total": report.snapshots_total,
    }
    if as_json:
        emit_json({**counts, "changed": report.changed})
    elif not report.changed:
        click.echo(f"catalog up to date ({report.snapshots_total} snapshot(s))")
    else:
        click.echo(
            f"catalog rebuilt: {report.snapshots_total} snapshot(s); "
            + ", ".join(
                f"{k.replace('_', ' ')} {v}" for k, v in counts.items() if k != "snapshots_total" and v
            )
        )
