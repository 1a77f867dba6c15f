"""The inbound associations a node holds at once, counted in one place for its limits.

A node may serve associations from several processes (`dicom.association_processes`); the
limits are the node's, so every process asks the one registry, in the node's main process.
"""

from __future__ import annotations

import itertools
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

from node.policy.admission import DeviceView, Limits, OpenAssociations, PartitionPolicy, over_limit

Sender = tuple[str, object]


def sender_of(device: DeviceView | None, calling_ae: str) -> Sender:
    """Who a per-device limit counts: the device entry, else (unknown) the calling AE."""
    return ("device", device.id) if device is not None else ("ae", calling_ae)


@dataclass(frozen=True)
class Admitted:
    """An association that counts against the limits until it is released."""

    owner: int  # the process serving it: 0 the node's main process, 1.. the others
    partition_id: int
    sender: Sender


class Admissions(Protocol):
    """What the admission handler needs: a token for an admitted association, or why not."""

    def admit(self, partition: PartitionPolicy, device: DeviceView | None,
              calling_ae: str) -> tuple[int | None, str | None]: ...

    def release(self, token: int) -> None: ...


class AssociationRegistry:
    """Counts and registers under one lock, so simultaneous requests cannot all pass."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._open: dict[int, Admitted] = {}
        self._tokens = itertools.count(1)

    def admit(self, partition: PartitionPolicy, device: DeviceView | None, calling_ae: str,
              owner: int = 0) -> tuple[int | None, str | None]:
        """(token, None) if admitted, else (None, why one more would exceed a limit)."""
        sender = sender_of(device, calling_ae)
        with self._lock:
            held = list(self._open.values())
            open_now = OpenAssociations(
                node=len(held),
                partition=sum(a.partition_id == partition.id for a in held),
                device=sum(a.sender == sender for a in held))
            why = over_limit(self.limits, partition, device, calling_ae, open_now)
            if why is not None:
                return None, why
            token = next(self._tokens)
            self._open[token] = Admitted(owner, partition.id, sender)
            return token, None

    def release(self, token: int) -> None:
        with self._lock:
            self._open.pop(token, None)

    def release_owner(self, owner: int) -> int:
        """Forget every association of a process that ended; how many there were."""
        with self._lock:
            gone = [token for token, a in self._open.items() if a.owner == owner]
            for token in gone:
                del self._open[token]
            return len(gone)

    def open_by_owner(self) -> Counter[int]:
        with self._lock:
            return Counter(a.owner for a in self._open.values())
