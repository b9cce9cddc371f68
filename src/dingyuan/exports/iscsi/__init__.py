"""The iSCSI target's wire layer (RFC 7143): ``pdu`` byte layouts and ``text`` negotiation."""
