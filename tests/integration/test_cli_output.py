"""What a new user sees from the CLI: settings refused before a traceback, the version, help
that reads, full UIDs, node defaults named as such, a queue that says it is empty."""

from __future__ import annotations

from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from hierarchy.cli import app
from node.cli import common
from tests.conftest import RunningNode, run_cli, wait_for, write_config
from tests.destination import CountingSCP
from tests.dicomgen import Patient, make_instance
from tests.scu import statuses, store


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


def every_command(group: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """The command path of the group and of each command under it."""
    yield path
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from every_command(command, (*path, name))
        else:
            yield (*path, name)


def test_every_help_shows_flags_as_choices_not_as_bool_values() -> None:
    runner = CliRunner()
    commands = list(every_command(typer.main.get_command(app)))
    assert len(commands) > 40
    for command in commands:
        result = runner.invoke(app, [*command, "--help"])
        assert result.exit_code == 0, (command, result.output)
        assert "<bool>" not in result.output, (command, result.output)
        assert "--help  " in result.output or "--help " in result.output
    partition = runner.invoke(app, ["partition", "edit", "--help"]).output
    device = runner.invoke(app, ["device", "edit", "--help"]).output
    for shown in ("--enabled / --disabled ", "--accept-any / --no-accept-any ",
                  "--case-sensitive on|off|default", "--duplicate-policy send-success|reject|"
                  "compare", "--query-limit N|default"):
        assert shown in partition, partition
    for shown in ("--enabled / --disabled ", "--storage / --no-storage ",
                  "--heartbeat on|off|default", "--send-updates on|off|default",
                  "--scope local|hierarchy"):
        assert shown in device, device


@pytest.mark.parametrize("new_db", ["sqlite"], indirect=True)
def test_study_list_shows_whole_uids_on_a_narrow_terminal(
        node: RunningNode, monkeypatch: pytest.MonkeyPatch) -> None:
    study = "1.2.826.0.1.3680043.8.498." + "1234567890" * 3 + "12345678"  # 64 characters
    patient = Patient(name="VERYLONGFAMILYNAME^WITH^MANY^COMPONENTS", patient_id="PID-0000001")
    assert statuses(store(node.port, [make_instance(study_uid=study, patient=patient)])) == [0]
    monkeypatch.setattr(common.out, "width", 80)  # what an 80-column terminal gives
    listed = node.cli("study", "list")
    assert listed.exit_code == 0, listed.output
    assert study in listed.output and "…" not in listed.output, listed.output
    assert common.out.width == 80  # the next output is as wide as the terminal again
    deleted = node.cli("study", "delete", study, "--yes")  # what the listing is for
    assert deleted.exit_code == 0 and f"deleted study {study}" in deleted.output


@pytest.mark.parametrize("new_db", ["sqlite"], indirect=True)
def test_queue_stats_follow_says_when_nothing_waits(node: RunningNode) -> None:
    for args in (["queue", "stats", "--follow"], ["queue", "stats"]):
        empty = node.cli(*args)
        assert empty.exit_code == 0
        assert empty.output == "the forwarding queue is empty: no job for any destination\n"
    dest = CountingSCP().start()
    try:
        assert node.cli("device", "add", "BACKUP", "--type", "BACKUP_TARGET", "--host",
                        "127.0.0.1", "--port", str(dest.port)).exit_code == 0
        assert statuses(store(node.port, [make_instance()])) == [0]
        assert wait_for(lambda: len(dest.received) == 1, 10)
        assert wait_for(lambda: '"done": 1' in node.cli("queue", "stats", "--json").output)
    finally:
        dest.stop()
    done = node.cli("queue", "stats", "--follow")
    assert done.exit_code == 0
    assert done.output.startswith("nothing waits to be forwarded:\n"), done.output
    assert "BACKUP" in done.output


@pytest.mark.parametrize("new_db", ["sqlite"], indirect=True)
def test_device_show_names_node_defaults_as_partition_show_does(node: RunningNode) -> None:
    assert node.cli("device", "add", "VIEWER", "--host", "127.0.0.1").exit_code == 0
    shown = node.cli("device", "show", "VIEWER")
    assert shown.exit_code == 0
    lines = dict(line.split(None, 1) for line in shown.output.splitlines()
                 if len(line.split(None, 1)) == 2)
    for key in ("max_pdu_size", "acse_timeout", "dimse_timeout", "network_timeout",
                "max_inbound_associations", "heartbeat", "remove_private_tags", "send_updates"):
        assert lines[key] == "(node default)", shown.output
    assert (lines["tls_port"], lines["category"], lines["partition"]) == (
        "(none)", "(none)", "(every partition)")
    assert not {"None", "0", "0.0"} & set(lines.values()), shown.output
    assert "(node default)" in node.cli("partition", "show", "PACSNODE").output  # the same words
    assert node.cli("device", "edit", "VIEWER", "--heartbeat", "off", "--acse-timeout", "5",
                    "--max-pdu", "16384").exit_code == 0
    lines = dict(line.split(None, 1) for line in node.cli("device", "show", "VIEWER")
                 .output.splitlines() if len(line.split(None, 1)) == 2)
    assert (lines["heartbeat"], lines["acse_timeout"], lines["max_pdu_size"]) == (
        "False", "5.0", "16384")
    assert lines["dimse_timeout"] == "(node default)"
