"""dingyuan vault init|rebuild-catalog|serve|enroll-token|token create."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..errors import PassphraseRequired
from ..repository.repo import ENCRYPTIONS
from .common import F, emit_json, json_option, new_passphrase, open_repo, parse_duration, read_passphrase

if TYPE_CHECKING:
    from ..vault.context import VaultContext


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
    """Create, serve and maintain a vault (the backup server: repository, catalog, TLS CA, API)."""


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
@click.option(
    "--catalog-url",
    metavar="URL",
    help="The catalog's database, e.g. postgresql+psycopg://dingyuan@dbhost/dingyuan (an existing "
    "database; needs the 'postgres' extra) [default: catalog.sqlite in the vault directory].",
)
def init(
    vault_dir: Path,
    passphrase_file: Path | None,
    as_json: bool,
    encryption: str,
    hostnames: tuple[str, ...],
    catalog_url: str | None,
) -> None:
    """Create a vault: its repository, catalog, TLS CA and server certificate."""
    from ..catalog.db import safe_url
    from ..vault.config import init_vault
    from ..vault.local import create_first_admin

    passphrase = new_passphrase(passphrase_file, encryption, "this vault's repository")
    cfg = init_vault(vault_dir, passphrase, encryption, hostnames, catalog_url=catalog_url)
    token_file = create_first_admin(cfg)
    info = {
        "dir": str(cfg.dir),
        "repository_id": cfg.repository_id,
        "repository": str(cfg.repository),
        "catalog_url": safe_url(cfg.catalog_url),
        "ca_fingerprint_sha256": cfg.ca_fingerprint(),
        "ca_cert": str(cfg.tls_ca_cert),
        "listen": cfg.listen,
        "admin_token_file": str(token_file),
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
        click.echo(
            f"  admin token    {token_file} (mode 0600: the API credential of the user 'admin'; "
            "keep it secret)"
        )


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


def _open_context(vault_dir: Path, passphrase_file: Path | None) -> VaultContext:
    from ..vault.context import open_vault_context

    try:
        return open_vault_context(vault_dir, read_passphrase(passphrase_file, prompt=False))
    except PassphraseRequired:
        passphrase = read_passphrase(passphrase_file, prompt=True)
        if passphrase is None:
            raise
        return open_vault_context(vault_dir, passphrase)


@vault.command()
@vault_dir_option
@passphrase_file_option
@click.option(
    "--listen",
    metavar="HOST:PORT",
    help="Address to serve HTTPS on [default: the vault's configured one, 127.0.0.1:8443].",
)
@click.option(
    "--nbd-listen",
    metavar="HOST:PORT|off",
    help="Address to serve exports over NBD on, or 'off' [default: the vault's configured one, "
    "127.0.0.1:10809].",
)
@click.option(
    "--iscsi-listen",
    metavar="HOST:PORT|off",
    help="Address of the iSCSI portal for exports, or 'off' [default: the vault's configured one, "
    "127.0.0.1:3260].",
)
@click.option(
    "--log-level",
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
    default="info",
    show_default=True,
)
def serve(
    vault_dir: Path,
    passphrase_file: Path | None,
    listen: str | None,
    nbd_listen: str | None,
    iscsi_listen: str | None,
    log_level: str,
) -> None:
    """Serve the vault's API over HTTPS, and its exports over NBD and iSCSI, until SIGINT or
    SIGTERM (then stop gracefully)."""
    from ..vault.exports import EXTRA as EXPORTS
    from ..vault.server import VaultServer, parse_listen

    ctx = _open_context(vault_dir, passphrase_file)
    _log_to_stderr(log_level)
    try:
        host, port = parse_listen(listen or ctx.cfg.listen)

        def started(server: VaultServer) -> None:
            click.echo(f"vault API at {server.url} (docs: {server.url}docs)")
            click.echo(f"  CA SHA-256  {ctx.cfg.ca_fingerprint()}  ({ctx.cfg.tls_ca_cert})")
            click.echo("  plaintext http:// to this port is refused; stop with Ctrl-C or SIGTERM")
            exports = server.ctx.extras.get(EXPORTS)
            if exports is not None:
                for protocol, name in (("nbd", "NBD"), ("iscsi", "iSCSI")):
                    address = exports.listening(protocol)
                    if address is not None:
                        click.echo(f"  exports over {name} on {address}")

        nbd = nbd_listen or ctx.cfg.nbd_listen
        iscsi = iscsi_listen or ctx.cfg.iscsi_listen
        VaultServer(
            ctx,
            host,
            port,
            log_level=log_level,
            on_started=started,
            nbd_listen=None if nbd == "off" else nbd,
            iscsi_listen=None if iscsi == "off" else iscsi,
        ).run()
        click.echo("vault stopped")
    finally:
        ctx.close()


def _log_to_stderr(level: str) -> None:
    """The vault's own log (exports, jobs, housekeeping) on stderr at ``level``, next to the API
    server's: an operator sees refused logins and dropped clients."""
    import logging

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("dingyuan")
    logger.addHandler(handler)
    logger.setLevel(level.upper())


@vault.command("enroll-token")
@vault_dir_option
@json_option
@click.argument("host")
@click.option(
    "--expires", default="24h", show_default=True, help="How long the token stays valid (e.g. 12h, 7d)."
)
def enroll_token(vault_dir: Path, as_json: bool, host: str, expires: str) -> None:
    """Make a one-time token with which the agent of HOST enrolls (printed once, never stored)."""
    from ..vault.config import load_vault
    from ..vault.local import create_enrollment

    issued = create_enrollment(load_vault(vault_dir), host, parse_duration(expires))
    assert issued.expires is not None
    if as_json:
        emit_json({"host": host, "token": issued.secret, "expires": issued.expires.isoformat()})
    else:
        click.echo(issued.secret)
        click.echo(
            f"one-time enrollment token for host {host}, valid until {issued.expires.isoformat()}; "
            "it is shown only now",
            err=True,
        )


@vault.group()
def token() -> None:
    """API tokens, made on the vault's machine (for the first ones; later POST /api/v1/tokens)."""


@token.command("create")
@vault_dir_option
@json_option
@click.option("--role", type=click.Choice(["admin", "operator", "viewer"]), required=True)
@click.option("--user", metavar="NAME", help="A token of this user (created with --role if absent).")
@click.option("--expires", metavar="DURATION", help="Expire after this long (e.g. 90d) [default: never].")
def token_create(vault_dir: Path, as_json: bool, role: str, user: str | None, expires: str | None) -> None:
    """Make an API token (printed once; the vault keeps only its hash)."""
    from ..vault.config import load_vault
    from ..vault.local import create_token

    issued = create_token(load_vault(vault_dir), role, user, parse_duration(expires) if expires else None)
    info = {
        "id": issued.id,
        "token": issued.secret,
        "role": issued.role,
        "owner": issued.owner,
        "expires": issued.expires.isoformat() if issued.expires else None,
    }
    if as_json:
        emit_json(info)
    else:
        click.echo(issued.secret)
        click.echo(
            f"API token {issued.id} ({issued.owner}, role {issued.role}"
            + (f", expires {info['expires']}" if issued.expires else "")
            + "); it is shown only now",
            err=True,
        )
