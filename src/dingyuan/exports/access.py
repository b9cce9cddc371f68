"""Who may open an export: allowed client networks, shared by the NBD and iSCSI servers."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterable

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def networks(allowed: Iterable[IpNetwork | str] | None) -> tuple[IpNetwork, ...] | None:
    """``allowed`` parsed (``"10.0.0.0/8"``, ``"192.0.2.7"``); None means every client."""
    return None if allowed is None else tuple(ipaddress.ip_network(n) for n in allowed)


def admits(allowed: tuple[IpNetwork, ...] | None, peer: IpAddress | None) -> bool:
    """Whether a client at ``peer`` is in ``allowed``. A Unix-socket client (``None``) is local and
    already passed the socket's file permissions; the networks restrict TCP clients."""
    if allowed is None or peer is None:
        return True
    if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
        peer = peer.ipv4_mapped
    return any(peer in network for network in allowed)


def peer_address(writer: asyncio.StreamWriter) -> IpAddress | None:
    """The IP address of a TCP connection's peer (without an IPv6 zone); None on a Unix socket."""
    peername = writer.get_extra_info("peername")
    if isinstance(peername, tuple) and peername:
        return ipaddress.ip_address(str(peername[0]).split("%", 1)[0])
    return None
