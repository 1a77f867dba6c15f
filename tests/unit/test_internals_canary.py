"""Canary for library upgrades: what node/internals/ relies on in pynetdicom, pydicom and psycopg
is still there and unchanged (node/internals/README.md lists each name and what breaks).

A failure here after an upgrade is not a bug to silence: re-read the upstream code it names
against the module of ours it names, adapt ours, then update the hash or the check. The
behaviour these internals give is checked over real associations elsewhere:
tests/integration/test_prompt.py and test_forward_sender.py (idle threads wake ~1/IDLE_WAIT
times a second, at least 0.4x and at most 1.5x that), test_direct_store.py and
test_forward_sender.py (stores received and sent by the direct paths).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import queue
import threading
from typing import Any

import psycopg
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, _config, dimse_messages, dsutils
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.fsm import TRANSITION_TABLE
from pynetdicom.sop_class import CTImageStorage, Verification
from pynetdicom.timer import Timer
from pynetdicom.transport import AssociationSocket

from node.internals import charsets, configure

# The upstream code ours copies, adapts or overrides: sha256 of inspect.getsource (first 16 hex
# digits), checked with pynetdicom 3.0.4, pydicom 3.0.2, psycopg 3.3.9; and which of our code
# to re-check when it changes.
UPSTREAM: dict[str, tuple[str, str]] = {
    "pynetdicom.dul.DULServiceProvider.run_reactor": (
        "e3a10eb3a0931e48", "internals/prompt.py PromptDUL._loop (a copy: same steps, a wait "
        "instead of the sleep); PromptRequestorDUL runs it as it is, with _run_loop_delay 0"),
    "pynetdicom.dul.DULServiceProvider._read_pdu_data": (
        "19f2d4e38c13c835", "internals/prompt.py PromptDUL._read_pdu_data (a copy, plus the "
        "direct C-STORE receiver)"),
    "pynetdicom.dul.DULServiceProvider._is_transport_event": (
        "8725ed03bb8fbdef", "internals/prompt.py _WaitsForWork._is_transport_event, "
        "PromptRequestorDUL._is_transport_event (its wait); pdu_guard's `ready`"),
    "pynetdicom.dul.DULServiceProvider._process_recv_primitive": (
        "4c0ebbb3e646e35e", "internals/prompt.py _WaitsForWork._process_recv_primitive"),
    "pynetdicom.dul.DULServiceProvider._decode_pdu": (
        "fc71dd1bf853e1ce", "internals/prompt.py _WaitsForWork.deliver, "
        "PromptDUL._read_pdu_data"),
    "pynetdicom.dul.DULServiceProvider.send_pdu": (
        "7cbce5da8594124e", "internals/prompt.py _WaitsForWork.send_pdu (wakes the DUL)"),
    "pynetdicom.dul.DULServiceProvider.kill_dul": (
        "5ceccf8dd01c2072", "internals/prompt.py _WaitsForWork.kill_dul (wakes the DUL)"),
    "pynetdicom.association.Association._run_reactor": (
        "f28838c5559e462a", "internals/prompt.py PromptAssociation._run_reactor (a copy: same "
        "steps, a wait on _prompt_wake instead of the 1 ms sleep)"),
    "pynetdicom.association.Association._serve_request": (
        "2f24c1759cdf6c8c", "internals/prompt.py PromptAssociation._serve_request"),
    "pynetdicom.association.Association.kill": (
        "8f9713666a7f4cff", "internals/prompt.py PromptAssociation.kill, "
        "PromptDUL._abort_at_once"),
    "pynetdicom.timer.Timer": (
        "77ddae7423f544b1", "internals/timers.py MonotonicTimer, monotonic_timers"),
    "pynetdicom.transport.AssociationSocket.recv": (
        "6bc20a33b1b7cfe7", "internals/pdu_guard.py GuardedAssociationSocket.recv"),
    "pynetdicom.transport.AssociationSocket.ready": (
        "3eb58e3d39dc076d", "internals/pdu_guard.py GuardedAssociationSocket.ready"),
    "pynetdicom.transport.RequestHandler._create_association": (
        "05c8d12b79863cdb", "internals/acceptor.py RememberingRequestHandler"),
    "pynetdicom.transport.AssociationServer.get_request": (
        "925a4f3a3042f6e4", "scp/listener.py ScreeningAssociationServer.get_request (TLS "
        "handshake moved to the connection's thread)"),
    "pynetdicom.transport.ThreadedAssociationServer.process_request_thread": (
        "9e76e9b9c8a3d8b1", "scp/listener.py ScreeningAssociationServer.process_request_thread"),
    "pynetdicom.dimse.DIMSEServiceProvider.receive_primitive": (
        "5f99c86b14a15cef", "internals/pdu_guard.py GuardedDIMSEServiceProvider; "
        "internals/direct_store.py (takes C-STOREs before it)"),
    "pynetdicom.dimse.DIMSEServiceProvider.get_msg": (
        "890e3e04283f5aeb", "internals/tuning.py ResponsesForTheWaiter"),
    "pynetdicom.dimse.DIMSEServiceProvider.send_msg": (
        "a839cf2fb46976d9", "internals/direct_answers.py RetrieveAnswers (replaces it on one "
        "association)"),
    "pynetdicom.fsm.StateMachine.do_action": (
        "9a883f44c7f31641", "internals/pdu_guard.py GuardedStateMachine.do_action"),
    "pynetdicom.dimse_messages.DIMSEMessage.encode_msg": (
        "73000c902c52832d", "internals/direct_store.py command_pdu/pdv_pdu, direct_send.py, "
        "direct_answers.py (the same PDUs, packed with struct)"),
    "pynetdicom.dimse_messages.DIMSEMessage.decode_msg": (
        "f51c777e841a76be", "internals/direct_store.py DirectStore.receive (fragments, the "
        "chunked data set file); pdu_guard.discard_partial_dataset (_data_set_file)"),
    "pynetdicom.dsutils.create_file_meta": (
        "035ed415f5aeea15", "internals/configure.py (its defaults), direct_store.file_meta "
        "(the same file meta, packed with struct)"),
    "psycopg.Connection.wait": (
        "602ce5e47fca2ec9", "internals/psycopg_wait.py BoundedWaitConnection.wait"),
    "pydicom.dataset.Dataset._character_set": (
        "0b29768cee1fbc45", "internals/charsets.py character_set"),
}


def _resolve(dotted: str) -> Any:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
            break
        except ImportError:
            continue
    for part in parts[i:]:
        # A class's own entry (a property itself, not its value on the class)
        obj = obj.__dict__.get(part, getattr(obj, part)) if isinstance(obj, type) \
            else getattr(obj, part)
    return obj.fget if isinstance(obj, property) else obj


@pytest.mark.parametrize("upstream", sorted(UPSTREAM))
def test_upstream_code_we_rely_on_is_unchanged(upstream: str) -> None:
    expected, ours = UPSTREAM[upstream]
    source = inspect.getsource(_resolve(upstream))
    found = hashlib.sha256(source.encode()).hexdigest()[:16]
    assert found == expected, (
        f"{upstream} changed upstream (source hash {found}, was {expected}): re-check {ours} "
        "against it (node/internals/README.md), then update the hash here")


@pytest.fixture
def assoc() -> Association:
    """An association object as pynetdicom makes it, not started (no thread, no socket)."""
    return Association(AE(), "requestor")


def _params(function: Any) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_association_has_the_private_state_prompt_and_tuning_use(assoc: Association) -> None:
    # PromptAssociation._run_reactor waits on these; tuning.ResponsesForTheWaiter reads the
    # checkpoint; direct_store reads _accepted_cx and _sent_release.
    assert isinstance(assoc._reactor_checkpoint, threading.Event)
    assert assoc._reactor_checkpoint.is_set()
    assert isinstance(assoc._dul_ready, threading.Event)
    assert assoc._is_paused is False and assoc._kill is False
    assert assoc._sent_release is False
    assert assoc._accepted_cx == {}
    assert _params(Association._run_reactor) == ["self"]
    assert _params(Association._serve_request) == ["self", "msg", "context_id"]


def test_dul_has_the_private_state_prompt_and_timers_use(assoc: Association) -> None:
    dul = assoc.dul
    assert type(dul) is DULServiceProvider
    assert type(dul._idle_timer) is Timer and type(dul.artim_timer) is Timer
    # PromptRequestorDUL sets it to 0 and waits in _is_transport_event instead.
    assert isinstance(dul._run_loop_delay, float) and dul._run_loop_delay > 0
    assert dul._kill_thread is False
    assert isinstance(dul._recv_pdu, queue.Queue)
    for method in ("_read_pdu_data", "_is_transport_event", "_process_recv_primitive"):
        assert _params(getattr(DULServiceProvider, method)) == ["self"], method
    assert _params(DULServiceProvider._decode_pdu) == ["self", "bytestream"]


def test_timer_keeps_its_times_in_the_attributes_timers_shifts() -> None:
    timer = Timer(10)
    assert timer._start_time is None and timer._end_time is None
    timer.start()
    assert isinstance(timer._start_time, float) and timer._end_time is None
    timer.stop()
    assert isinstance(timer._end_time, float)


def test_transport_and_dimse_names_pdu_guard_and_acceptor_use() -> None:
    assert "self._is_connected" in inspect.getsource(AssociationSocket)
    assert isinstance(AssociationSocket.__dict__["ready"], property)
    assert _params(AssociationSocket.recv) == ["self", "nr_bytes"]
    from pynetdicom.transport import RequestHandler
    assert _params(RequestHandler._create_association) == ["self"]
    # A C-STORE cut off mid-transfer leaves this open file (pdu_guard removes it).
    assert "self._data_set_file" in inspect.getsource(dimse_messages)
    assert ("Evt9", "Sta6") in TRANSITION_TABLE  # GuardedStateMachine looks events up here


def test_config_names_configure_sets() -> None:
    for name in ("STORE_RECV_CHUNKED_DATASET", "STORE_SEND_CHUNKED_DATASET",
                 "LOG_REQUEST_IDENTIFIERS", "LOG_RESPONSE_IDENTIFIERS"):
        assert isinstance(getattr(_config, name), bool), name
    assert isinstance(_config.LOG_HANDLER_LEVEL, str)
    # configure_pynetdicom replaces it with a partial of this, with our implementation UID
    assert getattr(dimse_messages.create_file_meta, "func", dimse_messages.create_file_meta) \
        is dsutils.create_file_meta
    assert {"implementation_uid", "implementation_version"} <= set(
        _params(dsutils.create_file_meta))


def test_supported_contexts_set_whole_are_what_the_ae_supports() -> None:
    built = AE()
    built.add_supported_context(Verification)
    built.add_supported_context(CTImageStorage)
    ae = AE()
    assert ae._supported_contexts == {}
    configure.use_supported_contexts(ae, built.supported_contexts)
    assert [cx.abstract_syntax for cx in ae.supported_contexts] == [Verification,
                                                                    CTImageStorage]


def test_pydicom_uid_table_sop_classes_reads() -> None:
    from pydicom._uid_dict import UID_dictionary
    name, kind, *_ = UID_dictionary[CTImageStorage]
    assert (name, kind) == ("CT Image Storage", "SOP Class")


def test_pydicom_character_set_of_a_dataset_built_here() -> None:
    ds = Dataset()
    assert charsets.character_set(ds) == "iso8859"
    ds.SpecificCharacterSet = "ISO_IR 192"
    assert charsets.character_set(ds) == ["UTF8"]


def test_psycopg_wait_timeout_and_signature() -> None:
    assert issubclass(psycopg.errors._WaitTimeout, Exception)
    assert _params(psycopg.Connection.wait) == ["self", "gen", "interval", "timeout"]
