"""`pacsnode query` against Orthanc 1.10 as the remote archive: the answers another PACS gives,
decoded with the character set it answers in."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import orthanc
from tests.conftest import free_port, node_toml, run_cli, write_config
from tests.dicomgen import Patient, make_instance, uid
from tests.scu import statuses, store

pytestmark = [pytest.mark.slow, pytest.mark.interop,
              pytest.mark.skipif(not orthanc.available(), reason="Orthanc is not installed")]

MULLER = Patient("PID7", "Müller^Jörg", "19500101", "M")


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[orthanc.Orthanc]:
    # Orthanc answers C-FIND only to the AE titles it knows (it aborts the others).
    peer = orthanc.Orthanc(tmp_path / "orthanc",
                           modalities={"NODE": ("PACSNODE", free_port())}).start()
    try:
        yield peer
    finally:
        peer.stop()


def test_query_orthanc_at_study_series_and_image_level(tmp_path: Path,
                                                       archive: orthanc.Orthanc) -> None:
    study, series = uid(), uid()
    datasets = [make_instance(study_uid=study, series_uid=series, patient=MULLER, modality="CT",
                              accession="ACC7", instance_number=n + 1) for n in range(2)]
    assert set(statuses(store(archive.port, datasets, called=archive.ae_title))) == {0}
    cfg = write_config(tmp_path / "node.toml", node_toml(
        tmp_path / "data", f"sqlite:///{tmp_path / 'node.db'}", free_port()))
    assert run_cli(cfg, "device", "add", "ORTHANC", "--ae-title", archive.ae_title, "--host",
                   "127.0.0.1", "--port", str(archive.port)).exit_code == 0

    def query(*args: str) -> list[dict[str, str]]:
        result = run_cli(cfg, "query", "ORTHANC", *args, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    (found,) = query("-k", "PatientName=M*")
    assert found["StudyInstanceUID"] == study and found["PatientName"] == "Müller^Jörg"
    assert (found["AccessionNumber"], found["NumberOfStudyRelatedInstances"]) == ("ACC7", "2")
    assert query("-k", "PatientID=NOBODY") == []
    (found_series,) = query("--level", "SERIES", "-k", f"StudyInstanceUID={study}")
    assert (found_series["SeriesInstanceUID"], found_series["Modality"]) == (series, "CT")
    images = query("--level", "IMAGE", "-k", f"StudyInstanceUID={study}",
                   "-k", f"SeriesInstanceUID={series}")
    assert sorted(i["SOPInstanceUID"] for i in images) == sorted(
        d.SOPInstanceUID for d in datasets)
    (patient,) = query("--level", "PATIENT", "-k", "PatientID=PID7")
    assert patient["PatientName"] == "Müller^Jörg"

    # A partition Orthanc does not know: Orthanc aborts, the command says so in one line.
    assert run_cli(cfg, "partition", "add", "STRANGER", "--port",
                   str(free_port())).exit_code == 0
    stranger = run_cli(cfg, "query", "ORTHANC", "--partition", "STRANGER")
    assert stranger.exit_code == 1 and "Traceback" not in stranger.output
    assert "the association was aborted (the peer may not know this calling AE title)" in (
        stranger.output)

    table = run_cli(cfg, "query", "ORTHANC", "-k", "PatientID=PID7")
    assert table.exit_code == 0 and study in table.output
    assert table.output.rstrip().endswith("1 answer(s)")
