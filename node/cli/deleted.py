"""`pacsnode deleted`: studies kept after an administrator deleted them (docs/how-to/storage.md)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from pydicom.errors import InvalidDicomError
from sqlalchemy import select

from node import activity
from node.cli.common import ConfigOption, JsonOption, database, fail, print_json, table
from node.db.models import DeletedStudy, Partition
from node.storage import deletion

app = typer.Typer(help="Deleted studies of partitions that track deletes: list, restore, remove.",
                  no_args_is_help=True)

IdArgument = Annotated[int, typer.Argument(help="The deleted study's id (from `deleted list`).")]


def _as_dict(record: DeletedStudy, partition: str) -> dict[str, Any]:
    return {"id": record.id, "partition": partition,
            "study_instance_uid": record.study_instance_uid, "patient_id": record.patient_id,
            "patient_name": record.patient_name, "study_date": record.study_date,
            "accession_number": record.accession_number,
            "modalities": record.modalities.strip("\\").replace("\\", ","),
            "instances": record.num_instances, "size": record.size,
            "deleted_at": record.deleted_at, "reason": record.reason, "folder": record.folder}


@app.command("list")
def list_(
    partition: Annotated[str | None, typer.Option(help="Only this partition (AE title).")] = None,
    limit: Annotated[int, typer.Option(help="Most recently deleted N.")] = 100,
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """List deleted studies, most recently deleted first."""
    with database(config) as (_settings, db), db.session() as session:
        query = (select(DeletedStudy, Partition.ae_title)
                 .join(Partition, Partition.id == DeletedStudy.partition_id)
                 .order_by(DeletedStudy.id.desc()).limit(limit))
        if partition:
            query = query.where(Partition.ae_title == partition)
        rows = [_as_dict(record, ae) for record, ae in session.execute(query)]
    if as_json:
        print_json(rows)
        return
    table("Deleted studies", ["id", "partition", "study", "patient ID", "patient", "date",
                              "instances", "size", "deleted", "reason"],
          [[r["id"], r["partition"], r["study_instance_uid"], r["patient_id"],
            r["patient_name"], r["study_date"], r["instances"], r["size"], r["deleted_at"],
            r["reason"]] for r in rows])


@app.command()
def restore(deleted_id: IdArgument, config: ConfigOption = None) -> None:
    """Put a deleted study back into its partition (it is not forwarded again)."""
    with database(config) as (settings, db):
        try:
            uid, restored, skipped = deletion.restore(db, settings.storage_dir, deleted_id)
        except deletion.DeletionError as exc:
            fail(str(exc))
        except (OSError, InvalidDicomError, ValueError) as exc:
            fail(f"cannot restore deleted study {deleted_id}: {exc}")
        with db.transaction() as session:
            activity.write(session, [activity.Event(
                kind="restore", study_instance_uid=uid, count=restored,
                detail=f"deleted study {deleted_id}; {skipped} already held")])
    again = f" ({skipped} were held again already)" if skipped else ""
    typer.echo(f"restored study {uid}: {restored} instances{again}")


@app.command()
def remove(
    deleted_id: IdArgument,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    config: ConfigOption = None,
) -> None:
    """Remove a deleted study for good (its files are erased)."""
    if not yes:
        typer.confirm(f"Erase deleted study {deleted_id} for good?", abort=True)
    with database(config) as (settings, db):
        try:
            record = deletion.discard(db, settings.storage_dir, deleted_id)
        except deletion.DeletionError as exc:
            fail(str(exc))
    typer.echo(f"removed deleted study {record.study_instance_uid} ({record.num_instances} "
               f"instances, {record.size} bytes) for good")
