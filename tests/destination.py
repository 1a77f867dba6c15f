"""A storage SCP for forwarding tests that counts what a destination would see."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.pdu_primitives import A_RELEASE
from pynetdicom.sop_class import Verification

from tests.conftest import free_port


class Gauge:
    """Open associations over one or more destinations, and the most seen at once."""

    def __init__(self) -> None:
        self.value = 0
        self.peak = 0
        self.lock = threading.Lock()

    def add(self, n: int) -> None:
        with self.lock:
            self.value += n
            self.peak = max(self.peak, self.value)


class CountingSCP:
    """Records every C-STORE (duplicates included), associations opened, and the most that
    were open at once; `delay` slows each C-STORE so transfers overlap."""

    def __init__(self, ae_title: str = "DEST", port: int | None = None, delay: float = 0.0,
                 folder: Path | None = None, gauge: Gauge | None = None,
                 refuse: set[str] | None = None) -> None:
        self.ae_title = ae_title
        self.port = port or free_port()
        self.delay = delay
        self.folder = folder
        self.received: list[str] = []
        self.datasets: dict[str, Dataset] = {}
        self.associations = 0
        self.open = 0
        self.max_open = 0
        self.echoes = 0
        self.gauge = gauge or Gauge()
        self.refuse = refuse or set()  # SOP instance UIDs answered 0xA700 (out of resources)
        self._lock = threading.Lock()
        self._counted_closed: set[object] = set()
        self._server = None

    def start(self) -> CountingSCP:
        ae = AE(ae_title=self.ae_title)
        ae.maximum_associations = 20
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ["1.2.840.10008.1.2.1",
                                                          "1.2.840.10008.1.2"])
        ae.add_supported_context(Verification)
        self._server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_ESTABLISHED, self._opened), (evt.EVT_ACSE_RECV, self._release_requested),
            (evt.EVT_ABORTED, self._closed), (evt.EVT_C_STORE, self._store),
            (evt.EVT_C_ECHO, self._echo)])
        return self

    def stop(self) -> None:
        if self._server is not None:
            for assoc in self._server.active_associations:
                assoc.abort()
            self._server.shutdown()
            self._server = None

    def _opened(self, event: evt.Event) -> None:
        with self._lock:
            self.associations += 1
            self.open += 1
            self.max_open = max(self.max_open, self.open)
        self.gauge.add(1)

    def _release_requested(self, event: evt.Event) -> None:
        # Counted closed when the A-RELEASE-RQ arrives: the requestor cannot open another
        # association before our A-RELEASE-RP, so the count never lags behind it.
        if isinstance(event.primitive, A_RELEASE) and event.primitive.result is None:
            self._closed(event)

    def _closed(self, event: evt.Event) -> None:
        with self._lock:
            if event.assoc in self._counted_closed:
                return
            self._counted_closed.add(event.assoc)
            self.open -= 1
        self.gauge.add(-1)

    def _echo(self, event: evt.Event) -> int:
        with self._lock:
            self.echoes += 1
        return 0

    def _store(self, event: evt.Event) -> int:
        if self.delay:
            time.sleep(self.delay)
        ds = event.dataset
        if ds.SOPInstanceUID in self.refuse:
            return 0xA700
        with self._lock:
            self.received.append(ds.SOPInstanceUID)
            self.datasets[ds.SOPInstanceUID] = ds
        return 0
