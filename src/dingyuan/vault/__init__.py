"""The vault: the backup server that owns one repository and a catalog.

Its directory and configuration (:mod:`.config`) with the TLS material made at init
(:mod:`.tls`); what a running vault holds open (:mod:`.context`); the REST API (:mod:`.app`,
:mod:`.api`, :mod:`.schemas`) with its credentials, roles and audit log (:mod:`.auth`); and the
HTTPS server that refuses plaintext (:mod:`.server`); policies in time (:mod:`.schedule`: next run,
RPO), jobs (:mod:`.jobs`: due backups, claims, expiry, retention, lock-for, gc) and the volumes'
protection status (:mod:`.status`).
"""
