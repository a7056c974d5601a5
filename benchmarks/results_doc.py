"""Assemble docs/results.md from benchmarks/results_template.md and the downstream reports in benchmarks/results/.

    python benchmarks/results_doc.py

``{{NAME}}`` is replaced by the tables of ``benchmarks/results/NAME.md`` (everything after its first paragraph)
and ``{{NAME:wall}}`` by the run count and training time of ``NAME.json``; the PNG plots are copied to
docs/results/downstream/.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FIGURES = ROOT / "docs" / "results" / "downstream"


def tables(name: str) -> str:
    """The tables and footer of a downstream report (its title and settings paragraph dropped)."""
    parts = (RESULTS / f"{name}.md").read_text().split("\n\n", 2)
    return parts[2].strip()


def wall(name: str) -> str:
    runs = json.loads((RESULTS / f"{name}.json").read_text())["runs"].values()
    return f"{len(runs)} runs, {sum(r['seconds'] for r in runs) / 60:.0f} min of training time"


def render(template: str) -> str:
    def sub(m: re.Match) -> str:
        name, _, what = m.group(1).partition(":")
        if not (RESULTS / f"{name}.json").is_file():
            raise FileNotFoundError(f"{{{{{m.group(1)}}}}} needs benchmarks/results/{name}.json; run the downstream "
                                    "benchmark first.")
        if (RESULTS / f"{name}.png").is_file():
            FIGURES.mkdir(parents=True, exist_ok=True)
            shutil.copy(RESULTS / f"{name}.png", FIGURES / f"{name}.png")
        return wall(name) if what == "wall" else tables(name)

    return re.sub(r"\{\{([A-Za-z0-9_]+(?::wall)?)\}\}", sub, template)


def main() -> None:
    out = ROOT / "docs" / "results.md"
    out.write_text(render((ROOT / "benchmarks" / "results_template.md").read_text()))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
