"""Pure decisions about connections that have not completed an A-ASSOCIATE-RQ yet: whether
one more may start its handshake, whether the bytes it sent are a well-formed request, how
refusals are reported, and the listen backlog that fits the limits.

A connection in its handshake holds no association slot (scp/gate.py reads its request before
pynetdicom sees it); these limits keep one host from holding all the handshake slots instead.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# The A-ASSOCIATE-RQ's fixed fields after the PDU header: protocol version, reserved, called
# AE, calling AE, reserved (PS3.8 9.3.2).
_FIXED = 68
_HEADER = 6
APPLICATION_CONTEXT = 0x10
PRESENTATION_CONTEXT = 0x20
ABSTRACT_SYNTAX = 0x30
TRANSFER_SYNTAX = 0x40
USER_INFORMATION = 0x50
MAXIMUM_LENGTH = 0x51


@dataclass(frozen=True)
class ConnectionLimits:
    """0: no limit."""

    per_address: int  # connections from one address, in handshake or associated
    handshakes: int  # connections in their handshake over the whole node


def refuse_connection(limits: ConnectionLimits, from_address: int,
                      handshaking: int) -> str | None:
    """Why a new connection must be closed at once, given the connections its address
    already holds and those in handshake over the node; None: let it start its handshake."""
    if limits.per_address and from_address >= limits.per_address:
        return (f"over the limit of {limits.per_address} connections per address "
                f"({from_address} open)")
    if limits.handshakes and handshaking >= limits.handshakes:
        return (f"over the limit of {limits.handshakes} connections in handshake "
                f"({handshaking} waiting for their A-ASSOCIATE-RQ)")
    return None


def listen_backlog(maximum_associations: int, max_handshakes: int, somaxconn: int) -> int:
    """A backlog that holds a burst of every connection the limits allow (socketserver's 5
    makes the rest of a burst wait for SYN retransmits: 1 s, then 3 s, ...), within the
    kernel's cap."""
    wanted = maximum_associations + (max_handshakes or somaxconn)
    return max(1, min(wanted, somaxconn))


def _items(data: bytes, start: int, end: int, where: str) -> list[tuple[int, int, int]] | str:
    """(type, start of value, end of value) of each item in data[start:end], or why not."""
    items = []
    pos = start
    while pos < end:
        if end - pos < 4:
            return f"{where}: {end - pos} stray byte(s) after the last item"
        item_type = data[pos]
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if pos + 4 + length > end:
            return (f"{where}: item 0x{item_type:02X} at byte {pos} claims {length} bytes, "
                    f"{end - pos - 4} left")
        items.append((item_type, pos + 4, pos + 4 + length))
        pos += 4 + length
    return items


# A-ASSOCIATE-RJ: rejected-permanent, source: service provider (ACSE), reason:
# protocol-version-not-supported (what pynetdicom's state machine sends, PS3.8 9.3.4).
REJECT_PROTOCOL_VERSION = bytes([0x03, 0, 0, 0, 0, 4, 0, 1, 2, 2])


def unsupported_version(pdu: bytes) -> str | None:
    """Why an A-ASSOCIATE-RQ's protocol version is not one this node speaks, or None.
    (pynetdicom answers it with an A-ASSOCIATE-RJ from its state machine, but never tells the
    association, which then waits the whole ACSE timeout.)"""
    if len(pdu) >= _HEADER + 2:
        version = int.from_bytes(pdu[_HEADER:_HEADER + 2], "big")
        if version != 1:
            return f"A-ASSOCIATE-RQ of protocol version 0x{version:04X} (only 0x0001 is known)"
    return None


def check_associate_rq(pdu: bytes) -> str | None:
    """Why `pdu` (a whole A-ASSOCIATE-RQ, header included) is not a well-formed request, or
    None. Checks the framing pynetdicom relies on (every item within its parent, lengths that
    add up, the items a request must have), not the values."""
    if len(pdu) < _HEADER + _FIXED:
        return f"A-ASSOCIATE-RQ of {len(pdu) - _HEADER} bytes, shorter than its fixed fields"
    items = _items(pdu, _HEADER + _FIXED, len(pdu), "A-ASSOCIATE-RQ")
    if isinstance(items, str):
        return items
    counts = {APPLICATION_CONTEXT: 0, PRESENTATION_CONTEXT: 0, USER_INFORMATION: 0}
    for item_type, start, end in items:
        if item_type not in counts:
            return f"A-ASSOCIATE-RQ: unknown item type 0x{item_type:02X}"
        counts[item_type] += 1
        if item_type == APPLICATION_CONTEXT and start == end:
            return "A-ASSOCIATE-RQ: empty application context name"
        if item_type == PRESENTATION_CONTEXT:
            why = _check_presentation_context(pdu, start, end)
        elif item_type == USER_INFORMATION:
            why = _check_user_information(pdu, start, end)
        else:
            why = None
        if why is not None:
            return f"A-ASSOCIATE-RQ: {why}"
    if counts[APPLICATION_CONTEXT] != 1:
        return f"A-ASSOCIATE-RQ with {counts[APPLICATION_CONTEXT]} application context items"
    if not counts[PRESENTATION_CONTEXT]:
        return "A-ASSOCIATE-RQ without a presentation context"
    if counts[USER_INFORMATION] != 1:
        return f"A-ASSOCIATE-RQ with {counts[USER_INFORMATION]} user information items"
    return None


def _check_presentation_context(pdu: bytes, start: int, end: int) -> str | None:
    if end - start < 4:
        return "presentation context item shorter than 4 bytes"
    context_id = pdu[start]
    if context_id % 2 == 0:
        return f"presentation context ID {context_id} (must be odd)"
    sub = _items(pdu, start + 4, end, f"presentation context {context_id}")
    if isinstance(sub, str):
        return sub
    abstract = [s for s in sub if s[0] == ABSTRACT_SYNTAX]
    syntaxes = [s for s in sub if s[0] == TRANSFER_SYNTAX]
    if len(abstract) != 1 or not syntaxes or len(abstract) + len(syntaxes) != len(sub):
        return (f"presentation context {context_id} needs one abstract syntax and transfer "
                "syntaxes, nothing else")
    if any(s_start == s_end for _, s_start, s_end in sub):
        return f"presentation context {context_id}: an empty syntax name"
    return None


def _check_user_information(pdu: bytes, start: int, end: int) -> str | None:
    sub = _items(pdu, start, end, "user information")
    if isinstance(sub, str):
        return sub
    maxima = [s for s in sub if s[0] == MAXIMUM_LENGTH]
    if len(maxima) != 1 or maxima[0][2] - maxima[0][1] != 4:
        return "user information needs one 4-byte maximum length item"
    return None


@dataclass
class _Window:
    opened: float
    count: int = 0  # refusals after the first one, not reported yet
    detail: str = ""


@dataclass
class Refusals:
    """Reports refused connections without letting a flood flood the log: the first refusal
    of a kind from an address is reported at once, further ones within `window` seconds are
    counted and reported as one line when it ends."""

    window: float = 10.0
    clock: Callable[[], float] = time.monotonic
    _open: dict[tuple[str, str], _Window] = field(default_factory=dict)

    def add(self, address: str, kind: str, detail: str) -> bool:
        """Count one refusal; True: report this one now."""
        key = (address, kind)
        window = self._open.get(key)
        if window is None:
            self._open[key] = _Window(self.clock())
            return True
        window.count += 1
        window.detail = detail
        return False

    def due(self) -> list[tuple[str, str, int, str]]:
        """(address, kind, count, last detail) of each ended window with unreported
        refusals; ended windows are forgotten."""
        now = self.clock()
        ended = [key for key, w in self._open.items() if now - w.opened >= self.window]
        out = []
        for key in ended:
            window = self._open.pop(key)
            if window.count:
                out.append((*key, window.count, window.detail))
        return out

    def next_due(self) -> float | None:
        """Seconds until the earliest window ends; None: none open."""
        if not self._open:
            return None
        return max(0.0, min(w.opened for w in self._open.values()) + self.window
                   - self.clock())
