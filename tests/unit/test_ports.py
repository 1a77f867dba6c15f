"""Why a port cannot be opened, in words (node/ports.py)."""

from __future__ import annotations

import errno
import socket

from node.ports import bind_reason, probe
from tests.conftest import free_port


def test_bind_reasons_say_what_to_do() -> None:
    assert "CAP_NET_BIND_SERVICE" in bind_reason(PermissionError(errno.EACCES, "Permission"
                                                                 " denied"))
    assert bind_reason(OSError(errno.EADDRINUSE, "Address already in use")).startswith(
        "address already in use")
    assert bind_reason(OSError(errno.ENOBUFS, "No buffer space available")) == \
        "No buffer space available"
    port = free_port()
    with socket.socket() as other:
        other.bind(("127.0.0.1", port))
        other.listen()
        refused = probe("127.0.0.1", port)
        assert refused is not None and refused.errno == errno.EADDRINUSE
    assert probe("127.0.0.1", port) is None
