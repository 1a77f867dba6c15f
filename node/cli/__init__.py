"""The `pacsnode` command: serve a node and administer it."""

from __future__ import annotations

import typer

from node.cli import category, db, device, integrity, partition, queue, serve

app = typer.Typer(
    name="pacsnode",
    help="A hierarchical PACS node: DICOM archive, partitions, devices and their administration.",
    no_args_is_help=True,
    add_completion=False,
)
app.command("serve")(serve.serve)
app.add_typer(db.app, name="db")
app.add_typer(partition.app, name="partition")
app.add_typer(device.app, name="device")
app.add_typer(integrity.app, name="integrity")
app.add_typer(queue.app, name="queue")
app.add_typer(category.app, name="category")
app.command("refresh-ip")(device.refresh_ip)


def main() -> None:
    app()
