"""The administrator's CLI: partitions, devices, echo, database; errors name the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory

from node.db.migrate import alembic_config
from tests.conftest import RunningNode, free_port, node_toml, run_cli, write_config
from tests.dicomgen import make_instance
from tests.scu import statuses, store


@pytest.fixture
def cfg(tmp_path: Path, db_url: str) -> Path:
    """A settings file for a node that is not running (the CLI works on its database)."""
    return write_config(tmp_path / "node.toml", node_toml(tmp_path / "data", db_url, free_port()))


def ok(cfg: Path, *args: str) -> str:
    result = run_cli(cfg, *args)
    assert result.exit_code == 0, result.output
    return result.output


def refused(cfg: Path, *args: str) -> str:
    result = run_cli(cfg, *args)
    assert result.exit_code != 0, result.output
    return result.output


def test_fresh_database_has_the_default_partition(cfg: Path) -> None:
    [p] = json.loads(ok(cfg, "partition", "list", "--json"))
    assert (p["ae_title"], p["enabled"], p["accept_any_device"], p["studies"]) == (
        "PACSNODE", True, True, 0)


def test_partition_add_show_edit_delete(cfg: Path) -> None:
    ok(cfg, "partition", "add", "CARDIO", "--port", "11113", "--description", "Cardiology",
       "--duplicate-policy", "compare", "--no-accept-any", "--auto-insert",
       "--default-remote-port", "4006", "--match", "PatientID,AccessionNumber",
       "--track-deleted")
    shown = json.loads(ok(cfg, "partition", "show", "CARDIO", "--json"))
    assert shown["folder"] == "CARDIO"  # defaults to the AE title
    assert (shown["port"], shown["duplicate_policy"], shown["accept_any_device"],
            shown["auto_insert_devices"], shown["default_remote_port"],
            shown["track_deleted_studies"]) == (11113, "compare", False, True, 4006, True)
    assert (shown["match_patient_id"], shown["match_accession_number"],
            shown["match_patient_name"]) == (True, True, False)
    text = ok(cfg, "partition", "show", "CARDIO")
    assert "PatientID,AccessionNumber" in text

    ok(cfg, "partition", "edit", "CARDIO", "--ae-title", "CARDIO2", "--disabled",
       "--match", "none")
    shown = json.loads(ok(cfg, "partition", "show", "CARDIO2", "--json"))
    assert shown["enabled"] is False and shown["match_patient_id"] is False
    ok(cfg, "partition", "delete", "CARDIO2")
    assert "no partition" in refused(cfg, "partition", "show", "CARDIO2")


@pytest.mark.parametrize(("args", "message"), [
    (["partition", "add", "PACSNODE"], "already used"),
    (["partition", "add", "NEW", "--folder", "PACSNODE"], "already used"),
    (["partition", "add", "NEW", "--folder", "../escape"], "folder name"),
    (["partition", "add", "WAY_TOO_LONG_AE_TITLE"], "longer than 16"),
    (["partition", "add", "NEW", "--port", "70000"], "between 0 and 65535"),
    (["partition", "add", "NEW", "--port", "0"], "needs a TCP port or a TLS port"),
    (["partition", "add", "NEW", "--tls-port", "2762"], "set tls.cert and tls.key"),
    (["partition", "add", "NEW", "--max-associations", "-1"], "max associations must be"),
    (["device", "add", "D1", "--max-inbound", "-2"], "max inbound associations must be"),
    (["partition", "add", "NEW", "--duplicate-policy", "maybe"], "send-success, reject, compare"),
    (["partition", "add", "NEW", "--match", "Shoesize"], "unknown study-matching field"),
    (["partition", "edit", "PACSNODE"], "nothing to change"),
    (["partition", "edit", "NOPE", "--disabled"], "no partition"),
    (["device", "add", "CT1", "--type", "TOASTER"], "not one of"),
    (["device", "add", "CT1", "--rule", "set PixelData 0"], "only alphanumeric"),
    (["device", "add", "CT1", "--rule", "frobnicate PatientName"], "unknown operation"),
    (["device", "add", "CT1", "--rule", "set PatientSex maybe?"], "not a valid CS"),
    (["device", "add", "CT1", "--partition", "NOPE"], "no partition"),
    (["device", "add", "CT1", "--tls-port", "-1"], "between 0 and 65535"),
    (["device", "edit", "NOPE", "--disabled"], "no device"),
    (["device", "echo", "NOPE"], "no device"),
    (["integrity", "show", "42"], "no integrity item"),
    (["device", "add", "S1", "--type", "SELF", "--partition", "PACSNODE"],
     "serves every partition"),
    (["device", "add", "S1", "--type", "self", "--scope", "hierarchy"], "it stays local"),
])
def test_bad_requests_are_refused_with_a_reason(cfg: Path, args: list[str], message: str
                                                ) -> None:
    output = refused(cfg, *args)
    assert "Error" in output and message in output
    assert "Traceback" not in output


def test_partition_with_studies_cannot_be_deleted(node: RunningNode) -> None:
    assert statuses(store(node.port, [make_instance()])) == [0]
    result = node.cli("partition", "delete", "PACSNODE")
    assert result.exit_code != 0
    assert "holds 1 study" in result.output
    [p] = json.loads(node.cli("partition", "list", "--json").output)
    assert p["studies"] == 1


def test_device_lifecycle(cfg: Path, tmp_path: Path) -> None:
    rules = tmp_path / "rules.txt"
    rules.write_text("# site A\nprefix AccessionNumber A-\nremove InstitutionAddress\n")
    ok(cfg, "device", "add", "CT-ROOM-1", "--ae-title", "CT1", "--host", "localhost",
       "--port", "4006", "--tls-port", "2762", "--type", "dicom", "--partition", "PACSNODE",
       "--description", "CT room 1", "--rules-file", str(rules), "--no-retrieve")
    [d] = json.loads(ok(cfg, "device", "list", "--json"))
    assert (d["name"], d["ae_title"], d["host"], d["port"], d["tls_port"], d["device_type"],
            d["partition"], d["enabled"], d["allow_retrieve"]) == (
        "CT-ROOM-1", "CT1", "localhost", 4006, 2762, "DICOM", "PACSNODE", True, False)
    assert d["ip"] in ("127.0.0.1", "::1")
    assert "prefix AccessionNumber A-" in ok(cfg, "device", "show", "CT-ROOM-1")

    ok(cfg, "device", "disable", "CT-ROOM-1")
    assert json.loads(ok(cfg, "device", "show", "CT-ROOM-1", "--json"))["enabled"] is False
    ok(cfg, "device", "enable", "CT-ROOM-1")
    ok(cfg, "device", "edit", "CT-ROOM-1", "--name", "CT-A", "--clear-rules", "--type",
       "BACKUP_TARGET", "--partition", "")
    d = json.loads(ok(cfg, "device", "show", "CT-A", "--json"))
    assert (d["coercion_rules"], d["device_type"], d["partition"]) == ("", "BACKUP_TARGET", None)
    assert "already has AE title CT1" in refused(cfg, "device", "add", "OTHER",
                                                 "--ae-title", "CT1")
    ok(cfg, "device", "delete", "CT-A")
    assert json.loads(ok(cfg, "device", "list", "--json")) == []


def test_one_self_device_per_node(cfg: Path) -> None:
    ok(cfg, "device", "add", "SCANNER", "--type", "SELF", "--rule", 'set InstitutionName "X"')
    ok(cfg, "device", "add", "CT1")
    assert "device 'SCANNER' is already this node's Self device (one per node)" in refused(
        cfg, "device", "edit", "CT1", "--type", "SELF")
    ok(cfg, "device", "edit", "SCANNER", "--rule", 'set InstitutionName "Y"')  # itself: fine
    [d] = [d for d in json.loads(ok(cfg, "device", "list", "--json")) if d["name"] == "SCANNER"]
    assert (d["device_type"], d["partition"], d["coercion_rules"]) == (
        "SELF", None, 'set InstitutionName "Y"')
    ok(cfg, "device", "delete", "SCANNER")
    ok(cfg, "device", "edit", "CT1", "--type", "SELF")


def test_invalid_host_name_is_a_warning_not_a_traceback(cfg: Path) -> None:
    result = run_cli(cfg, "device", "add", "BAD", "--host", "a..b")
    assert result.exit_code == 0 and "Traceback" not in result.output
    assert "warning: host a..b does not resolve now" in result.output


def test_device_echo_sends_a_real_c_echo(node: RunningNode) -> None:
    assert node.cli("device", "add", "SELF", "--ae-title", "PACSNODE", "--host", "127.0.0.1",
                    "--port", str(node.port)).exit_code == 0
    result = node.cli("device", "echo", "SELF", "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert answer["ok"] is True and answer["status"] == 0 and answer["round_trip_ms"] > 0
    text = node.cli("device", "echo", "SELF").output
    assert "success" in text and " ms" in text

    # A closed port and a wrong AE title both fail with the reason and exit code 1.
    assert node.cli("device", "add", "GONE", "--host", "127.0.0.1",
                    "--port", str(free_port())).exit_code == 0
    gone = node.cli("device", "echo", "GONE")
    assert gone.exit_code == 1 and "connection refused" in gone.output
    assert node.cli("device", "add", "WRONGAE", "--ae-title", "NOTTHERE", "--host", "127.0.0.1",
                    "--port", str(node.port)).exit_code == 0
    wrong = node.cli("device", "echo", "WRONGAE")
    assert wrong.exit_code == 1 and "rejected" in wrong.output


def test_bad_settings_file_is_named(tmp_path: Path) -> None:
    bad = write_config(tmp_path / "bad.toml", "[dicom]\nmax_pdu_size = 0\n")
    result = run_cli(bad, "partition", "list")
    assert result.exit_code == 1 and "max_pdu_size" in result.output
    unknown = write_config(tmp_path / "unknown.toml", "[node]\ncolour = 'blue'\n")
    assert "node.colour" in run_cli(unknown, "partition", "list").output


def test_db_upgrade_and_current(cfg: Path) -> None:
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert f"current (empty), head {head}" in ok(cfg, "db", "current")  # reports only
    assert f"schema at revision {head}" in ok(cfg, "db", "upgrade")
    assert f"current {head}, head {head}" in ok(cfg, "db", "current")
