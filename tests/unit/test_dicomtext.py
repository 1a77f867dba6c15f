"""Text as matching compares it: case folding of every script, person-name groups."""

from __future__ import annotations

import unicodedata

import pytest

from node.dicomtext import fold, name_groups


@pytest.mark.parametrize(("one", "other"), [
    ("Διονυσιος", "ΔΙΟΝΥΣΙΟΣ"),  # Greek, final sigma included
    ("Buc^Jérôme", "BUC^JÉRÔME"),
    ("buc^jérôme", "Buc^Jérôme"),
    ("Äneas^Rüdiger", "äneas^rüdiger"),
    ("Люкceмбypг", "ЛЮКCEМБYPГ"),  # noqa: RUF001 (the file mixes scripts)
    ("smith^john", "SMITH^JOHN"),
    # The same letter composed and decomposed.
    ("Jérôme", unicodedata.normalize("NFD", "JÉRÔME")),
])
def test_values_that_differ_in_case_fold_alike(one: str, other: str) -> None:
    assert fold(one) == fold(other)


@pytest.mark.parametrize(("one", "other"), [
    ("Jerome", "Jérôme"),  # accents are not case
    ("SMITH", "SMYTH"),
    ("Straße", "STRASSE"),  # sharp s has no one-letter upper case: kept
])
def test_values_that_differ_otherwise_stay_apart(one: str, other: str) -> None:
    assert fold(one) != fold(other)


@pytest.mark.parametrize("text", ["Straße", "ǆemal", "ﬁsh", "İstanbul", "山田^太郎", "a?b*"])
def test_folding_keeps_one_character_per_character(text: str) -> None:
    """A `?` wildcard stands for one character of the stored value, folded or not."""
    assert len(fold(text)) == len(unicodedata.normalize("NFC", text))


def test_scripts_without_case_are_unchanged() -> None:
    for text in ("山田^太郎", "やまだ^たろう", "홍^길동", "قباني^لنزار", "שרון^דבורה"):
        assert fold(text) == text


def test_name_groups_split_groups_then_components() -> None:
    assert name_groups("Yamada^Tarou=山田^太郎=やまだ^たろう") == [
        ["Yamada", "Tarou", "", "", ""], ["山田", "太郎", "", "", ""],
        ["やまだ", "たろう", "", "", ""]]
    assert name_groups("=Buc^Jérôme") == [["", "", "", "", ""], ["Buc", "Jérôme", "", "", ""]]
    assert name_groups("") == [["", "", "", "", ""]]
    # Anything beyond three groups or five components is kept in the last one.
    assert name_groups("a=b=c=d") == [["a", "", "", "", ""], ["b", "", "", "", ""],
                                      ["c=d", "", "", "", ""]]
    assert name_groups("A^B^C^D^E^F") == [["A", "B", "C", "D", "E^F"]]
