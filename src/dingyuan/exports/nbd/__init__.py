"""The NBD server: ``wire`` (the byte layouts), ``handshake`` (option haggling), ``transmission``
(the request loop), ``registry`` (exports, access, device lifetime) and ``server`` (listening,
connections, the threaded helper). See docs/nbd.md for what it implements."""
