"""What every command shares: opening the repository, the passphrase, output and progress."""

from __future__ import annotations

import getpass
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console

from ..errors import PassphraseRequired, UsageError
from ..repository.backends.local import LocalBackend
from ..repository.repo import Repository, default_cache_dir

err_console = Console(stderr=True)
out_console = Console(width=None if sys.stdout.isatty() else 160)

F = TypeVar("F", bound=Callable[..., Any])


def repo_options(f: F) -> F:
    """--repo, --passphrase-file and --cache-dir, on every command that opens a repository."""
    f = click.option(
        "--cache-dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="DINGYUAN_CACHE_DIR",
        help="Local cache directory [env DINGYUAN_CACHE_DIR; default ~/.cache/dingyuan].",
    )(f)
    f = click.option(
        "--passphrase-file",
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        envvar="DINGYUAN_PASSPHRASE_FILE",
        help="Read the passphrase from this file [or env DINGYUAN_PASSPHRASE, or a prompt].",
    )(f)
    f = click.option(
        "--repo",
        "repo_path",
        envvar="DINGYUAN_REPO",
        metavar="PATH",
        help="Repository location [env DINGYUAN_REPO].",
    )(f)
    return f


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")(f)


def backend_for(repo_path: str | None) -> LocalBackend:
    if not repo_path:
        raise UsageError("no repository given: use --repo PATH or set DINGYUAN_REPO")
    return LocalBackend(repo_path)


def read_passphrase(passphrase_file: Path | None, prompt: bool, confirm: bool = False) -> bytes | None:
    """The passphrase from DINGYUAN_PASSPHRASE, --passphrase-file or (if ``prompt``) a terminal."""
    env = os.environ.get("DINGYUAN_PASSPHRASE")
    if env is not None:
        return env.encode()
    if passphrase_file is not None:
        return passphrase_file.read_bytes().rstrip(b"\r\n")
    if prompt and sys.stdin.isatty():
        first = getpass.getpass("Repository passphrase: ")
        if confirm and getpass.getpass("Repeat passphrase: ") != first:
            raise UsageError("the passphrases do not match")
        return first.encode()
    return None


def new_passphrase(passphrase_file: Path | None, encryption: str, what: str) -> bytes | None:
    """The passphrase for a new encrypted repository (asked twice on a terminal), or, for
    ``--encryption none``, None and a loud warning."""
    if encryption == "none":
        err_console.print(
            f"[bold red]WARNING: {what} is NOT encrypted: anyone who can read its storage can read "
            "every backed-up disk.[/]"
        )
        return None
    passphrase = read_passphrase(passphrase_file, prompt=True, confirm=True)
    if not passphrase:
        raise PassphraseRequired()
    return passphrase


def open_repo(repo_path: str | None, passphrase_file: Path | None, cache_dir: Path | None) -> Repository:
    backend = backend_for(repo_path)
    cache = cache_dir or default_cache_dir()
    try:
        return Repository.open(backend, read_passphrase(passphrase_file, prompt=False), cache)
    except PassphraseRequired:
        passphrase = read_passphrase(passphrase_file, prompt=True)
        if passphrase is None:
            raise
        return Repository.open(backend, passphrase, cache)


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


@contextmanager
def progress_bar(
    description: str, enabled: bool, unit: str = "bytes"
) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar on stderr, or None when not on a terminal. ``unit`` "bytes" shows
    bytes, throughput and ETA; any other unit shows "done/total unit" and ETA."""
    if not enabled or not err_console.is_terminal:
        yield None
        return
    from rich.progress import (  # only on a terminal: it costs a noticeable part of start-up
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    amount: list[ProgressColumn] = (
        [DownloadColumn(binary_units=True), TransferSpeedColumn()]
        if unit == "bytes"
        else [MofNCompleteColumn(), TextColumn(unit)]
    )
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        *amount,
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)\s*([KMGT]?)(?:i?B)?", text.strip(), re.IGNORECASE)
    if not m:
        raise UsageError(f"cannot read size {text!r}: use for example 64K, 4M")
    return int(m.group(1)) * SIZE_UNITS[m.group(2).upper()]


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}


def parse_duration(text: str) -> timedelta:
    m = re.fullmatch(r"(\d+)\s*([smhdwy])", text.strip())
    if not m:
        raise UsageError(f"cannot read duration {text!r}: use for example 12h, 30d, 1y")
    return timedelta(seconds=int(m.group(1)) * DURATION_UNITS[m.group(2)])


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
