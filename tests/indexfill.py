"""Fill the index with synthetic rows (no files): for query tests and the query benchmark."""

from __future__ import annotations

import random
from datetime import UTC, datetime

from sqlalchemy import insert, select

from node.db.database import Database
from node.db.indexer import person_name_rows, with_keys, with_modality
from node.db.models import Instance, Patient, PersonName, Series, Study

FAMILIES = ["SMITH", "JONES", "TAYLOR", "BROWN", "WILLIAMS", "WILSON", "JOHNSON", "DAVIES",
            "ROBINSON", "WRIGHT", "THOMPSON", "EVANS", "WALKER", "WHITE", "ROBERTS", "GREEN"]
GIVEN = ["JOHN", "ANNA", "PETER", "MARY", "DAVID", "SARAH", "PAUL", "LAURA"]
MODALITIES = ["CT", "MR", "CR", "US", "DX", "MG", "PT", "NM"]
ROOT = "1.2.826.0.1.3680043.10.1457.9"


def fill(db: Database, partition_id: int, studies: int, *, series_per_study: int = 2,
         instances_per_series: int = 5, seed: int = 1, batch: int = 2000,
         path: str | None = None) -> None:
    """`studies` studies (one patient each two studies) with their series and instances.

    `path`: one stored file every instance row points to (default: files that do not exist).
    """
    rng = random.Random(seed)
    now = datetime.now(UTC)
    with db.transaction() as session:
        first_patient = (session.scalar(select(Patient.id).order_by(Patient.id.desc())) or 0) + 1
        first_study = (session.scalar(select(Study.id).order_by(Study.id.desc())) or 0) + 1
        first_series = (session.scalar(select(Series.id).order_by(Series.id.desc())) or 0) + 1
    patients, study_rows, series_rows, instance_rows, names = [], [], [], [], []

    def flush(force: bool = False) -> None:
        if not force and len(instance_rows) < batch * 5:
            return
        with db.transaction() as session:
            for model, rows in ((Patient, patients), (Study, study_rows), (Series, series_rows),
                                (PersonName, names), (Instance, instance_rows)):
                if rows:
                    session.execute(insert(model),
                                    [with_keys(model.__table__, row) for row in rows])
                    rows.clear()

    series_pk = first_series
    for i in range(studies):
        patient_pk = first_patient + i // 2
        if i % 2 == 0:
            name = f"{rng.choice(FAMILIES)}{i // 2}^{rng.choice(GIVEN)}"
            birth_date, sex = f"19{rng.randint(30, 99)}0101", "MF"[i % 4 // 2]
            patients.append({
                "id": patient_pk, "partition_id": partition_id,
                "patient_id": f"P{patient_pk:07d}", "issuer_of_patient_id": "",
                "patient_name": name, "patient_birth_date": birth_date, "patient_sex": sex,
            })
        study_pk = first_study + i
        modality = rng.choice(MODALITIES)
        study_uid = f"{ROOT}.{study_pk}"
        date = f"20{rng.randint(15, 24)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
        study_rows.append({
            "id": study_pk, "partition_id": partition_id, "patient_pk": patient_pk,
            "study_instance_uid": study_uid, "study_date": date, "study_time": "101500",
            "accession_number": f"A{study_pk:08d}", "study_id": "1", "study_description": "",
            "referring_physician_name": "", "patient_name": name,
            "patient_id": f"P{patient_pk:07d}", "issuer_of_patient_id": "",
            "patient_birth_date": birth_date, "patient_sex": sex,
            "num_series": series_per_study,
            "num_instances": series_per_study * instances_per_series,
            "modalities": with_modality("", modality), "received_at": now, "updated_at": now,
        })
        names.extend({"study_pk": study_pk, "partition_id": partition_id, **row}
                     for row in person_name_rows("PatientName", name))
        for s in range(series_per_study):
            series_rows.append({
                "id": series_pk, "study_pk": study_pk, "series_instance_uid": f"{study_uid}.{s}",
                "modality": modality, "series_number": str(s + 1), "series_description": "",
                "body_part_examined": "", "series_date": date, "series_time": "",
                "num_instances": instances_per_series,
            })
            for n in range(instances_per_series):
                instance_rows.append({
                    "partition_id": partition_id, "series_pk": series_pk,
                    "sop_instance_uid": f"{study_uid}.{s}.{n}",
                    "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "instance_number": str(n + 1),
                    "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                    "path": path or f"X/{study_uid}/{study_uid}.{s}/{study_uid}.{s}.{n}.dcm",
                    "size": 0, "calling_ae_title": "FILL", "received_at": now,
                })
            series_pk += 1
        flush()
    flush(force=True)
