"""The agent: runs on a protected server, backs its volumes up to a vault over HTTPS.

``config`` (enrollment and the agent's state directory), ``client`` (the vault's API),
``leafcache`` (the last snapshot's chunk ids per volume), ``upload`` (the transfer protocol's
sending side), ``runner`` (one backup run) and ``daemon`` (polling the vault for work).
"""
