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
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # downstream.py (imported where needed: it imports torch)

NETWORK_NAMES = {"resunet": "ResUNet", "unet": "UNet", "dynunet": "DynUNet", "segresnet": "SegResNet",
                 "vnet": "VNet"}
TASKS = {"msd_hippocampus": "hippocampus", "chaos_mr_t2": "liver (CHAOS T2)"}


def _dataset(results: dict[str, Any]) -> str:
    """The dataset's folder name as recorded in the results' settings (e.g. ``msd_hippocampus``)."""
    return str(results.get("settings", {}).get("data") or "dataset")


def _network_order(net: str) -> int:
    return list(NETWORK_NAMES).index(net) if net in NETWORK_NAMES else len(NETWORK_NAMES)


def condition_order(cond: str) -> tuple[int, float]:
    """Table / plot order: real, mix<f>, qcmix<f> (by f), pretrain, synth, anything else."""
    for rank, prefix in enumerate(("qcmix", "mix")):
        if cond.startswith(prefix):
            return (2 - rank, float(cond[len(prefix):]))
    return ({"real": 0, "pretrain": 3, "synth": 4}.get(cond, 5), 0.0)


def describe(cond: str, settings: dict[str, Any] | None = None) -> str:
    """How a condition uses synthetic pairs, in words (``mix0.25`` -> ``mix 25%``)."""
    if cond.startswith("qcmix"):
        t = (settings or {}).get("qc_threshold")
        return f"QC-filtered mix {float(cond[5:]):.0%}" + (f" (Dice ≥ {t:g})" if t is not None else "")
    if cond.startswith("mix"):
        return f"mix {float(cond[3:]):.0%}"
    return {"real": "none", "pretrain": "pre-train, then fine-tune on real", "synth": "synthetic only"}.get(cond, cond)


def _ms(values: list[float], pct: bool = True) -> str:
    """``mean ± std`` (sample std, ddof=1) in percent, with the number of seeds when it is not 3."""
    if not values:
        return "—"
    k = 100.0 if pct else 1.0
    v = np.asarray(values, dtype=float) * k
    std = float(v.std(ddof=1)) if len(v) > 1 else float("nan")
    text = f"{v.mean():.1f} ± {std:.1f}" if len(v) > 1 else f"{v.mean():.1f}"
    return text if len(v) == 3 else f"{text} (n={len(v)})"


def _count(values: list[float | None]) -> str:
    """Integers (steps, samples): ``mean (min–max)`` over seeds; ``—`` when none is known."""
    v = [x for x in values if x is not None]
    if not v:
        return "—"
    lo, hi = int(min(v)), int(max(v))
    return f"{np.mean(v):.0f}" + (f" ({lo}–{hi})" if lo != hi else "")


def group(results: dict[str, Any]) -> dict[tuple[str, int, str], dict[int, dict]]:
    """Runs by ``(network, num_real, condition)`` then seed."""
    out: dict[tuple[str, int, str], dict[int, dict]] = defaultdict(dict)
    for run in results["runs"].values():
        out[(run["network"], run["num_real"], run["condition"])][run["seed"]] = run
    return out


def exposure(run: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """Steps trained, best step, real and synthetic samples seen by a run; runs made before these were
    recorded (fixed steps) get them from the settings and their synthetic share."""
    if "steps_trained" in run:
        return {k: run.get(k) for k in ("steps_trained", "best_step", "real_seen", "synthetic_seen", "pretrain_steps")}
    steps, batch = settings.get("steps"), settings.get("batch_size")
    if steps is None or batch is None:
        return {"steps_trained": None, "best_step": None, "real_seen": None, "synthetic_seen": None}
    synthetic = round(steps * batch * run.get("synthetic_share_seen", 0.0))
    return {"steps_trained": steps, "best_step": None, "real_seen": steps * batch - synthetic,
            "synthetic_seen": synthetic}


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (network, regime, condition using synthetic pairs): real vs real + synthetic, paired over
    seeds (a regime without such a condition gets one row with ``condition`` ``None``)."""
    g = group(results)
    rows = []
    for net in sorted({k[0] for k in g}, key=_network_order):
        synth = g.get((net, 0, "synth"), {})
        regimes = sorted({k[1] for k in g if k[0] == net and k[1] > 0})
        for n in regimes:
            real = g.get((net, n, "real"), {})
            conds = sorted((k[2] for k in g if k[0] == net and k[1] == n and k[2] not in ("real", "synth")),
                           key=condition_order)
            for cond in conds or [None]:
                mix = g.get((net, n, cond), {}) if cond else {}
                paired = sorted(set(real) & set(mix))
                fraction = next((r.get("fraction") for r in mix.values()), None)
                rows.append({
                    "network": net, "num_real": n, "condition": cond, "fraction": fraction,
                    "real": [real[s]["mean"] for s in sorted(real)],
                    "mix": [mix[s]["mean"] for s in sorted(mix)],
                    "diff": [mix[s]["mean"] - real[s]["mean"] for s in paired],
                    "synth": [synth[s]["mean"] for s in sorted(synth)],
                    "real_class": [real[s]["per_class"] for s in sorted(real)],
                    "mix_class": [mix[s]["per_class"] for s in sorted(mix)],
                    "synth_class": [synth[s]["per_class"] for s in sorted(synth)],
                })
    return rows


def _protocol(s: dict[str, Any]) -> str:
    if s.get("early_stopping"):
        text = (f"Converged segmenters: up to {s['max_steps']} steps with early stopping on the "
                f"{s.get('num_val_cases', '?')} val cases (val mean Dice every {s['val_every']} steps, patience "
                f"{s['patience']} evaluations, best weights restored before testing)")
    else:
        text = f"{s['steps']} steps (fixed)"
        if s.get("pretrain_share") is not None:
            text += f"; pre-training spends {s['pretrain_share']:.0%} of them on synthetic pairs"
    if s.get("subset") == "model":
        text += ("; the real cases of a regime are drawn from the generator's own training cases "
                 "(`training_cases.json`: same-data protocol)")
    return text


def to_markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    names = s.get("label_names", [])[1:] or [f"class {k}" for k in range(1, s["num_classes"])]
    rows = summary_rows(results)
    g = group(results)
    seconds = sum(x.get("seconds", 0.0) for x in results.get("sessions", []))
    task = TASKS.get(_dataset(results), _dataset(results))
    lines = [
        f"# Downstream segmentation: real vs real + synthetic ({_dataset(results)})", "",
        f"Test Dice (%) on the {s['num_test_cases']} held-out test cases, mean ± std over seeds (paired: the "
        "real and real + synthetic runs of a seed share the real subset and the initialisation). "
        f"{_protocol(s)}; batch {s['batch_size']}, AdamW lr {s['lr']:g} (cosine), DiceCE loss, "
        f"autocast {s['amp']}; synthetic pool of {s['num_synthetic']} pairs ({s['gen_steps']} DDIM steps, "
        f"{s['gen_dtype']}) from model `{s['model_path']}` (id {s['model']}). "
        f"Volumes {'x'.join(map(str, s['volume_shape']))}.",
        "",
        "| network | task | real cases | synthetic pairs used as | real | real + synthetic | improvement | "
        "synthetic only |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        use = describe(r["condition"], s) if r["condition"] else "—"
        lines.append(f"| {NETWORK_NAMES.get(r['network'], r['network'])} | {task} | {r['num_real']} | {use} | "
                     f"{_ms(r['real'])} | {_ms(r['mix'])} | {_signed(r['diff'])} | {_ms(r['synth'])} |")
    for (net, _, c), runs in sorted(g.items(), key=lambda kv: _network_order(kv[0][0])):
        if c == "synth" and not any(r["network"] == net for r in rows):
            lines.append(f"| {NETWORK_NAMES.get(net, net)} | {task} | 0 | synthetic only | — | — | — | "
                         f"{_ms([runs[k]['mean'] for k in sorted(runs)])} |")
    if any(net == "unet" for net, _, _ in g):
        lines += ["", "UNet: MONAI `UNet` with two residual units per level, the same network as ResUNet."]

    ordered = sorted(g.items(), key=lambda kv: (_network_order(kv[0][0]), kv[0][1], condition_order(kv[0][2])))
    lines += ["", "Training length and real-sample exposure (per run, mean (min–max) over seeds; steps count "
              "optimiser steps of batch " f"{s['batch_size']}, samples count volumes drawn into batches; "
              "\"best step\" is the restored checkpoint):", "",
              "| network | real cases | condition | steps trained | best step | real samples seen | "
              "synthetic samples seen | synthetic pool |",
              "|---|---|---|---|---|---|---|---|"]
    for (net, n, cond), runs in ordered:
        ex = [exposure(runs[k], s) for k in sorted(runs)]
        pool = [runs[k].get("qc_pool") for k in sorted(runs)] if cond.startswith("qcmix") else []
        pool_text = (f"{_count(pool)} of {s['num_synthetic']} (QC)" if pool else
                     (str(s["num_synthetic"]) if cond != "real" else "—"))
        lines.append(f"| {NETWORK_NAMES.get(net, net)} | {n} | {cond} | "
                     f"{_count([e['steps_trained'] for e in ex])} | {_count([e['best_step'] for e in ex])} | "
                     f"{_count([e['real_seen'] for e in ex])} | {_count([e['synthetic_seen'] for e in ex])} | "
                     f"{pool_text} |")

    lines += ["", "Per class (Dice %, mean ± std over seeds):", "",
              "| network | real cases | condition | " + " | ".join(names) + " |",
              "|---|---|---|" + "---|" * len(names)]
    for (net, n, cond), runs in ordered:
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
    """Bars of mean test Dice per network and regime (real, then each way of using synthetic pairs), seeds as
    dots, synthetic-only as a dashed line with a ±std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = group(results)
    networks = sorted({k[0] for k in g}, key=_network_order)
    fig, axes = plt.subplots(1, len(networks), figsize=(max(4.2 * len(networks), 6.5), 3.6), squeeze=False, sharey=True)
    for ax, net in zip(axes[0], networks):
        regimes = sorted({k[1] for k in g if k[0] == net and k[1] > 0})
        conds = sorted({k[2] for k in g if k[0] == net and k[1] > 0}, key=condition_order)
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
            label = "real only" if cond == "real" else f"real + synthetic: {describe(cond, results['settings'])}"
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
    """One results dict from several (e.g. one process per seed); their ``keys`` settings must be equal (a key
    a file lacks counts as ``downstream.LEGACY_SETTINGS`` says, see ``downstream.settings_diff``)."""
    from downstream import settings_diff

    first = parts[0]
    for other in parts[1:]:
        diff = {k: v for k, v in settings_diff(first["settings"], other["settings"]).items() if k in keys}
        if diff:
            raise ValueError(f"Cannot merge results made with different settings: {diff}.")
        clash = set(first["runs"]) & set(other["runs"])
        if clash:
            raise ValueError(f"Runs {sorted(clash)[:3]} appear in more than one results file.")
    return {**first, "runs": {k: v for p in parts for k, v in p["runs"].items()},
            "sessions": [s for p in parts for s in p.get("sessions", [])]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="JSON file(s) written by benchmarks/downstream.py")
    ap.add_argument("--out", default=None, help="merged JSON to write (needed with several inputs)")
    args = ap.parse_args()
    parts = [json.loads(Path(p).read_text()) for p in args.results]
    if len(parts) > 1 and args.out is None:
        ap.error("pass --out for the merged results of several files")
    from downstream import RESULT_SETTINGS

    results = merge(parts, RESULT_SETTINGS)
    path = Path(args.out or args.results[0])
    if args.out:
        path.write_text(json.dumps(results, indent=1, sort_keys=True))
    write_report(results, path.with_suffix(".md"), path.with_suffix(".png"))
    print(path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
