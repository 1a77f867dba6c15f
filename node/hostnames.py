"""Host names to IP addresses, as the device table stores them."""

from __future__ import annotations

import ipaddress
import socket


def resolve_ip(host: str) -> str:
    """The IP of `host` ('' if it does not resolve now; refresh-IP retries later)."""
    if not host:
        return ""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        return socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)[0][4][0]
    except OSError:
        return ""


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
