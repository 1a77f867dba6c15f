"""DCMTK in TLS mode (+tls) as an independent peer: storescu/echoscu in, storescp out."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.conftest import dcmtk_env, free_port, wait_for
from tests.dicomgen import make_instance
from tests.scu import statuses, store
from tests.tlsnode import Pki, StartTls, pki_fixture, start_tls_fixture  # noqa: F401

pytestmark = [pytest.mark.interop,
              pytest.mark.parametrize("new_db", ["sqlite"], indirect=True)]


def tls_options(pki: Pki) -> list[str]:
    return ["+tls", str(pki.client.key), str(pki.client.cert), "+cf", str(pki.ca.path)]


def run(tool: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(tool), *args], env=dcmtk_env(), capture_output=True, text=True,
                          timeout=60)


def test_storescu_and_echoscu_over_tls(start_tls: StartTls, pki: Pki, dcmtk: Path,
                                       tmp_path: Path) -> None:
    node = start_tls()
    tls_port = str(node.tls_port)  # type: ignore[attr-defined]
    echoed = run(dcmtk / "echoscu", *tls_options(pki), "-aec", "PACSNODE", "127.0.0.1",
                 tls_port)
    assert echoed.returncode == 0, echoed.stderr
    path = tmp_path / "ct.dcm"
    make_instance().save_as(path, enforce_file_format=True)
    stored = run(dcmtk / "storescu", *tls_options(pki), "-aet", "CT1", "-aec", "PACSNODE",
                 "127.0.0.1", tls_port, str(path))
    assert stored.returncode == 0, stored.stderr
    sop = dcmread(path).SOPInstanceUID
    assert list(node.storage.rglob(f"{sop}.dcm"))
    # Without +tls storescu talks plain DICOM to the TLS port: refused at once, not hung.
    started = time.monotonic()
    plain = run(dcmtk / "storescu", "-aec", "PACSNODE", "127.0.0.1", tls_port, str(path))
    assert plain.returncode != 0
    assert time.monotonic() - started < 10


@pytest.fixture
def storescp_tls(dcmtk: Path, pki: Pki, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """DCMTK storescp with a TLS port that requires our client certificate."""
    port, out = free_port(), tmp_path / "received"
    out.mkdir()
    server = pki.ca.issue(tmp_path / "pki", "storescp")
    proc = subprocess.Popen([str(dcmtk / "storescp"), "+tls", str(server.key), str(server.cert),
                             "+cf", str(pki.ca.path), "-aet", "STORESCP", "-od", str(out),
                             str(port)], env=dcmtk_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        yield port, out
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_forwarding_to_dcmtk_storescp_over_tls(start_tls: StartTls,
                                               storescp_tls: tuple[int, Path]) -> None:
    port, received = storescp_tls
    node = start_tls("site")
    added = node.cli("device", "add", "ARCHIVE", "--ae-title", "STORESCP", "--host", "127.0.0.1",
                     "--port", "9", "--tls-port", str(port), "--type", "BACKUP_TARGET")
    assert added.exit_code == 0, added.output
    assert wait_for(lambda: node.cli("device", "echo", "ARCHIVE").exit_code == 0, timeout=10)
    datasets = [make_instance() for _ in range(3)]
    assert statuses(store(node.port, datasets)) == [0, 0, 0]
    assert wait_for(lambda: len(list(received.iterdir())) == 3, timeout=30)
    got = {dcmread(p).SOPInstanceUID for p in received.iterdir()}
    assert got == {ds.SOPInstanceUID for ds in datasets}
