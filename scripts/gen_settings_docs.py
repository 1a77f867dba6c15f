#!/usr/bin/env python3
"""Write docs/reference/settings.md from the settings schema (run after changing a setting).

    python scripts/gen_settings_docs.py           # write the page
    python scripts/gen_settings_docs.py --check   # exit 1 if it is not current (CI)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's node/, not another installed copy

from node.config_docs import REFERENCE_PAGE, reference_markdown  # noqa: E402

PAGE = ROOT / REFERENCE_PAGE


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help=f"compare with {REFERENCE_PAGE} instead of writing")
    args = parser.parse_args()
    text = reference_markdown()
    if args.check:
        if not PAGE.is_file() or PAGE.read_text(encoding="utf-8") != text:
            print(f"{REFERENCE_PAGE} is out of date; run python scripts/gen_settings_docs.py",
                  file=sys.stderr)
            return 1
        print(f"{REFERENCE_PAGE} is current")
        return 0
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(text, encoding="utf-8")
    print(f"wrote {REFERENCE_PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
