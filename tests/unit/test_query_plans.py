"""Study queries on patient and study text keys read the index led by the partition, not
every row of the partition (SQLite's planner, without statistics, as on a new node)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from node.db import migrate
from node.db.database import Database
from node.query.conditions import parse_identifier
from node.query.index import MatchSettings, statement


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    path: Path = tmp_path_factory.mktemp("plans") / "index.db"
    database = Database(f"sqlite:///{path}")
    migrate.upgrade(database.engine)
    yield database
    database.dispose()


@pytest.mark.parametrize(("level", "keys", "index"), [
    ("STUDY", {"PatientName": "SMITH12*"}, "ix_person_names_family_key"),
    ("STUDY", {"PatientName": "smith"}, "ix_person_names_family_key"),
    ("STUDY", {"PatientName": "Διονυσιος"}, "ix_person_names_family_key"),
    ("STUDY", {"PatientName": "Smith*", "StudyDate": "20240101-"},
     "ix_person_names_family_key"),
    ("PATIENT", {"PatientName": "Люк*"}, "ix_person_names_family_key"),
    ("SERIES", {"PatientName": "=山田^太郎"}, "ix_person_names_family_key"),
    ("STUDY", {"PatientID": "P00012*"}, "ix_patients_partition_id_patient_id_key"),
    ("STUDY", {"AccessionNumber": "ACC12*"}, "ix_studies_partition_id_accession_number_key"),
    ("STUDY", {"AccessionNumber": "Äcc12"}, "ix_studies_partition_id_accession_number_key"),
])
def test_a_text_key_reads_its_partition_index(db: Database, level: str, keys: dict[str, str],
                                              index: str) -> None:
    """Every table is read by a key (SEARCH), never walked (SCAN), and the key's index is
    used to find the rows."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    ds.StudyInstanceUID = ""
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    stmt = statement(parse_identifier(ds), 1, MatchSettings(prefix_as_range=True))
    compiled = stmt.compile(db.engine)
    with db.engine.connect() as conn:
        plan = " | ".join(row[-1] for row in conn.exec_driver_sql(
            f"EXPLAIN QUERY PLAN {compiled}",
            tuple(compiled.params[name] for name in compiled.positiontup or ())))
    steps = plan.split(" | ")
    assert not [step for step in steps if step.startswith("SCAN")], plan
    assert any(step.startswith("SEARCH") and index in step for step in steps), plan
