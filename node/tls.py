"""DICOM TLS: the contexts for TLS ports and for associations the node opens to devices.

Contexts are built once per set of files (a certificate change needs a restart, as for
Orthanc and dcm4chee). Which port and context an outbound association uses is decided by
`endpoint`, the one function behind forwarding, C-MOVE sub-operations, storage commitment
reports and `pacsnode device echo`.
"""

from __future__ import annotations

import functools
import ssl
from dataclasses import dataclass
from pathlib import Path

from node.config import Settings

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_VERIFY = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}


class TlsError(ValueError):
    """Certificates that cannot be loaded; the message names the file and the problem."""


@functools.lru_cache(maxsize=8)
def _server_context(cert: Path, key: Path, ca: Path | None, verify: str,
                    min_version: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[min_version]
    _load_chain(ctx, cert, key)
    if ca is not None:
        _load_ca(ctx, ca)
    ctx.verify_mode = _VERIFY[verify] if ca is not None else ssl.CERT_NONE
    return ctx


@functools.lru_cache(maxsize=8)
def _client_context(cert: Path, key: Path, ca: Path | None, verify_server: bool,
                    min_version: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = _VERSIONS[min_version]
    _load_chain(ctx, cert, key)
    if not verify_server:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif ca is not None:
        _load_ca(ctx, ca)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    return ctx


def _load_chain(ctx: ssl.SSLContext, cert: Path, key: Path) -> None:
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"cannot load TLS certificate {cert} with key {key}: {exc}") from exc


def _load_ca(ctx: ssl.SSLContext, ca: Path) -> None:
    try:
        ctx.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"cannot load TLS CA bundle {ca}: {exc}") from exc


def server_context(settings: Settings) -> ssl.SSLContext | None:
    """The context of every TLS port of the node; None when [tls] has no certificate."""
    cert, key = settings.dicom_tls_file("cert"), settings.dicom_tls_file("key")
    if cert is None or key is None:
        return None
    t = settings.tls
    return _server_context(cert, key, settings.dicom_tls_file("ca"), t.verify_client,
                           t.min_version)


def client_context(settings: Settings) -> ssl.SSLContext | None:
    """The context of outbound TLS associations; None when the node has no client certificate."""
    cert, key = settings.dicom_tls_file("client_cert"), settings.dicom_tls_file("client_key")
    if cert is None or key is None:
        return None
    t = settings.tls
    return _client_context(cert, key, settings.dicom_tls_file("ca"), t.verify_server,
                           t.min_version)


@dataclass(frozen=True)
class Endpoint:
    """Where an outbound association goes, and with which TLS arguments (None: plain TCP)."""

    address: str
    port: int
    tls_args: tuple[ssl.SSLContext, str] | None = None

    def __str__(self) -> str:
        return f"{self.address}:{self.port}{' (TLS)' if self.tls_args else ''}"

    def associate_kwargs(self) -> dict[str, object]:
        return {"tls_args": self.tls_args} if self.tls_args is not None else {}


def choose_port(port: int, tls_port: int, has_client_cert: bool) -> tuple[int, bool]:
    """(port, use TLS) for a device: its TLS port when it has one and the node can present a
    client certificate, else its TCP port (0 when it has none: the caller reports it)."""
    if tls_port and has_client_cert:
        return tls_port, True
    return port, False


def endpoint(settings: Settings, *, host: str, ip: str, port: int, tls_port: int) -> Endpoint:
    """The endpoint of a device (or directory partition) given its table values."""
    ctx = client_context(settings) if tls_port else None
    chosen, secure = choose_port(port, tls_port, ctx is not None)
    address = ip or host
    if not secure or ctx is None:
        return Endpoint(address, chosen)
    # The certificate is checked against the name the administrator entered, not the
    # resolved address (a certificate names a host, rarely an IP).
    return Endpoint(address, chosen, (ctx, host or address))


def tls_reason(exc: ssl.SSLError) -> str:
    """The short reason OpenSSL gives, e.g. "certificate verify failed: self-signed ..."."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    return str(exc.reason or exc).replace("_", " ").lower()
