"""Fuzzing one running node with hostile datasets and PDUs (hypothesis).

CI runs a bounded, reproducible number of cases (seed 0); for more, e.g.

    PACSNODE_FUZZ_EXAMPLES=5000 python -m pytest tests/integration/test_fuzz.py -s

runs 5000 dataset cases and 5000 PDU cases with a random seed, printed at the start (set
`PACSNODE_FUZZ_SEED` to replay one). The run ends with one report line:

    fuzz: cases=250 crashes=0 files_outside_storage=0 acknowledged=.. found=.. ...

crashes: a handler or pynetdicom's machinery raised (a traceback from the node's loggers, an
"Exception in handler", an uncaught thread exception), a 0x0110 answer, or the node stopped
answering C-ECHO. Every acknowledged instance must be indexed, with its file present and
parseable; no temporary file, no row without its file and no file without its row remains; no
new file appears in the test's directory outside the storage root.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification
from sqlalchemy import select

from node.db.indexer import INDEX_TAGS
from node.db.models import Instance
from node.internals.pdu_guard import PDU_SLACK
from node.internals.tuning import CONNECTION_HANDLERS
from node.storage.structure import StructureError, decode_values, read_header
from tests import hostile
from tests.conftest import RunningNode, incoming_files, wait_for
from tests.dicomgen import make_instance, uid
from tests.integration.test_bad_input import chunked_send

_ON_DEMAND = os.environ.get("PACSNODE_FUZZ_EXAMPLES")
DATASET_CASES = int(_ON_DEMAND) if _ON_DEMAND else 150
PDU_CASES = int(_ON_DEMAND) if _ON_DEMAND else 100
SEED = int(os.environ.get("PACSNODE_FUZZ_SEED")
           or (random.getrandbits(32) if _ON_DEMAND else 0))

pytestmark = [pytest.mark.slow,
              # One backend keeps CI time down; the index code is the same on both.
              pytest.mark.parametrize("new_db", ["sqlite"], indirect=True),
              # About 30 ms a case here; generous, so long runs on demand are not cut short.
              pytest.mark.timeout(120 + (DATASET_CASES + PDU_CASES) // 10)]
MAX_PDU = 1 << 20
# Statuses the node may answer a C-STORE with (docs/reference/conformance.md); 0x0110 counts
# as a crash.
EXPECTED = {0x0000, 0x0111, 0xA700, 0xA900, 0xC000, 0xC001, 0xC002}
# pynetdicom's words for an event handler (ours) that raised. Tracebacks pynetdicom logs for
# a PDU it could not decode or an action its state machine failed (the guard then aborts the
# association) are counted apart: handled, not crashes. A thread that dies is a crash.
CRASH_MESSAGES = ("Exception in handler", "Exception in the handler")
_DB_SUFFIXES = (".db", ".db-wal", ".db-shm", ".db-journal")


# --- what is recorded while fuzzing --------------------------------------------------------

@dataclass
class Record:
    cases: int = 0
    crashes: list[str] = field(default_factory=list)
    handled_tracebacks: int = 0
    lingering: list[str] = field(default_factory=list)  # PDU cases the node did not close
    acknowledged: set[str] = field(default_factory=set)
    outcomes: Counter[str] = field(default_factory=Counter)
    # A well-formed A-ASSOCIATE-RQ that was not accepted, or a legitimate peer's C-ECHO on a
    # new association that failed or took over LEGIT_LIMIT s: the cases locked someone out.
    refused: list[str] = field(default_factory=list)


class CrashLog(logging.Handler):
    """Log records that mean something raised where it should not have."""

    def __init__(self, record: Record) -> None:
        super().__init__(logging.WARNING)
        self.record = record

    def emit(self, entry: logging.LogRecord) -> None:
        text = entry.getMessage()
        ours = entry.name.startswith("node") and entry.exc_info is not None
        theirs = entry.name.startswith("pynetdicom") and any(m in text for m in CRASH_MESSAGES)
        if ours or theirs:
            self.record.crashes.append(f"{entry.name}: {text}")
        elif entry.exc_info is not None:
            self.record.handled_tracebacks += 1


@contextlib.contextmanager
def watching(record: Record) -> Iterator[None]:
    handler = CrashLog(record)
    root = logging.getLogger()
    previous_level, previous_hook = root.level, threading.excepthook
    root.addHandler(handler)
    root.setLevel(min(previous_level, logging.WARNING))

    def hook(args: threading.ExceptHookArgs) -> None:
        record.crashes.append(f"thread {args.thread.name if args.thread else '?'}: "
                              f"{args.exc_type.__name__}: {args.exc_value}")
        previous_hook(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous_hook
        root.removeHandler(handler)
        root.setLevel(previous_level)


# --- dataset cases -------------------------------------------------------------------------

_LENGTHS = [0, 1, 2, 3, 0xFF, 0x100, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFF0, 0xFFFFFFFE,
            0xFFFFFFFF]
_VRS = [b"UN", b"SQ", b"OB", b"OW", b"UT", b"LO", b"US", b"UL", b"XX", b"\0\0", b"zz"]
# No group 0002 tag: the sending side (pynetdicom's chunked send) would take it for file meta.
_TAGS = [0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD, 0x7FE00010, 0x00000000, 0xFFFFFFFF, 0x00080018,
         0x00081140, 0x00100010]
_HOSTILE_UIDS = ["../../../../fuzz-escape", "/tmp/fuzz-escape", "1.2.3/../../4", "1.2.3\\4",
                 "..", ".", "", "1." + "2" * 80, "1.2.3\0", "1.2.3 ", "~", "1.2.3\n4"]
_UID_KEYWORDS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"]

frac = st.floats(min_value=0, max_value=1, exclude_max=True)
mutation = st.one_of(
    st.tuples(st.just("flip"), frac, st.integers(0, 255)),
    st.tuples(st.just("truncate"), frac),
    st.tuples(st.just("insert"), frac, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("length"), st.integers(0, 63),
              st.one_of(st.sampled_from(_LENGTHS), st.integers(-8, 8))),
    st.tuples(st.just("vr"), st.integers(0, 63), st.sampled_from(_VRS)),
    st.tuples(st.just("tag"), st.integers(0, 63), st.sampled_from(_TAGS)),
    st.tuples(st.just("uid"), st.sampled_from(_UID_KEYWORDS),
              st.one_of(st.sampled_from(_HOSTILE_UIDS),
                        st.text(st.characters(codec="ascii"), max_size=70))),
    st.tuples(st.just("lie")),
)
dataset_cases = st.tuples(st.booleans(), st.booleans(),  # implicit VR, with a sequence
                          st.lists(mutation, min_size=1, max_size=3))


@dataclass(frozen=True)
class Header:
    offset: int
    implicit: bool
    long_length: bool  # a 4-byte length field


def element_headers(body: bytes, implicit: bool) -> list[Header]:
    """Top-level element headers of a well-formed little-endian body (defined lengths)."""
    headers, pos = [], 0
    while pos + 8 <= len(body):
        if implicit:
            headers.append(Header(pos, True, True))
            pos += 8 + struct.unpack_from("<L", body, pos + 4)[0]
        elif body[pos + 4:pos + 6] in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR"):
            headers.append(Header(pos, False, True))
            pos += 12 + struct.unpack_from("<L", body, pos + 8)[0]
        else:
            headers.append(Header(pos, False, False))
            pos += 8 + struct.unpack_from("<H", body, pos + 6)[0]
    return headers


def build_dataset_case(case: tuple[bool, bool, list[tuple]]) -> tuple[bytes, str]:
    """The file to send (meta as pynetdicom would write it) and its SOP Instance UID."""
    implicit, sequence, mutations = case
    ds = make_instance(size=4, sop_uid=uid())
    if sequence:
        item = Dataset()
        item.ReferencedSOPClassUID = CTImageStorage
        item.ReferencedSOPInstanceUID = uid()
        ds.ReferencedImageSequence = Sequence([item])
    sop = ds.SOPInstanceUID
    for m in mutations:
        if m[0] == "uid":
            setattr(ds, m[1], m[2])
    body = bytearray(hostile.encode(ds, implicit=implicit))
    syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    headers = element_headers(bytes(body), implicit)
    for m in mutations:
        kind = m[0]
        if kind == "flip" and body:
            body[int(m[1] * len(body))] = m[2]
        elif kind == "truncate":
            del body[int(m[1] * len(body)):]
        elif kind == "insert":
            at = int(m[1] * len(body))
            body[at:at] = m[2]
        elif kind == "append":
            body += m[1]
        elif kind in ("length", "vr", "tag") and headers:
            h = headers[m[1] % len(headers)]
            if h.offset + 12 > len(body):
                continue
            if kind == "tag":
                body[h.offset:h.offset + 4] = struct.pack("<HH", m[2] >> 16, m[2] & 0xFFFF)
            elif kind == "vr" and not h.implicit:
                body[h.offset + 4:h.offset + 6] = m[2]
            elif kind == "length":
                at, size = (h.offset + 4, 4) if h.implicit else (
                    (h.offset + 8, 4) if h.long_length else (h.offset + 6, 2))
                fmt = "<L" if size == 4 else "<H"
                current = struct.unpack_from(fmt, body, at)[0]
                value = m[2] if m[2] > 8 else current + m[2]
                body[at:at + size] = struct.pack(fmt, value % (1 << (8 * size)))
        elif kind == "lie":
            syntax = ExplicitVRLittleEndian if implicit else ImplicitVRLittleEndian
    return hostile.part10(bytes(body), syntax, sop), sop


class StoreSession:
    """One association kept open for the dataset cases; opened again when the node drops it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.assoc: Association | None = None
        self.reopened = 0

    def established(self) -> Association:
        if self.assoc is None or not self.assoc.is_established:
            ae = AE(ae_title="FUZZER")
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
            for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
                ae.add_requested_context(CTImageStorage, syntax)
            ae.add_requested_context(Verification)
            self.assoc = ae.associate("127.0.0.1", self.port, ae_title="PACSNODE",
                                      evt_handlers=CONNECTION_HANDLERS)
            assert self.assoc.is_established, "the node no longer accepts associations"
            self.reopened += 1
        return self.assoc

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()


# --- PDU cases -----------------------------------------------------------------------------

_PDU_LENGTHS = [0, 1, 3, 4, 5, 6, 0x100, 0x3FFE, MAX_PDU, MAX_PDU + PDU_SLACK + 1,
                0x7FFFFFFF, 0xFFFFFFF0, 0xFFFFFFFF]
pdu_mutation = st.one_of(
    st.tuples(st.just("flip"), frac, st.integers(0, 255)),
    st.tuples(st.just("truncate"), frac),
    st.tuples(st.just("insert"), frac, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("pdu-length"), st.sampled_from(_PDU_LENGTHS)),
    st.tuples(st.just("item-length"), st.sampled_from(_PDU_LENGTHS)),
    st.tuples(st.just("type"), st.integers(0, 255)),
)
# What follows a valid A-ASSOCIATE-RQ (or replaces it): an echo, a small C-STORE, a release,
# or noise, each possibly mutated.
payload = st.tuples(st.sampled_from(["echo", "store", "release", "random", "header"]),
                    st.lists(pdu_mutation, max_size=3), st.binary(max_size=600),
                    st.integers(0, 255), st.sampled_from(_PDU_LENGTHS))
pdu_cases = st.tuples(st.sampled_from(["raw", "rq", "after", "after", "after"]), payload)


def mutate_pdu(data: bytes, mutations: list[tuple]) -> bytes:
    out = bytearray(data)
    for m in mutations:
        kind = m[0]
        if kind == "flip" and out:
            out[int(m[1] * len(out))] = m[2]
        elif kind == "truncate":
            del out[int(m[1] * len(out)):]
        elif kind == "insert":
            at = int(m[1] * len(out))
            out[at:at] = m[2]
        elif kind == "pdu-length" and len(out) >= 6:
            out[2:6] = struct.pack(">L", m[1])
        elif kind == "item-length" and len(out) >= 10:
            out[6:10] = struct.pack(">L", m[1])
        elif kind == "type" and out:
            out[0] = m[1]
    return bytes(out)


def build_payload(spec: tuple, rq: bool) -> tuple[bytes, str]:
    """Bytes to send (after an association, or instead of one) and the SOP Instance UID of
    the C-STORE they carry, if any."""
    kind, mutations, noise, pdu_type, length = spec
    sop = ""
    if rq:
        data = hostile.associate_rq(abstract_syntaxes=("1.2.840.10008.1.1", CTImageStorage))
    elif kind == "echo":
        data = hostile.echo_request()
    elif kind == "store":
        ds = make_instance(size=4, sop_uid=uid())
        sop = ds.SOPInstanceUID
        data = hostile.store_request(hostile.encode(ds), CTImageStorage, sop, context_id=3)
    elif kind == "release":
        data = hostile.pdu_header(0x05, 4) + b"\0" * 4
    elif kind == "header":
        data = hostile.pdu_header(pdu_type, length) + noise
    else:
        data = noise
    return mutate_pdu(data, mutations), sop


def framing_complete(data: bytes) -> bool:
    """Whether `data` is whole PDUs, so the node will answer rather than wait for more."""
    whole, rest = hostile.pdus(data)
    return bool(whole) and not rest


def exchange(port: int, data: bytes, associate: bool) -> tuple[str, bytes]:
    """Send one PDU case on a fresh connection; returns what happened and the node's bytes."""
    with hostile.RawPeer(port, timeout=5) as peer:
        if associate:
            ac = peer.associate(
                hostile.associate_rq(abstract_syntaxes=("1.2.840.10008.1.1", CTImageStorage)))
            if ac[:1] != b"\x02":
                return "not-associated", ac
        peer.send(data)
        answer = b""
        if associate and framing_complete(data):
            # Whole PDUs: the node answers (or aborts) promptly; give it a moment.
            peer.sock.settimeout(1.0)
            with contextlib.suppress(OSError):
                answer = peer.read_pdu()
        with contextlib.suppress(OSError):
            peer.sock.shutdown(socket.SHUT_WR)  # what is missing is not coming
        peer.sock.settimeout(5)
        rest, closed = peer.answer()
        answer += rest
    if not closed:
        return "lingering", answer
    kind = {0x02: "accepted", 0x03: "rejected", 0x04: "answered", 0x06: "released",
            0x07: "aborted"}.get(answer[0], "garbage") if answer else "closed"
    return kind, answer


# --- the run -------------------------------------------------------------------------------

def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def echo(assoc: Association) -> bool:
    rsp = assoc.send_c_echo()
    return "Status" in rsp and int(rsp.Status) == 0


# How long a legitimate peer's association and C-ECHO may take while the cases run.
LEGIT_LIMIT = 1.0


def legit_echo(port: int) -> str | None:
    """A C-ECHO on a new association, as any other peer would send it; why it failed."""
    ae = AE(ae_title="LEGIT")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    ae.add_requested_context(Verification)
    started = time.monotonic()
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE")
    if not assoc.is_established:
        return f"legitimate C-ECHO: association {'rejected' if assoc.is_rejected else 'failed'}"
    try:
        ok = echo(assoc)
    finally:
        assoc.release()
    took = time.monotonic() - started
    if not ok or took > LEGIT_LIMIT:
        return f"legitimate C-ECHO: {'failed' if not ok else 'answered'} after {took:.2f} s"
    return None


def test_fuzz(make_node: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    node: RunningNode = make_node()  # type: ignore[operator]
    cases_dir = tmp_path / "cases"
    cases_dir.mkdir()
    case_file = cases_dir / "case.dcm"
    before = files_under(tmp_path)
    record = Record()
    session = StoreSession(node.port)
    with capsys.disabled():
        print(f"\nfuzz: seed={SEED} dataset cases={DATASET_CASES} PDU cases={PDU_CASES} "
              f"(PACSNODE_FUZZ_SEED={SEED} to replay)")
    started = time.monotonic()

    @seed(SEED)
    @settings(max_examples=DATASET_CASES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(dataset_cases)
    def dataset_case(case: tuple[bool, bool, list[tuple]]) -> None:
        data, sop = build_dataset_case(case)
        case_file.write_bytes(data)
        record.cases += 1
        assoc = session.established()
        rsp = assoc.send_c_store(case_file)
        if "Status" not in rsp:
            record.outcomes["no response"] += 1
            return  # the association was dropped: the next case opens another
        status = int(rsp.Status)
        record.outcomes[f"0x{status:04X}"] += 1
        if status == 0:
            record.acknowledged.add(sop)
        if status == 0x0110:  # "internal error": something raised in the node
            record.crashes.append(f"0x0110 {rsp.get('ErrorComment', '')} for {case}")
        assert status in EXPECTED, (f"C-STORE answered 0x{status:04X} "
                                    f"({rsp.get('ErrorComment', '')}) for {case}")

    @seed(SEED)
    @settings(max_examples=PDU_CASES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(pdu_cases)
    def pdu_case(case: tuple[str, tuple]) -> None:
        mode, spec = case
        data, sop = build_payload(spec, rq=mode == "rq")
        if mode == "raw":
            data = spec[2] if spec[0] == "random" else data
        record.cases += 1
        outcome, answer = exchange(node.port, data, associate=mode == "after")
        record.outcomes[f"pdu {outcome}"] += 1
        if outcome == "not-associated":
            record.refused.append(f"valid A-ASSOCIATE-RQ answered {answer[:10].hex()} in "
                                  f"{repr(case)[:200]}")
        if outcome == "lingering":
            record.lingering.append(repr(case)[:300])
        for command in hostile.command_sets(answer):
            if (sop and command.get("AffectedSOPInstanceUID") == sop
                    and int(command.get("Status", -1)) == 0):
                record.acknowledged.add(sop)
        if record.cases % 10 == 0:
            assert echo(session.established()), "the node stopped answering C-ECHO"
        if record.cases % 5 == 0 and (refused := legit_echo(node.port)) is not None:
            record.refused.append(f"{refused} after case {repr(case)[:200]}")

    failure: BaseException | None = None
    alive = False
    with watching(record), chunked_send():
        try:
            dataset_case()
            pdu_case()
            alive = echo(session.established())
            if (refused := legit_echo(node.port)) is not None:  # right after the cases
                record.refused.append(f"{refused} after the last case")
        except Exception as exc:  # reported after the checks below, then raised
            failure = exc
        finally:
            with contextlib.suppress(Exception):
                session.close()
    if not alive:
        record.crashes.append("the node stopped answering C-ECHO")
    elapsed = time.monotonic() - started

    # Afterwards: every acknowledged instance is indexed, on disk and parseable; nothing else.
    storage = node.storage
    assert wait_for(lambda: incoming_files(storage) == [], timeout=10)
    with node.db.session() as s:
        rows = {sop: path for sop, path in s.execute(
            select(Instance.sop_instance_uid, Instance.path))}
    stored = {p for p in files_under(storage)
              if ".incoming" not in p.relative_to(storage).parts}
    partial = [*incoming_files(storage),
               *(p for p in stored if p.name.endswith((".partial", ".coerced")))]
    orphan_rows = [sop for sop, path in rows.items() if not (storage / path).is_file()]
    files_without_row = stored - {storage / path for path in rows.values()}
    found, missing, undecodable = 0, [], []
    for sop in sorted(record.acknowledged):
        path = rows.get(sop)
        if path is None or not (storage / path).is_file():
            missing.append(f"{sop}: {'no row' if path is None else 'no file'}")
            continue
        try:
            # Parseable: pydicom reads the whole file, and it passes the node's own checks.
            dcmread(storage / path)
            read_header(storage / path, INDEX_TAGS)
        except Exception as exc:
            missing.append(f"{sop}: {type(exc).__name__}: {exc}")
            continue
        found += 1
        try:
            decode_values(dcmread(storage / path, stop_before_pixels=True))
        except StructureError as exc:
            # Framed correctly, but an element the node does not index has a value pydicom
            # cannot decode (a made-up VR, ...): stored as received, like any unchecked value.
            undecodable.append(f"{sop}: {exc}")
    outside = sorted(str(p.relative_to(tmp_path)) for p in files_under(tmp_path) - before
                     if not p.is_relative_to(storage) and not p.is_relative_to(cases_dir)
                     and not p.name.endswith(_DB_SUFFIXES))
    escaped = [p for p in ("/tmp/fuzz-escape", str(tmp_path.parent / "fuzz-escape"))
               if Path(p).exists()]
    report = (f"fuzz: cases={record.cases} crashes={len(record.crashes)} "
              f"files_outside_storage={len(outside) + len(escaped)} "
              f"acknowledged={len(record.acknowledged)} found={found} "
              f"partial_files={len(partial)} orphan_rows={len(orphan_rows)} "
              f"files_without_row={len(files_without_row)} "
              f"legitimate_refused={len(record.refused)} "
              f"undecodable_unindexed_values={len(undecodable)} "
              f"handled_tracebacks={record.handled_tracebacks} seed={SEED} "
              f"seconds={elapsed:.1f}")
    with capsys.disabled():
        print(report)
        print("fuzz outcomes: " + ", ".join(f"{k}={v}" for k, v in sorted(
            record.outcomes.items())) + f"; associations opened={session.reopened}")
        for line in [*record.crashes[:10], *record.refused[:10], *missing[:10],
                     *undecodable[:3],
                     *(f"lingering: {c}" for c in record.lingering[:5])]:
            print(f"  {line}")
    if failure is not None:
        raise failure
    assert not record.crashes, f"{report}\n" + "\n".join(record.crashes[:20])
    assert not record.refused, f"{report}\n" + "\n".join(record.refused[:20])
    assert not outside and not escaped, f"{report}\n{outside} {escaped}"
    assert found == len(record.acknowledged), f"{report}\n" + "\n".join(missing[:20])
    assert not partial and not orphan_rows and not files_without_row, (
        f"{report}\n{partial} {orphan_rows} {sorted(files_without_row)[:5]}")
