"""`pacsnode query`: C-FIND to a device (docs/how-to/query-retrieve-remote.md)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from pydicom.dataset import Dataset

from node.cli.common import ConfigOption, JsonOption, database, fail, print_json, table
from node.cli.device import outbound
from node.scu.find import (
    LEVELS,
    RETURN_KEYS,
    FindCancelled,
    FindError,
    find,
    flatten,
    identifier,
    model_for,
)

# The exit status of a command stopped by Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED = 130


def query(
    device: Annotated[str, typer.Argument(help="The device to query (its name in the device"
                                          " table).")],
    key: Annotated[list[str] | None, typer.Option(
        "--key", "-k", metavar="KEY[=VALUE]",
        help="A matching key, Keyword=Value or gggg,eeee=Value (wildcards * and ?, date ranges"
             " 20240101-20241231); Keyword alone asks for a return key. Repeatable.")
    ] = None,
    level: Annotated[str, typer.Option(
        "--level", metavar="|".join(LEVELS), help="Query/Retrieve Level.")] = "STUDY",
    partition: Annotated[str | None, typer.Option(
        "--partition", metavar="AE",
        help="Query as this partition (its AE title calls; default: the device's partition,"
             " or the first).")] = None,
    model: Annotated[str | None, typer.Option(
        "--model", metavar="study|patient",
        help="Information model (default: study; PATIENT level is patient root).")] = None,
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """Send a C-FIND to a device and print the answers: the keys asked for plus the usual
    ones of the level."""
    level = level.upper()
    try:
        chosen = model_for(level, model.lower() if model else None)
        ask = identifier(level, key or [])
    except FindError as exc:
        fail(str(exc))
    with database(config) as (settings, db), db.session() as session:
        peer = outbound(session, settings, device, partition)
    called, where, calling = peer.called_ae, peer.endpoint, peer.calling_ae
    answers: list[dict[str, Any]] = []
    problem = ""
    try:
        for answer in find(settings, endpoint=where, called_ae=called, calling_ae=calling,
                           query=ask, model=chosen, own=peer.own):
            answers.append(flatten(answer))
    except FindError as exc:
        problem = str(exc)
    except FindCancelled as exc:
        _print(answers, ask, as_json, f"C-FIND {calling} -> {called}@{where}")
        typer.echo(f"{exc}: {len(answers)} answer(s) before", err=True)
        raise typer.Exit(INTERRUPTED) from None
    # The answers that came before a failure (e.g. a peer's match limit) are shown too.
    if answers or not problem:
        _print(answers, ask, as_json, f"C-FIND {calling} -> {called}@{where}")
    if problem:
        fail(problem)


def _print(answers: list[dict[str, Any]], ask: Dataset, as_json: bool, title: str) -> None:
    if as_json:
        print_json(answers)
        return
    columns = _columns(ask, answers)
    table(title, columns, [[_cell(a.get(c, "")) for c in columns] for a in answers])
    typer.echo(f"{len(answers)} answer(s)")


def _columns(ask: Dataset, answers: list[dict[str, Any]]) -> list[str]:
    """The level's usual keys in findscu's order, the other keys asked for, then any others
    the answers carry."""
    columns = list(RETURN_KEYS[ask.QueryRetrieveLevel])
    columns += [k for k in flatten(ask) if k not in columns]
    for answer in answers:
        columns += [k for k in answer if k not in columns]
    return columns


def _cell(value: Any) -> str:
    return "\\".join(value) if isinstance(value, list) else str(value)
