"""Partition administration: validation and table changes behind `pacsnode partition`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from node.db.models import DeletedStudy, Device, DuplicatePolicy, Partition, Study
from node.storage.paths import is_valid_folder_name


class AdminError(ValueError):
    """A change the administrator asked for that cannot be made; the message says why."""


EDITABLE = (
    "ae_title", "port", "tls_port", "max_associations", "description", "folder", "enabled",
    "duplicate_policy",
    "accept_any_device", "auto_insert_devices", "default_remote_port", "match_patient_name",
    "match_patient_id", "match_patient_sex", "match_patient_birth_date",
    "match_accession_number", "match_issuer_of_patient_id", "track_deleted_studies",
    "case_sensitive_matching", "empty_matching", "query_limit", "forwarding_enabled",
)


def check_ae_title(value: str, what: str = "AE title") -> str:
    """PS3.5: at most 16 characters of the default repertoire, no backslash or control chars."""
    title = value.strip()
    if not title:
        raise AdminError(f"{what} must not be empty")
    if len(title) > 16:
        raise AdminError(f"{what} {value!r} is longer than 16 characters")
    if any(ch == "\\" or ord(ch) < 32 or ord(ch) > 126 for ch in title):
        raise AdminError(f"{what} {value!r} may hold only printable ASCII without backslash")
    return title


def check_port(value: int, what: str = "port", *, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        raise AdminError(f"{what} {value} must be between {low} and 65535")
    return value


def _validate(session: Session, values: dict[str, Any], current: Partition | None) -> None:
    if "ae_title" in values:
        values["ae_title"] = check_ae_title(values["ae_title"])
        clash = session.scalar(select(Partition).where(Partition.ae_title == values["ae_title"]))
        if clash is not None and clash is not current:
            raise AdminError(f"AE title {values['ae_title']} is already used by another partition")
    if "folder" in values:
        if not is_valid_folder_name(values["folder"]):
            raise AdminError(f"folder name {values['folder']!r} must be one path component of "
                             "letters, digits, '.', '_' or '-'")
        clash = session.scalar(select(Partition).where(Partition.folder == values["folder"]))
        if clash is not None and clash is not current:
            raise AdminError(f"folder {values['folder']} is already used by another partition")
    for key, what in (("port", "port"), ("tls_port", "TLS port")):
        if key in values:
            check_port(values[key], what, allow_zero=True)
    _check_ports(session, values, current)
    if values.get("max_associations") is not None and values["max_associations"] < 0:
        raise AdminError("max associations must be 0 (only the node's limit) or positive")
    if values.get("query_limit") is not None and values["query_limit"] < 0:
        raise AdminError("query limit must be 0 (no limit) or positive")
    if "default_remote_port" in values:
        check_port(values["default_remote_port"], "default remote port")
    if "duplicate_policy" in values:
        try:
            values["duplicate_policy"] = DuplicatePolicy(values["duplicate_policy"]).value
        except ValueError:
            known = ", ".join(p.value for p in DuplicatePolicy)
            raise AdminError(f"duplicate policy {values['duplicate_policy']!r} is not one of "
                             f"{known}") from None
    unknown = set(values) - set(EDITABLE)
    if unknown:
        raise AdminError(f"unknown partition setting(s): {', '.join(sorted(unknown))}")


def _check_ports(session: Session, values: dict[str, Any], current: Partition | None) -> None:
    """At least one port; a port number serves plain DICOM or TLS, never both (the listener
    on it cannot tell which a connection wants before reading from it)."""
    port = values.get("port", current.port if current is not None else 0)
    tls_port = values.get("tls_port", current.tls_port if current is not None else 0)
    if not port and not tls_port:
        raise AdminError("a partition needs a TCP port or a TLS port (both are 0)")
    if port and port == tls_port:
        raise AdminError(f"port {port} cannot be both the TCP and the TLS port")
    others = session.execute(select(Partition.ae_title, Partition.port, Partition.tls_port)
                             .where(Partition.id != (current.id if current else -1))).all()
    for ae_title, other_port, other_tls in others:
        if port and port == other_tls:
            raise AdminError(f"port {port} is the TLS port of partition {ae_title}")
        if tls_port and tls_port == other_port:
            raise AdminError(f"TLS port {tls_port} is the TCP port of partition {ae_title}")


def get(session: Session, ae_title: str, /) -> Partition:
    partition = session.scalar(select(Partition).where(Partition.ae_title == ae_title.strip()))
    if partition is None:
        raise AdminError(f"no partition with AE title {ae_title!r}")
    return partition


def add(session: Session, **values: Any) -> Partition:
    values.setdefault("folder", values.get("ae_title", ""))
    _validate(session, values, None)
    partition = Partition(**values)
    session.add(partition)
    session.flush()
    return partition


def edit(session: Session, current_ae_title: str, /, **values: Any) -> Partition:
    partition = get(session, current_ae_title)
    _validate(session, values, partition)
    for key, value in values.items():
        setattr(partition, key, value)
    session.flush()
    return partition


def delete(session: Session, ae_title: str) -> None:
    """Seed 000: a partition can be deleted only when it holds no study."""
    partition = get(session, ae_title)
    studies = study_counts(session).get(partition.id, 0)
    if studies:
        raise AdminError(f"partition {partition.ae_title} holds {studies} "
                         f"stud{'y' if studies == 1 else 'ies'}; delete them first")
    kept = session.scalar(select(func.count()).select_from(DeletedStudy)
                          .where(DeletedStudy.partition_id == partition.id)) or 0
    if kept:
        raise AdminError(f"partition {partition.ae_title} keeps {kept} deleted "
                         f"stud{'y' if kept == 1 else 'ies'}; restore them or remove them "
                         "(pacsnode deleted remove) first")
    for device in session.scalars(select(Device).where(Device.partition_id == partition.id)):
        session.delete(device)
    session.delete(partition)


def study_counts(session: Session) -> dict[int, int]:
    rows = session.execute(select(Study.partition_id, func.count()).group_by(Study.partition_id))
    return {pid: n for pid, n in rows}


@dataclass(frozen=True)
class PartitionRow:
    partition: Partition
    studies: int


def listing(session: Session) -> list[PartitionRow]:
    counts = study_counts(session)
    partitions = session.scalars(select(Partition).order_by(Partition.port, Partition.ae_title))
    return [PartitionRow(p, counts.get(p.id, 0)) for p in partitions]


def as_dict(p: Partition, studies: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {key: getattr(p, key) for key in EDITABLE}
    if studies is not None:
        out["studies"] = studies
    return out
