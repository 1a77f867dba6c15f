"""Logging for a server process: one format, and no secret in any line."""

from __future__ import annotations

import logging

from node import dicomtrace
from node.config import Settings
from node.redact import RedactingFilter, known_secrets


def configure_logging(settings: Settings, process: str = "") -> None:
    """Log at the node's level to standard error; `process` names a process other than the
    node's main one in every line."""
    where = f" [{process}]" if process else ""
    logging.basicConfig(
        level=settings.node.log_level.upper(),
        format=f"%(asctime)s %(levelname)s %(name)s{where}: %(message)s",
    )
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    dicomtrace.configure(settings.node.trace_dicom, settings.node.trace_dicom_ae_titles)
    # The node's own messages hide passwords; this also catches what libraries log.
    secrets = known_secrets(settings)
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter(secrets))
