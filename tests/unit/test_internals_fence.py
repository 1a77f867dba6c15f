"""The fence around library internals (node/internals/README.md): outside node/internals/, no
module of node/ or hierarchy/ imports, reads, writes or overrides a private (`_name`) name of
pynetdicom, pydicom, psycopg or grpc, and none swaps an object's class.

What counts as a use, found by walking each module's syntax tree:
- an import whose module path or imported name has a `_` part (`from pynetdicom import _config`,
  `from pydicom._uid_dict import ...`);
- `X._name` (or deeper, `psycopg.errors._WaitTimeout`) where `X` was imported from one of the
  libraries;
- `self._name`, or `def _name`, in a class that subclasses a class of the libraries, where
  that class (or a library class above it) has `_name` in its source;
- `obj._name` (or `getattr(obj, "_name")`) on any other object, where one of the libraries has
  `_name` in its source and the node's own code never defines it (so our `self._lock` stays
  ours);
- an assignment to `obj.__class__`.
hierarchy/rpc/ is left out: grpcio-tools generates it (it imports `grpc._utilities`).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIBRARIES = ("pynetdicom", "pydicom", "psycopg", "grpc")
FENCED = (ROOT / "node" / "internals",)
GENERATED = (ROOT / "hierarchy" / "rpc",)
_PRIVATE_TOKEN = re.compile(r"(?<![A-Za-z0-9_])_[A-Za-z][A-Za-z0-9_]*")
# Names with a leading underscore that are public API elsewhere, and also appear in the
# libraries' sources: SQLAlchemy's Row._mapping, namedtuple's methods.
PUBLIC_ELSEWHERE = frozenset({"_mapping", "_asdict", "_fields", "_replace", "_make"})


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _library_of(module: str) -> str | None:
    top = module.split(".")[0]
    return top if top in LIBRARIES else None


@cache
def library_private_names() -> frozenset[str]:
    """Every `_name` token in the libraries' own sources."""
    names: set[str] = set()
    for lib in LIBRARIES:
        package = Path(importlib.import_module(lib).__file__).parent
        for path in package.rglob("*.py"):
            names.update(_PRIVATE_TOKEN.findall(path.read_text(errors="replace")))
    return frozenset(names)


@cache
def _class_private_names(cls: type) -> frozenset[str]:
    """The `_name`s in the source of a library class and the library classes above it."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if _library_of(klass.__module__ or "") is None:
            continue
        try:
            names.update(_PRIVATE_TOKEN.findall(inspect.getsource(klass)))
        except (OSError, TypeError):  # a C-implemented class (grpc's cygrpc) has no source
            names.update(n for n in vars(klass) if _is_private(n))
    return frozenset(names)


def scanned_modules() -> list[Path]:
    paths = []
    for top in ("node", "hierarchy"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if any(path.is_relative_to(d) for d in (*FENCED, *GENERATED)):
                continue
            paths.append(path)
    return paths


@cache
def own_private_names() -> frozenset[str]:
    """`_name`s the node's own code defines: methods, attributes set on `self`, module-level
    functions, classes and variables (outside node/internals/)."""
    names: set[str] = set()
    for path in scanned_modules():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                    names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return frozenset(n for n in names if _is_private(n))


def _imports(tree: ast.Module) -> dict[str, str]:
    """Local name -> the dotted name of what it was imported as (`AE` -> `pynetdicom.AE`)."""
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                local = alias.asname or alias.name.split(".")[0]
                bound[local] = alias.name if alias.asname else local
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return bound


def _resolve(dotted: str) -> object | None:
    module, _, attr = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError):
        try:
            return importlib.import_module(dotted)
        except ImportError:
            return None


def _attribute_base(node: ast.Attribute) -> str | None:
    value = node.value
    while isinstance(value, ast.Attribute):
        value = value.value
    return value.id if isinstance(value, ast.Name) else None


def violations(path: Path) -> Iterator[str]:
    source = path.read_text()
    tree = ast.parse(source, str(path))
    rel = path.relative_to(ROOT)
    imported = _imports(tree)
    bound = {local: dotted for local, dotted in imported.items() if _library_of(dotted)}
    lib_names = library_private_names() - own_private_names() - PUBLIC_ELSEWHERE

    def at(node: ast.AST, what: str) -> str:
        return f"{rel}:{node.lineno}: {what}"

    # Classes that subclass a library class (directly or through classes of ours): the
    # private names they must not touch.
    module = ".".join(rel.with_suffix("").parts)
    subclass_names: dict[ast.ClassDef, frozenset[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            cls = _resolve(f"{module}.{node.name}") if rel.stem != "__main__" else None
            if isinstance(cls, type):
                names = set(_class_private_names(cls))
            else:  # not importable: its bases, as imported
                names = set()
                for base in node.bases:
                    head, _, rest = ast.unparse(base).partition(".")
                    if head in imported:
                        found = _resolve(imported[head] + ("." + rest if rest else ""))
                        if isinstance(found, type):
                            names |= _class_private_names(found)
            if names:
                subclass_names[node] = frozenset(names)

    for cls_node, names in subclass_names.items():
        for node in ast.walk(cls_node):
            if (isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                    and node.name in names):
                yield at(node, f"{cls_node.name} overrides the library's {node.name}")
            elif (isinstance(node, ast.Attribute) and node.attr in names
                  and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                yield at(node, f"{cls_node.name} uses the library's self.{node.attr}")

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and _library_of(node.module):
            parts = node.module.split(".") + [a.name for a in node.names]
            if any(_is_private(p) for p in parts):
                yield at(node, f"imports a private name: from {node.module} import "
                         + ", ".join(a.name for a in node.names))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if _library_of(alias.name) and any(map(_is_private, alias.name.split("."))):
                    yield at(node, f"imports a private module: {alias.name}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
              and isinstance(node.args[1].value, str) and node.args[1].value in lib_names):
            yield at(node, f"private library name by {node.func.id}: {ast.unparse(node)}")
        elif isinstance(node, ast.Attribute):
            if node.attr == "__class__" and isinstance(node.ctx, ast.Store):
                yield at(node, f"swaps the class of {ast.unparse(node.value)}")
            if not _is_private(node.attr):
                continue
            base = _attribute_base(node)
            if base in bound:
                yield at(node, f"private name of {bound[base]}: {ast.unparse(node)}")
            elif base in ("self", "cls") and isinstance(node.value, ast.Name):
                continue  # our own attribute, or caught above in a library subclass
            elif (base in imported and isinstance(node.value, ast.Name)
                  and inspect.ismodule(_resolve(imported[base]))):
                continue  # a module-level name of another module (os._exit, our own)
            elif node.attr in lib_names:
                yield at(node, f"private library name on an object: {ast.unparse(node)}")


def test_no_private_library_name_outside_node_internals():
    found = [v for path in scanned_modules() for v in violations(path)]
    assert not found, (
        "private names of pynetdicom/pydicom/psycopg/grpc used outside node/internals/ "
        "(move the use into node/internals/ and list it in its README):\n" + "\n".join(found))


def test_node_internals_readme_names_every_private_name_used_there():
    """The list in node/internals/README.md is what the package uses, found as above."""
    readme = (ROOT / "node" / "internals" / "README.md").read_text()
    private = library_private_names()
    used = {name for path in sorted(FENCED[0].glob("*.py")) for found in violations(path)
            for name in _PRIVATE_TOKEN.findall(found.partition(": ")[2]) if name in private}
    missing = sorted(name for name in used if f"`{name}`" not in readme
                     and not re.search(rf"`[^`]*\.{name}\b[^`]*`", readme))
    assert used and not missing, f"not in node/internals/README.md: {missing}"


def test_every_module_of_node_internals_has_a_place_in_the_layers_contract():
    """pyproject.toml's import contract names node/internals/' modules one by one (the
    pynetdicom machinery high, the leaves that import nothing of the node low): a new module
    must be given its place, or import-linter would not check it."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"][
        "contracts"]
    layers = " ".join(layer for contract in contracts for layer in contract.get("layers", []))
    named = set(re.findall(r"\binternals\.(\w+)", layers))
    modules = {path.stem for path in FENCED[0].glob("*.py") if path.stem != "__init__"}
    assert named == modules, (f"not in the contract: {sorted(modules - named)}; "
                              f"no such module: {sorted(named - modules)}")
