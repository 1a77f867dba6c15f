"""Synthetic DICOM instances for tests and benchmarks (no pixel data is decoded anywhere)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

ROOT = "1.2.826.0.1.3680043.10.1457."  # test UIDs live under one prefix


def uid() -> str:
    return generate_uid(prefix=ROOT)


@dataclass(frozen=True)
class Patient:
    patient_id: str = "PID001"
    name: str = "DOE^JANE"
    birth_date: str = "19700101"
    sex: str = "F"


def make_instance(
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    patient: Patient | None = None,
    size: int = 64,
    modality: str = "CT",
    accession: str = "ACC001",
    instance_number: int = 1,
    sop_class: str = CTImageStorage,
    transfer_syntax: str = ExplicitVRLittleEndian,
    fill: int = 0,
) -> Dataset:
    patient = patient or Patient()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.StudyInstanceUID = study_uid or uid()
    ds.SeriesInstanceUID = series_uid or uid()
    ds.StudyDate = "20240115"
    ds.StudyTime = "101500"
    ds.AccessionNumber = accession
    ds.StudyID = "1"
    ds.StudyDescription = "TEST STUDY"
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.InstitutionName = "GENERAL HOSPITAL"
    set_monochrome12(ds, size)
    ds.PixelData = bytes([fill & 0xFF, (fill >> 8) & 0x0F]) * (size * size)
    return ds


def set_monochrome12(ds: Dataset, size: int) -> None:
    """The image pixel module of a square 12-bit grey image (pixel data not included)."""
    ds.Rows = size
    ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0


def write_study(
    folder: Path, count: int, *, size: int = 64, patient: Patient | None = None,
    study_uid: str | None = None, **kwargs: object,
) -> list[Path]:
    """`count` instances of one study and series, written as Part-10 files in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or uid()
    series_uid = uid()
    paths = []
    for i in range(count):
        ds = make_instance(study_uid=study_uid, series_uid=series_uid, patient=patient,
                           size=size, instance_number=i + 1, fill=i, **kwargs)  # type: ignore[arg-type]
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
