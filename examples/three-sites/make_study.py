#!/usr/bin/env python3
"""Write a small CT study (Part-10 files) for the three-sites example.

Usage: make_study.py <folder> <patient id> <count>   (prints the Study Instance UID)
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def main() -> None:
    folder, patient_id, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    for number in range(1, count + 1):
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID, ds.PatientName = patient_id, f"EXAMPLE^{patient_id}"
        ds.StudyDate, ds.Modality, ds.InstanceNumber = "20261122", "CT", number
        ds.Rows = ds.Columns = 16
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 15, 0, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = bytes(16 * 16 * 2)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(folder / f"{number:03d}.dcm", enforce_file_format=True)
    print(study)


if __name__ == "__main__":
    main()
