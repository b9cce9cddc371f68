"""dingyuan repo init|unlock."""

from __future__ import annotations

from pathlib import Path

import click

from ..repository.repo import DEFAULT_PACK_SIZE, ENCRYPTIONS, Repository, default_cache_dir
from .common import (
    backend_for,
    emit_json,
    json_option,
    new_passphrase,
    open_repo,
    parse_size,
    repo_options,
)


@click.group()
def repo() -> None:
    """Create and maintain repositories."""


@repo.command()
@repo_options
@json_option
@click.option("--encryption", type=click.Choice(ENCRYPTIONS), default="aes-256-gcm", show_default=True)
@click.option("--pack-size", default=str(DEFAULT_PACK_SIZE >> 20) + "M", show_default=True)
def init(
    repo_path: str | None,
    passphrase_file: Path | None,
    cache_dir: Path | None,
    as_json: bool,
    encryption: str,
    pack_size: str,
) -> None:
    """Create a new repository."""
    backend = backend_for(repo_path)
    passphrase = new_passphrase(passphrase_file, encryption, "this repository")
    r = Repository.init(
        backend, passphrase, encryption, cache_dir or default_cache_dir(), pack_size=parse_size(pack_size)
    )
    if as_json:
        emit_json({"id": r.id, "location": backend.location, "encryption": encryption})
    else:
        click.echo(f"created repository {r.id} at {backend.location} (encryption: {encryption})")


@repo.command()
@repo_options
def unlock(repo_path: str | None, passphrase_file: Path | None, cache_dir: Path | None) -> None:
    """Remove every lock (only when no dingyuan process uses the repository)."""
    backend = open_repo(repo_path, passphrase_file, cache_dir).backend
    names = [n for n, _ in backend.list("locks/")]
    for name in names:
        backend.delete(name)
    click.echo(f"removed {len(names)} lock(s)")
