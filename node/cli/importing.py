"""`pacsnode import PATH...`: files, folders and DICOMDIR media into a partition."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from sqlalchemy.exc import SQLAlchemyError

from node import activity
from node.cli.common import (
    ConfigOption,
    JsonOption,
    database,
    database_error,
    err,
    fail,
    print_json,
)
from node.importing.importer import FileResult, Importer, Result, Summary
from node.importing.sources import collect
from node.internals.configure import configure_pynetdicom
from node.partitions import AdminError

Paths = Annotated[list[Path], typer.Argument(
    help="DICOM files, folders (searched recursively) and DICOMDIR files (what they "
    "reference is imported).", show_default=False, metavar="PATH...")]
PartitionOption = Annotated[str | None, typer.Option(
    "--partition", "-p", help="AE title of the partition to import into (default: the "
    "node's only enabled partition).")]


def import_(paths: Paths, partition: PartitionOption = None, as_json: JsonOption = False,
            config: ConfigOption = None) -> None:
    """Import DICOM files as the node's Self device sends them: through the C-STORE path
    (checks, the Self device's coercion rules, durable storage, duplicate policy, forwarding).
    Originals are never changed. Exit status 1 when a file was refused."""
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        fail(f"no such file or folder: {', '.join(missing)}")
    with database(config) as (settings, db), _quiet("node.ingest.pipeline"):
        configure_pynetdicom()  # pydicom reads and writes as the node does
        try:
            importer = Importer(settings, db, partition)
        except AdminError as exc:
            fail(str(exc))
        except SQLAlchemyError as exc:
            fail(database_error(settings, exc))
        found, problems = collect(paths)
        for problem in problems:
            importer.add(FileResult(str(problem.path), Result.REFUSED, None, problem.reason))
        summary = importer.summary
        try:
            summary.interrupted = not _run(importer, found,
                                           show=not as_json and err.is_terminal)
        except KeyboardInterrupt:
            summary.interrupted = True
        finally:
            if settings.storage.activity_log:
                try:
                    with db.transaction() as session:
                        activity.write(session, summary.activity(importer.calling_ae))
                except SQLAlchemyError as exc:
                    err.print(f"warning: the import is not in the activity log: "
                              f"{database_error(settings, exc)}", highlight=False)
    if as_json:
        print_json(summary.as_dict())
    else:
        _print(summary, importer.self_enabled)
    if summary.interrupted:
        raise typer.Exit(130)
    if summary.refused:
        raise typer.Exit(1)


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Each refusal is in the summary: the store's warning would say it twice."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _run(importer: Importer, found: list[Path], *, show: bool) -> bool:
    """Import `found`; False when Ctrl-C stopped it. The file in hand is finished first, so
    the summary says exactly what was stored (a second Ctrl-C stops at once)."""
    stop = threading.Event()

    def interrupt(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.SIG_IGN:  # a background job ignores it, and goes on doing so
        signal.signal(signal.SIGINT, interrupt)
    columns = (TextColumn("importing"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[stored]} stored"), TimeRemainingColumn())
    try:
        with Progress(*columns, console=err, disable=not show, transient=True) as progress:
            task = progress.add_task("import", total=len(found), stored=0)
            stored = 0
            for path in found:
                if stop.is_set():
                    return False
                if importer.import_file(path).result is Result.STORED:
                    stored += 1
                progress.update(task, advance=1, stored=stored)
    finally:
        signal.signal(signal.SIGINT, previous)
    return not stop.is_set()


def _print(summary: Summary, self_enabled: bool) -> None:
    if summary.self_device is None:
        source = "no Self device: no coercion"
    elif not self_enabled:
        source = f"Self device {summary.self_device} is disabled: no coercion"
    else:
        source = f"Self device {summary.self_device}: {summary.rules} coercion rule(s)"
    typer.echo(f"import into {summary.partition} ({source})"
               + (": interrupted" if summary.interrupted else ""))
    labels = {Result.STORED: "stored", Result.DUPLICATE: "duplicates skipped",
              Result.REFUSED: "refused", Result.NOT_DICOM: "not DICOM",
              Result.SKIPPED: "skipped"}
    for result, label in labels.items():
        typer.echo(f"  {label:<19}{summary.count(result):>7}")
    differing = sum(f.integrity for f in summary.files)
    if differing:
        typer.echo(f"  {differing} difference(s) recorded in the integrity queue "
                   "(pacsnode integrity list)")
    for f in summary.refused:
        status = "" if f.status is None else f"0x{f.status:04X} "
        typer.echo(f"refused {f.path}: {status}{f.comment}")
    for f in summary.files:
        if f.result is Result.SKIPPED:
            typer.echo(f"skipped {f.path}: {f.comment}")
        elif f.result is Result.STORED and f.comment:
            typer.echo(f"note: {f.path}: {f.comment}")
