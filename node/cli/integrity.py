"""`pacsnode integrity`: the Study Integrity Queue (docs/how-to/coercion.md)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from sqlalchemy import select

from node.cli.common import ConfigOption, JsonOption, database, fail, fields, print_json, table
from node.db.models import IntegrityItem, IntegrityKind, Partition

app = typer.Typer(help="Integrity queue: duplicates that differ, demographics that do not match.",
                  no_args_is_help=True)


def _as_dict(item: IntegrityItem, partition: str) -> dict[str, Any]:
    return {"id": item.id, "partition": partition, "kind": item.kind,
            "study_instance_uid": item.study_instance_uid,
            "sop_instance_uid": item.sop_instance_uid, "calling_ae": item.calling_ae_title,
            "created_at": item.created_at, "differences": json.loads(item.details)}


@app.command("list")
def list_(
    partition: Annotated[str | None, typer.Option(help="Only this partition (AE title).")] = None,
    kind: Annotated[str | None, typer.Option(
        help=" | ".join(IntegrityKind))] = None,
    limit: Annotated[int, typer.Option(help="Newest N items.")] = 100,
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """List integrity-queue items, newest first."""
    with database(config) as (_settings, db), db.session() as session:
        query = (select(IntegrityItem, Partition.ae_title)
                 .join(Partition, Partition.id == IntegrityItem.partition_id)
                 .order_by(IntegrityItem.id.desc()).limit(limit))
        if partition:
            query = query.where(Partition.ae_title == partition)
        if kind:
            query = query.where(IntegrityItem.kind == kind)
        rows = [_as_dict(item, ae) for item, ae in session.execute(query)]
    if as_json:
        print_json(rows)
        return
    table("Integrity queue", ["id", "partition", "kind", "study", "SOP instance", "from",
                              "received", "differs in"],
          [[r["id"], r["partition"], r["kind"], r["study_instance_uid"], r["sop_instance_uid"],
            r["calling_ae"], r["created_at"],
            ", ".join(d["keyword"] for d in r["differences"])] for r in rows])


@app.command()
def show(item_id: Annotated[int, typer.Argument(help="The item's id.")],
         as_json: JsonOption = False, config: ConfigOption = None) -> None:
    """Show one item with every difference (stored value against received value)."""
    with database(config) as (_settings, db), db.session() as session:
        row = session.execute(
            select(IntegrityItem, Partition.ae_title)
            .join(Partition, Partition.id == IntegrityItem.partition_id)
            .where(IntegrityItem.id == item_id)).first()
        if row is None:
            fail(f"no integrity item {item_id}")
        data = _as_dict(*row)
    if as_json:
        print_json(data)
        return
    differences = data.pop("differences")
    fields(data)
    table("Differences", ["attribute", "stored", "received"],
          [[d["keyword"], d["stored"], d["received"]] for d in differences])
