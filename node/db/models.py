"""The index: partitions, devices, the patient/study/series/instance hierarchy, integrity queue.

The schema is created and changed only by the alembic migrations in alembic/; a test compares
these models with the migrated database on SQLite and PostgreSQL.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class DuplicatePolicy(enum.StrEnum):
    """What a partition does with a SOP instance it already holds (docs/how-to/partitions.md)."""

    SEND_SUCCESS = "send-success"  # answer success, keep the stored copy, drop the new one
    REJECT = "reject"  # answer a failure status
    COMPARE = "compare"  # answer success, record differences in the integrity queue


class DeviceType(enum.StrEnum):
    DICOM = "DICOM"
    PARENT = "PARENT"
    CHILD = "CHILD"
    BACKUP_SOURCE = "BACKUP_SOURCE"
    BACKUP_TARGET = "BACKUP_TARGET"
    MEDIA_CREATOR = "MEDIA_CREATOR"
    VIEWER = "VIEWER"
    WEB_SERVICE = "WEB_SERVICE"
    SELF = "SELF"  # the node itself: its coercion rules apply to `pacsnode import`


class IntegrityKind(enum.StrEnum):
    DUPLICATE_DIFFERS = "duplicate-differs"
    DEMOGRAPHICS_MISMATCH = "demographics-mismatch"
    # A new study of a known patient (same Patient ID and issuer) whose demographics differ
    # from the patient's.
    PATIENT_MISMATCH = "patient-mismatch"


class Partition(Base):
    __tablename__ = "partitions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ae_title: Mapped[str] = mapped_column(String(16), unique=True)
    port: Mapped[int] = mapped_column(Integer, index=True)  # 0: no plain TCP port
    # DICOM TLS port (docs/how-to/tls.md); 0: none. A port number is either TCP or TLS.
    tls_port: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Inbound associations to this partition at once; 0: only the node's limit applies.
    max_associations: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    description: Mapped[str] = mapped_column(String(256), default="")
    folder: Mapped[str] = mapped_column(String(64), unique=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    duplicate_policy: Mapped[str] = mapped_column(String(16), default=DuplicatePolicy.SEND_SUCCESS)
    accept_any_device: Mapped[bool] = mapped_column(Boolean, default=True)
    auto_insert_devices: Mapped[bool] = mapped_column(Boolean, default=False)
    default_remote_port: Mapped[int] = mapped_column(Integer, default=104)
    match_patient_name: Mapped[bool] = mapped_column(Boolean, default=True)
    match_patient_id: Mapped[bool] = mapped_column(Boolean, default=True)
    match_patient_sex: Mapped[bool] = mapped_column(Boolean, default=True)
    match_patient_birth_date: Mapped[bool] = mapped_column(Boolean, default=True)
    match_accession_number: Mapped[bool] = mapped_column(Boolean, default=True)
    match_issuer_of_patient_id: Mapped[bool] = mapped_column(Boolean, default=True)
    track_deleted_studies: Mapped[bool] = mapped_column(Boolean, default=False)
    # Query/retrieve (docs/reference/query-retrieve.md); NULL: the node default from the
    # settings file.
    case_sensitive_matching: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    empty_matching: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    query_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Off: nothing stored on this partition is queued for forwarding.
    forwarding_enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Category(Base):
    """Devices of one category share a connection limit (docs/how-to/devices.md)."""

    __tablename__ = "categories"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    max_connections: Mapped[int] = mapped_column(Integer, default=1)


class Device(Base):
    __tablename__ = "devices"
    __table_args__ = (UniqueConstraint("partition_id", "ae_title"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    ae_title: Mapped[str] = mapped_column(String(16), index=True)
    host: Mapped[str] = mapped_column(String(255), default="")
    ip: Mapped[str] = mapped_column(String(64), default="")
    port: Mapped[int] = mapped_column(Integer, default=104)
    tls_port: Mapped[int] = mapped_column(Integer, default=0)
    device_type: Mapped[str] = mapped_column(String(16), default=DeviceType.DICOM)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    # NULL: the device may talk to every partition of the node.
    partition_id: Mapped[int | None] = mapped_column(
        ForeignKey("partitions.id", ondelete="CASCADE"), nullable=True
    )
    description: Mapped[str] = mapped_column(String(256), default="")
    coercion_rules: Mapped[str] = mapped_column(Text, default="")
    allow_storage: Mapped[bool] = mapped_column(Boolean, default=True)
    allow_query: Mapped[bool] = mapped_column(Boolean, default=True)
    allow_retrieve: Mapped[bool] = mapped_column(Boolean, default=True)
    auto_inserted: Mapped[bool] = mapped_column(Boolean, default=False)
    # Outbound associations to the device (retrieve sub-operations, forwarding); 0 or '':
    # the node's [dicom] setting.
    max_pdu_size: Mapped[int] = mapped_column(Integer, default=0)
    acse_timeout: Mapped[float] = mapped_column(Float, default=0.0)
    dimse_timeout: Mapped[float] = mapped_column(Float, default=0.0)
    network_timeout: Mapped[float] = mapped_column(Float, default=0.0)
    # Transfer syntaxes to propose besides each instance's own, comma separated.
    transfer_syntaxes: Mapped[str] = mapped_column(String(1024), default="")
    # Forwarding: PARENT and BACKUP_TARGET devices receive what their partition stores (all of
    # it, or what forward_rules select); VIEWER devices only what their rules select.
    forward: Mapped[bool] = mapped_column(Boolean, default=True)
    forward_rules: Mapped[str] = mapped_column(Text, default="")
    # Sender tasks (associations) at once: one could not keep up with a fast modality's CT
    # burst into the node (bench/forward.py), two do.
    max_outbound_tasks: Mapped[int] = mapped_column(Integer, default=2)
    # Associations the device may hold open to this node at once (docs/how-to/limits.md);
    # 0: the node's [dicom] max_associations_per_device.
    max_inbound_associations: Mapped[int] = mapped_column(Integer, default=0,
                                                          server_default="0")
    category_id: Mapped[int | None] = mapped_column(
        ForeignKey("categories.id", ondelete="SET NULL"), nullable=True)
    # NULL: the node's [forwarding] default.
    heartbeat: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    remove_private_tags: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    send_updates: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    # Ask the device for storage commitment after forwarding to it (push model).
    storage_commitment: Mapped[bool] = mapped_column(Boolean, default=False)
    # "local": this node only; "hierarchy": replicated to every node of the tree, from the
    # node where it was created (origin_node).
    scope: Mapped[str] = mapped_column(String(16), default="local")
    origin_node: Mapped[str] = mapped_column(String(64), default="")
    # The node id of the parent or child this PARENT/CHILD entry was created for by
    # registration; '' for devices an administrator added.
    neighbour_id: Mapped[str] = mapped_column(String(64), default="", index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    partition: Mapped[Partition | None] = relationship()
    category: Mapped[Category | None] = relationship()


# Index text that is not a UID or a person name is kept whole up to this many characters (no
# conformant value comes near it); a person name up to PN_WIDTH.
TEXT_WIDTH = 256
PN_WIDTH = 324
# A column `<name>_key` holds the value of column `<name>` as case-insensitive matching compares
# it (dicomtext.fold): the index computes it when it inserts the row.
KEY_SUFFIX = "_key"


def _pattern_ops(column: str) -> dict[str, str]:
    """PostgreSQL: an index on a key column serves LIKE 'ABC%' as well as equality."""
    return {column: "text_pattern_ops"}


class Patient(Base):
    """A patient: a Patient ID and its issuer, within a partition. A study without a Patient
    ID has a patient of its own: such studies are never merged with each other."""

    __tablename__ = "patients"
    __table_args__ = (
        Index("ix_patients_identity", "partition_id", "patient_id", "issuer_of_patient_id",
              unique=True, sqlite_where=text("patient_id <> ''"),
              postgresql_where=text("patient_id <> ''")),
        Index("ix_patients_patient_id", "patient_id"),
        # Led by the partition, which every query filters on: without statistics SQLite
        # prefers the partition's equality to a range on a single-column index.
        Index("ix_patients_partition_id_patient_id_key", "partition_id", "patient_id_key",
              postgresql_ops=_pattern_ops("patient_id_key")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    partition_id: Mapped[int] = mapped_column(ForeignKey("partitions.id", ondelete="CASCADE"))
    patient_id: Mapped[str] = mapped_column(String(TEXT_WIDTH), default="")
    patient_id_key: Mapped[str] = mapped_column(String(TEXT_WIDTH), default="")
    issuer_of_patient_id: Mapped[str] = mapped_column(String(TEXT_WIDTH), default="")
    issuer_of_patient_id_key: Mapped[str] = mapped_column(String(TEXT_WIDTH), default="")
    # The demographics the patient's first study was received with (each study keeps its own:
    # Study.patient_name etc.).
    patient_name: Mapped[str] = mapped_column(String(PN_WIDTH), default="")
    patient_birth_date: Mapped[str] = mapped_column(String(TEXT_WIDTH), default="")
    patient_sex: Mapped[str] = mapped_column(String(TEXT_WIDTH), default="")
    patient_sex_key: Mapped[str] = mapped_column(String(TEXT_WIDTH), default="")


class Study(Base):
    __tablename__ = "studies"
    __table_args__ = (
        UniqueConstraint("partition_id", "study_instance_uid"),
        Index("ix_studies_partition_id_study_date", "partition_id", "study_date"),
        Index("ix_studies_partition_id_accession_number_key", "partition_id",
              "accession_number_key", postgresql_ops=_pattern_ops("accession_number_key")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    partition_id: Mapped[int] = mapped_column(ForeignKey("partitions.id", ondelete="CASCADE"))
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patients.id", ondelete="CASCADE"),
                                            index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    study_date: Mapped[str] = mapped_column(String(TEXT_WIDTH), default="")
    study_time: Mapped[str] = mapped_column(String(TEXT_WIDTH), default="")
    accession_number: Mapped[str] = mapped_column(String(TEXT_WIDTH), default="", index=True)
    accession_number_key: Mapped[str] = mapped_column(String(TEXT_WIDTH), default="")
    study_id: Mapped[str] = mapped_column(String(TEXT_WIDTH), default="")
    study_id_key: Mapped[str] = mapped_column(String(TEXT_WIDTH), default="")
    study_description: Mapped[str] = mapped_column(String(TEXT_WIDTH), default="")
    study_description_key: Mapped[str] = mapped_column(String(TEXT_WIDTH), default="")
    referring_physician_name: Mapped[str] = mapped_column(String(PN_WIDTH), default="")
    # Demographics as the first instance of the study carried them: the study answers queries
    # with them, and study matching compares every later instance against them
    # (docs/how-to/coercion.md).
    patient_name: Mapped[str] = mapped_column(String(PN_WIDTH), default="")
    patient_id: Mapped[str] = mapped_column(String(TEXT_WIDTH), default="")
    issuer_of_patient_id: Mapped[str] = mapped_column(String(TEXT_WIDTH), default="")
    patient_birth_date: Mapped[str] = mapped_column(String(TEXT_WIDTH), default="")
    patient_sex: Mapped[str] = mapped_column(String(TEXT_WIDTH), default="")
    patient_sex_key: Mapped[str] = mapped_column(String(TEXT_WIDTH), default="")
    # Kept up to date at ingest, so C-FIND answers them without counting.
    num_series: Mapped[int] = mapped_column(Integer, default=0)
    num_instances: Mapped[int] = mapped_column(Integer, default=0)
    modalities: Mapped[str] = mapped_column(String(256), default="")  # delimited: \CT\SR\
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow,
                                                  index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Last time the study was received into or retrieved from (C-MOVE/C-GET): the purge order
    # "accessed" deletes the least recently accessed first.
    accessed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow,
                                                  index=True)


class Series(Base):
    __tablename__ = "series"
    __table_args__ = (UniqueConstraint("study_pk", "series_instance_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    modality: Mapped[str] = mapped_column(String(TEXT_WIDTH), default="")
    modality_key: Mapped[str] = mapped_column(String(TEXT_WIDTH), default="")
    series_number: Mapped[str] = mapped_column(String(TEXT_WIDTH), default="")
    series_description: Mapped[str] = mapped_column(String(TEXT_WIDTH), default="")
    series_description_key: Mapped[str] = mapped_column(String(TEXT_WIDTH), default="")
    body_part_examined: Mapped[str] = mapped_column(String(TEXT_WIDTH), default="")
    body_part_examined_key: Mapped[str] = mapped_column(String(TEXT_WIDTH), default="")
    series_date: Mapped[str] = mapped_column(String(TEXT_WIDTH), default="")
    series_time: Mapped[str] = mapped_column(String(TEXT_WIDTH), default="")
    num_instances: Mapped[int] = mapped_column(Integer, default=0)


class PersonName(Base):
    """One component group of a study's person name (Patient's Name, Referring Physician's
    Name): the five components as received and as case-insensitive matching compares them.

    A name has up to three groups (alphabetic, ideographic, phonetic); a query's value is
    matched against each, so `山田^太郎` finds `Yamada^Tarou=山田^太郎=やまだ^たろう`.
    """

    __tablename__ = "person_names"
    __table_args__ = (
        Index("ix_person_names_family_key", "partition_id", "keyword", "family_key",
              postgresql_ops=_pattern_ops("family_key")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"),
                                          index=True)
    # The study's, so a query reads the names of its partition only.
    partition_id: Mapped[int] = mapped_column(Integer)
    keyword: Mapped[str] = mapped_column(String(32))  # PatientName | ReferringPhysicianName
    group_index: Mapped[int] = mapped_column(Integer)  # 0 alphabetic, 1 ideographic, 2 phonetic
    family: Mapped[str] = mapped_column(String(PN_WIDTH), default="")
    family_key: Mapped[str] = mapped_column(String(PN_WIDTH), default="")
    given: Mapped[str] = mapped_column(String(PN_WIDTH), default="")
    given_key: Mapped[str] = mapped_column(String(PN_WIDTH), default="")
    middle: Mapped[str] = mapped_column(String(PN_WIDTH), default="")
    middle_key: Mapped[str] = mapped_column(String(PN_WIDTH), default="")
    prefix: Mapped[str] = mapped_column(String(PN_WIDTH), default="")
    prefix_key: Mapped[str] = mapped_column(String(PN_WIDTH), default="")
    suffix: Mapped[str] = mapped_column(String(PN_WIDTH), default="")
    suffix_key: Mapped[str] = mapped_column(String(PN_WIDTH), default="")


class Instance(Base):
    __tablename__ = "instances"
    __table_args__ = (UniqueConstraint("partition_id", "sop_instance_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    partition_id: Mapped[int] = mapped_column(ForeignKey("partitions.id", ondelete="CASCADE"))
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"),
                                           index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64), default="")
    instance_number: Mapped[str] = mapped_column(String(12), default="")
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64), default="")
    # Relative to the storage root: <folder>/<study>/<series>/<sop>.dcm
    path: Mapped[str] = mapped_column(String(512))
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    calling_ae_title: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class JobState(enum.StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ForwardJob(Base):
    """One instance to one destination: the durable forwarding queue."""

    __tablename__ = "forward_jobs"
    __table_args__ = (
        UniqueConstraint("instance_pk", "device_id"),
        Index("ix_forward_jobs_state_next_attempt_at", "state", "next_attempt_at"),
        Index("ix_forward_jobs_device_id_study_instance_uid", "device_id", "study_instance_uid"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    partition_id: Mapped[int] = mapped_column(ForeignKey("partitions.id", ondelete="CASCADE"))
    instance_pk: Mapped[int] = mapped_column(ForeignKey("instances.id", ondelete="CASCADE"))
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=JobState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_error: Mapped[str] = mapped_column(Text, default="")
    # Which node process is sending it, and since when (a lease: a crashed sender's jobs are
    # taken back after forwarding.lease_seconds).
    claimed_by: Mapped[str] = mapped_column(String(64), default="")
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    done_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Storage commitment at the destination: "" (not asked), requesting, requested (waiting
    # for the report), committed, failed, unsupported.
    commitment: Mapped[str] = mapped_column(String(16), default="")
    commitment_uid: Mapped[str] = mapped_column(String(64), default="", index=True)
    committed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True),
                                                          nullable=True)
    # A delivered job the device must still commit: when to ask (again), and how often it was
    # asked since the last reset (its backoff). None once committed, or when nothing is owed.
    commitment_attempts: Mapped[int] = mapped_column(Integer, default=0)
    commitment_due_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True),
                                                               nullable=True, index=True)


class IntegrityItem(Base):
    """A record that needs a person: the study integrity queue (docs/how-to/coercion.md)."""

    __tablename__ = "integrity_items"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    partition_id: Mapped[int] = mapped_column(
        ForeignKey("partitions.id", ondelete="CASCADE"), index=True
    )
    kind: Mapped[str] = mapped_column(String(32))
    study_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    sop_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    calling_ae_title: Mapped[str] = mapped_column(String(16), default="")
    # JSON: a list of {"tag", "keyword", "stored", "received"} differences.
    details: Mapped[str] = mapped_column(Text, default="[]")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class NodeMeta(Base):
    """Small named values of this node: its id, the change-log sequence counter."""

    __tablename__ = "node_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text, default="")


class ReplicatedDevice(Base):
    """The newest version this node holds of each hierarchy-wide device record (tombstones too)."""

    __tablename__ = "replicated_devices"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    origin_node: Mapped[str] = mapped_column(String(64))
    # Hybrid logical clock "<wall ms:013>.<counter:06>.<node id>": text order is time order.
    version: Mapped[str] = mapped_column(String(96), index=True)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    payload: Mapped[str] = mapped_column(Text, default="")  # JSON settings; '' for a tombstone
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class DeviceChange(Base):
    """Every record version this node applied, in order: what it pushes to its neighbours."""

    __tablename__ = "device_changes"

    # Assigned from the node_meta counter under a row lock, so sequence order is commit order
    # and a neighbour's cursor never skips a change that committed late.
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(64))
    origin_node: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(96))
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    payload: Mapped[str] = mapped_column(Text, default="")
    # The neighbour it came from ('' for a local edit): not pushed back to it.
    received_from: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Neighbour(Base):
    """This node's parent and registered children, their liveness and sync cursor."""

    __tablename__ = "neighbours"

    node_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    role: Mapped[str] = mapped_column(String(8))  # parent | child
    control_address: Mapped[str] = mapped_column(String(255), default="")
    site: Mapped[str] = mapped_column(String(256), default="")
    info: Mapped[str] = mapped_column(Text, default="{}")  # its NodeInfo, as JSON
    heartbeat_seconds: Mapped[float] = mapped_column(Float, default=10.0)
    # The highest local change-log seq delivered to it.
    cursor: Mapped[int] = mapped_column(BigInteger, default=0)
    last_seen: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    reachable: Mapped[bool] = mapped_column(Boolean, default=True)
    last_error: Mapped[str] = mapped_column(Text, default="")
    queue_depth: Mapped[int] = mapped_column(BigInteger, default=0)
    registered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class DirectoryNode(Base):
    """One node of the DotCom directory, as the last recollect found it."""

    __tablename__ = "directory_nodes"

    node_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    parent_id: Mapped[str] = mapped_column(String(64), default="")
    site: Mapped[str] = mapped_column(String(256), default="")
    control_address: Mapped[str] = mapped_column(String(255), default="")
    dicom_host: Mapped[str] = mapped_column(String(255), default="")
    role: Mapped[str] = mapped_column(String(16), default="")
    version: Mapped[str] = mapped_column(String(32), default="")
    reachable: Mapped[bool] = mapped_column(Boolean, default=True)
    error: Mapped[str] = mapped_column(Text, default="")
    last_seen: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    collected_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    root_id: Mapped[str] = mapped_column(String(64), default="")


class DirectoryPartition(Base):
    """A partition of a directory node: how an AE title at another site is reached."""

    __tablename__ = "directory_partitions"
    __table_args__ = (UniqueConstraint("node_id", "ae_title"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    node_id: Mapped[str] = mapped_column(
        ForeignKey("directory_nodes.node_id", ondelete="CASCADE"))
    ae_title: Mapped[str] = mapped_column(String(16), index=True)
    port: Mapped[int] = mapped_column(Integer)
    tls_port: Mapped[int] = mapped_column(Integer, default=0)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)


class DeletedStudy(Base):
    """A study deleted by an administrator while its partition tracks deletes.

    See docs/how-to/storage.md.

    Its files were moved, not removed, to `folder` (relative to the storage root), from where
    it can be restored.
    """

    __tablename__ = "deleted_studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    partition_id: Mapped[int] = mapped_column(
        ForeignKey("partitions.id", ondelete="CASCADE"), index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    patient_id: Mapped[str] = mapped_column(String(TEXT_WIDTH), default="")
    patient_name: Mapped[str] = mapped_column(String(PN_WIDTH), default="")
    study_date: Mapped[str] = mapped_column(String(TEXT_WIDTH), default="")
    accession_number: Mapped[str] = mapped_column(String(TEXT_WIDTH), default="")
    study_description: Mapped[str] = mapped_column(String(TEXT_WIDTH), default="")
    modalities: Mapped[str] = mapped_column(String(256), default="")
    num_instances: Mapped[int] = mapped_column(Integer, default=0)
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    folder: Mapped[str] = mapped_column(String(512))
    reason: Mapped[str] = mapped_column(Text, default="")
    deleted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Activity(Base):
    """The DICOM activity log: associations, stores, queries, retrieves, forwards.

    See docs/how-to/activity-log.md.

    Written in batches off the hot path and removed after storage.activity_retention_days.
    """

    __tablename__ = "activity"
    __table_args__ = (Index("ix_activity_kind_at", "kind", "at"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    # association | reject | echo | store | find | move | get | commitment | forward | purge
    # | delete | restore
    kind: Mapped[str] = mapped_column(String(16))
    partition: Mapped[str] = mapped_column(String(16), default="")  # the partition's AE title
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    called_ae: Mapped[str] = mapped_column(String(16), default="")
    peer: Mapped[str] = mapped_column(String(128), default="")  # address or device name
    study_instance_uid: Mapped[str] = mapped_column(String(64), default="", index=True)
    count: Mapped[int] = mapped_column(Integer, default=0)  # instances, matches, sub-ops
    failed: Mapped[int] = mapped_column(Integer, default=0)
    outcome: Mapped[str] = mapped_column(String(16), default="ok")  # ok | warning | failed
    detail: Mapped[str] = mapped_column(Text, default="")
