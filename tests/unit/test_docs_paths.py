"""The documentation names modules that exist: a module moved or renamed without its pages
updated fails here (the performance journal and the changelog are history and keep old paths)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HISTORY = {ROOT / "docs" / "performance" / "journal.md", ROOT / "CHANGELOG.md"}
PACKAGES = ("scp", "scu", "storage", "db", "forwarding", "query", "importing", "ingest",
            "policy", "processes", "internals", "cli")
MODULE = re.compile(r"\b(?:node/)?((?:" + "|".join(PACKAGES) + r")/[a-z_]+\.py)\b")


def pages() -> list[Path]:
    found = [ROOT / "README.md", ROOT / "node" / "internals" / "README.md",
             *sorted((ROOT / "docs").rglob("*.md"))]
    return [page for page in found if page not in HISTORY]


def test_every_module_a_page_names_exists() -> None:
    missing = sorted({f"{page.relative_to(ROOT)}: {match}"
                      for page in pages()
                      for match in MODULE.findall(page.read_text(encoding="utf-8"))
                      if not (ROOT / "node" / match).is_file()})
    assert not missing, "pages name modules that do not exist:\n" + "\n".join(missing)


def test_the_check_sees_the_pages_that_name_modules() -> None:
    # Guards the pattern itself: the architecture and internals pages name many modules.
    named = [MODULE.findall(page.read_text(encoding="utf-8")) for page in pages()]
    assert sum(len(n) for n in named) >= 20
