"""The ``dingyuan`` command: one tree of thin commands over the library.

Exit status: 0 on success; a DingyuanError's ``exit_code`` otherwise (2 usage, 3 an RPO is
breached (``status``), 10 repository, 20 storage, 30 source, 31 restore target, 40 verification
found problems, 50 exports, clones and mounts); 130 on Ctrl-C.
"""

from __future__ import annotations

import importlib
import sqlite3
import sys

import click

from .. import __version__
from ..errors import DingyuanError
from .common import err_console

#: command name -> "module:attribute"; modules are imported only for the command that runs
#: (a backup does not pay for the imports of gc, verify or rich tables).
COMMANDS = {
    "repo": "repo_cmd:repo",
    "backup": "transfer:backup",
    "restore": "transfer:restore",
    "snapshot": "snapshot_cmd:snapshot",
    "verify": "maintenance:verify",
    "forget": "maintenance:forget",
    "gc": "maintenance:gc",
    "vault": "vault_cmd:vault",
    "agent": "agent_cmd:agent",
    "status": "status_cmd:status",
    "export": "export_cmd:export",
    "clone": "export_cmd:clone",
    "mount": "mount_cmd:mount",
    "umount": "mount_cmd:umount",
    "restore-files": "mount_cmd:restore_files",
    "convert": "recovery_cmd:convert",
    "boot": "recovery_cmd:boot",
    "drill": "recovery_cmd:drill",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, attr = target.split(":")
        command = getattr(importlib.import_module(f"{__package__}.{module}"), attr)
        assert isinstance(command, click.Command)
        return command


@click.group(
    cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(__version__, prog_name="dingyuan")
def cli() -> None:
    """dingyuan: block-level disaster recovery and continuous data protection."""


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
