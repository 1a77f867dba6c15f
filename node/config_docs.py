"""The settings schema (node/config.py) written out for people: `pacsnode config example`, a
commented TOML file with every key at its default, and docs/reference/settings.md
(scripts/gen_settings_docs.py writes it; a test fails when the committed page is stale)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import textwrap
import typing
from collections.abc import Callable, Iterator
from typing import Any

from pydicom.uid import UID

from node.config import SECTIONS
from node.config_schema import Spec, allowed, describe_type, spec_of

WIDTH = 99
REFERENCE_PAGE = "docs/reference/settings.md"


def keys(cls: type) -> Iterator[tuple[str, Any, Any, Spec]]:
    """(name, type, default, spec) of each key of a section, in declaration order."""
    kinds = typing.get_type_hints(cls)
    default = cls()
    for item in dataclasses.fields(cls):
        yield item.name, kinds[item.name], getattr(default, item.name), spec_of(item)


def toml_value(value: Any) -> str:
    """A default as TOML writes it (JSON's string escapes are TOML's basic-string ones)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def _notes(spec: Spec) -> list[str]:
    """Unit, allowed values, the default in words and the overriding option, as sentences."""
    notes = []
    words = allowed(spec)
    unit = f" ({spec.unit})" if spec.unit in ("seconds", "days") else ""
    if words:
        notes.append(f"Allowed: {words}{unit}.")
    elif spec.unit:
        notes.append(f"In {spec.unit}.")
    if spec.shown_default:
        notes.append(f"Default: {spec.shown_default}.")
    if spec.cli:
        notes.append(f"Per {spec.cli.split()[0]}: `pacsnode {spec.cli}`.")
    return notes


def _see(spec: Spec, markdown: bool) -> list[str]:
    title, page = spec.see
    if not page:
        return []
    return [f"See [{title}](../{page})." if markdown else f"See docs/{page}."]


def _comment(text: str, indent: str = "") -> list[str]:
    return textwrap.wrap(text, WIDTH - len(indent) - 2, initial_indent=f"{indent}# ",
                         subsequent_indent=f"{indent}# ", break_on_hyphens=False)


def _toml_key(name: str, value: Any) -> list[str]:
    if name == "transfer_syntaxes":  # one per line, named: UIDs alone say nothing
        lines = [f"{name} = ["]
        lines += [f"    {toml_value(uid)},  # {UID(uid).name}" for uid in value]
        return [*lines, "]"]
    return [f"{name} = {toml_value(value)}"]


def example_toml() -> str:
    """A settings file with every key at its default and what it does; load() reads it as the
    defaults."""
    lines = [
        "# pacsnode settings: every key at its default (printed by `pacsnode config example`).",
        "# Every key is optional: keep only those you change, so that the others follow the",
        "# defaults of the installed version. Relative paths are relative to this file.",
        f"# Reference: {REFERENCE_PAGE}; check a file with `pacsnode config check FILE`.",
    ]
    for section, cls in SECTIONS.items():
        lines += ["", f"[{section}]", *_comment(inspect.cleandoc(cls.__doc__ or ""))]
        for name, _kind, default, spec in keys(cls):
            lines += ["", *_comment(" ".join([spec.text, *_notes(spec), *_see(spec, False)])),
                      *_toml_key(name, default)]
    return "\n".join(lines) + "\n"


def settings_toml(settings: Any, shown: Callable[[str, Spec, Any], Any]) -> str:
    """The values of `settings` as a settings file, each value as `shown(key, spec, value)`
    gives it (`pacsnode config check` masks secrets there)."""
    lines: list[str] = []
    for section in SECTIONS:
        values = getattr(settings, section)
        lines += ["", f"[{section}]"]
        for item in dataclasses.fields(values):
            value = shown(f"{section}.{item.name}", spec_of(item), getattr(values, item.name))
            lines += _toml_key(item.name, value)
    return "\n".join(lines[1:]) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _shown_default(default: Any, spec: Spec) -> str:
    return spec.shown_default or f"`{toml_value(default)}`"


def reference_markdown() -> str:
    """docs/reference/settings.md: one table per section."""
    lines = [
        "# Settings reference",
        "",
        "<!-- Generated from node/config.py by scripts/gen_settings_docs.py; do not edit. -->",
        "",
        "`pacsnode serve --config node.toml` (or `PACSNODE_CONFIG=node.toml`) reads a TOML"
        " file; every key is optional and relative paths are relative to the file. An unknown"
        " section or key, or a value of the wrong type or out of range, stops the node with a"
        " message naming the key. `pacsnode config example` prints a file with every key at"
        " its default and what it does; `pacsnode config check node.toml` validates a file and"
        " prints the settings in effect. `examples/site-node.toml` is a commented site"
        " configuration.",
    ]
    for section, cls in SECTIONS.items():
        lines += ["", f"## [{section}]", "", inspect.cleandoc(cls.__doc__ or ""), "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]
        for name, kind, default, spec in keys(cls):
            notes = [n for n in _notes(spec) if not n.startswith("Default:")]
            meaning = " ".join([spec.text, *notes, *_see(spec, True)])
            lines.append(f"| `{section}.{name}` | {describe_type(kind)} |"
                         f" {_cell(_shown_default(default, spec))} | {_cell(meaning)} |")
    return "\n".join(lines) + "\n"
