"""Why a listening port cannot be opened, in words an administrator can act on."""

from __future__ import annotations

import errno
import socket

# What the kernel's word means for a port the node wants to listen on, and what to do.
_REASONS = {
    errno.EADDRINUSE: "address already in use (another program, or another node, listens"
                      " there)",
    errno.EACCES: "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE;"
                  " choose a port of 1024 or above)",
    errno.EADDRNOTAVAIL: "address not available (the listen address is not one of this"
                         " machine's)",
}


def bind_reason(exc: OSError) -> str:
    """Why binding failed: the errno in words, else whatever the error says."""
    if exc.errno in _REASONS:
        return _REASONS[exc.errno]
    return exc.strerror or str(exc) or type(exc).__name__


def probe(host: str, port: int) -> OSError | None:
    """Bind (host, port) as a listener does (SO_REUSEADDR) and let it go at once: the error
    a listener would meet there now, or None when the port is free."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        return exc
    return None
