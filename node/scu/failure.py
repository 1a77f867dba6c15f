"""Why an association the node requested was not established, in words for its log.

pynetdicom tells a requestor only that an association failed; the reason is in its events (a
reject's result, source and reason) or only in its own log lines (the TCP or TLS error of the
connection, an ACSE timeout), which its threads write. `PynetdicomErrors` keeps those lines
per thread for a short while, and `AssociationFailure` reads them for the association it
watches.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from typing import Any

from pynetdicom import evt

_KEEP_THREADS = 64  # threads whose error lines are kept (the newest ones)
_KEEP_LINES = 8  # error lines kept per thread

_TCP = "TCP Initialisation Error: "
_ERRNO = re.compile(r"^\[Errno -?\d+\] ")


class PynetdicomErrors(logging.Handler):
    """pynetdicom's error lines, by the thread that logged them."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self._lines: OrderedDict[int, list[tuple[float, str]]] = OrderedDict()
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        line = (time.monotonic(), record.getMessage())
        with self._lock:
            kept = self._lines.pop(record.thread or 0, [])
            self._lines[record.thread or 0] = [*kept[-(_KEEP_LINES - 1):], line]
            while len(self._lines) > _KEEP_THREADS:
                self._lines.popitem(last=False)

    def since(self, started: float, threads: list[threading.Thread | None]) -> list[str]:
        """What these threads logged from `started` on (monotonic time), oldest first."""
        with self._lock:
            lines = [line for thread in threads if thread is not None and thread.ident
                     for line in self._lines.get(thread.ident, [])]
        return [message for at, message in sorted(lines) if at >= started]


ERRORS = PynetdicomErrors()
logging.getLogger("pynetdicom").addHandler(ERRORS)


class AssociationFailure:
    """Watches one requested association (its `handlers` go into associate's evt_handlers)
    and says why it was not established."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.rejected = ""
        self.assoc: Any = None
        # The thread that requests the association: pynetdicom logs there what it finds wrong
        # with the accept (e.g. no accepted presentation context) before it aborts.
        self.requestor = threading.current_thread()

    def handlers(self) -> list[tuple[Any, Any]]:
        return [(evt.EVT_REJECTED, self._on_rejected), (evt.EVT_ABORTED, self._on_aborted)]

    def _on_rejected(self, event: evt.Event) -> None:
        self.assoc = event.assoc
        rsp = event.assoc.acceptor.primitive
        if rsp is not None:
            self.rejected = f"rejected ({rsp.result_str}, {rsp.source_str}: {rsp.reason_str})"

    def _on_aborted(self, event: evt.Event) -> None:
        self.assoc = event.assoc

    def reason(self) -> str:
        """Why it failed, as far as pynetdicom let it be known."""
        if self.rejected:
            return self.rejected
        lines = (ERRORS.since(self.started, [self.requestor, self.assoc,
                                             getattr(self.assoc, "dul", None)])
                 if self.assoc is not None else [])
        for line in lines:
            if line.startswith(_TCP):
                return _ERRNO.sub("", line[len(_TCP):]) or "the connection failed"
        if any(line.startswith("ACSE timeout") for line in lines):
            return "no answer to the association request (ACSE timeout)"
        if any(line.startswith("No accepted presentation contexts") for line in lines):
            return "it accepted none of the presentation contexts proposed"
        if self.assoc is not None:
            return "the association was aborted"
        return "no association (the reason was not logged)"
