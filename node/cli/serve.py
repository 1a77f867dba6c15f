"""`pacsnode serve`: run a node until Ctrl-C or SIGTERM."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated

import typer
from sqlalchemy.exc import SQLAlchemyError

from node.cli.common import ConfigOption, fail, load_settings
from node.config import Settings
from node.logs import configure_logging
from node.redact import known_secrets, scrub
from node.service import Extension, Node
from node.tls import TlsError

TraceOption = Annotated[bool, typer.Option(
    "--trace-dicom", help="Log every association's A-ASSOCIATE, DIMSE messages, release and"
    " abort (logger pacsnode.dicom.trace; sets node.trace_dicom).")]
TraceAeOption = Annotated[str, typer.Option(
    "--trace-dicom-ae", metavar="AE1,AE2", show_default=False,
    help="Trace only associations with one of these calling or called AE titles (implies"
    " --trace-dicom; sets node.trace_dicom_ae_titles).")]


def serve(config: ConfigOption = None, trace_dicom: TraceOption = False,
          trace_dicom_ae: TraceAeOption = "") -> None:
    """Start the node: migrate the database, open the DICOM listeners, serve until stopped."""
    run(config, lambda _settings: [], trace_dicom=trace_dicom, trace_dicom_ae=trace_dicom_ae)


def run(config: Path | None, extensions: Callable[[Settings], Sequence[Extension]], *,
        trace_dicom: bool = False, trace_dicom_ae: str = "") -> None:
    settings = load_settings(config)
    trace(settings, trace_dicom, trace_dicom_ae)
    configure_logging(settings)
    secrets = known_secrets(settings)
    try:
        Node(settings, extensions(settings)).run_until_signalled()
    except (OSError, SQLAlchemyError, TlsError) as exc:
        fail(scrub(str(exc), secrets))


def trace(settings: Settings, on: bool, ae_titles: str) -> None:
    """The command line's trace options over the settings file's (association processes get
    the settings, so they trace too)."""
    titles = [t.strip() for t in ae_titles.split(",") if t.strip()]
    for title in titles:
        if len(title) > 16:
            fail(f"--trace-dicom-ae: {title!r} is not an AE title (1-16 characters)")
    if on or titles:
        settings.node.trace_dicom = True
    if titles:
        settings.node.trace_dicom_ae_titles = titles
