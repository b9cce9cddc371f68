"""The vault: the backup server that owns one repository and a catalog.

Its directory and configuration (:mod:`.config`) with the TLS material made at init
(:mod:`.tls`); what a running vault holds open (:mod:`.context`); the REST API (:mod:`.app`,
:mod:`.api`, :mod:`.schemas`) with its credentials, roles and audit log (:mod:`.auth`); and the
HTTPS server that refuses plaintext (:mod:`.server`).
"""
