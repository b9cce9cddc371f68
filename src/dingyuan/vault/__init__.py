"""The vault: the backup server that owns one repository and a catalog.

So far only its directory and configuration exist (:mod:`dingyuan.vault.config`) with the TLS
material made at init (:mod:`dingyuan.vault.tls`); the API daemon is planned.
"""
