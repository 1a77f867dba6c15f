"""`pacsnode category`: devices that share a connection limit."""

from __future__ import annotations

from typing import Annotated

import typer

from node import categories
from node.cli.common import ConfigOption, JsonOption, change, database, print_json, table

app = typer.Typer(help="Device categories: members share a connection limit.",
                  no_args_is_help=True)
NameArg = Annotated[str, typer.Argument(help="The category's name.")]
MaxConnections = Annotated[int, typer.Option(
    "--max-connections", help="Associations all members together may have open.")]


@app.command()
def add(name: NameArg, max_connections: MaxConnections = 1,
        config: ConfigOption = None) -> None:
    """Add a category; put devices in it with `device edit NAME --category`."""
    change(config, lambda s: categories.add(s, name, max_connections),
           f"added category {name} (max {max_connections} connections)")


@app.command()
def edit(name: NameArg, max_connections: MaxConnections = 1,
         config: ConfigOption = None) -> None:
    """Change a category's connection limit."""
    change(config, lambda s: categories.edit(s, name, max_connections),
           f"category {name}: max {max_connections} connections")


@app.command()
def delete(name: NameArg, config: ConfigOption = None) -> None:
    """Delete a category (its devices keep their own limits)."""
    change(config, lambda s: categories.delete(s, name), f"deleted category {name}")


@app.command("list")
def list_(as_json: JsonOption = False, config: ConfigOption = None) -> None:
    """List categories with their limit and number of devices."""
    with database(config) as (_settings, db), db.session() as session:
        rows = [(c.name, c.max_connections, n) for c, n in categories.listing(session)]
    if as_json:
        print_json([{"name": n, "max_connections": m, "devices": d} for n, m, d in rows])
        return
    table("Categories", ["name", "max connections", "devices"], [list(r) for r in rows])
