"""The rescue tool runs where nothing is installed: its package may import the standard library and
dingyuan.errors alone (both shipped inside dingyuan-rescue.pyz)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import dingyuan
import dingyuan.rescue

SRC = Path(dingyuan.__file__).resolve().parent.parent
RESCUE = Path(dingyuan.rescue.__file__).resolve().parent
SHIPPED = [*sorted(RESCUE.glob("*.py")), SRC / "dingyuan" / "errors.py", SRC / "dingyuan" / "__init__.py"]


def _outside_imports(path: Path) -> list[str]:
    """Imports of ``path`` that are neither the standard library nor a shipped module."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1 and path.parent == RESCUE:
                continue  # a sibling in the rescue package
            if node.level == 2 and path.parent == RESCUE and node.module in (None, "errors"):
                continue  # dingyuan.__version__, dingyuan.errors
            names = [("." * node.level) + (node.module or "")]
        else:
            continue
        bad += [
            f"{path.name}:{node.lineno} {n}" for n in names if n.split(".")[0] not in sys.stdlib_module_names
        ]
    return bad


def test_the_rescue_package_imports_only_the_standard_library() -> None:
    assert [p.name for p in SHIPPED if p.parent == RESCUE]  # the scan sees the package
    assert [bad for p in SHIPPED for bad in _outside_imports(p)] == []


def test_every_module_imports_under_an_isolated_python_without_site_packages() -> None:
    modules = [f"dingyuan.rescue.{p.stem}" for p in sorted(RESCUE.glob("*.py")) if p.stem != "__main__"]
    code = (
        f"import sys; sys.path.insert(0, {str(SRC)!r}); "
        + "; ".join(f"import {m}" for m in modules)
        + "; import json; print(json.dumps([m for m in sys.modules if m.split('.')[0] not in "
        + "(*sys.stdlib_module_names, '__main__')]))"
    )
    done = subprocess.run(
        ["/usr/bin/python3", "-I", "-S", "-c", code], capture_output=True, text=True, env={}, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert set(json.loads(done.stdout)) == {"dingyuan", "dingyuan.errors", "dingyuan.rescue", *modules}
