"""The catalog: the vault's SQL database of hosts, volumes, policies, jobs, users and audit events,
plus an index of the repository's snapshots.

The repository is the truth (DESIGN.md, invariant 1): hosts, volumes and snapshots in the catalog
are derived from it and can be rebuilt from it alone (:func:`dingyuan.catalog.rebuild.rebuild_catalog`).
Policies, users, tokens, jobs and audit events live only here.
"""
