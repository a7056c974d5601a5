"""Side-by-side Markdown table of several ``bundled_quality.py`` reports (e.g. before/after a training change).

    python benchmarks/compare_quality.py "unconditional=a/quality.json" "conditioned=b/quality.json" \
        --out docs/results/control/before_after/table.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def row(name: str, q: dict) -> str:
    vols = " / ".join(f"{100 * r['relative_difference']:+.1f} %" for r in q["volume"].values())
    vol_ok = all(r["within_20pct"] for r in q["volume"].values())
    a = q["all_classes_present"]
    m = q["mean_intensity"]
    inten = " / ".join(f"{m['synthetic'][n]:.3f}" for n in q["volume"])
    return (f"| {name} | {vols} ({'met' if vol_ok else 'NOT met'}) | {100 * a['synthetic']:.0f} % | {inten} | "
            f"{'met' if m['same_order'] else 'not met'} |")


def table(reports: dict[str, dict]) -> str:
    first = next(iter(reports.values()))
    classes = list(first["volume"])
    real = first["mean_intensity"]["real"]
    lines = [f"| model | median volume vs real, {' / '.join(classes)} (±20 %) | all classes present (≥ 90 %) | "
             f"mean intensity {' / '.join(classes)} (real {' / '.join(f'{real[n]:.3f}' for n in classes)}) | "
             "intensity order as real |", "|---|---|---|---|---|"]
    lines += [row(name, q) for name, q in reports.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", nargs="+", help="NAME=path/to/quality.json, in table order")
    ap.add_argument("--out", default=None, help="write the table here too")
    args = ap.parse_args()
    reports = {}
    for item in args.reports:
        name, sep, path = item.partition("=")
        if not sep:
            ap.error(f"reports look like NAME=path/to/quality.json, got {item!r}")
        reports[name] = json.loads(Path(path).read_text())
    text = table(reports)
    if args.out:
        Path(args.out).write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
