"""The rescue tool's commands: enroll, list, restore (docs/rescue.md is the user's guide).

Exit status 0 on success only; an error prints one line on stderr saying what happened and what
to do, and exits with the error's code (dingyuan.errors). ``restore`` ends with a statistics line
on stdout, ``key=value`` pairs that scripts may parse.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import DingyuanError, UsageError, VaultRefused
from .client import Vault
from .progress import human
from .restore import WORKERS, Layout, Restorer
from .state import DEFAULT_STATE, State, enroll
from .target import open_target

PROG = "dingyuan-rescue"
SNAPSHOT_ID = re.compile(r"[0-9a-f]{64}")
MIN_PREFIX = 6


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--state",
        type=Path,
        default=DEFAULT_STATE,
        help=f"the state file written by enroll (default: ./{DEFAULT_STATE})",
    )
    p = argparse.ArgumentParser(
        prog=PROG, description="Restore a disk from a dingyuan vault; needs nothing but python3."
    )
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser(
        "enroll",
        parents=[common],
        help="enroll as a host with a one-time token",
        description="Enroll as the host the TOKEN was made for ('dingyuan vault enroll-token HOST' "
        "on the vault). The vault revokes that host's previous agent token.",
    )
    e.add_argument("url", help="the vault, https://HOST:PORT")
    e.add_argument("token", help="the one-time enrollment token dye1.<CA fingerprint>.<secret>")
    e.add_argument("--hostname", help="the name this machine reports (default: its host name)")
    ls = sub.add_parser("list", parents=[common], help="the host's snapshots, newest first")
    ls.add_argument("--volume", help="only this volume's")
    r = sub.add_parser(
        "restore",
        parents=[common],
        help="restore a snapshot onto a disk or into a file",
        description="Restore SNAPSHOT (an id, a unique prefix of one, or VOLUME@latest) onto TARGET: "
        "a block device, an existing file, or a new file (created sparse).",
    )
    r.add_argument("snapshot", help="snapshot id, a unique id prefix, or VOLUME@latest")
    r.add_argument("target", help="the disk (e.g. /dev/sda) or file to write")
    r.add_argument(
        "--delta", action="store_true", help="read the target and fetch only the chunks that differ"
    )
    r.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    r.add_argument("--workers", type=int, default=WORKERS, help=f"requests in flight (default {WORKERS})")
    return p


def resolve(vault: Vault, host: str, spec: str) -> str:
    """The full id of the snapshot ``spec`` names (id, unique prefix or ``VOLUME@latest``)."""
    if SNAPSHOT_ID.fullmatch(spec):
        return spec
    if spec.endswith("@latest"):
        volume = spec.removesuffix("@latest")
        found = vault.get_json("/snapshots", volume=volume, limit=1)
        if not found:
            raise UsageError(f"host {host} has no snapshot of volume {volume!r}; 'list' shows them")
        return str(found[0]["id"])
    if len(spec) < MIN_PREFIX or not re.fullmatch(r"[0-9a-f]+", spec):
        raise UsageError(
            f"{spec!r} is no snapshot: give its id (or at least {MIN_PREFIX} of its first hex digits) "
            "or VOLUME@latest"
        )
    ids = [str(s["id"]) for s in vault.get_json("/snapshots", limit=1000) if str(s["id"]).startswith(spec)]
    if len(ids) != 1:
        what = "no snapshot" if not ids else f"{len(ids)} snapshots"
        raise UsageError(f"{what} of host {host} start with {spec}; 'list' shows them")
    return ids[0]


def cmd_enroll(args: argparse.Namespace) -> None:
    state = enroll(args.url, args.token, args.state, args.hostname)
    print(f"enrolled as host {state.host} with the vault at {state.url}; state in {args.state}")


def cmd_list(args: argparse.Namespace) -> None:
    state = State.load(args.state)
    snaps: list[dict[str, Any]] = state.vault().get_json("/snapshots", volume=args.volume, limit=1000)
    if not snaps:
        print(f"host {state.host} has no snapshots on the vault")
        return
    print(f"{'id':<16}  {'time (UTC)':<19}  {'volume':<20}  size")
    for s in snaps:
        when = str(s["time"])[:19].replace("T", " ")
        print(f"{s['id'][:16]:<16}  {when:<19}  {s['volume']:<20}  {human(int(s['size']))}")


def cmd_restore(args: argparse.Namespace) -> None:
    if args.workers < 1:
        raise UsageError("--workers must be at least 1")
    restore_from(
        State.load(args.state),
        args.snapshot,
        args.target,
        delta=args.delta,
        yes=args.yes,
        workers=args.workers,
    )


def restore_from(
    state: State, snapshot: str, target_path: str, *, delta: bool, yes: bool, workers: int
) -> None:
    """Restore ``snapshot`` of ``state``'s host to ``target_path`` (also the installed agent's
    ``dingyuan agent restore``)."""
    vault = state.vault()
    snapshot_id = resolve(vault, state.host, snapshot)
    try:
        layout = Layout.fetch(vault, snapshot_id)
    except VaultRefused as e:
        if e.kwargs.get("status") not in (403, 404):
            raise
        raise UsageError(
            f"the vault has no snapshot {snapshot_id[:12]} of host {state.host} ({e.kwargs['detail']}); "
            "'list' shows this host's snapshots"
        ) from None
    target = open_target(target_path, layout.size, create=not delta)
    try:
        if not yes:
            _confirm(layout, target_path, delta)
    except BaseException:
        target.close()
        if target.created:
            os.unlink(target_path)
        raise
    try:
        restorer = Restorer(vault, layout, target, workers)
        stats = restorer.delta() if delta else restorer.full()
    except BaseException:
        print(
            f"{PROG}: {target_path} is incomplete: run the restore again (--delta fetches only what differs)",
            file=sys.stderr,
        )
        raise
    finally:
        target.close()
    kind = "delta restore" if delta else "restore"
    print(f"{kind} of snapshot {snapshot_id[:12]} ({layout.volume}) to {target_path} done: {stats.line()}")


def _confirm(layout: Layout, target: str, delta: bool) -> None:
    how = "changing the chunks that differ" if delta else "overwriting it"
    print(
        f"Restore snapshot {layout.id[:12]} of volume {layout.volume} ({human(layout.size)}) onto "
        f"{target}, {how}? Type 'yes' to go on: ",
        end="",
        file=sys.stderr,
        flush=True,
    )
    answer = sys.stdin.readline().strip().lower()
    if answer != "yes":
        raise UsageError("not confirmed: nothing was written (answer 'yes', or pass --yes)")


COMMANDS = {"enroll": cmd_enroll, "list": cmd_list, "restore": cmd_restore}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except DingyuanError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0
