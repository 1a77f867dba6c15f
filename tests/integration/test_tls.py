"""DICOM TLS: TLS ports beside TCP ports, client certificates, and outbound TLS to devices."""

from __future__ import annotations

import logging
import socket
import ssl
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_charset_files
from pynetdicom.sop_class import Verification

from node import config
from node.service import Node
from tests.certs import make_ca
from tests.conftest import free_port, wait_for
from tests.dicomgen import make_instance
from tests.integration.test_retrieve import body, counts, get
from tests.scu import associate, statuses, store
from tests.tlsnode import Pki, StartTls, pki_fixture, start_tls_fixture  # noqa: F401

# TLS does not depend on the index database: SQLite only, to keep the suite short.
pytestmark = pytest.mark.parametrize("new_db", ["sqlite"], indirect=True)


def echo(port: int, tls_args: tuple[ssl.SSLContext, str] | None, called: str = "PACSNODE"
         ) -> bool:
    assoc = associate(port, called, "CT1", contexts=[Verification], tls_args=tls_args)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return "Status" in status and int(status.Status) == 0
    finally:
        assoc.release()


def test_store_over_tls_with_a_client_certificate(start_tls: StartTls, pki: Pki,
                                                  tmp_path: Path) -> None:
    node = start_tls()
    tls_port = node.tls_port  # type: ignore[attr-defined]
    good = pki.client_context(pki.client)
    ds = make_instance()
    assoc = associate(tls_port, calling="CT1", tls_args=good)
    assert assoc.is_established
    try:
        assert isinstance(assoc.dul.socket.socket, ssl.SSLSocket)
        assert int(assoc.send_c_store(ds).Status) == 0
    finally:
        assoc.release()
    assert list(node.storage.rglob(f"{ds.SOPInstanceUID}.dcm"))
    # The TCP port of the same partition keeps serving plain DICOM.
    assert echo(node.port, None)


def test_clients_without_a_trusted_certificate_are_refused(
        start_tls: StartTls, pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    node = start_tls()
    tls_port = node.tls_port  # type: ignore[attr-defined]
    caplog.set_level(logging.WARNING, logger="node.scp.listener")
    assert not echo(tls_port, pki.client_context(None))
    assert not echo(tls_port, pki.client_context(pki.rogue))
    assert wait_for(lambda: caplog.text.count("TLS handshake with 127.0.0.1") >= 2)
    # ... and the node keeps serving everyone else.
    assert echo(tls_port, pki.client_context(pki.client))


def test_plain_dicom_on_the_tls_port_gets_an_abort(
        start_tls: StartTls, caplog: pytest.LogCaptureFixture) -> None:
    node = start_tls()
    caplog.set_level(logging.WARNING, logger="node.scp.listener")
    started = time.monotonic()
    assoc = associate(node.tls_port, calling="CT1", contexts=[Verification])  # type: ignore
    assert not assoc.is_established and assoc.is_aborted
    assert time.monotonic() - started < 5
    assert "plain DICOM (no TLS) on TLS port" in caplog.text


def test_tls_on_the_plain_port_fails_cleanly(start_tls: StartTls, pki: Pki) -> None:
    node = start_tls()
    started = time.monotonic()
    assert not echo(node.port, pki.client_context(pki.client))
    assert time.monotonic() - started < 5
    assert echo(node.port, None)


def test_a_silent_connection_does_not_block_the_tls_port(start_tls: StartTls, pki: Pki
                                                         ) -> None:
    """pynetdicom would do the handshake in its accept loop: one silent client would stall
    every later association on the port."""
    node = start_tls()
    tls_port = node.tls_port  # type: ignore[attr-defined]
    with socket.create_connection(("127.0.0.1", tls_port)):
        started = time.monotonic()
        assert echo(tls_port, pki.client_context(pki.client))
        assert time.monotonic() - started < 5


def test_optional_client_certificate_and_minimum_version(start_tls: StartTls, pki: Pki
                                                         ) -> None:
    node = start_tls(verify="optional", min_version="1.3")
    tls_port = node.tls_port  # type: ignore[attr-defined]
    assert echo(tls_port, pki.client_context(None))  # no certificate: allowed when optional
    assert echo(tls_port, pki.client_context(pki.client))
    assert not echo(tls_port, pki.client_context(None, max_version=ssl.TLSVersion.TLSv1_2))
    assert not echo(tls_port, pki.client_context(pki.rogue))  # one that is sent is verified


def test_tls_partition_added_live_and_tls_ports_shared(start_tls: StartTls, pki: Pki) -> None:
    node = start_tls()
    tls_port = node.tls_port  # type: ignore[attr-defined]
    shared = node.cli("partition", "add", "SECURE", "--tls-port", str(tls_port))
    assert shared.exit_code == 0, shared.output
    assert "port 0" not in shared.output and f"TLS port {tls_port}" in shared.output
    own_port = free_port()
    result = node.cli("partition", "add", "SECURE2", "--tls-port", str(own_port))
    assert result.exit_code == 0, result.output
    good = pki.client_context(pki.client)
    assert wait_for(lambda: echo(own_port, good, "SECURE2"), timeout=10)
    assert echo(tls_port, good, "SECURE")
    assert echo(tls_port, good, "PACSNODE")
    # A port number is TCP or TLS, never both.
    clash = node.cli("partition", "add", "CLASH", "--port", str(own_port))
    assert clash.exit_code != 0 and "TLS port of partition SECURE2" in clash.output
    # SECURE has no TCP port: plain DICOM on the TCP port does not reach it.
    assoc = associate(node.port, "SECURE", "CT1", contexts=[Verification])
    assert assoc.is_rejected


def test_forwarding_and_echo_use_the_device_tls_port(start_tls: StartTls, pki: Pki) -> None:
    destination = start_tls("central", tcp=False)
    source = start_tls("site", verify="none")
    dest_tls = destination.tls_port  # type: ignore[attr-defined]
    # Port 9 (discard) is closed on loopback: only the TLS port can deliver.
    added = source.cli("device", "add", "CENTRAL", "--ae-title", "PACSNODE", "--host",
                       "127.0.0.1", "--port", "9", "--tls-port", str(dest_tls), "--type",
                       "BACKUP_TARGET")
    assert added.exit_code == 0, added.output
    pinged = source.cli("device", "echo", "CENTRAL")
    assert pinged.exit_code == 0, pinged.output
    assert f"127.0.0.1:{dest_tls} (TLS): success" in pinged.output
    ds = make_instance()
    assert statuses(store(source.port, [ds])) == [0]
    assert wait_for(lambda: list(destination.storage.rglob(f"{ds.SOPInstanceUID}.dcm")),
                    timeout=20)


def test_device_echo_names_a_certificate_problem(start_tls: StartTls, pki: Pki,
                                                 tmp_path: Path) -> None:
    other = make_ca(tmp_path / "other", "other")
    server = other.issue(tmp_path / "other", "server")
    destination = start_tls("central", tcp=False, extra="")
    destination.node.stop()
    # The destination now presents a certificate from a CA the source does not trust.
    text = destination.config_path.read_text()
    text = text.replace(str(pki.node.cert), str(server.cert)).replace(str(pki.node.key),
                                                                       str(server.key))
    destination.config_path.write_text(text.replace('verify_client = "required"',
                                                    'verify_client = "none"'))
    restarted = Node(config.load(destination.config_path))
    restarted.start()
    try:
        source = start_tls("site")
        dest_tls = destination.tls_port  # type: ignore[attr-defined]
        source.cli("device", "add", "CENTRAL", "--ae-title", "PACSNODE", "--host",
                   "127.0.0.1", "--port", "9", "--tls-port", str(dest_tls))
        pinged = source.cli("device", "echo", "CENTRAL")
        assert pinged.exit_code == 1
        assert "certificate verify failed" in pinged.output
    finally:
        restarted.stop()


def test_tls_connections_handed_to_another_association_process(
        start_tls: StartTls, pki: Pki) -> None:
    # The connection is handed over before the handshake: the other process does it.
    node = start_tls(extra="[dicom]\nassociation_processes = 2\n")
    tls_port = node.tls_port  # type: ignore[attr-defined]
    held = associate(tls_port, calling="CT1", tls_args=pki.client_context(pki.client))
    try:
        assert held.is_established  # served by the main process
        ds = make_instance()
        assoc = associate(tls_port, calling="CT1", tls_args=pki.client_context(pki.client))
        assert assoc.is_established
        try:
            assert int(assoc.send_c_store(ds).Status) == 0
        finally:
            assoc.release()
        assert node.node.processes is not None and node.node.processes.handed()[1] == 1
        assert list(node.storage.rglob(f"{ds.SOPInstanceUID}.dcm"))
        # A client without a trusted certificate is refused there too.
        assert not echo(tls_port, pki.client_context(pki.rogue))
    finally:
        held.release()


def test_c_get_over_tls_returns_the_stored_bytes(start_tls: StartTls, pki: Pki,
                                                  tmp_path: Path) -> None:
    node = start_tls()
    original = Path(get_charset_files("chrKoreanMulti.dcm")[0])  # group lengths included
    assert statuses(store(node.port, [original])) == [0]
    sop = str(dcmread(original, stop_before_pixels=True).SOPInstanceUID)
    folder = tmp_path / "got"
    folder.mkdir()
    final = get(node, "IMAGE", folder, calling="CT1", port=node.tls_port,  # type: ignore[attr-defined]
                tls_args=pki.client_context(pki.client), SOPInstanceUID=sop)[-1]
    assert (int(final.Status), counts(final)[1:3]) == (0, (1, 0))
    [received] = folder.iterdir()
    assert body(received) == body(original)
