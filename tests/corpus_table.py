"""Print the hostile-input corpus of tests/test_hostile_corpus.py as a markdown table, for docs/SAFETY.md.

Run from the project directory: `python tests/corpus_table.py`
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_hostile_corpus import CASES, EXTRA_ROWS, outcome


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table() -> str:
    lines = [
        "| # | case | hostile input | `--keep` | expected (steps kept / deleted / incomplete: reason) | today |",
        "|---:|---|---|---|---|---|",
    ]
    rows = [(c.name, c.what, c.keep, outcome(c), c.defect is not None) for c in CASES] + EXTRA_ROWS
    for number, (name, what, keep, expected, defect) in enumerate(rows, start=1):
        status = "**fails: known defect**" if defect else "passes"
        lines.append(f"| {number} | `{name}` | {cell(what)} | `{keep}` | {cell(expected)} | {status} |")
    passing = sum(1 for row in rows if not row[4])
    lines.append("")
    lines.append(f"{len(rows)} cases: {passing} pass, {len(rows) - passing} fail today (known defects, xfail strict).")
    return "\n".join(lines)


def main() -> int:
    print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
