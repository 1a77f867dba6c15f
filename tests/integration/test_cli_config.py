"""`pacsnode config example` and `pacsnode config check`: the settings file from the CLI."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hierarchy.cli import app
from node import config
from node.config import ENV_CONFIG


@pytest.fixture(autouse=True)
def _no_config_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_CONFIG, raising=False)


def test_config_example_prints_a_file_that_loads_as_the_defaults(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["config", "example"])
    assert result.exit_code == 0, result.output
    path = tmp_path / "node.toml"
    path.write_text(result.output, encoding="utf-8")
    settings, defaults = config.load(path), config.load(None)
    for section in config.SECTIONS:
        assert getattr(settings, section) == getattr(defaults, section)
    assert "# Maximum PDU the node receives" in result.output


def test_config_check_prints_the_settings_in_effect_without_passwords(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[node]\nname = "site-a"\n'
                    'database_url = "postgresql+psycopg://pacs:s3cr3t-pw@db/pacs"\n'
                    '[dicom]\nmax_pdu_size = 16384\n'
                    '[notify]\nsmtp_host = "mail"\nsmtp_password = "pw"\n', encoding="utf-8")
    result = CliRunner().invoke(app, ["config", "check", str(path)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"# {path} is valid")
    shown = tomllib.loads(result.output)
    assert shown["node"]["name"] == "site-a"
    assert shown["dicom"]["max_pdu_size"] == 16384
    assert shown["node"]["database_url"] == "postgresql+psycopg://pacs:***@db/pacs"
    assert shown["notify"]["smtp_password"] == "***"
    assert "s3cr3t" not in result.output and '"pw"' not in result.output


@pytest.mark.parametrize(("text", "message"), [
    ('[dicom]\nmax_pdu_size = "x"\n', "dicom.max_pdu_size must be int, got str 'x'"),
    ("[storage]\ncritical_watermark = 101\n", "storage.critical_watermark must be a percentage"),
    ("[dicom]\nmax_pdus = 1\n", "unknown setting dicom.max_pdus"),
])
def test_config_check_names_the_problem_and_exits_1(tmp_path: Path, text: str,
                                                    message: str) -> None:
    path = tmp_path / "node.toml"
    path.write_text(text, encoding="utf-8")
    result = CliRunner().invoke(app, ["config", "check", str(path)])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {message}")
    assert "Traceback" not in result.output


def test_config_check_reads_the_file_the_environment_names(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "node.toml"
    path.write_text("[bootstrap_partition]\nport = 2104\n", encoding="utf-8")
    monkeypatch.setenv(ENV_CONFIG, str(path))
    result = CliRunner().invoke(app, ["config", "check"])
    assert result.exit_code == 0, result.output
    assert tomllib.loads(result.output)["bootstrap_partition"]["port"] == 2104
