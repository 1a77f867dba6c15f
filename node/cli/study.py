"""`pacsnode study`: list the studies a node holds and delete them (docs/how-to/storage.md)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from sqlalchemy import select

from node import activity
from node.cli.common import ConfigOption, JsonOption, database, fail, print_json, table
from node.db.models import Partition, Study
from node.policy.purge import Candidate
from node.storage import deletion, purge

app = typer.Typer(help="Studies held by this node: list, delete.", no_args_is_help=True)

PartitionOption = Annotated[str | None, typer.Option(
    "--partition", "-p", help="The partition (AE title); needed when several hold the study.")]


@app.command("list")
def list_(
    partition: PartitionOption = None,
    patient_id: Annotated[str | None, typer.Option(help="Only this patient ID.")] = None,
    limit: Annotated[int, typer.Option(help="Most recently received N studies.")] = 50,
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """List studies, most recently received first, with size and whether they are stored
    elsewhere (the condition for auto-purge)."""
    with database(config) as (settings, db), db.session() as session:
        query = (select(Study, Partition.ae_title)
                 .join(Partition, Partition.id == Study.partition_id)
                 .order_by(Study.received_at.desc(), Study.id.desc()).limit(limit))
        if partition:
            query = query.where(Partition.ae_title == partition)
        if patient_id:
            query = query.where(Study.patient_id == patient_id)
        found = session.execute(query).all()
        described = {c.study_pk: c for c in purge.describe(
            session, [(s.id, s.study_instance_uid, s.partition_id) for s, _ in found],
            settings.storage.archive_device_types)} if found else {}
        rows = [_as_dict(study, ae, described[study.id]) for study, ae in found]
    if as_json:
        print_json(rows)
        return
    table("Studies", ["partition", "study", "patient ID", "patient", "date", "modalities",
                      "instances", "size", "received", "stored elsewhere"],
          [[r["partition"], r["study_instance_uid"], r["patient_id"], r["patient_name"],
            r["study_date"], r["modalities"], r["instances"], r["size"], r["received_at"],
            "yes" if r["stored_elsewhere"] else "no"] for r in rows])


def _as_dict(study: Study, partition: str, candidate: Candidate) -> dict[str, Any]:
    return {"partition": partition, "study_instance_uid": study.study_instance_uid,
            "patient_id": study.patient_id, "patient_name": study.patient_name,
            "study_date": study.study_date, "accession_number": study.accession_number,
            "modalities": study.modalities.strip("\\").replace("\\", ","),
            "instances": candidate.instances, "size": candidate.size,
            "received_at": study.received_at, "accessed_at": study.accessed_at,
            "stored_elsewhere": candidate.stored_elsewhere}


@app.command()
def delete(
    study_uids: Annotated[list[str], typer.Argument(help="Study Instance UID(s).")],
    partition: PartitionOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    config: ConfigOption = None,
) -> None:
    """Delete studies from a partition. When the partition tracks deleted studies, their files
    move to its deleted folder (`pacsnode deleted list`, `restore`); otherwise they are gone.
    Forward jobs of the study that have not been sent are dropped."""
    with database(config) as (settings, db):
        targets = []
        with db.session() as session:
            for uid in study_uids:
                query = (select(Study.id, Partition.ae_title, Partition.track_deleted_studies)
                         .join(Partition, Partition.id == Study.partition_id)
                         .where(Study.study_instance_uid == uid))
                if partition:
                    query = query.where(Partition.ae_title == partition)
                held = session.execute(query).all()
                if not held:
                    fail(f"study {uid} is not held" + (f" by partition {partition}"
                                                       if partition else ""))
                if len(held) > 1:
                    fail(f"study {uid} is held by partitions "
                         f"{', '.join(ae for _, ae, _ in held)}: choose one with --partition")
                targets.append((uid, *held[0]))
        if not yes:
            names = ", ".join(f"{uid} from {ae}" for uid, _, ae, _ in targets)
            typer.confirm(f"Delete {names}?", abort=True)
        for uid, study_pk, ae, keep in targets:
            removed = deletion.delete_study(db, settings.storage_dir, study_pk, keep=keep,
                                            reason="deleted by an administrator")
            if removed is None:
                typer.echo(f"study {uid} was already gone from {ae}")
                continue
            with db.transaction() as session:
                activity.write(session, [activity.Event(
                    kind="delete", partition=ae, study_instance_uid=uid,
                    count=removed.instances,
                    detail=f"{removed.size} bytes; kept as deleted study {removed.deleted_id}"
                    if keep else f"{removed.size} bytes; not kept")])
            kept = (f", kept as deleted study {removed.deleted_id} (pacsnode deleted restore "
                    f"{removed.deleted_id})" if keep else "")
            typer.echo(f"deleted study {uid} from {ae}: {removed.instances} instances, "
                       f"{removed.size} bytes{kept}")
