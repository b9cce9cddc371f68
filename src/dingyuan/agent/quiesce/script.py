"""Pre/post scripts: the generic plugin for applications without a plugin of their own.

``freeze`` runs the pre (freeze) command, ``thaw`` the post (thaw) command; an optional
``prepare`` command runs before the pause. A command is an argument list, or a string run by
``/bin/sh -c``. Each runs in a session of its own with the plugin's timeout: at the timeout the
whole process group is killed (a shell's children too) and the step fails. The Quiescer runs
the thaw command whatever happened before — also after the freeze command failed or timed out —
so a thaw script must be safe to run when nothing is frozen.

The environment tells a script where it is: ``DINGYUAN_QUIESCE_STEP`` is ``prepare``, ``freeze``
or ``thaw``.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence

from ...errors import PluginFailed
from .base import DEFAULT_STEP_TIMEOUT, Plugin
from .tools import kill_group, output_tail

Command = str | Sequence[str]


class ScriptPlugin(Plugin):
    name = "script"

    def __init__(
        self,
        freeze: Command | None,
        thaw: Command | None,
        prepare: Command | None = None,
        timeout: float = DEFAULT_STEP_TIMEOUT,
    ) -> None:
        super().__init__(timeout)
        self.commands = {"prepare": prepare, "freeze": freeze, "thaw": thaw}

    def prepare(self) -> None:
        self._run("prepare")

    def freeze(self) -> None:
        self._run("freeze")

    def thaw(self) -> None:
        self._run("thaw")

    def _run(self, step: str) -> None:
        cmd = self.commands[step]
        if cmd is None:
            return
        argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        env = dict(os.environ, DINGYUAN_QUIESCE_STEP=step)
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        except OSError as e:
            raise PluginFailed(plugin=self.name, step=step, detail=f"cannot run {argv[0]}: {e}") from None
        try:
            out, _ = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            out, _ = proc.communicate()
            raise PluginFailed(
                plugin=self.name,
                step=step,
                detail=f"{step} command killed after {self.timeout:g} s{output_tail(out)}",
            ) from None
        except BaseException:
            kill_group(proc)
            proc.wait()
            raise
        if proc.returncode != 0:
            raise PluginFailed(
                plugin=self.name,
                step=step,
                detail=f"{step} command exited with status {proc.returncode}{output_tail(out)}",
            )
