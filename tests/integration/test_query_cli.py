"""`pacsnode query`: C-FIND to a device of the device table, against a real node on loopback
(SQLite and PostgreSQL), and the ways it fails: each one line, exit 1, no traceback."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import Result
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from tests.conftest import RunningNode, free_port, node_toml, run_cli, write_config
from tests.dicomgen import Patient, make_instance, uid
from tests.scu import statuses, store

MULLER = Patient("PID7", "Müller^Jörg", "19500101", "M")
SMITH = Patient("PID8", "SMITH^JOHN", "19600101", "M")


def query(node: RunningNode, *args: str) -> Result:
    result = node.cli("query", *args)
    assert "Traceback" not in result.output
    return result


def add_self(node: RunningNode, name: str = "SELF", ae_title: str = "PACSNODE") -> None:
    assert node.cli("device", "add", name, "--ae-title", ae_title, "--host", "127.0.0.1",
                    "--port", str(node.port)).exit_code == 0


def two_studies(node: RunningNode) -> dict[str, str]:
    studies = {"muller": uid(), "smith": uid()}
    series = uid()
    datasets = [make_instance(study_uid=studies["muller"], series_uid=series, patient=MULLER,
                              modality="CT", accession="ACC7", instance_number=n + 1)
                for n in range(3)]
    datasets.append(make_instance(study_uid=studies["smith"], patient=SMITH, modality="MR",
                                  accession="ACC8"))
    assert set(statuses(store(node.port, datasets))) == {0}
    return studies


def test_study_level_answers_with_the_usual_keys(node: RunningNode) -> None:
    studies = two_studies(node)
    add_self(node)
    result = query(node, "SELF", "-k", "PatientID=PID7", "--json")
    assert result.exit_code == 0, result.output
    answers = json.loads(result.output)
    assert len(answers) == 1
    (answer,) = answers
    assert answer["StudyInstanceUID"] == studies["muller"]
    assert answer["PatientName"] == "Müller^Jörg"  # UTF-8 both ways
    assert answer["AccessionNumber"] == "ACC7" and answer["NumberOfStudyRelatedInstances"] == "3"
    assert answer["ModalitiesInStudy"] == "CT"
    assert answer["RetrieveAETitle"] == "PACSNODE"

    # The table shows whole UIDs and a count line; a wildcard finds both studies.
    table = query(node, "SELF", "-k", "PatientName=*")
    assert table.exit_code == 0, table.output
    assert studies["muller"] in table.output and studies["smith"] in table.output
    assert table.output.rstrip().endswith("2 answer(s)")


def test_series_and_image_levels_and_the_patient_root_model(node: RunningNode) -> None:
    studies = two_studies(node)
    add_self(node)
    series = json.loads(query(node, "SELF", "--level", "SERIES", "-k",
                              f"StudyInstanceUID={studies['muller']}", "--json").output)
    assert [(s["Modality"], s["NumberOfSeriesRelatedInstances"]) for s in series] == [("CT", "3")]
    images = json.loads(query(node, "SELF", "--level", "image", "-k",
                              f"SeriesInstanceUID={series[0]['SeriesInstanceUID']}",
                              "-k", "StudyInstanceUID", "--json").output)
    assert sorted(int(i["InstanceNumber"]) for i in images) == [1, 2, 3]
    assert {i["StudyInstanceUID"] for i in images} == {studies["muller"]}
    patients = json.loads(query(node, "SELF", "--level", "PATIENT", "-k", "PatientID=PID8",
                                "--json").output)
    assert [p["PatientName"] for p in patients] == ["SMITH^JOHN"]
    nothing = query(node, "SELF", "-k", "PatientID=NOBODY")
    assert nothing.exit_code == 0 and nothing.output.rstrip().endswith("0 answer(s)")


def test_errors_are_one_line_and_exit_1(node: RunningNode) -> None:
    two_studies(node)
    add_self(node)
    unknown = query(node, "NOPE")
    assert unknown.exit_code == 1 and "no device named 'NOPE'" in unknown.output

    bad_key = query(node, "SELF", "-k", "Colour=blue")
    assert bad_key.exit_code == 1 and "'Colour' is neither a DICOM keyword" in bad_key.output

    assert node.cli("device", "add", "GONE", "--host", "127.0.0.1",
                    "--port", str(free_port())).exit_code == 0
    gone = query(node, "GONE")
    assert gone.exit_code == 1 and "connection refused" in gone.output.lower()

    add_self(node, "WRONGAE", "NOTTHERE")
    wrong = query(node, "WRONGAE")
    assert wrong.exit_code == 1
    assert ("no association with NOTTHERE at 127.0.0.1:" in wrong.output and "rejected (Rejected"
            " Permanent, Service User: Called AE title not recognised)" in wrong.output)
    assert "answer(s)" not in wrong.output  # no empty table: nothing was asked

    other = query(node, "SELF", "--partition", "NOSUCH")
    assert other.exit_code == 1 and "NOSUCH" in other.output


def test_a_failure_status_is_shown_with_its_comment(node: RunningNode) -> None:
    two_studies(node)
    add_self(node)
    assert node.cli("partition", "edit", "PACSNODE", "--query-limit", "1").exit_code == 0
    limited = query(node, "SELF", "-k", "PatientName=*")
    assert limited.exit_code == 1
    assert "status 0xA700 (Refused: Out of Resources): more than 1 matches" in limited.output
    assert "1 answer(s)" in limited.output  # what came before the failure is shown
    assert len(limited.output.strip().splitlines()[-1]) > 0


class SlowFinder:
    """A Study Root C-FIND SCP on loopback that sends one answer every `interval` seconds,
    `count` of them, and records whether the requestor cancelled."""

    def __init__(self, interval: float, count: int = 100,
                 model: str = StudyRootQueryRetrieveInformationModelFind) -> None:
        self.interval, self.count = interval, count
        self.port = free_port()
        self.first_sent = threading.Event()
        self.cancelled = threading.Event()
        ae = AE(ae_title="SLOW")
        ae.add_supported_context(model)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_FIND, self._find)])

    def _find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        for n in range(self.count):
            if event.is_cancelled:
                self.cancelled.set()
                yield 0xFE00, None
                return
            answer = Dataset()
            answer.QueryRetrieveLevel = event.identifier.QueryRetrieveLevel
            answer.StudyInstanceUID = f"1.2.3.{n}"
            yield 0xFF00, answer
            self.first_sent.set()
            time.sleep(self.interval)


@pytest.fixture
def slow_finder(request: pytest.FixtureRequest) -> Iterator[SlowFinder]:
    finder = SlowFinder(*getattr(request, "param", (0.2,)))
    try:
        yield finder
    finally:
        finder.server.shutdown()


def slow_device(tmp_path: Path, finder: SlowFinder, *options: str) -> Path:
    """A node's settings (not running: the query reads its device table) with device SLOW."""
    cfg = write_config(tmp_path / "node.toml", node_toml(
        tmp_path / "data", f"sqlite:///{tmp_path / 'node.db'}", free_port()))
    assert run_cli(cfg, "device", "add", "SLOW", "--host", "127.0.0.1",
                   "--port", str(finder.port), *options).exit_code == 0
    return cfg


def test_ctrl_c_cancels_the_query_and_exits_130(tmp_path: Path,
                                                 slow_finder: SlowFinder) -> None:
    cfg = slow_device(tmp_path, slow_finder)
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "query", "SLOW", "--config",
                             str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert slow_finder.first_sent.wait(30)
        time.sleep(0.3)  # the command is waiting for the next answer
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in out + err
    assert "cancelled (C-CANCEL sent)" in err and "1.2.3.0" in out
    assert slow_finder.cancelled.wait(5)  # the peer saw the C-CANCEL, not only the abort


# Three answers 3 s apart: without the device's timeout the query would end well, in 6 s.
@pytest.mark.parametrize("slow_finder", [(3.0, 3)], indirect=True)
def test_the_devices_dimse_timeout_bounds_the_wait_for_an_answer(
        tmp_path: Path, slow_finder: SlowFinder) -> None:
    cfg = slow_device(tmp_path, slow_finder, "--dimse-timeout", "0.5")
    started = time.monotonic()
    result = run_cli(cfg, "query", "SLOW")
    elapsed = time.monotonic() - started
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "no answer came within the DIMSE timeout" in result.output
    assert "1.2.3.0" in result.output  # the answer before the silence is shown
    assert 0.4 < elapsed < 2.5, elapsed  # the device's 0.5 s, not the node's 30 s nor 3 s


# An archive that has only the Patient Root model: PATIENT level and --model patient use it.
@pytest.mark.parametrize("slow_finder", [(0, 1, PatientRootQueryRetrieveInformationModelFind)],
                         indirect=True)
def test_patient_level_goes_on_the_patient_root_model(tmp_path: Path,
                                                      slow_finder: SlowFinder) -> None:
    cfg = slow_device(tmp_path, slow_finder)
    for args in (["--level", "PATIENT"], ["--model", "patient"]):
        result = run_cli(cfg, "query", "SLOW", *args, "--json")
        assert result.exit_code == 0, result.output
        assert [a["StudyInstanceUID"] for a in json.loads(result.output)] == ["1.2.3.0"]
    study_root = run_cli(cfg, "query", "SLOW")
    assert study_root.exit_code == 1 and "Traceback" not in study_root.output
    assert "it accepted none of the presentation contexts proposed" in study_root.output
