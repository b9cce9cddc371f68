"""The iSCSI target (RFC 7143): ``pdu`` byte layouts, ``text`` negotiation, ``chap``, the
``login`` phase, ``session`` state, a ``connection``'s full feature phase and the ``server``; the
SCSI commands themselves are :mod:`dingyuan.exports.scsi`'s."""

#: the naming authority of the IQNs dingyuan gives its targets (iqn.YYYY-MM.reversed-domain)
IQN_PREFIX = "iqn.2026-11.org.dingyuan"
