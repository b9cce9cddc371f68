"""The ``dingyuan`` command: one tree of thin commands over the library.

Exit status: 0 on success; a DingyuanError's ``exit_code`` otherwise (2 usage, 10 repository,
20 storage, 30 source, 31 restore target, 40 verification found problems); 130 on Ctrl-C.
"""

from __future__ import annotations

import sqlite3
import sys

import click

from .. import __version__
from ..errors import DingyuanError
from . import maintenance, repo_cmd, snapshot_cmd, transfer
from .common import err_console


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="dingyuan")
def cli() -> None:
    """dingyuan: block-level disaster recovery and continuous data protection."""


cli.add_command(repo_cmd.repo)
cli.add_command(transfer.backup)
cli.add_command(transfer.restore)
cli.add_command(snapshot_cmd.snapshot)
cli.add_command(maintenance.verify)
cli.add_command(maintenance.forget)
cli.add_command(maintenance.gc)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except DingyuanError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except sqlite3.Error as e:
        err_console.print(
            f"[bold red]error:[/] the local cache failed ({e}): free space where it lives, or point "
            "--cache-dir / DINGYUAN_CACHE_DIR elsewhere (it is rebuilt from the repository)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(10)
    except OSError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except click.exceptions.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
