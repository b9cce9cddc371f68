"""Fixtures shared by the integration tests (the kits' own fixtures, found here by pytest)."""

from drillkit import traversable_tmp  # noqa: F401
from fskit import xfs_stack  # noqa: F401
