"""What a new user sees from the CLI: settings refused before a traceback, the version, help
that reads, full UIDs, node defaults named as such, a queue that says it is empty."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from typer.testing import CliRunner

from hierarchy.cli import app
from tests.conftest import run_cli, write_config


def test_serve_refuses_a_log_level_logging_does_not_know_in_one_line(tmp_path: Path) -> None:
    settings = write_config(tmp_path / "node.toml", '[node]\nlog_level = "VERBOSE"\n')
    result = run_cli(settings, "serve")
    assert result.exit_code == 1
    assert result.output == ("Error: node.log_level 'VERBOSE' is not a log level: use one of"
                             " DEBUG, INFO, WARNING, ERROR, CRITICAL\n")


def test_version_is_the_installed_distributions() -> None:
    result = CliRunner().invoke(app, ["--version"])  # no command, no settings
    assert result.exit_code == 0
    assert result.output == f"pacsnode {metadata.version('pacsnode')}\n"
