"""Table (Markdown) and plot (PNG) of a `benchmarks/downstream.py` results JSON.

    python benchmarks/downstream_report.py benchmarks/results/downstream_hippocampus.json

writes ``<json>.md`` and ``<json>.png`` beside it (``downstream.py`` does this itself at the end of a run).
Several files (e.g. one process per seed, run in parallel) are merged into ``--out``:

    python benchmarks/downstream_report.py runs/downstream/s0.json runs/downstream/s1.json \
        --out benchmarks/results/downstream_hippocampus.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

NETWORK_NAMES = {"unet": "UNet", "dynunet": "DynUNet", "vnet": "VNet"}


def _dataset(results: dict[str, Any]) -> str:
    """The dataset's folder name as recorded in the results' settings (e.g. ``msd_hippocampus``)."""
    return str(results.get("settings", {}).get("data") or "dataset")


def _ms(values: list[float], pct: bool = True) -> str:
    """``mean ± std`` (sample std, ddof=1) in percent, with the number of seeds when it is not 3."""
    if not values:
        return "—"
    k = 100.0 if pct else 1.0
    v = np.asarray(values, dtype=float) * k
    std = float(v.std(ddof=1)) if len(v) > 1 else float("nan")
    text = f"{v.mean():.1f} ± {std:.1f}" if len(v) > 1 else f"{v.mean():.1f}"
    return text if len(v) == 3 else f"{text} (n={len(v)})"


def group(results: dict[str, Any]) -> dict[tuple[str, int, str], dict[int, dict]]:
    """Runs by ``(network, num_real, condition)`` then seed."""
    out: dict[tuple[str, int, str], dict[int, dict]] = defaultdict(dict)
    for run in results["runs"].values():
        out[(run["network"], run["num_real"], run["condition"])][run["seed"]] = run
    return out


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (network, regime, mixed condition): real vs real+synthetic, paired over seeds."""
    g = group(results)
    rows = []
    networks = sorted({k[0] for k in g}, key=lambda n: list(NETWORK_NAMES).index(n) if n in NETWORK_NAMES else 9)
    for net in networks:
        synth = g.get((net, 0, "synth"), {})
        regimes = sorted({k[1] for k in g if k[0] == net and k[1] > 0})
        for n in regimes:
            real = g.get((net, n, "real"), {})
            mixes = sorted((k[2] for k in g if k[0] == net and k[1] == n and k[2].startswith("mix")),
                           key=lambda c: float(c[3:]))
            for cond in mixes or [None]:
                mix = g.get((net, n, cond), {}) if cond else {}
                paired = sorted(set(real) & set(mix))
                rows.append({
                    "network": net, "num_real": n, "condition": cond,
                    "fraction": float(cond[3:]) if cond else None,
                    "real": [real[s]["mean"] for s in sorted(real)],
                    "mix": [mix[s]["mean"] for s in sorted(mix)],
                    "diff": [mix[s]["mean"] - real[s]["mean"] for s in paired],
                    "synth": [synth[s]["mean"] for s in sorted(synth)],
                    "real_class": [real[s]["per_class"] for s in sorted(real)],
                    "mix_class": [mix[s]["per_class"] for s in sorted(mix)],
                    "synth_class": [synth[s]["per_class"] for s in sorted(synth)],
                })
    return rows


def to_markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    names = s.get("label_names", [])[1:] or [f"class {k}" for k in range(1, s["num_classes"])]
    rows = summary_rows(results)
    seconds = sum(x.get("seconds", 0.0) for x in results.get("sessions", []))
    lines = [
        f"# Downstream segmentation: real vs real + synthetic ({_dataset(results)})", "",
        f"Test Dice (%) on the {s['num_test_cases']} held-out test cases, mean ± std over seeds (paired: the "
        "real and real + synthetic runs of a seed share the real subset and the initialisation). "
        f"{s['steps']} steps, batch {s['batch_size']}, AdamW lr {s['lr']:g} (cosine), DiceCE loss, "
        f"autocast {s['amp']}; synthetic pool of {s['num_synthetic']} pairs ({s['gen_steps']} DDIM steps, "
        f"{s['gen_dtype']}) from model `{s['model_path']}` (id {s['model']}). "
        f"Volumes {'x'.join(map(str, s['volume_shape']))}.",
        "",
        "| network | real cases | synthetic share | real only | real + synthetic | improvement | synthetic only |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        frac = f"{r['fraction']:.0%}" if r["fraction"] is not None else "—"
        lines.append(f"| {NETWORK_NAMES.get(r['network'], r['network'])} | {r['num_real']} | {frac} | "
                     f"{_ms(r['real'])} | {_ms(r['mix'])} | {_signed(r['diff'])} | {_ms(r['synth'])} |")
    synth_only = [(net, runs) for (net, n, c), runs in group(results).items() if c == "synth"]
    for net, runs in synth_only:
        if not any(r["network"] == net for r in rows):
            lines.append(f"| {NETWORK_NAMES.get(net, net)} | 0 | 100% | — | — | — | "
                         f"{_ms([runs[k]['mean'] for k in sorted(runs)])} |")
    lines += ["", "Per class (Dice %, mean ± std over seeds):", "",
              "| network | real cases | condition | " + " | ".join(names) + " |",
              "|---|---|---|" + "---|" * len(names)]
    for (net, n, cond), runs in sorted(group(results).items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        per = np.array([runs[k]["per_class"] for k in sorted(runs)])
        cells = " | ".join(_ms(per[:, c].tolist()) for c in range(per.shape[1]))
        lines.append(f"| {NETWORK_NAMES.get(net, net)} | {n} | {cond} | {cells} |")
    lines += ["", f"{len(results['runs'])} runs; {seconds / 60:.1f} min wall time over "
              f"{len(results.get('sessions', []))} session(s).", ""]
    return "\n".join(lines)


def _signed(values: list[float]) -> str:
    if not values:
        return "—"
    v = np.asarray(values) * 100
    std = f" ± {v.std(ddof=1):.1f}" if len(v) > 1 else ""
    n = "" if len(v) == 3 else f" (n={len(v)})"
    return f"{v.mean():+.1f}{std}{n}"


def plot(results: dict[str, Any], path: str | Path) -> None:
    """Bars of mean test Dice per network and regime (real, each real + synthetic fraction), seeds as dots,
    synthetic-only as a dashed line with a ±std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = group(results)
    networks = [n for n in NETWORK_NAMES if any(k[0] == n for k in g)] or sorted({k[0] for k in g})
    fig, axes = plt.subplots(1, len(networks), figsize=(max(4.2 * len(networks), 6.5), 3.6), squeeze=False, sharey=True)
    for ax, net in zip(axes[0], networks):
        regimes = sorted({k[1] for k in g if k[0] == net and k[1] > 0})
        conds = ["real"] + sorted({k[2] for k in g if k[0] == net and k[2].startswith("mix")},
                                  key=lambda c: float(c[3:]))
        width = 0.8 / len(conds)
        for j, cond in enumerate(conds):
            xs, means, stds = [], [], []
            for i, n in enumerate(regimes):
                runs = g.get((net, n, cond), {})
                if not runs:
                    continue
                v = np.array([runs[s]["mean"] for s in sorted(runs)])
                x = i + (j - (len(conds) - 1) / 2) * width
                xs.append(x)
                means.append(v.mean())
                stds.append(v.std(ddof=1) if len(v) > 1 else 0.0)
                ax.scatter(np.full(len(v), x), v, s=9, color="k", zorder=3)
            label = "real only" if cond == "real" else f"real + {float(cond[3:]):.0%} synthetic"
            ax.bar(xs, means, width * 0.95, yerr=stds, capsize=3, label=label, alpha=0.8)
        synth = g.get((net, 0, "synth"), {})
        if synth:
            v = np.array([synth[s]["mean"] for s in sorted(synth)])
            sd = v.std(ddof=1) if len(v) > 1 else 0.0
            ax.axhline(v.mean(), color="tab:red", ls="--", lw=1.2, label="synthetic only")
            ax.axhspan(v.mean() - sd, v.mean() + sd, color="tab:red", alpha=0.12)
        ax.set_xticks(range(len(regimes)), [str(n) for n in regimes])
        ax.set_xlabel("real training cases")
        ax.set_title(NETWORK_NAMES.get(net, net))
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("test Dice (mean of classes)")
    lo = min((r["mean"] for r in results["runs"].values()), default=0.0)
    axes[0][0].set_ylim(max(0.0, lo - 0.1), 1.0)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{_dataset(results)}: downstream Dice with duodiff synthetic pairs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict[str, Any], md_path: str | Path, png_path: str | Path | None = None) -> None:
    """Write the Markdown table (and the plot when ``png_path`` is given)."""
    Path(md_path).write_text(to_markdown(results))
    if png_path is not None and results["runs"]:
        plot(results, png_path)


def merge(parts: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    """One results dict from several (e.g. one process per seed); their ``keys`` settings must be equal."""
    first = parts[0]
    for other in parts[1:]:
        diff = {k: (first["settings"].get(k), other["settings"].get(k)) for k in keys
                if first["settings"].get(k) != other["settings"].get(k)}
        if diff:
            raise ValueError(f"Cannot merge results made with different settings: {diff}.")
        clash = set(first["runs"]) & set(other["runs"])
        if clash:
            raise ValueError(f"Runs {sorted(clash)[:3]} appear in more than one results file.")
    return {**first, "runs": {k: v for p in parts for k, v in p["runs"].items()},
            "sessions": [s for p in parts for s in p.get("sessions", [])]}


def main() -> None:
    import sys

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="JSON file(s) written by benchmarks/downstream.py")
    ap.add_argument("--out", default=None, help="merged JSON to write (needed with several inputs)")
    args = ap.parse_args()
    parts = [json.loads(Path(p).read_text()) for p in args.results]
    if len(parts) > 1 and args.out is None:
        ap.error("pass --out for the merged results of several files")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from downstream import RESULT_SETTINGS

    results = merge(parts, RESULT_SETTINGS)
    path = Path(args.out or args.results[0])
    if args.out:
        path.write_text(json.dumps(results, indent=1, sort_keys=True))
    write_report(results, path.with_suffix(".md"), path.with_suffix(".png"))
    print(path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
