"""A C-FIND/C-MOVE/C-GET identifier as matching conditions (PS3.4 C.2.2.2), without a database.

Each key of the identifier is one of: universal (empty: matches everything, only returned),
single value, wildcard (`*`, `?`), range (dates and times: `a-b`, `a-`, `-b`) or a list of UIDs.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from node.dicomtext import element_text, name_groups

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")


class Match(enum.Enum):
    UNIVERSAL = "universal"
    SINGLE = "single"
    WILDCARD = "wildcard"
    RANGE = "range"
    LIST = "list"


@dataclass(frozen=True)
class Condition:
    keyword: str
    match: Match
    values: tuple[str, ...] = ()  # RANGE: (low, high), either may be ''


@dataclass(frozen=True)
class Query:
    level: str
    conditions: tuple[Condition, ...]
    # Every key the requestor sent, in its order: the keys to return.
    return_keys: tuple[str, ...] = field(default_factory=tuple)

    def condition(self, keyword: str) -> Condition | None:
        return next((c for c in self.conditions if c.keyword == keyword), None)


class QueryError(ValueError):
    """An identifier that cannot be answered (the message goes into the Error Comment)."""


RANGE_VRS = frozenset({"DA", "TM", "DT"})
LIST_VRS = frozenset({"UI"})
NO_WILDCARD_VRS = frozenset({"UI", "DA", "TM", "DT", "IS", "DS", "US", "UL", "SS", "SL"})


def condition_for(keyword: str, vr: str, value: str) -> Condition:
    """The condition one key expresses; `value` is the element's text ('' when empty)."""
    text = value.strip()
    if text == "" or (text == "*" and vr not in NO_WILDCARD_VRS):
        return Condition(keyword, Match.UNIVERSAL)
    if vr in LIST_VRS and "\\" in text:
        return Condition(keyword, Match.LIST, tuple(v.strip() for v in text.split("\\") if v))
    if vr in RANGE_VRS and "-" in text:
        low, _, high = text.partition("-")
        if not low and not high:
            return Condition(keyword, Match.UNIVERSAL)
        return Condition(keyword, Match.RANGE, (low.strip(), high.strip()))
    if vr not in NO_WILDCARD_VRS and ("*" in text or "?" in text):
        return Condition(keyword, Match.WILDCARD, (text,))
    return Condition(keyword, Match.SINGLE, (text,))


def parse_identifier(ds: Dataset) -> Query:
    """Conditions and return keys of a query identifier; raises QueryError."""
    level = str(ds.get("QueryRetrieveLevel", "")).strip().upper()
    if level not in LEVELS:
        raise QueryError(f"Query/Retrieve Level {level!r} is not one of {', '.join(LEVELS)}")
    conditions: list[Condition] = []
    keys: list[str] = []
    for element in ds:
        keyword = element.keyword
        if not keyword or keyword in ("QueryRetrieveLevel", "SpecificCharacterSet"):
            continue
        keys.append(keyword)
        if element.VR == "SQ":
            continue  # no sequence attribute is indexed: matched universally, returned empty
        condition = condition_for(keyword, element.VR, element_text(ds, keyword) or "")
        if condition.match is not Match.UNIVERSAL:
            conditions.append(condition)
    return Query(level, tuple(conditions), tuple(keys))


def like_pattern(value: str) -> str:
    """A DICOM wildcard value as an SQL LIKE pattern with backslash as the escape character."""
    out = []
    for ch in value:
        if ch in "\\%_":
            out.append("\\" + ch)
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


def person_name_query(value: str) -> list[tuple[int | None, list[str]]]:
    """What a person-name query asks of the component groups of a stored name: (group index,
    its five components) for each group of the value that constrains anything. A value of one
    group (no '=') is matched against every group of a stored name (index None), so
    `山田^太郎` finds `Yamada^Tarou=山田^太郎`; a value of several groups asks each of its
    groups of the stored name's group in the same place. Empty and `*` components match
    anything, missing trailing ones too."""
    groups = name_groups(value)
    return [(None if len(groups) == 1 else index, components)
            for index, components in enumerate(groups)
            if any(c not in ("", "*") for c in components)]
