"""Fixtures for DICOM TLS tests: a CA, certificates, and nodes with a TLS partition."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from node import config
from node.service import Node
from tests.certs import CA, Issued, make_ca
from tests.conftest import RunningNode, free_port, node_toml, stop_nodes, write_config


@dataclass
class Pki:
    ca: CA
    node: Issued
    client: Issued
    rogue: Issued  # signed by a CA the node does not trust

    def client_context(self, issued: Issued | None, *, max_version: ssl.TLSVersion | None = None
                       ) -> tuple[ssl.SSLContext, str]:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(self.ca.path)
        if issued is not None:
            ctx.load_cert_chain(issued.cert, issued.key)
        if max_version is not None:
            ctx.maximum_version = max_version
        return ctx, "127.0.0.1"


@pytest.fixture(name="pki")
def pki_fixture(tmp_path: Path) -> Pki:
    ca = make_ca(tmp_path / "pki", "hospital")
    rogue = make_ca(tmp_path / "rogue", "rogue")
    return Pki(ca, ca.issue(tmp_path / "pki", "node"), ca.issue(tmp_path / "pki", "CT1"),
               rogue.issue(tmp_path / "rogue", "CT1"))


def tls_section(pki: Pki, verify: str = "required", min_version: str = "1.2") -> str:
    return f"""
[tls]
cert = "{pki.node.cert}"
key = "{pki.node.key}"
ca = "{pki.ca.path}"
verify_client = "{verify}"
min_version = "{min_version}"
"""


StartTls = Callable[..., RunningNode]


@pytest.fixture(name="start_tls")
def start_tls_fixture(tmp_path: Path, new_db: Callable[[str], str], pki: Pki) -> Iterator[StartTls]:
    """Start a node whose bootstrap partition has a TCP port (0: none) and a TLS port."""
    started: list[Node] = []

    def start(name: str = "node", *, tcp: bool = True, verify: str = "required",
              min_version: str = "1.2", extra: str = "") -> RunningNode:
        port = free_port() if tcp else 0
        tls_port = free_port()
        text = node_toml(tmp_path / name, new_db(name), port, bootstrap=False) + f"""
[bootstrap_partition]
port = {port}
tls_port = {tls_port}
{tls_section(pki, verify, min_version)}
{extra}
"""
        settings = config.load(write_config(tmp_path / f"{name}.toml", text))
        node = Node(settings)
        node.start()
        started.append(node)
        running = RunningNode(node, settings, tmp_path / f"{name}.toml", port)
        running.tls_port = tls_port  # type: ignore[attr-defined]
        return running

    yield start
    stop_nodes(started)
