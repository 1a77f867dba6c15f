"""The settings schema's vocabulary: what a key means and which values it takes.

node/config.py declares every key once with `setting(...)`; from that declaration come the
checks a settings file passes (`check_type`, `check_value`), `pacsnode config example` and
docs/reference/settings.md (node/config_docs.py). Pure functions, no I/O: association
processes import this with the settings.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Spec:
    """One key's documentation and the values it takes."""

    text: str  # what the key does, one or two sentences (docs and `config example`)
    unit: str = ""  # "seconds", "bytes", "%"
    choices: tuple[str, ...] = ()  # the allowed values (of each item, for a list)
    minimum: float | None = None  # smallest allowed value
    maximum: float | None = None  # largest allowed value
    positive: bool = False  # above 0 (timeouts, intervals)
    zero: str = ""  # 0 is allowed besides the range, and means this
    non_empty: bool = False  # a list needs at least one item
    cli: str = ""  # the command option that overrides the key for one partition or device
    shown_default: str = ""  # the default in words, where the value alone does not say it
    secret: bool = False  # masked wherever settings are printed
    see: tuple[str, str] = ("", "")  # (title, page under docs/) that explains the key in use


def setting(default: Any, text: str, **spec: Any) -> Any:
    """A dataclass field of an immutable default, with its Spec."""
    return field(default=default, metadata=described(text, **spec))


def described(text: str, **spec: Any) -> dict[str, Spec]:
    """The metadata of a field declared with `field(default_factory=...)` (a list)."""
    return {"spec": Spec(text, **spec)}


def spec_of(item: dataclasses.Field[Any]) -> Spec:
    spec = item.metadata.get("spec")
    if spec is None:
        raise TypeError(f"setting {item.name} has no Spec: declare it with setting()")
    return spec


def describe_type(kind: Any) -> str:
    """`int`, `float`, `list of str`: the name a refusal and the reference use."""
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        return f"list of {item.__name__}"
    return str(kind.__name__)


def check_type(key: str, kind: Any, value: Any) -> Any:
    """The value as the key's type (an integer where a float is expected becomes a float),
    or a message naming the key, the type and what was given."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    origin = typing.get_origin(kind) or kind
    # bool is an int to Python, never to a settings file
    if not isinstance(value, origin) or (origin in (int, float) and isinstance(value, bool)):
        raise ValueError(f"{key} must be {origin.__name__}, got {type(value).__name__}"
                         f" {_shown(value)}")
    if origin is list:
        (item_kind,) = typing.get_args(kind)
        for i, item in enumerate(value):
            if not isinstance(item, item_kind) or isinstance(item, bool):
                raise ValueError(f"{key}[{i}] must be {item_kind.__name__}, got"
                                 f" {type(item).__name__} {_shown(item)}")
    return value


def check_value(key: str, spec: Spec, value: Any) -> None:
    """A message naming the key and the allowed values when `value` is not one of them."""
    if isinstance(value, list):
        if spec.non_empty and not value:
            raise ValueError(f"{key} must name at least one value")
        wrong = [item for item in value if spec.choices and item not in spec.choices]
        if wrong:
            raise ValueError(f"{key} must name values from {', '.join(spec.choices)}, got"
                             f" {_shown(value)}")
        return
    if spec.choices and value not in spec.choices:
        raise ValueError(f"{key} must be {allowed(spec)}, got {_shown(value)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not in_range(spec,
                                                                                        value):
        raise ValueError(f"{key} must be {allowed(spec)}, got {_shown(value)}")


def in_range(spec: Spec, value: float) -> bool:
    if spec.zero and value == 0:
        return True
    return ((not spec.positive or value > 0)
            and (spec.minimum is None or value >= spec.minimum)
            and (spec.maximum is None or value <= spec.maximum))


def allowed(spec: Spec) -> str:
    """The allowed values in words ('' when any value of the type is)."""
    if spec.choices:
        quoted = [repr(c) for c in spec.choices]
        return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
    low = (f"{_number(spec.minimum)}" if spec.minimum is not None else "")
    high = (f"{_number(spec.maximum)}" if spec.maximum is not None else "")
    if spec.positive and high:
        words = f"above 0 and at most {high}"
    elif spec.positive:
        words = "positive"
    elif low and high:
        words = f"{low}-{high}"
    elif low:
        words = f"at least {low}"
    elif high:
        words = f"at most {high}"
    else:
        return ""
    if spec.unit == "%":
        words = f"a percentage, {words}"
    elif spec.unit == "bytes":
        words = f"{words} bytes"
    if spec.zero:
        words = f"0 ({spec.zero}) or {words}"
    return words


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _shown(value: Any) -> str:
    """A given value in a refusal, cut short: a settings file can hold long lists."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
