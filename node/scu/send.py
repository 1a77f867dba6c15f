"""Stored instances sent over an association: the one way the node sends what it stores (the
C-STORE sub-operations of C-GET and C-MOVE, and forwarding).

An instance goes as it is stored (the data set after its file meta, byte for byte) whenever
the peer accepted a context with the file's own transfer syntax: written to the socket by
internals/direct_send.py where it can, else by pynetdicom straight from the file (TLS), either way
read in pieces, never whole. Only otherwise is it decoded with pydicom, decompressed if the
peer accepted it uncompressed only (which needs a decoder for that syntax), and sent by
pynetdicom; an instance that cannot be sent either way fails with the reason, and the next
one is tried. While the peer stores one instance, the next one's file is opened and its first
piece read (`StoredFile`), so reading overlaps sending.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from node.internals.direct_send import Broken, StoredFile, Unreadable, Wire
from node.scu.contexts import Accepted, as_stored, by_syntax, decodable

log = logging.getLogger(__name__)

MEDIUM = 0x0000  # C-STORE priority


class Instance(Protocol):
    """A stored instance to send (a retrieve's match, a forward job)."""

    @property
    def path(self) -> str | Path: ...
    @property
    def sop_class(self) -> str: ...
    @property
    def sop_instance(self) -> str: ...


Item = TypeVar("Item", bound=Instance)


@dataclass(frozen=True)
class Outcome:
    status: int | None = None  # the peer's C-STORE status; None: the peer did not store it
    error: str = ""  # why not (what failed here), or the peer's error comment
    broken: bool = False  # the association is gone: nothing more can be sent on it

    @property
    def stored(self) -> bool:
        """Stored (success, or one of the storage warnings)."""
        return self.status is not None and (self.status == 0
                                            or 0xB000 <= self.status <= 0xBFFF)


@dataclass
class _Next(Generic[Item]):
    """An instance made ready to send: its file open and first piece read, or why not."""

    item: Item
    file: StoredFile | None = None
    error: str = ""
    unparsed: bool = False  # a file direct_send cannot frame: pynetdicom reads it


class StoreSender:
    """Sends stored instances over one established association, from one thread; a context
    manager (the association's socket may be borrowed until it exits)."""

    def __init__(self, assoc: Any, *, peer: str = "the destination", message_id: int = 1,
                 originator: tuple[str, int] | None = None,
                 transform: Callable[[Dataset], None] | None = None) -> None:
        """`peer`: its name in errors; `message_id`: of the first C-STORE (then counting up);
        `originator`: the C-MOVE requestor's AE title and message ID; `transform`: applied to
        every instance, which is then always decoded (e.g. removing private tags)."""
        self.assoc = assoc
        self.peer = peer
        self.message_id = message_id
        self.originator = originator
        self.transform = transform
        self.accepted: list[Accepted] = [
            (int(cx.context_id), str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
            for cx in assoc.accepted_contexts if cx.as_scu]
        self._contexts = by_syntax(self.accepted)  # (a C-GET may have 120 to look through)
        self._wire: Wire | None = None
        self._direct = transform is None  # False once borrowing the socket was refused
        self._buffer = bytearray(64 * 1024)  # first pieces, until the wire has its own

    def __enter__(self) -> StoreSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self._give_back()

    def _give_back(self) -> None:
        if self._wire is not None:
            self._wire.close()
            self._wire = None

    def _next_message_id(self) -> int:
        current = self.message_id
        self.message_id = current % 65535 + 1
        return current

    def send_each(self, items: Iterable[Item]) -> Iterator[tuple[Item, Outcome]]:
        """Each item and its outcome, in order; stops after an outcome that is `broken`."""
        queue = iter(items)
        ready = self._prepare(next(queue, None))
        try:
            while ready is not None:
                current, ready = ready, None
                context_id = None
                if current.file is not None:
                    meta = current.file.meta
                    context_id = self._contexts.get((meta.sop_class, meta.transfer_syntax))
                if current.file is not None and context_id is not None and self._borrow():
                    assert self._wire is not None
                    message_id = self._next_message_id()
                    try:
                        self._wire.send(current.file, context_id, message_id, self.originator)
                        current.file.close()
                        # The next file is opened and read while the peer stores this one.
                        ready = self._prepare(next(queue, None))
                        answer = self._wire.response(message_id)
                        outcome = Outcome(answer.status, answer.comment)
                    except Broken as exc:
                        outcome = self._broken(str(exc))
                else:
                    outcome = self._through_pynetdicom(current, context_id)
                    ready = None if outcome.broken else self._prepare(next(queue, None))
                yield current.item, outcome
                if outcome.broken:
                    return
        finally:
            if ready is not None and ready.file is not None:
                ready.file.close()
            self._give_back()

    def _prepare(self, item: Item | None) -> _Next[Item] | None:
        if item is None:
            return None
        buffer = self._wire.buffer if self._wire is not None else self._buffer
        try:
            return _Next(item, StoredFile(item.path, buffer))
        except FileNotFoundError:
            return _Next(item, error=f"stored file {item.path} is missing")
        except OSError as exc:
            return _Next(item, error=f"cannot read {item.path}: {exc}")
        except Unreadable:
            return _Next(item, unparsed=True)

    def _borrow(self) -> bool:
        if self._wire is None and self._direct:
            self._wire = Wire.open(self.assoc)
            self._direct = self._wire is not None
        return self._wire is not None

    def _broken(self, why: str) -> Outcome:
        """A message may be half sent: the association cannot go on."""
        self._give_back()
        if self.assoc.is_established:
            self.assoc.abort()
        return Outcome(error=why, broken=True)

    def _through_pynetdicom(self, current: _Next[Item], context_id: int | None) -> Outcome:
        item = current.item
        if current.error:
            if current.file is not None:
                current.file.close()
            return Outcome(error=current.error)
        syntax = current.file.meta.transfer_syntax if current.file is not None else ""
        if current.file is not None:
            current.file.close()
        self._give_back()  # pynetdicom's DUL sends this one
        sent: Dataset | str | Path = item.path
        if context_id is None or self.transform is not None:
            decoded = self._decode(item, syntax)
            if isinstance(decoded, Outcome):
                return decoded
            sent = decoded
        if not self.assoc.is_established:
            return Outcome(error="the association ended (aborted or connection lost)",
                           broken=True)
        try:
            status = self.assoc.send_c_store(
                sent, msg_id=self._next_message_id(), priority=MEDIUM,
                **({"originator_aet": self.originator[0], "originator_id": self.originator[1]}
                   if self.originator else {}))
        except RuntimeError as exc:  # pynetdicom: the association ended as it began
            return Outcome(error=str(exc), broken=True)
        except FileNotFoundError:
            return Outcome(error=f"stored file {item.path} is missing")
        except (OSError, InvalidDicomError, AttributeError) as exc:
            # AttributeError: pynetdicom names the file meta elements the file lacks.
            return Outcome(error=f"cannot read {item.path}: {exc}")
        except ValueError as exc:  # no context for it, or it cannot be encoded
            return Outcome(error=str(exc))
        if "Status" not in status:
            return Outcome(error="no C-STORE response (timeout, abort or connection lost)",
                           broken=True)
        return Outcome(int(status.Status), str(status.get("ErrorComment", "")))

    def _decode(self, item: Instance, syntax: str) -> Dataset | Outcome:
        """The instance as pydicom reads it, transformed, decompressed if the peer takes its
        class uncompressed only; or why it cannot be sent."""
        try:
            # Untouched elements are written back byte for byte; pixel data stays undecoded
            # unless it must be decompressed.
            ds = dcmread(item.path, defer_size="1 MB")
        except FileNotFoundError:
            return Outcome(error=f"stored file {item.path} is missing")
        except (OSError, ValueError, InvalidDicomError) as exc:
            return Outcome(error=f"cannot read {item.path}: {exc}")
        if self.transform is not None:
            self.transform(ds)
        syntax = syntax or str(ds.file_meta.get("TransferSyntaxUID", ""))
        sop_class = str(ds.get("SOPClassUID", item.sop_class))
        if as_stored(self.accepted, sop_class, syntax) is not None:
            return ds
        refused = f"{self.peer} accepts no context for {sop_class} in {syntax}"
        if not decodable(self.accepted, sop_class):
            return Outcome(error=f"{refused} or uncompressed")
        if syntax and UID(syntax).is_compressed:
            try:
                # Still the same instance (pydicom 3 would give it a new UID by default).
                ds.decompress(generate_instance_uid=False)
            except Exception as exc:  # any decoder's failure, or no decoder at all
                return Outcome(error=f"{refused}, and it cannot be decompressed here: {exc}")
        return ds
