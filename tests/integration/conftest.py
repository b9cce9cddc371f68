"""Fixtures shared by the integration tests (the kits' own fixtures, found here by pytest)."""

from fskit import xfs_stack  # noqa: F401
