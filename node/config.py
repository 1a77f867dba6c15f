"""Node settings: a TOML file whose every key has a default.

`pacsnode serve` with no file runs the embedded default: SQLite and storage under
./pacsnode-data, one partition PACSNODE on port 11112 accepting any device.

Every key is declared once below with `setting(default, text, ...)` (node/config_schema.py):
its type and value checks, `pacsnode config example` and docs/reference/settings.md come from
that declaration. Rules that relate several keys (TLS files, storage watermarks, hierarchy
addresses) are the named functions after the declarations.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.uid import UID, AllTransferSyntaxes, ImplicitVRLittleEndian

from node.config_schema import check_type, check_value, described, setting, spec_of

ENV_CONFIG = "PACSNODE_CONFIG"
MAX_ASSOCIATION_PROCESSES = 64
# The device table's types (DeviceType in node/db/models.py, less SELF), written out here so
# that reading settings does not import the database models (tests/unit/test_config_schema.py
# keeps the two equal).
DEVICE_TYPES = ("DICOM", "PARENT", "CHILD", "BACKUP_SOURCE", "BACKUP_TARGET", "MEDIA_CREATOR",
                "VIEWER", "WEB_SERVICE")
_SECONDS: dict[str, Any] = {"unit": "seconds", "positive": True}
_PORT: dict[str, Any] = {"minimum": 1, "maximum": 65535}


class ConfigError(ValueError):
    """A settings file that cannot be used; the message names the key and the problem."""


def _default_transfer_syntaxes() -> list[str]:
    """Uncompressed syntaxes first, then every compressed syntax pydicom knows.

    The acceptor picks the first syntax of this list that the requestor offers, so compressed
    data offered alone is still accepted (and stored as received).
    """
    first = [
        "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
        "1.2.840.10008.1.2",  # Implicit VR Little Endian
        "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
        "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
    ]
    return first + [str(uid) for uid in AllTransferSyntaxes if str(uid) not in first]


@dataclass
class NodeSettings:
    """The node itself: its name, where its data lives, its database."""

    name: str = setting("pacsnode", "The node's name, shown in logs.")
    data_dir: str = setting(
        "./pacsnode-data", "Where the SQLite database and the storage live by default.")
    database_url: str = setting(
        "", "SQLAlchemy URL of the index database; PostgreSQL: `postgresql+psycopg://...`.",
        shown_default="SQLite `<data_dir>/pacsnode.db`")
    storage_dir: str = setting(
        "", "The repository root (temporary files in `.incoming/` inside it).",
        shown_default="`<data_dir>/storage`")
    listen_host: str = setting("0.0.0.0", "Address the DICOM listeners bind to.")
    partition_poll_seconds: float = setting(
        2.0, "How often listeners are matched to the partition table.", **_SECONDS)
    shutdown_grace_seconds: float = setting(
        10.0, "How long running associations may finish at shutdown.", unit="seconds",
        minimum=0)
    log_level: str = setting(
        "INFO", "Log level: DEBUG, INFO, WARNING, ERROR or CRITICAL (any case).")
    # A database that stalls (a frozen or unreachable PostgreSQL server, another process
    # holding SQLite's write lock) must not stall the node; peers' own DIMSE timeouts are
    # commonly 30-60 s, so the answer comes before they give up.
    database_connect_timeout: float = setting(
        5.0, "Seconds to open a database connection (PostgreSQL: at least 2, libpq's"
        " shortest).", **_SECONDS)
    database_timeout: float = setting(
        10.0, "The longest a serving node waits for one database operation or write"
        " transaction (statement, lock, commit): then a C-STORE is answered 0x0110 with"
        " nothing stored and a C-FIND 0xC000; associations are admitted from the partitions"
        " and devices last looked up.", see=("Database", "how-to/postgresql.md"), **_SECONDS)
    trace_dicom: bool = setting(
        False, "Log every association's A-ASSOCIATE, DIMSE messages, release and abort, one"
        " line each, on the logger `pacsnode.dicom.trace` (at DEBUG, whatever `log_level`"
        " says); `pacsnode serve --trace-dicom` turns it on too. Off, it costs nothing.",
        see=("DICOM trace", "how-to/troubleshooting.md"))
    trace_dicom_ae_titles: list[str] = field(default_factory=list, metadata=described(
        "With the trace on, only associations with one of these as calling or called AE"
        " title (`serve --trace-dicom-ae`).", shown_default="every association"))


@dataclass
class DicomSettings:
    """The DICOM listeners and the associations the node accepts and requests."""

    transfer_syntaxes: list[str] = field(default_factory=_default_transfer_syntaxes,
                                         metadata=described(
        "Accepted transfer syntaxes, UIDs or pydicom keywords such as"
        " `ExplicitVRLittleEndian`.", non_empty=True,
        shown_default="uncompressed, then every syntax pydicom knows"))
    transfer_syntax_preference: str = setting(
        "requestor", "`requestor`: in each proposed presentation context accept the"
        " requestor's first syntax that is in `transfer_syntaxes` (data arrives as the sender"
        " holds it); `node`: the order of `transfer_syntaxes` decides (the preferred transfer"
        " syntax).", choices=("requestor", "node"))
    enforce_default_transfer_syntax: bool = setting(
        False, "Accept only Implicit VR Little Endian.")
    max_pdu_size: int = setting(
        1_048_576, "Maximum PDU the node receives; never unlimited (0 would let a peer make the"
        " node buffer arbitrarily large PDUs).", unit="bytes", minimum=4096)
    acse_timeout: float = setting(30.0, "Seconds to wait for association messages.",
                                  **_SECONDS)
    dimse_timeout: float = setting(60.0, "Seconds to wait for DIMSE messages.", **_SECONDS)
    network_timeout: float = setting(
        120.0, "Idle seconds before an association is closed.", **_SECONDS)
    connection_timeout: float = setting(
        10.0, "Seconds to open outbound connections (`device echo`, forwarding).", **_SECONDS)
    send_implementation_version_name: bool = setting(
        True, "Send the implementation version name (`PACSNODE_<version>`) in the"
        " A-ASSOCIATE-AC; `false` leaves it out, for peers that mishandle it.")
    maximum_associations: int = setting(
        64, "Concurrent inbound associations over all partitions; beyond it a transient"
        " reject.", minimum=1)
    max_associations_per_device: int = setting(
        16, "Inbound associations one calling device (AE title) may hold at once.",
        minimum=1, zero="no limit below maximum_associations",
        cli="device add|edit --max-inbound")
    handshake_timeout: float = setting(
        5.0, "Seconds a new connection has to complete its A-ASSOCIATE-RQ (or TLS"
        " handshake), else it is closed (as dcm4che's request timeout does); until then it"
        " holds no association slot.", **_SECONDS)
    max_connections_per_address: int = setting(
        32, "Connections one peer IP address may hold at once, in handshake or associated;"
        " beyond it a new one is closed at once, so one host cannot fill the node.",
        minimum=1, zero="no limit")
    max_handshakes: int = setting(
        256, "Connections still in their handshake (no complete A-ASSOCIATE-RQ yet) over the"
        " whole node; beyond it a new one is closed at once.", minimum=1, zero="no limit")
    # One Python process runs its Python code on one core at a time: with one process,
    # 64x64 images over four associations came in at 0.73x Orthanc's rate, with one per core
    # ahead of it (bench/ingest.py).
    association_processes: int = setting(
        0, "Processes that serve inbound associations, the node's main one included; on a"
        " machine with more cores, associations spread over several receive faster together.",
        minimum=1, maximum=MAX_ASSOCIATION_PROCESSES, zero="one per CPU core",
        see=("Association processes", "how-to/processes.md"))
    cpu_affinity: bool = setting(
        True, "With one association process per CPU: a process serving two or more"
        " associations at once keeps their receiving threads on a CPU of its own.",
        see=("Association processes", "how-to/processes.md"))
    accept_unknown_sop_classes: bool = setting(
        True, "Accept storage of a SOP class neither pydicom nor pynetdicom knows (a vendor's"
        " private class, one newer than the libraries) when a sender proposes it; `false`: no"
        " presentation context for them.")

    def processes(self) -> int:
        """How many processes serve associations (association_processes, 0 resolved)."""
        if self.association_processes:
            return self.association_processes
        return max(1, len(os.sched_getaffinity(0)))


@dataclass
class TlsSettings:
    """DICOM TLS: a partition's TLS port, and associations the node opens to devices that have
    a TLS port. Files are PEM; relative paths are relative to the settings file."""

    cert: str = setting(
        "", "The node's certificate: server identity, and client identity by default.",
        shown_default="none", see=("DICOM TLS", "how-to/tls.md"))
    key: str = setting("", "Its private key (given with `cert`).", shown_default="none")
    ca: str = setting(
        "", "CA bundle: verifies client certificates and the devices' server certificates.",
        shown_default="none")
    verify_client: str = setting(
        "optional", "Client certificates: `required`, `optional` (verified when sent) or"
        " `none`; `required` and `optional` need `ca`.",
        choices=("required", "optional", "none"))
    min_version: str = setting("1.2", "Lowest TLS version accepted.", choices=("1.2", "1.3"))
    client_cert: str = setting("", "Certificate for outbound associations.",
                               shown_default="`cert`")
    client_key: str = setting("", "Its private key.", shown_default="`key`")
    verify_server: bool = setting(
        True, "Check a device's certificate against `ca` and its host name.")


@dataclass
class QuerySettings:
    """Node defaults for query/retrieve; a partition may override each."""

    case_sensitive: bool = setting(
        False, "Case-sensitive C-FIND matching; off: `smith*` matches `SMITH^JOHN`.",
        cli="partition add|edit --case-sensitive")
    empty_matching: bool = setting(
        False, "An empty value in the index matches any non-empty query key.",
        cli="partition add|edit --empty-matching")
    limit: int = setting(
        0, "Most C-FIND matches or retrieved instances; more end the request with status"
        " 0xA700.", minimum=1, zero="no limit", cli="partition add|edit --query-limit")


@dataclass
class ForwardingSettings:
    """The forwarding queue and its senders (defaults; a device may override some)."""

    workers: int = setting(4, "Sender tasks running at once, over all destinations.",
                           minimum=1)
    poll_seconds: float = setting(
        1.0, "How often the queue is checked when nothing new arrived.", **_SECONDS)
    batch_size: int = setting(
        50, "Jobs one sender task claims and sends on one association.", minimum=1)
    retry_base_seconds: float = setting(
        10.0, "First retry delay; it doubles per failed attempt.", **_SECONDS)
    retry_max_seconds: float = setting(3600.0, "The longest delay between attempts.",
                                       **_SECONDS)
    max_attempts: int = setting(20, "Attempts, then the job is marked failed.", minimum=1)
    lease_seconds: float = setting(
        600.0, "Jobs claimed by a sender that died go back to the queue after this.",
        **_SECONDS)
    heartbeat: bool = setting(
        True, "Keep associations open between transmissions.",
        cli="device add|edit --heartbeat")
    heartbeat_interval: float = setting(
        30.0, "C-ECHO on an idle association this often.", **_SECONDS)
    heartbeat_idle_seconds: float = setting(
        300.0, "Release an association without transmissions this long.", **_SECONDS)
    remove_private_tags: bool = setting(
        False, "Remove private tags when forwarding.",
        cli="device add|edit --remove-private-tags")
    send_updates: bool = setting(
        True, "Forward new instances of studies already forwarded.",
        cli="device add|edit --send-updates")
    commitment_timeout: float = setting(
        600.0, "The longest a storage commitment report is awaited before commitment is asked"
        " again (or the retry delay, when longer): a report that never comes is retried, not"
        " forgotten.", **_SECONDS)


@dataclass
class StorageSettings:
    """Disk watermarks, auto-purge and the activity log.

    Watermarks are percentages of the filesystem in use (as `df` shows it), checked for every
    filesystem that holds the storage root or a partition's folder.
    """

    high_watermark: float = setting(
        90.0, "Above this, auto-purge deletes studies stored elsewhere ...", unit="%",
        positive=True, maximum=100)
    low_watermark: float = setting(
        80.0, "... until usage is back at or below this.", unit="%", positive=True,
        maximum=100)
    critical_watermark: float = setting(
        95.0, "At or above this, C-STORE is suspended (answered 0xA700) until space is freed.",
        unit="%", positive=True, maximum=100)
    check_interval_seconds: float = setting(
        30.0, "How often disk usage is checked and purging runs.", **_SECONDS)
    auto_purge: bool = setting(True, "`false`: never purge (suspension still applies).")
    purge_order: str = setting(
        "received", "`received`: oldest received first; `accessed`: least recently received"
        " or retrieved first.", choices=("received", "accessed"))
    purge_batch_size: int = setting(
        10, "Studies deleted per batch, then usage is measured again.", minimum=1)
    protected_studies: int = setting(
        0, "Purging stops when a filesystem holds this many studies.", minimum=0)
    cpu_idle_threshold: float = setting(
        0.0, "Purge only while the CPU is at least this % idle (0: always).", unit="%",
        minimum=0, maximum=100)
    archive_device_types: list[str] = field(default_factory=lambda: ["PARENT", "BACKUP_TARGET"],
                                            metadata=described(
        "Device types that count as stored elsewhere: a study is, when every instance reached"
        " a device of these types (and was committed there, where the device asks for storage"
        " commitment). Any case.", choices=DEVICE_TYPES, non_empty=True))
    activity_log: bool = setting(True, "Record DICOM activity in the database"
                                 " (`pacsnode activity`).")
    activity_retention_days: int = setting(
        30, "Activity older than this many days is removed.", unit="days", minimum=1,
        zero="kept forever")


@dataclass
class NotifySettings:
    """E-mail when storage is suspended or resumes (an error is always logged)."""

    email_to: str = setting("", "Comma-separated addresses; empty: no e-mail.")
    email_from: str = setting("", "Sender address.", shown_default="`pacsnode@<host name>`")
    smtp_host: str = setting("", "The mail server (needed with `email_to`).")
    smtp_port: int = setting(25, "Its port.", **_PORT)
    smtp_starttls: bool = setting(False, "STARTTLS before logging in.")
    smtp_user: str = setting("", "Log in as this user when given.")
    smtp_password: str = setting("", "Its password.", secret=True)
    smtp_timeout: float = setting(10.0, "Seconds per mail server operation.", **_SECONDS)


@dataclass
class HierarchySettings:
    """This node's place in the tree and its gRPC control plane (served by `pacsnode serve`)."""

    enabled: bool = setting(True, "Serve the control plane.")
    node_id: str = setting(
        "", "Unique in the tree: 1-64 letters, digits, `.`, `_` or `-`.",
        shown_default="`node.name`")
    site: str = setting("", "The site's human name, shown in the DotCom directory.")
    control_listen: str = setting(
        "127.0.0.1:50051", "gRPC listen address `host:port`. Without TLS certificates the"
        " control plane only listens on a loopback address, unless `allow_insecure_remote`"
        " is set.")
    advertise_address: str = setting(
        "", "How other nodes reach this one (`host:port`).",
        shown_default="`control_listen` (a wildcard host: the machine's name)")
    dicom_host: str = setting("", "Host other nodes use for this node's partitions.",
                              shown_default="the advertised host")
    allow_insecure_remote: bool = setting(
        False, "Allow a non-loopback `control_listen` without TLS.")
    parent: str = setting(
        "", "The parent's control address `host:port`; empty: this node is a root.")
    parent_ae_title: str = setting("", "Partition of the parent to forward to.",
                                   shown_default="the parent's first enabled partition")
    parent_dicom_host: str = setting("", "Host of the `PARENT` device.",
                                     shown_default="the host the parent advertises")
    heartbeat_seconds: float = setting(
        10.0, "Child to parent heartbeat; three missed: not alive.", **_SECONDS)
    sync_seconds: float = setting(
        2.0, "How often device changes are pushed again to a neighbour that has not taken"
        " them (new changes go at once; CLI changes within 0.2 s).", **_SECONDS)
    rpc_timeout: float = setting(5.0, "One call to a neighbour.", **_SECONDS)
    recollect_timeout: float = setting(
        20.0, "Recollect, status and refresh-IP over the whole tree.", **_SECONDS)
    tls_cert: str = setting(
        "", "PEM certificate of this node (its node id as CN or a SAN), server and client"
        " identity; `tls_cert`, `tls_key` and `tls_ca` go together.", shown_default="none")
    tls_key: str = setting("", "Its PEM private key.", shown_default="none")
    tls_ca: str = setting("", "PEM CA bundle that signs every node's certificate.",
                          shown_default="none")
    tls_server_name: str = setting("", "Expected name in peers' certificates.",
                                   shown_default="the peer's host")


@dataclass
class BootstrapPartition:
    """Created when the database holds no partition at all (first start)."""

    ae_title: str = setting("PACSNODE", "The partition's AE title.")
    port: int = setting(11112, "Its port (not a privileged port).", zero="none", **_PORT)
    tls_port: int = setting(0, "Its DICOM TLS port (needs `[tls]` cert and key).",
                            zero="none", **_PORT)
    folder: str = setting("PACSNODE", "Its folder in the storage.")
    description: str = setting("Default partition", "Its description.")


@dataclass
class Settings:
    node: NodeSettings = field(default_factory=NodeSettings)
    dicom: DicomSettings = field(default_factory=DicomSettings)
    query: QuerySettings = field(default_factory=QuerySettings)
    forwarding: ForwardingSettings = field(default_factory=ForwardingSettings)
    bootstrap_partition: BootstrapPartition = field(default_factory=BootstrapPartition)
    hierarchy: HierarchySettings = field(default_factory=HierarchySettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    notify: NotifySettings = field(default_factory=NotifySettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    source: Path | None = None

    @property
    def node_id(self) -> str:
        return self.hierarchy.node_id or self.node.name

    def tls_file(self, key: str) -> Path | None:
        """One of the [hierarchy] tls_* files, resolved like every path in the file."""
        value = getattr(self.hierarchy, key)
        return _resolve(value, self.source) if value else None

    def dicom_tls_file(self, key: str) -> Path | None:
        """One of the [tls] files (client_cert/client_key fall back to cert/key)."""
        value = getattr(self.tls, key) or (getattr(self.tls, key.removeprefix("client_"))
                                           if key.startswith("client_") else "")
        return _resolve(value, self.source) if value else None

    @property
    def data_dir(self) -> Path:
        return _resolve(self.node.data_dir, self.source)

    @property
    def storage_dir(self) -> Path:
        if self.node.storage_dir:
            return _resolve(self.node.storage_dir, self.source)
        return self.data_dir / "storage"

    @property
    def database_url(self) -> str:
        if self.node.database_url:
            return self.node.database_url
        return f"sqlite:///{self.data_dir / 'pacsnode.db'}"

    @property
    def accepted_transfer_syntaxes(self) -> list[str]:
        if self.dicom.enforce_default_transfer_syntax:
            return [str(ImplicitVRLittleEndian)]
        return list(self.dicom.transfer_syntaxes)


def _resolve(value: str, source: Path | None) -> Path:
    """Relative paths in a settings file are relative to the file, not to the shell's cwd."""
    path = Path(value).expanduser()
    if not path.is_absolute() and source is not None:
        path = source.parent / path
    return path.absolute()


# Section name -> its dataclass, in the order of Settings (and of the reference).
SECTIONS: dict[str, type] = {f.name: typing.cast(type, f.default_factory)
                             for f in dataclasses.fields(Settings) if f.name != "source"}


def read_section(name: str, cls: type, raw: Any) -> Any:
    """A section of a settings file, its keys known and of their types (no other check)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"[{name}] must be a table")
    kinds = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"unknown setting {name}.{key} (known: {', '.join(sorted(known))})")
        try:
            values[key] = check_type(f"{name}.{key}", kinds[key], value)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return cls(**values)


def validate(settings: Settings) -> None:
    """Normalise what has several spellings, then check every key against its declaration
    and the rules that relate several keys; the first problem is a ConfigError."""
    settings.node.log_level = _log_level(settings.node.log_level)
    _resolve_transfer_syntaxes(settings.dicom)
    s = settings.storage
    s.archive_device_types = [str(t).upper() for t in s.archive_device_types]
    for name in SECTIONS:
        section = getattr(settings, name)
        for item in dataclasses.fields(section):
            try:
                check_value(f"{name}.{item.name}", spec_of(item), getattr(section, item.name))
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
    _validate_bootstrap_ports(settings)
    for title in settings.node.trace_dicom_ae_titles:
        if not isinstance(title, str) or not 0 < len(title.strip()) <= 16:
            raise ConfigError(f"node.trace_dicom_ae_titles: {title!r} is not an AE title"
                              " (1-16 characters)")
    _validate_hierarchy(settings)
    _validate_watermarks(settings.storage)
    _validate_notify(settings.notify)
    _validate_tls(settings)


def _log_level(value: str) -> str:
    """The level's name as the logging module knows it (any case), else a ConfigError."""
    known = logging.getLevelNamesMapping()
    if value.strip().upper() in known:
        return value.strip().upper()
    levels = sorted({logging.getLevelName(n) for n in known.values() if n}, key=known.__getitem__)
    raise ConfigError(f"node.log_level {value!r} is not a log level: use one of"
                      f" {', '.join(levels)}")


def _resolve_transfer_syntaxes(d: DicomSettings) -> None:
    """Keywords and names become UIDs; a UID pydicom does not know is refused."""
    known = {str(uid) for uid in AllTransferSyntaxes}
    for i, uid in enumerate(d.transfer_syntaxes):
        if not isinstance(uid, str):
            raise ConfigError(f"dicom.transfer_syntaxes: {uid!r} is not a string")
        resolved = resolve_transfer_syntax(uid)
        if resolved not in known:
            raise ConfigError(f"dicom.transfer_syntaxes: {uid!r} is not a known transfer syntax")
        d.transfer_syntaxes[i] = resolved


def _validate_bootstrap_ports(settings: Settings) -> None:
    b = settings.bootstrap_partition
    if not (b.port or b.tls_port):
        raise ConfigError("bootstrap_partition.port and tls_port are both 0 (off): set at least"
                          " one of them")
    if b.port and b.port == b.tls_port:
        raise ConfigError("bootstrap_partition.port and tls_port must differ")
    if b.tls_port and not settings.tls.cert:
        raise ConfigError("bootstrap_partition.tls_port needs [tls] cert and key")


def _validate_tls(settings: Settings) -> None:
    t = settings.tls
    if bool(t.cert) != bool(t.key):
        raise ConfigError("tls.cert and tls.key must be given together")
    if bool(t.client_cert) != bool(t.client_key):
        raise ConfigError("tls.client_cert and tls.client_key must be given together")
    for key in ("cert", "key", "ca", "client_cert", "client_key"):
        if getattr(t, key):
            path = settings.dicom_tls_file(key)
            if path is None or not path.is_file():
                raise ConfigError(f"tls.{key}: {path} does not exist")
    if t.verify_client != "none" and t.cert and not t.ca:
        raise ConfigError(f"tls.verify_client = {t.verify_client!r} needs tls.ca (the CA that"
                          " signs client certificates), or set it to 'none'")


def _validate_watermarks(s: StorageSettings) -> None:
    if not s.low_watermark <= s.high_watermark <= s.critical_watermark:
        raise ConfigError("storage watermarks must satisfy low_watermark <= high_watermark <= "
                          f"critical_watermark (got {s.low_watermark}, {s.high_watermark}, "
                          f"{s.critical_watermark})")


def _validate_notify(n: NotifySettings) -> None:
    if n.email_to and not n.smtp_host:
        raise ConfigError("notify.email_to needs notify.smtp_host")


def split_address(value: str, key: str) -> tuple[str, int]:
    """host:port (IPv6 as [::1]:port) -> (host, port), or a ConfigError naming `key`."""
    host, sep, port = value.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key} must be host:port, got {value!r}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _validate_hierarchy(settings: Settings) -> None:
    h = settings.hierarchy
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", settings.node_id):
        raise ConfigError(f"hierarchy.node_id {settings.node_id!r} must be 1-64 letters, digits,"
                          " '.', '_' or '-' (it defaults to node.name)")
    host, _port = split_address(h.control_listen, "hierarchy.control_listen")
    if h.advertise_address:
        split_address(h.advertise_address, "hierarchy.advertise_address")
    if h.parent:
        split_address(h.parent, "hierarchy.parent")
    tls = [k for k in ("tls_cert", "tls_key", "tls_ca") if getattr(h, k)]
    if tls and len(tls) != 3:
        raise ConfigError("hierarchy.tls_cert, tls_key and tls_ca must be given together")
    for key in tls:
        path = settings.tls_file(key)
        if path is None or not path.is_file():
            raise ConfigError(f"hierarchy.{key}: {path} does not exist")
    if h.enabled and not tls and not is_loopback(host) and not h.allow_insecure_remote:
        raise ConfigError(
            f"hierarchy.control_listen {h.control_listen} is not a loopback address: configure"
            " tls_cert, tls_key and tls_ca (mutual TLS), or set allow_insecure_remote = true")


def resolve_transfer_syntax(value: str) -> str:
    """Accept a UID or pydicom's keyword for it (e.g. ``ExplicitVRLittleEndian``)."""
    for uid in AllTransferSyntaxes:
        if value in (str(uid), uid.keyword, uid.name):
            return str(uid)
    return str(UID(value))


def load(path: str | Path | None = None) -> Settings:
    """Read settings from `path`, or $PACSNODE_CONFIG, or use the embedded default."""
    if path is None:
        path = os.environ.get(ENV_CONFIG) or None
    if path is None:
        settings = Settings()
        validate(settings)
        return settings
    file = Path(path)
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"settings file {file} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read settings file {file}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"settings file {file} is not valid TOML: {exc}") from exc
    sections: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in SECTIONS:
            raise ConfigError(f"unknown section [{name}] (known: {', '.join(sorted(SECTIONS))})")
        sections[name] = read_section(name, SECTIONS[name], value)
    settings = Settings(**sections, source=file.absolute())
    validate(settings)
    return settings
