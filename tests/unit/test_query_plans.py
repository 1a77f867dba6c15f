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


@pytest.mark.parametrize(("keys", "index"), [
    ({"PatientName": "SMITH12*"}, "ix_patients_partition_upper_name_family"),
    ({"PatientName": "smith"}, "ix_patients_partition_upper_name_family"),
    ({"PatientID": "P00012*"}, "ix_patients_partition_upper_patient_id"),
    ({"AccessionNumber": "ACC12*"}, "ix_studies_partition_upper_accession_number"),
])
def test_a_text_key_reads_its_partition_index(db: Database, keys: dict[str, str],
                                              index: str) -> None:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = ""
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    stmt = statement(parse_identifier(ds), 1, MatchSettings(prefix_as_range=True))
    compiled = stmt.compile(db.engine)
    with db.engine.connect() as conn:
        plan = " | ".join(row[-1] for row in conn.exec_driver_sql(
            f"EXPLAIN QUERY PLAN {compiled}",
            tuple(compiled.params[name] for name in compiled.positiontup or ())))
    first = plan.split(" | ")[0]
    assert first.startswith("SEARCH") and index in first, plan
