"""Host names to IP addresses, as the device table stores them."""

from __future__ import annotations

import ipaddress
import socket


def resolve(host: str) -> tuple[str, str]:
    """(the IP of `host`, '') or ('', why it does not resolve now)."""
    if not host:
        return "", "no host given"
    try:
        return str(ipaddress.ip_address(host)), ""
    except ValueError:
        pass
    try:
        return str(socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)[0][4][0]), ""
    except OSError as exc:
        return "", exc.strerror or str(exc)
    except UnicodeError:
        # Python's IDNA codec refuses an empty or over-long label ("a..b") before asking.
        return "", "not a valid host name"


def resolve_ip(host: str) -> str:
    """The IP of `host` ('' if it does not resolve now; refresh-IP retries later)."""
    return resolve(host)[0]


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
