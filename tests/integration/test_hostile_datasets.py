"""Datasets with broken framing, sent over real associations: 0xC000, nothing stored or
indexed, the node keeps serving (the checks themselves: tests/unit/test_structure.py)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification
from sqlalchemy import func, select

from node.db.models import Instance
from node.internals.tuning import CONNECTION_HANDLERS
from tests import hostile
from tests.conftest import RunningNode, incoming_files, wait_for
from tests.dicomgen import make_instance
from tests.integration.test_bad_input import chunked_send, dcm_files, echo_ok

SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
            DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit]


@contextlib.contextmanager
def every_syntax(port: int, calling: str = "HOSTILE") -> Iterator[Association]:
    """One CT context per transfer syntax, so each file goes out in exactly its own syntax
    (a chunked send needs that), plus Verification."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    for syntax in SYNTAXES:
        ae.add_requested_context(CTImageStorage, syntax)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE",
                         evt_handlers=CONNECTION_HANDLERS)
    assert assoc.is_established
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def instance_rows(node: RunningNode) -> int:
    with node.db.session() as s:
        return s.scalar(select(func.count()).select_from(Instance)) or 0


def _trailing_padding() -> bytes:
    ds = make_instance()
    ds.DataSetTrailingPadding = b"\0" * 8
    return hostile.set_length(hostile.instance_file(ds), 0xFFFCFFFC, 0xFFFFFFF0)


def _image_type_absurd() -> bytes:
    ds = make_instance()
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    return hostile.set_length(hostile.instance_file(ds, implicit=True), 0x00080008, 0xFFFFFFF0,
                              implicit=True)


def _private_absurd() -> bytes:
    ds = make_instance()
    ds.add_new(0x00290010, "LO", "HOSTILE")  # a private block between the indexed tags and
    ds.add_new(0x00291010, "OB", b"\0" * 16)  # the pixel data
    return hostile.set_length(hostile.instance_file(ds), 0x00291010, 0xFFFFFFF0)


def _truncated_in_a_sequence() -> bytes:
    # One instance: each has new UIDs, whose lengths move the element's offset.
    data = hostile.with_sequences()
    return data[:hostile.element_offset(data, 0x00081150) + 4]


# Each: a file that pydicom's header read alone would accept (or crash on), and the words the
# refusal's Error Comment must contain.
HOSTILE = {
    "truncated pixel data": (lambda: hostile.instance_file()[:-100], "(7FE0,0010)"),
    "truncated encapsulated pixel data": (lambda: hostile.encapsulated_file()[:-60],
                                          "(7FE0,0010)"),
    "absurd length before the indexed tags": (_image_type_absurd, "past the end"),
    "absurd length of an indexed element": (
        lambda: hostile.set_length(hostile.instance_file(implicit=True), 0x00100010,
                                   0xFFFFFFF0, implicit=True), "(0010,0010)"),
    "absurd length after the indexed tags": (_private_absurd, "past the end"),
    "absurd length after the pixel data": (_trailing_padding, "(FFFC,FFFC)"),
    "trailing garbage": (lambda: hostile.instance_file() + b"\xde\xad\xbe", "truncated"),
    "implicit dataset on an explicit context": (
        lambda: hostile.instance_file(implicit=True, transfer_syntax=ExplicitVRLittleEndian),
        "implicit VR dataset"),
    "explicit dataset on an implicit context": (
        lambda: hostile.instance_file(transfer_syntax=ImplicitVRLittleEndian),
        "explicit VR dataset"),
    "truncated sequence before the pixel data": (_truncated_in_a_sequence, "truncated"),
    "truncated deflated dataset": (lambda: hostile.deflated_file()[:-20], "truncated"),
    "deflate bomb": (lambda: hostile.deflate_bomb(300 << 20), "deflated dataset inflates"),
}


def test_hostile_datasets_get_0xC000_and_leave_nothing(
        node: RunningNode, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    paths = {}
    for name, (make, _) in HOSTILE.items():
        path = tmp_path / f"{name.replace(' ', '-')}.dcm"
        path.write_bytes(make())
        paths[name] = path
    with chunked_send(), every_syntax(node.port) as assoc:
        for name, (_, reason) in HOSTILE.items():
            rsp = assoc.send_c_store(paths[name])
            assert "Status" in rsp, f"{name}: no response (association {assoc.is_established})"
            assert int(rsp.Status) == 0xC000, (name, rsp)
            assert reason in rsp.ErrorComment, (name, rsp.ErrorComment)
        # The association survives every refusal and still stores a good instance.
        good = make_instance()
        assert int(assoc.send_c_store(good).Status) == 0
    assert len(dcm_files(node.storage)) == 1
    assert instance_rows(node) == 1
    assert wait_for(lambda: incoming_files(node.storage) == [])
    assert echo_ok(node)
    assert "Traceback" not in caplog.text
    assert "HOSTILE@127.0.0.1" in caplog.text  # the refusals name the peer


def test_structure_is_checked_before_coercion_rules(node: RunningNode, tmp_path: Path) -> None:
    assert node.cli("device", "add", "CT1", "--partition", "PACSNODE",
                    "--rule", "prefix AccessionNumber SITEA-").exit_code == 0
    path = tmp_path / "truncated.dcm"
    path.write_bytes(hostile.instance_file()[:-100])
    lying = tmp_path / "lying.dcm"
    lying.write_bytes(hostile.instance_file(implicit=True,
                                            transfer_syntax=ExplicitVRLittleEndian))
    with chunked_send(), every_syntax(node.port, calling="CT1") as assoc:
        assert [int(assoc.send_c_store(p).Status) for p in (path, lying)] == [0xC000, 0xC000]
    assert dcm_files(node.storage) == []
    assert instance_rows(node) == 0
    assert wait_for(lambda: incoming_files(node.storage) == [])


def test_well_formed_files_in_every_syntax_are_stored(node: RunningNode, tmp_path: Path
                                                      ) -> None:
    # The checks must not refuse anything pydicom writes correctly.
    files = {
        "explicit": hostile.instance_file(),
        "implicit": hostile.instance_file(implicit=True),
        "big-endian": hostile.instance_file(little=False),
        "encapsulated": hostile.encapsulated_file(),
        "sequences": hostile.with_sequences(),
        "deflated": hostile.deflated_file(),
    }
    paths = []
    for name, data in files.items():
        paths.append(tmp_path / f"{name}.dcm")
        paths[-1].write_bytes(data)
    with chunked_send(), every_syntax(node.port) as assoc:
        assert [int(assoc.send_c_store(p).Status) for p in paths] == [0] * len(paths)
    assert len(dcm_files(node.storage)) == len(paths)
    assert instance_rows(node) == len(paths)
