"""dingyuan-rescue: restore a disk from the vault on a bare machine (a live system, nothing installed).

This package runs on a stock ``python3`` with the standard library alone: it may import nothing of
dingyuan but :mod:`dingyuan.errors` (itself standard-library only), so that it can be shipped as one
file, ``dingyuan-rescue.pyz`` (:mod:`.build`), which the vault also hands out at
``GET /api/v1/rescue.pyz``. A test runs it under ``python3 -I -S`` and scans its imports.

Modules: :mod:`.frames` (the wire format of chunk streams and compares, shared with the vault),
:mod:`.client` (HTTPS to the vault, CA pinned), :mod:`.state` (enrollment and the state file),
:mod:`.target` (checking the disk or file to write), :mod:`.restore` (full and delta restores),
:mod:`.progress`, :mod:`.cli`.
"""
