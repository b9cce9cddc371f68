"""The vault: the backup server that owns one repository and a catalog.

Its directory and configuration (:mod:`dingyuan.vault.config`) with the TLS material made at init
(:mod:`dingyuan.vault.tls`); policies in time (:mod:`dingyuan.vault.schedule`: next run, RPO),
jobs (:mod:`dingyuan.vault.jobs`: due backups, claims, expiry, retention, lock-for, gc) and the
volumes' protection status (:mod:`dingyuan.vault.status`).
"""
