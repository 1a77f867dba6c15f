"""Statements run on the DBAPI cursor (node/db/prepared.py) write what Connection.execute
writes, on SQLite and PostgreSQL, and fail the same way."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError

from node.db.database import Database
from node.db.migrate import upgrade
from node.db.models import Partition, Patient, Study
from node.db.prepared import Prepared

_patients = Patient.__table__
WHEN = datetime(2026, 11, 23, 4, 5, 6, 789012, tzinfo=UTC)


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    upgrade(database.engine)
    with database.write() as conn:
        conn.execute(insert(Partition), {"ae_title": "P", "port": 104, "folder": "P"})
    yield database
    database.dispose()


def patient(pid: str) -> dict[str, object]:
    return {"partition_id": 1, "patient_id": pid, "patient_id_key": pid.upper(),
            "issuer_of_patient_id": "", "issuer_of_patient_id_key": "",
            "patient_name": f"DOE^{pid}", "patient_birth_date": "", "patient_sex": "F",
            "patient_sex_key": "F"}


INSERT = Prepared(insert(_patients).values({c: bindparam(c) for c in patient("x")}),
                  returns_id=True)


def test_an_insert_returns_the_new_primary_key(db: Database) -> None:
    with db.write() as conn:
        first = INSERT.run(conn, patient("A"))
        second = INSERT.run(conn, patient("B"))
    assert second == first + 1
    with db.session() as s:
        assert s.scalar(select(_patients.c.patient_id).where(_patients.c.id == second)) == "B"


def test_a_unique_violation_is_sqlalchemys_integrity_error(db: Database) -> None:
    with db.write() as conn:
        INSERT.run(conn, patient("A"))
    with pytest.raises(IntegrityError), db.write() as conn:
        INSERT.run(conn, patient("A"))  # (partition, patient ID, issuer) is unique
    with db.session() as s:  # the failed transaction was rolled back, the first row kept
        assert s.scalars(select(_patients.c.patient_id)).all() == ["A"]


def test_typed_and_literal_parameters_are_written_as_connection_execute_writes_them(
        db: Database) -> None:
    studies = Study.__table__
    values = {"partition_id": 1, "study_instance_uid": "1.2.3", "received_at": WHEN,
              "updated_at": WHEN, "accessed_at": WHEN}
    with db.write() as conn:
        pk = INSERT.run(conn, patient("A"))
        conn.execute(insert(studies), {**values, "patient_pk": pk})
        prepared = Prepared(update(studies).where(studies.c.study_instance_uid == "1.2.3")
                            .values(num_instances=studies.c.num_instances + 1,
                                    updated_at=bindparam("now")))
        prepared.run(conn, {"now": WHEN})
        prepared.run(conn, {"now": WHEN})
    with db.session() as s:
        row = s.execute(select(studies.c.num_instances, studies.c.updated_at,
                               studies.c.received_at)).one()
    assert row.num_instances == 2
    # Read back through the ORM's types: the cursor wrote the same representation.
    assert row.updated_at == row.received_at


def test_statements_that_need_column_defaults_are_refused(db: Database) -> None:
    needs_defaults = Prepared(insert(_patients).values(partition_id=bindparam("p")))
    with pytest.raises(ValueError, match="defaults"), db.write() as conn:
        needs_defaults.run(conn, {"p": 1})
