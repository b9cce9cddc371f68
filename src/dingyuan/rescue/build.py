"""Build ``dingyuan-rescue.pyz``: this package as one file that a stock ``python3`` runs.

The archive holds ``dingyuan/__init__.py``, ``dingyuan/errors.py`` and ``dingyuan/rescue/*.py``
(all standard-library only) and a ``__main__.py`` that runs :func:`dingyuan.rescue.cli.main`.
``python3 -m dingyuan.rescue.build OUT`` writes it (scripts/build-rescue.sh); the vault serves
:func:`build_bytes` at ``GET /api/v1/rescue.pyz``.
"""

from __future__ import annotations

import io
import shutil
import sys
import tempfile
import zipapp
from pathlib import Path

MAIN = "import sys\nfrom dingyuan.rescue.cli import main\nsys.exit(main())\n"
INTERPRETER = "/usr/bin/env python3"


def _sources() -> list[tuple[Path, str]]:
    """(file, its name in the archive) of every module the archive holds."""
    here = Path(__file__).resolve().parent
    top = here.parent
    files = [(top / "__init__.py", "dingyuan/__init__.py"), (top / "errors.py", "dingyuan/errors.py")]
    files += [(f, f"dingyuan/rescue/{f.name}") for f in sorted(here.glob("*.py"))]
    return files


def build(out: Path | io.BytesIO) -> None:
    """Write the archive to ``out`` (a path, made executable, or a buffer)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for src, name in _sources():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, root / name)
        (root / "__main__.py").write_text(MAIN)
        zipapp.create_archive(root, out, interpreter=INTERPRETER, compressed=True)


def build_bytes() -> bytes:
    buf = io.BytesIO()
    build(buf)
    return buf.getvalue()


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: python3 -m dingyuan.rescue.build OUT.pyz", file=sys.stderr)
        return 2
    out = Path(sys.argv[1])
    build(out)
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
