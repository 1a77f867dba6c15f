"""Unit tests for turning UIDs into storage paths (node/storage/paths.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from node.storage.paths import (
    inside,
    instance_relpath,
    is_harmless_uid,
    is_valid_folder_name,
    is_valid_uid,
    path_part,
    study_relpath,
)

GOOD = "1.2.840.10008.5.1.4.1.1.2"


# --- is_valid_uid --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uid",
    [
        "1",
        "0",
        "1.2",
        GOOD,
        "2.25.329800735698586629295641978511506172918",
        "1.2.040.5",  # leading zero in a component: invalid by the standard, harmless in a path
    ],
)
def test_valid_uids(uid: str) -> None:
    assert is_valid_uid(uid) is True


def test_uid_of_64_characters_is_valid_and_65_is_not() -> None:
    uid64 = "1." + "2" * 62
    uid65 = "1." + "2" * 63
    assert len(uid64) == 64
    assert len(uid65) == 65
    assert is_valid_uid(uid64) is True
    assert is_valid_uid(uid65) is False


@pytest.mark.parametrize(
    "value",
    [
        "",
        ".",
        "..",
        "../1.2",
        "1.2/../3",
        "1/2",
        "/1.2",
        "1.2\\3",
        "\\1.2",
        "1.2 3",
        " 1.2",
        "1.2 ",
        "1.2.",
        ".1.2",
        "1..2",
        "1.2.3a",
        "abc",
        "1.2.3\n",
        "1.2.3\x00",
        "1,2,3",
        "-1.2",
        "1.2.\u0663",  # ARABIC-INDIC DIGIT THREE: a Unicode digit, not [0-9]
    ],
)
def test_invalid_uid_strings(value: str) -> None:
    assert is_valid_uid(value) is False


@pytest.mark.parametrize("value", [None, 1, 1.2, b"1.2.3", ["1.2.3"], object()])
def test_non_strings_are_not_uids(value: object) -> None:
    assert is_valid_uid(value) is False


# --- is_harmless_uid, path_part ----------------------------------------------------------

HEX = "dccc9599087131742838cc1162a630fea87ba9bf61ac09bfda90d4adfa5ddaed"  # bad_sequence.dcm


@pytest.mark.parametrize("uid", [GOOD, HEX, "1..2", "1.2.", ".1.2", "1.2.3a", "abc", "1,2,3",
                                 "-1.2", "~", "*", "1.2.[3]", "x" + "0" * 63, "1." + "2" * 62,
                                 ".hidden", "...", "1.2-3_4"])
def test_harmless_uids(uid: str) -> None:
    assert is_harmless_uid(uid) is True


@pytest.mark.parametrize("value", ["", ".", "..", "../1.2", "1.2/../3", "1/2", "/1.2",
                                   "1.2\\3", "1.2 3", " 1.2", "1.2 ", "1.2.3\n", "1.2.3\x00",
                                   "1.2\t3", "1.2.\u0663", "caf\u00e9", "1." + "2" * 63,
                                   None, 1, b"1.2"])
def test_uids_that_are_not_harmless(value: object) -> None:
    assert is_harmless_uid(value) is False


def test_conformant_uids_are_their_own_path_part() -> None:
    assert path_part(GOOD) == GOOD
    assert path_part("1.2.040.5") == "1.2.040.5"


@pytest.mark.parametrize("uid", [HEX, "1..2", "*", "..."])
def test_other_harmless_uids_are_a_hash(uid: str) -> None:
    part = path_part(uid)
    assert part == path_part(uid)  # the same value, the same path
    assert part.startswith("x") and len(part) == 65
    assert set(part[1:]) <= set("0123456789abcdef")
    assert not is_valid_uid(part)  # never the part of a conformant UID


def test_hashes_of_different_uids_differ() -> None:
    assert len({path_part(uid) for uid in (HEX, HEX.upper(), "1..2", "1..2.", "")}) == 5


@pytest.mark.parametrize("value", ["..", ".", "../x", "1/2", "1.2\\3", "1.2\x003"])
def test_path_part_refuses_what_is_not_harmless(value: str) -> None:
    with pytest.raises(ValueError, match="may not be stored"):
        path_part(value)


def test_hashed_relpath_layout() -> None:
    relpath = instance_relpath("PACSNODE", HEX, "abc", "1.2.3")
    assert relpath == f"PACSNODE/{path_part(HEX)}/{path_part('abc')}/1.2.3.dcm"
    assert study_relpath("PACSNODE", HEX) == f"PACSNODE/{path_part(HEX)}"


def test_a_non_patient_object_has_no_study_or_series_but_a_sop_instance() -> None:
    relpath = instance_relpath("PACSNODE", "", "", "1.2.840.10008.1.5.1")
    assert relpath == f"PACSNODE/{path_part('')}/{path_part('')}/1.2.840.10008.1.5.1.dcm"
    with pytest.raises(ValueError, match="invalid SOP instance UID"):
        instance_relpath("PACSNODE", "1.2", "1.2.3", "")


# --- is_valid_folder_name ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["PACSNODE", "a", "_", "0", "site_1", "site-1", "site.1", "x" * 64, "A..B"]
)
def test_valid_folder_names(name: str) -> None:
    assert is_valid_folder_name(name) is True


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "..",
        ".hidden",
        "-dash",
        "a/b",
        "/abs",
        "../up",
        "a\\b",
        "a b",
        "a\n",
        "a\x00b",
        "x" * 65,
        "caf\u00e9",
    ],
)
def test_invalid_folder_names(name: str) -> None:
    assert is_valid_folder_name(name) is False


# --- instance_relpath ----------------------------------------------------------------------


def test_instance_relpath_layout() -> None:
    relpath = instance_relpath("PACSNODE", "1.2", "1.2.3", "1.2.3.4")
    assert relpath == "PACSNODE/1.2/1.2.3/1.2.3.4.dcm"


@pytest.mark.parametrize("folder", ["..", ".", "", "../x", "a/b", "/etc", ".hidden", "a\\b"])
def test_instance_relpath_refuses_hostile_folder(folder: str) -> None:
    with pytest.raises(ValueError, match="invalid partition folder name"):
        instance_relpath(folder, "1.2", "1.2.3", "1.2.3.4")


@pytest.mark.parametrize(
    "hostile", ["..", "../..", "1.2/../../x", "/etc/passwd", "1\\2", "1.2 ", ".", "1\x002",
                "1." + "2" * 63]
)
@pytest.mark.parametrize("position", ["study", "series", "SOP instance"])
def test_instance_relpath_refuses_hostile_uids(hostile: str, position: str) -> None:
    uids = {"study": "1.2", "series": "1.2.3", "SOP instance": "1.2.3.4"}
    uids[position] = hostile
    with pytest.raises(ValueError, match=f"invalid {position} UID"):
        instance_relpath("PACSNODE", uids["study"], uids["series"], uids["SOP instance"])


def test_instance_relpath_refuses_non_string_uid() -> None:
    with pytest.raises(ValueError, match="invalid SOP instance UID"):
        instance_relpath("PACSNODE", "1.2", "1.2.3", None)  # type: ignore[arg-type]


# --- inside --------------------------------------------------------------------------------


def test_inside_returns_the_absolute_path_under_root(tmp_path: Path) -> None:
    relpath = instance_relpath("PACSNODE", "1.2", "1.2.3", "1.2.3.4")
    path = inside(tmp_path, relpath)
    assert path == tmp_path.resolve() / "PACSNODE" / "1.2" / "1.2.3" / "1.2.3.4.dcm"
    assert path.is_absolute()


def test_inside_normalises_harmless_dot_dot(tmp_path: Path) -> None:
    assert inside(tmp_path, "a/../b/c.dcm") == tmp_path.resolve() / "b" / "c.dcm"


def test_inside_accepts_a_relative_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert inside(Path("store"), "x/y.dcm") == tmp_path.resolve() / "store" / "x" / "y.dcm"


@pytest.mark.parametrize(
    "relpath",
    ["..", "../x.dcm", "a/../../x.dcm", "a/b/../../../x", "/etc/passwd", "../store2/x.dcm"],
)
def test_inside_refuses_escapes(tmp_path: Path, relpath: str) -> None:
    root = tmp_path / "store"
    root.mkdir()
    with pytest.raises(ValueError, match="outside the storage root"):
        inside(root, relpath)


def test_inside_refuses_a_symlink_leading_out(tmp_path: Path) -> None:
    root = tmp_path / "store"
    outside = tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    os.symlink(outside, root / "link")
    with pytest.raises(ValueError, match="outside the storage root"):
        inside(root, "link/x.dcm")


def test_inside_follows_a_symlinked_root(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    alias = tmp_path / "alias"
    os.symlink(real, alias)
    assert inside(alias, "a/b.dcm") == real.resolve() / "a" / "b.dcm"
