"""Node settings: a TOML file whose every key has a default.

`pacsnode serve` with no file runs the embedded default: SQLite and storage under
./pacsnode-data, one partition PACSNODE on port 11112 accepting any device.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.uid import UID, AllTransferSyntaxes, ImplicitVRLittleEndian

ENV_CONFIG = "PACSNODE_CONFIG"
MAX_ASSOCIATION_PROCESSES = 64


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
    name: str = "pacsnode"
    data_dir: str = "./pacsnode-data"
    database_url: str = ""  # empty: sqlite:///<data_dir>/pacsnode.db
    storage_dir: str = ""  # empty: <data_dir>/storage
    listen_host: str = "0.0.0.0"
    partition_poll_seconds: float = 2.0
    shutdown_grace_seconds: float = 10.0
    log_level: str = "INFO"
    # A database that stalls (a frozen or unreachable PostgreSQL server, another process
    # holding SQLite's write lock) must not stall the node: seconds to open a connection, and
    # the longest a serving process waits for one database operation or write transaction
    # (statement, lock, commit). Beyond it a C-STORE is answered 0x0110 and a C-FIND 0xC000;
    # peers' own DIMSE timeouts are commonly 30-60 s, so the answer comes before they give up.
    database_connect_timeout: float = 5.0
    database_timeout: float = 10.0


@dataclass
class DicomSettings:
    transfer_syntaxes: list[str] = field(default_factory=_default_transfer_syntaxes)
    # "requestor": in each presentation context accept the requestor's first proposed syntax
    # that is in transfer_syntaxes (data arrives as the sender holds it); "node": the order of
    # transfer_syntaxes decides (the "preferred transfer syntax" of seed 001).
    transfer_syntax_preference: str = "requestor"
    enforce_default_transfer_syntax: bool = False
    max_pdu_size: int = 1_048_576
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 120.0
    connection_timeout: float = 10.0
    send_implementation_version_name: bool = True
    maximum_associations: int = 64  # inbound, over all partitions (seed 004)
    # Inbound associations one calling device (AE title) may hold at once; a device's own
    # max_inbound_associations overrides it; 0: no limit below maximum_associations.
    max_associations_per_device: int = 16
    # A connection must complete its A-ASSOCIATE-RQ (or TLS handshake) this soon, else it is
    # closed (as dcm4che's request timeout does); until then it holds no association slot.
    handshake_timeout: float = 5.0
    # Connections one peer address may hold at once, in handshake or associated; beyond it a
    # new one is closed at once, so one host cannot fill the node. 0: no limit.
    max_connections_per_address: int = 32
    # Connections still in their handshake (no complete A-ASSOCIATE-RQ yet) over the whole
    # node; beyond it a new one is closed at once. 0: no limit.
    max_handshakes: int = 256
    # Processes that serve inbound associations, the node's main one included: one Python
    # process runs its Python code on one core at a time, so on a machine with more cores,
    # associations spread over several receive faster together. 0: one per CPU core (the
    # default: with one process, 64x64 images over four associations came in at 0.73x
    # Orthanc's rate, with one per core ahead of it; bench/ingest.py).
    association_processes: int = 0
    # With one association process per CPU: a process serving two or more associations at
    # once keeps their receiving threads on a CPU of its own (affinity.py).
    cpu_affinity: bool = True
    # Accept storage of a SOP class neither pydicom nor pynetdicom knows (a vendor's private
    # class, one newer than the libraries) when a sender proposes it (sop_classes.py).
    accept_unknown_sop_classes: bool = True

    def processes(self) -> int:
        """How many processes serve associations (association_processes, 0 resolved)."""
        if self.association_processes:
            return self.association_processes
        return max(1, len(os.sched_getaffinity(0)))


@dataclass
class TlsSettings:
    """DICOM TLS (seeds 001, 003): a partition's TLS port, and associations the node opens to
    devices that have a TLS port. Files are PEM; relative paths are relative to this file."""

    cert: str = ""  # the node's certificate (server identity; client identity by default)
    key: str = ""  # its private key
    ca: str = ""  # CA bundle: verifies client certificates and the devices' server certificates
    verify_client: str = "optional"  # "required", "optional" (verified when sent) or "none"
    min_version: str = "1.2"  # "1.2" or "1.3"
    client_cert: str = ""  # certificate for outbound associations; empty: cert
    client_key: str = ""  # empty: key
    verify_server: bool = True  # check a device's certificate against ca and its host name


@dataclass
class QuerySettings:
    """Node defaults for query/retrieve (seed 001); a partition may override each."""

    case_sensitive: bool = False  # off: smith* matches SMITH^JOHN
    empty_matching: bool = False  # on: an empty value matches any non-empty key
    limit: int = 0  # more matches than this: the request ends with status 0xA700; 0: no limit


@dataclass
class ForwardingSettings:
    """The forwarding queue and its senders (defaults; a device may override some)."""

    workers: int = 4  # sender tasks running at once, over all destinations
    poll_seconds: float = 1.0  # how often the queue is checked when idle
    batch_size: int = 50  # jobs one sender task claims at a time
    retry_base_seconds: float = 10.0  # first retry delay; doubles per attempt
    retry_max_seconds: float = 3600.0  # the longest delay between attempts
    max_attempts: int = 20  # then the job is marked failed
    lease_seconds: float = 600.0  # a crashed sender's claimed jobs are taken back after this
    heartbeat: bool = True  # keep associations open between transmissions (seed 001)
    heartbeat_interval: float = 30.0  # C-ECHO on an idle association this often
    heartbeat_idle_seconds: float = 300.0  # release an association idle this long
    remove_private_tags: bool = False  # seed 001 system default, per-device override
    send_updates: bool = True  # forward new instances of studies already forwarded
    # The longest a storage commitment report is awaited before commitment is asked again
    # (a report that never comes is retried, not forgotten).
    commitment_timeout: float = 600.0


@dataclass
class StorageSettings:
    """Disk watermarks, auto-purge and the activity log (seed 004).

    Watermarks are percentages of the filesystem in use (as `df` shows it), checked for every
    filesystem that holds the storage root or a partition's folder.
    """

    high_watermark: float = 90.0  # above: purge studies stored elsewhere ...
    low_watermark: float = 80.0  # ... until usage is back at or below this
    critical_watermark: float = 95.0  # at or above: C-STORE answers 0xA700 (suspended)
    check_interval_seconds: float = 30.0  # how often disk usage is checked (and purge runs)
    auto_purge: bool = True
    purge_order: str = "received"  # "received": oldest received first; "accessed": least
    # recently received or retrieved first
    purge_batch_size: int = 10  # studies deleted per batch, then usage is measured again
    protected_studies: int = 0  # purging stops when a filesystem holds this many studies
    cpu_idle_threshold: float = 0.0  # purge only while the CPU is at least this % idle
    # A study counts as stored elsewhere when every instance reached a device of these types
    # (and was committed there, where the device asks for storage commitment).
    archive_device_types: list[str] = field(
        default_factory=lambda: ["PARENT", "BACKUP_TARGET"])
    activity_log: bool = True  # record DICOM activity in the database
    activity_retention_days: int = 30  # then removed; 0: kept forever


@dataclass
class NotifySettings:
    """E-mail when storage is suspended or resumes (an error is always logged)."""

    email_to: str = ""  # comma-separated addresses; empty: no e-mail
    email_from: str = ""  # empty: pacsnode@<host name>
    smtp_host: str = ""
    smtp_port: int = 25
    smtp_starttls: bool = False
    smtp_user: str = ""
    smtp_password: str = ""
    smtp_timeout: float = 10.0


@dataclass
class HierarchySettings:
    """This node's place in the tree and its gRPC control plane (served by `pacsnode serve`)."""

    enabled: bool = True  # serve the control plane
    node_id: str = ""  # unique in the tree; empty: node.name
    site: str = ""  # the site's human name, shown in the DotCom directory
    # Without TLS certificates the control plane only listens on a loopback address, unless
    # allow_insecure_remote is set.
    control_listen: str = "127.0.0.1:50051"
    advertise_address: str = ""  # how other nodes reach this one; empty: control_listen
    dicom_host: str = ""  # host other nodes use for this node's partitions; empty: advertised
    allow_insecure_remote: bool = False
    parent: str = ""  # the parent's control address host:port; empty: this node is a root
    parent_ae_title: str = ""  # partition of the parent to forward to; empty: its first
    parent_dicom_host: str = ""  # empty: the host the parent advertises
    heartbeat_seconds: float = 10.0  # child -> parent; 3 missed: unreachable
    sync_seconds: float = 2.0  # how often device changes are pushed to neighbours
    rpc_timeout: float = 5.0  # one call to a neighbour
    recollect_timeout: float = 20.0  # recollect / status / refresh-ip over the whole tree
    tls_cert: str = ""  # PEM certificate of this node (server and client identity)
    tls_key: str = ""  # its PEM private key
    tls_ca: str = ""  # PEM CA bundle that signs every node's certificate
    tls_server_name: str = ""  # expected name in peers' certificates; empty: their host


@dataclass
class BootstrapPartition:
    """Created when the database holds no partition at all (first start)."""

    ae_title: str = "PACSNODE"
    port: int = 11112
    tls_port: int = 0  # 0: no TLS port (needs [tls] cert and key)
    folder: str = "PACSNODE"
    description: str = "Default partition"


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


_SECTIONS: dict[str, type] = {
    "node": NodeSettings,
    "dicom": DicomSettings,
    "query": QuerySettings,
    "forwarding": ForwardingSettings,
    "bootstrap_partition": BootstrapPartition,
    "hierarchy": HierarchySettings,
    "storage": StorageSettings,
    "notify": NotifySettings,
    "tls": TlsSettings,
}


def _section(name: str, cls: type, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"[{name}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    default = cls()
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"unknown setting {name}.{key} (known: {', '.join(sorted(fields))})")
        expected = type(getattr(default, key))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ConfigError(
                f"{name}.{key} must be {expected.__name__}, got {type(value).__name__}"
            )
        values[key] = value
    return cls(**values)


def validate(settings: Settings) -> None:
    d = settings.dicom
    if d.max_pdu_size < 4096:
        # 0 would mean "unlimited": a peer could make us buffer arbitrarily large PDUs.
        raise ConfigError("dicom.max_pdu_size must be at least 4096 bytes")
    for key in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout",
                "handshake_timeout"):
        if getattr(d, key) <= 0:
            raise ConfigError(f"dicom.{key} must be positive")
    if d.maximum_associations < 1:
        raise ConfigError("dicom.maximum_associations must be at least 1")
    if not 0 <= d.association_processes <= MAX_ASSOCIATION_PROCESSES:
        raise ConfigError("dicom.association_processes must be 0 (one per CPU core) or 1-"
                          f"{MAX_ASSOCIATION_PROCESSES}")
    for key in ("max_associations_per_device", "max_connections_per_address",
                "max_handshakes"):
        if getattr(d, key) < 0:
            raise ConfigError(f"dicom.{key} must be 0 (no limit) or positive")
    if d.transfer_syntax_preference not in ("requestor", "node"):
        raise ConfigError("dicom.transfer_syntax_preference must be 'requestor' or 'node'")
    if not d.transfer_syntaxes:
        raise ConfigError("dicom.transfer_syntaxes must name at least one transfer syntax")
    known = {str(uid) for uid in AllTransferSyntaxes}
    for i, uid in enumerate(d.transfer_syntaxes):
        if not isinstance(uid, str):
            raise ConfigError(f"dicom.transfer_syntaxes: {uid!r} is not a string")
        resolved = resolve_transfer_syntax(uid)
        if resolved not in known:
            raise ConfigError(f"dicom.transfer_syntaxes: {uid!r} is not a known transfer syntax")
        d.transfer_syntaxes[i] = resolved
    f = settings.forwarding
    if f.workers < 1 or f.batch_size < 1 or f.max_attempts < 1:
        raise ConfigError("forwarding.workers, batch_size and max_attempts must be at least 1")
    for key in ("poll_seconds", "retry_base_seconds", "retry_max_seconds", "lease_seconds",
                "heartbeat_interval", "heartbeat_idle_seconds", "commitment_timeout"):
        if getattr(f, key) <= 0:
            raise ConfigError(f"forwarding.{key} must be positive")
    if settings.query.limit < 0:
        raise ConfigError("query.limit must be 0 (no limit) or positive")
    b = settings.bootstrap_partition
    if not (0 <= b.port < 65536 and 0 <= b.tls_port < 65536) or not (b.port or b.tls_port):
        raise ConfigError("bootstrap_partition.port and tls_port must be between 0 (off) and"
                          " 65535, and at least one of them set")
    if b.port and b.port == b.tls_port:
        raise ConfigError("bootstrap_partition.port and tls_port must differ")
    if b.tls_port and not settings.tls.cert:
        raise ConfigError("bootstrap_partition.tls_port needs [tls] cert and key")
    for key in ("partition_poll_seconds", "database_connect_timeout", "database_timeout"):
        if getattr(settings.node, key) <= 0:
            raise ConfigError(f"node.{key} must be positive")
    settings.node.log_level = _log_level(settings.node.log_level)
    _validate_hierarchy(settings)
    _validate_storage(settings)
    _validate_tls(settings)


def _log_level(value: str) -> str:
    """The level's name as the logging module knows it (any case), else a ConfigError."""
    known = logging.getLevelNamesMapping()
    if value.strip().upper() in known:
        return value.strip().upper()
    levels = sorted({logging.getLevelName(n) for n in known.values() if n}, key=known.get)
    raise ConfigError(f"node.log_level {value!r} is not a log level: use one of"
                      f" {', '.join(levels)}")


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
    if t.verify_client not in ("required", "optional", "none"):
        raise ConfigError("tls.verify_client must be 'required', 'optional' or 'none'")
    if t.verify_client != "none" and t.cert and not t.ca:
        raise ConfigError(f"tls.verify_client = {t.verify_client!r} needs tls.ca (the CA that"
                          " signs client certificates), or set it to 'none'")
    if t.min_version not in ("1.2", "1.3"):
        raise ConfigError("tls.min_version must be '1.2' or '1.3'")


def _validate_storage(settings: Settings) -> None:
    s = settings.storage
    for key in ("low_watermark", "high_watermark", "critical_watermark"):
        if not 0 < getattr(s, key) <= 100:
            raise ConfigError(f"storage.{key} must be a percentage of the disk in use, 0-100")
    if not s.low_watermark <= s.high_watermark <= s.critical_watermark:
        raise ConfigError("storage watermarks must satisfy low_watermark <= high_watermark <= "
                          f"critical_watermark (got {s.low_watermark}, {s.high_watermark}, "
                          f"{s.critical_watermark})")
    if s.check_interval_seconds <= 0:
        raise ConfigError("storage.check_interval_seconds must be positive")
    if s.purge_order not in ("received", "accessed"):
        raise ConfigError("storage.purge_order must be 'received' or 'accessed'")
    if s.purge_batch_size < 1:
        raise ConfigError("storage.purge_batch_size must be at least 1")
    if s.protected_studies < 0 or s.activity_retention_days < 0:
        raise ConfigError("storage.protected_studies and activity_retention_days must not be"
                          " negative")
    if not 0 <= s.cpu_idle_threshold <= 100:
        raise ConfigError("storage.cpu_idle_threshold must be a percentage, 0-100")
    known = {"DICOM", "PARENT", "CHILD", "BACKUP_SOURCE", "BACKUP_TARGET", "MEDIA_CREATOR",
             "VIEWER", "WEB_SERVICE"}
    types = [str(t).upper() for t in s.archive_device_types]
    unknown = [t for t in types if t not in known]
    if unknown or not types:
        raise ConfigError(f"storage.archive_device_types must name device types from "
                          f"{', '.join(sorted(known))} (got {s.archive_device_types!r})")
    s.archive_device_types = types
    n = settings.notify
    if n.email_to and not n.smtp_host:
        raise ConfigError("notify.email_to needs notify.smtp_host")
    if not 0 < n.smtp_port < 65536 or n.smtp_timeout <= 0:
        raise ConfigError("notify.smtp_port must be 1-65535 and smtp_timeout positive")


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
    for key in ("heartbeat_seconds", "sync_seconds", "rpc_timeout", "recollect_timeout"):
        if getattr(h, key) <= 0:
            raise ConfigError(f"hierarchy.{key} must be positive")
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
        if name not in _SECTIONS:
            raise ConfigError(f"unknown section [{name}] (known: {', '.join(sorted(_SECTIONS))})")
        sections[name] = _section(name, _SECTIONS[name], value)
    settings = Settings(**sections, source=file.absolute())
    validate(settings)
    return settings
