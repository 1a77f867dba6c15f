"""`pacsnode serve`: run a node until Ctrl-C or SIGTERM."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from node.cli.common import ConfigOption, fail, load_settings
from node.config import Settings
from node.logs import configure_logging
from node.redact import known_secrets, scrub
from node.service import Extension, Node
from node.tls import TlsError


def serve(config: ConfigOption = None) -> None:
    """Start the node: migrate the database, open the DICOM listeners, serve until stopped."""
    run(config, lambda _settings: [])


def run(config: Path | None, extensions: Callable[[Settings], Sequence[Extension]]) -> None:
    settings = load_settings(config)
    configure_logging(settings)
    secrets = known_secrets(settings)
    try:
        Node(settings, extensions(settings)).run_until_signalled()
    except (OSError, SQLAlchemyError, TlsError) as exc:
        fail(scrub(str(exc), secrets))
