"""`pacsnode serve`: run a node until Ctrl-C or SIGTERM."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from node.cli.common import ConfigOption, fail, load_settings
from node.config import Settings
from node.redact import RedactingFilter, known_secrets, scrub
from node.service import Extension, Node
from node.tls import TlsError


def serve(config: ConfigOption = None) -> None:
    """Start the node: migrate the database, open the DICOM listeners, serve until stopped."""
    run(config, lambda _settings: [])


def run(config: Path | None, extensions: Callable[[Settings], Sequence[Extension]]) -> None:
    settings = load_settings(config)
    logging.basicConfig(
        level=settings.node.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # The node's own messages hide passwords; this also catches what libraries log.
    secrets = known_secrets(settings)
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter(secrets))
    try:
        Node(settings, extensions(settings)).run_until_signalled()
    except (OSError, SQLAlchemyError, TlsError) as exc:
        fail(scrub(str(exc), secrets))
