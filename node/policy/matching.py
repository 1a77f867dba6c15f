"""Study matching: does a new instance agree with its stored study's demographics?
(docs/how-to/coercion.md)"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# Partition flag -> the DICOM keyword it checks.
MATCH_FIELDS: dict[str, str] = {
    "match_patient_name": "PatientName",
    "match_patient_id": "PatientID",
    "match_patient_sex": "PatientSex",
    "match_patient_birth_date": "PatientBirthDate",
    "match_accession_number": "AccessionNumber",
    "match_issuer_of_patient_id": "IssuerOfPatientID",
}


@dataclass(frozen=True)
class Difference:
    keyword: str
    stored: str
    received: str

    def as_dict(self) -> dict[str, str]:
        return {"keyword": self.keyword, "stored": self.stored, "received": self.received}


def demographic_differences(
    stored: Mapping[str, str], received: Mapping[str, str], keywords: Iterable[str]
) -> list[Difference]:
    """Differences on the checked keywords; surrounding spaces are not significant (PS3.5)."""
    out = []
    for keyword in keywords:
        a = (stored.get(keyword) or "").strip()
        b = (received.get(keyword) or "").strip()
        if a != b:
            out.append(Difference(keyword, a, b))
    return out


def patient_differences(patient: Mapping[str, str], received: Mapping[str, str],
                        keywords: Iterable[str]) -> list[Difference]:
    """A new study's differences from its patient (known by Patient ID and issuer) on the
    checked keywords the patient holds: name, birth date, sex."""
    return demographic_differences(patient, received, [k for k in keywords if k in patient])
