"""The settings schema (node/config.py, node/config_schema.py): every key declared with its
meaning and allowed values, every wrong value refused naming the key, and the documents made
from it (`pacsnode config example`, examples/site-node.toml) readable as settings."""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from pathlib import Path
from typing import Any

import pytest

from node import config
from node.config import DEVICE_TYPES, ENV_CONFIG, SECTIONS, ConfigError, load
from node.config_docs import example_toml
from node.config_schema import Spec, check_value, spec_of
from node.db.models import DeviceType

ROOT = Path(__file__).parents[2]


@pytest.fixture(autouse=True)
def _no_config_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_CONFIG, raising=False)


def every_key() -> list[tuple[str, str, Any, Spec]]:
    """(section, key, type, spec) of every setting."""
    found = []
    for section, cls in SECTIONS.items():
        kinds = typing.get_type_hints(cls)
        for item in dataclasses.fields(cls):
            found.append((section, item.name, kinds[item.name], spec_of(item)))
    return found


KEYS = every_key()
BOUNDED = [(s, k, t, spec) for s, k, t, spec in KEYS
           if spec.positive or spec.minimum is not None or spec.maximum is not None]


def test_every_key_is_declared_with_a_sentence_saying_what_it_does() -> None:
    assert len(KEYS) > 90
    for section, key, _kind, spec in KEYS:
        assert spec.text.endswith((".", "...")) and len(spec.text) > 5, f"{section}.{key}"


def test_the_archive_device_types_are_the_device_tables() -> None:
    assert set(DEVICE_TYPES) == {t.value for t in DeviceType} - {"SELF"}


def _write(folder: Path, section: str, key: str, toml_value: str) -> Path:
    path = folder / "node.toml"
    path.write_text(f"[{section}]\n{key} = {toml_value}\n", encoding="utf-8")
    return path


def _wrong_type(kind: Any) -> str:
    """A TOML value of another type than `kind`."""
    return "true" if kind is not bool else '"yes"'


@pytest.mark.parametrize(("section", "key", "kind"), [(s, k, t) for s, k, t, _ in KEYS])
def test_a_value_of_the_wrong_type_is_refused_naming_the_key(
        tmp_path: Path, section: str, key: str, kind: Any) -> None:
    with pytest.raises(ConfigError, match=rf"^{section}\.{key} must be \w+, got \w+ "):
        load(_write(tmp_path, section, key, _wrong_type(kind)))


def _outside(spec: Spec) -> list[float]:
    """Values just outside what the spec allows, on each side it bounds."""
    values = []
    if spec.positive:
        values.append(0 if not spec.zero else -1)
        values.append(-0.5)
    if spec.minimum is not None:
        values.append(spec.minimum - 1 if spec.minimum - 1 != 0 or not spec.zero else -1)
    if spec.maximum is not None:
        values.append(spec.maximum + 1)
    return values


@pytest.mark.parametrize(("section", "key", "kind", "spec"), BOUNDED)
def test_a_value_out_of_range_is_refused_naming_the_key_and_the_value(
        tmp_path: Path, section: str, key: str, kind: Any, spec: Spec) -> None:
    for value in _outside(spec):
        given = int(value) if kind is int else float(value)
        with pytest.raises(ConfigError) as refused:
            load(_write(tmp_path, section, key, repr(given)))
        message = str(refused.value)
        assert message.startswith(f"{section}.{key} must be "), message
        assert message.endswith(f"got {given!r}"), message


@pytest.mark.parametrize(("section", "key", "kind", "spec"), BOUNDED)
def test_the_bounds_themselves_are_allowed(section: str, key: str, kind: Any,
                                           spec: Spec) -> None:
    inside = [spec.minimum, spec.maximum, 0 if spec.zero else None,
              1e-3 if spec.positive and kind is float else None]
    for value in [v for v in inside if v is not None]:
        check_value(f"{section}.{key}", spec, kind(value))


@pytest.mark.parametrize(("section", "key", "spec"),
                         [(s, k, spec) for s, k, t, spec in KEYS if spec.choices and t is str])
def test_a_value_that_is_not_one_of_the_choices_is_refused_naming_them(
        tmp_path: Path, section: str, key: str, spec: Spec) -> None:
    with pytest.raises(ConfigError) as refused:
        load(_write(tmp_path, section, key, '"other"'))
    message = str(refused.value)
    assert message.startswith(f"{section}.{key} must be "), message
    assert all(repr(choice) in message for choice in spec.choices), message
    assert message.endswith("got 'other'")


def test_a_list_item_of_the_wrong_type_is_named_with_its_index(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^storage\.archive_device_types\[1\] must be str,"
                                          r" got int 3$"):
        load(_write(tmp_path, "storage", "archive_device_types", '["PARENT", 3]'))


def test_a_long_value_is_shown_cut_short(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        load(_write(tmp_path, "node", "name", "[" + ", ".join(["1"] * 100) + "]"))
    assert str(refused.value).startswith("node.name must be str, got list [1, 1")
    assert len(str(refused.value)) < 120


# --- pacsnode config example ------------------------------------------------------------------


def test_the_example_sets_every_key_and_loads_as_the_defaults(tmp_path: Path) -> None:
    text = example_toml()
    raw = tomllib.loads(text)
    assert {(s, k) for s, table in raw.items() for k in table} == {(s, k) for s, k, _, _ in KEYS}
    path = tmp_path / "example.toml"
    path.write_text(text, encoding="utf-8")
    example, defaults = load(path), load(None)
    for section in SECTIONS:
        assert getattr(example, section) == getattr(defaults, section), section


def test_the_example_says_what_each_key_does_above_it() -> None:
    comments: dict[tuple[str, str], str] = {}
    section, above = "", []
    for line in example_toml().splitlines():
        if line.startswith("# "):
            above.append(line[2:])
        elif line.startswith("["):
            section = line.strip("[]")
        elif " = " in line:
            comments[(section, line.split(" = ")[0])] = " ".join(above)
        if not line.startswith("# "):
            above = []
    for section, key, _kind, spec in KEYS:
        assert comments[(section, key)].startswith(spec.text), (section, key)


# --- examples/site-node.toml --------------------------------------------------------------


def test_the_site_example_loads_and_its_commented_keys_are_known_with_the_right_types(
        tmp_path: Path) -> None:
    """The example is written by hand (a site's choices, not every key): it must load, and a
    key shown commented out must load too once uncommented."""
    text = (ROOT / "examples" / "site-node.toml").read_text(encoding="utf-8")
    assert load(ROOT / "examples" / "site-node.toml").bootstrap_partition.ae_title == "SITEA"
    section, commented = "", []
    for line in text.splitlines():
        header = re.match(r"#?\s*\[(\w+)\]", line)
        if header:
            section = header[1]
        elif re.match(r"#\s*\w+\s*=", line):
            commented.append((section, line.lstrip("# ").split("  #")[0]))
    assert len(commented) > 10
    for section, assignment in commented:
        raw = tomllib.loads(f"[{section}]\n{assignment}\n")
        # type and allowed values only: the files the example names are not on this machine
        for key, value in raw[section].items():
            fields = {f.name: f for f in dataclasses.fields(SECTIONS[section])}
            assert key in fields, f"{section}.{key} in examples/site-node.toml is not a setting"
            checked = config.read_section(section, SECTIONS[section], {key: value})
            check_value(f"{section}.{key}", spec_of(fields[key]), getattr(checked, key))
