"""Which devices an instance is forwarded to: a pure decision over the device table.

Every instance stored on a partition goes to each enabled PARENT and BACKUP_TARGET device of
that partition (or of every partition) that has forwarding on; a device's rules narrow that
down. VIEWER devices get only what their rules select (auto-routing). Rules, one per line,
all of which must hold; a line holds when the attribute is any of its values:

    modality CT MR
    calling-ae CT1 CT2
    sop-class 1.2.840.10008.5.1.4.1.1.2
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

RULE_KEYS = {"modality": "modality", "calling-ae": "calling_ae", "sop-class": "sop_class"}
# Values of db.models.DeviceType (a StrEnum, equal to these strings): the decision needs no
# schema import (tests/unit/test_routing.py checks they are DeviceType's).
ROUTED_TYPES = frozenset({"PARENT", "BACKUP_TARGET"})
AUTO_ROUTED_TYPE = "VIEWER"


class RuleError(ValueError):
    """A forwarding rule that cannot be used; the message names the line."""


@dataclass(frozen=True)
class Rule:
    key: str  # modality | calling_ae | sop_class
    values: frozenset[str]


@dataclass(frozen=True)
class Route:
    device_id: int
    device_type: str
    partition_id: int | None  # None: every partition
    enabled: bool
    forward: bool
    rules: tuple[Rule, ...]


@dataclass(frozen=True)
class Received:
    partition_id: int
    modality: str
    calling_ae: str
    sop_class: str


def parse_rules(text: str) -> tuple[Rule, ...]:
    rules = []
    for line_no, raw in enumerate(text.splitlines(), start=1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        key = words[0].lower()
        if key not in RULE_KEYS:
            raise RuleError(f"line {line_no}: unknown rule {words[0]!r} "
                            f"(use {', '.join(RULE_KEYS)})")
        if len(words) < 2:
            raise RuleError(f"line {line_no}: {key} needs at least one value")
        values = [w.upper() if key == "modality" else w for w in words[1:]]
        rules.append(Rule(RULE_KEYS[key], frozenset(values)))
    return tuple(rules)


def _holds(rule: Rule, received: Received) -> bool:
    value = getattr(received, rule.key)
    return (value.upper() if rule.key == "modality" else value) in rule.values


def destinations(routes: Iterable[Route], received: Received) -> list[int]:
    """The ids of the devices `received` is forwarded to."""
    out = []
    for route in routes:
        if not (route.enabled and route.forward):
            continue
        if route.partition_id is not None and route.partition_id != received.partition_id:
            continue
        if route.device_type in ROUTED_TYPES:
            selected = all(_holds(rule, received) for rule in route.rules)
        elif route.device_type == AUTO_ROUTED_TYPE:
            selected = bool(route.rules) and all(_holds(r, received) for r in route.rules)
        else:
            selected = False
        if selected:
            out.append(route.device_id)
    return out
