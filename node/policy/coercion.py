"""Per-device coercion rules: a small language applied to every C-STORE from a device.

One rule per line, applied in order (docs/how-to/coercion.md); a line starting with `#` is a
comment. Arguments are separated by spaces; a value with spaces is quoted ("..." or '...');
backslashes are literal.

    set <attr> <value>                 set (or create) the element
    prefix <attr> <value>              prepend to a present, non-empty value
    suffix <attr> <value>              append to a present, non-empty value
    copy <attr> from <source-attr>     copy the value of another element, if that one is present
    replace <attr> <regex> <text>      regex substitution on a present value (\\1 refers back)
    remove <attr>                      delete the element

<attr> is a DICOM keyword (PatientName) or a tag ((0010,0010) or 00100010). Only top-level
alphanumeric elements can be coerced; UIDs cannot, since they identify the object and name its
files. A rule that is not valid is refused when it is configured, never when an image arrives.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import validate_value

from node.dicomtext import element_text

# Alphanumeric VRs that are safe to coerce; UI is left out on purpose (see module docstring).
COERCIBLE_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UR", "UT"}
)
OPERATIONS = ("set", "prefix", "suffix", "copy", "replace", "remove")


class CoercionError(ValueError):
    """A rule that cannot be used; the message names the line and the problem."""


@dataclass(frozen=True)
class Rule:
    op: str
    tag: BaseTag
    vr: str
    value: str = ""
    source: BaseTag | None = None
    pattern: re.Pattern[str] | None = None

    @property
    def keyword(self) -> str:
        return keyword_for_tag(self.tag) or str(self.tag)


def _attribute(token: str, line_no: int) -> tuple[BaseTag, str]:
    tag: BaseTag | None = None
    text = token.strip()
    hex_form = re.fullmatch(r"\(?([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})\)?", text)
    if hex_form:
        tag = Tag(int(hex_form.group(1), 16), int(hex_form.group(2), 16))
    else:
        number = tag_for_keyword(text)
        if number is not None:
            tag = Tag(number)
    if tag is None:
        raise CoercionError(f"line {line_no}: {token!r} is not a DICOM keyword or tag")
    try:
        vr = dictionary_VR(tag)
    except KeyError as exc:
        raise CoercionError(f"line {line_no}: {token} is not in the DICOM dictionary") from exc
    if vr not in COERCIBLE_VRS:
        raise CoercionError(
            f"line {line_no}: {token} has VR {vr}; only alphanumeric elements can be coerced "
            f"({', '.join(sorted(COERCIBLE_VRS))})"
        )
    return tag, vr


def _check_value(vr: str, value: str, token: str, line_no: int) -> None:
    try:
        validate_value(vr, value, 2)  # 2: raise on an invalid value
    except ValueError as exc:
        raise CoercionError(
            f"line {line_no}: {value!r} is not a valid {vr} for {token}: {exc}"
        ) from None


def parse_rules(text: str) -> list[Rule]:
    """Parse and validate a rule list; raises CoercionError naming the offending line."""
    rules: list[Rule] = []
    for line_no, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            words = _split(line)
        except ValueError as exc:
            raise CoercionError(f"line {line_no}: {exc}") from exc
        if not words:
            continue
        op, args = words[0].lower(), words[1:]
        if op not in OPERATIONS:
            raise CoercionError(
                f"line {line_no}: unknown operation {words[0]!r} (use {', '.join(OPERATIONS)})"
            )
        rules.append(_rule(op, args, line_no))
    return rules


def _split(line: str) -> list[str]:
    """Split on spaces, honouring quotes; backslashes stay literal (regexes need them)."""
    lexer = shlex.shlex(line, posix=True)
    lexer.whitespace_split = True
    lexer.escape = ""
    lexer.commenters = ""
    return list(lexer)


def _rule(op: str, args: list[str], line_no: int) -> Rule:
    expected = {"set": 2, "prefix": 2, "suffix": 2, "copy": 3, "replace": 3, "remove": 1}[op]
    if len(args) != expected:
        usage = {
            "set": "set <attr> <value>",
            "prefix": "prefix <attr> <value>",
            "suffix": "suffix <attr> <value>",
            "copy": "copy <attr> from <source-attr>",
            "replace": "replace <attr> <regex> <replacement>",
            "remove": "remove <attr>",
        }[op]
        raise CoercionError(f"line {line_no}: expected `{usage}`")
    tag, vr = _attribute(args[0], line_no)
    if op == "set":
        _check_value(vr, args[1], args[0], line_no)
        return Rule(op, tag, vr, value=args[1])
    if op in ("prefix", "suffix"):
        return Rule(op, tag, vr, value=args[1])
    if op == "copy":
        if args[1].lower() != "from":
            raise CoercionError(f"line {line_no}: expected `copy <attr> from <source-attr>`")
        source, _ = _attribute(args[2], line_no)
        return Rule(op, tag, vr, source=source)
    if op == "replace":
        try:
            pattern = re.compile(args[1])
        except re.error as exc:
            raise CoercionError(f"line {line_no}: invalid regular expression: {exc}") from exc
        try:
            pattern.sub(args[2], "")
        except (re.error, IndexError) as exc:
            raise CoercionError(f"line {line_no}: invalid replacement: {exc}") from exc
        return Rule(op, tag, vr, value=args[2], pattern=pattern)
    return Rule(op, tag, vr)


def apply_rules(rules: list[Rule], ds: Dataset) -> list[str]:
    """Apply `rules` to `ds` in order; returns the keywords that changed."""
    changed: list[str] = []
    for rule in rules:
        current = element_text(ds, rule.tag)
        new: str | None
        if rule.op == "remove":
            if current is not None:
                del ds[rule.tag]
                changed.append(rule.keyword)
            continue
        if rule.op == "set":
            new = rule.value
        elif rule.op == "copy":
            assert rule.source is not None
            new = element_text(ds, rule.source)
        elif not current:
            new = None  # prefix/suffix/replace leave an absent or empty value alone
        elif rule.op == "prefix":
            new = rule.value + current
        elif rule.op == "suffix":
            new = current + rule.value
        else:
            assert rule.pattern is not None
            new = rule.pattern.sub(rule.value, current)
        if new is None or new == current:
            continue
        ds.add_new(rule.tag, rule.vr, new)
        changed.append(rule.keyword)
    return changed
