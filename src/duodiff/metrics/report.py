"""Write an :class:`~duodiff.metrics.evaluate.Evaluation` as ``report.json``, ``report.md`` and PNG figures."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_write, write_json
from .data import PairSet
from .evaluate import Evaluation

__all__ = ["write_report", "markdown_report"]


def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    x = float(x)
    if x != 0 and (abs(x) >= 1e4 or abs(x) < 10 ** -digits):
        return f"{x:.{digits}g}"
    return f"{x:.{digits}f}"


def markdown_report(metrics: dict[str, Any], figures: dict[str, str] | None = None) -> str:
    """The Markdown summary of a report dict (tables + figure links)."""
    s, fid, mmd, ms = metrics["setup"], metrics["fid_2p5d"], metrics["mmd"], metrics["ms_ssim"]
    cons, mem, lab = metrics["pair_consistency"], metrics["memorization"], metrics["labels"]
    ref = fid["real_split_half"]
    real_dice = cons.get("real_heldout", {})
    rr = mem.get("real_to_real_ncc", {})
    lines = [
        "# duodiff evaluation report",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    for key in ("model", "real", "cases", "synthetic_source", "num_real", "num_synthetic", "volume_shape",
                "label_names", "num_inference_steps", "seed"):
        if key in s:
            val = s[key]
            lines.append(f"| {key} | {', '.join(map(str, val)) if isinstance(val, list) else val} |")
    lines += [
        f"| real preprocessing | {s.get('preprocessing', 'n/a')} |",
        f"| feature network | {s['feature_network']} |",
        "",
        "## Summary",
        "",
        "| metric | synthetic vs real | real reference | better |",
        "|---|---|---|---|",
        f"| FID-2.5D mean | {_f(fid['mean'])} | {_f(ref['mean'])} (real half vs half) | lower |",
    ]
    lines += [f"| FID-2.5D {p} | {_f(fid[p])} | {_f(ref[p])} | lower |" for p in ("axial", "coronal", "sagittal")]
    lines += [
        f"| MMD² (Gaussian, volume features) | {_f(mmd['mmd2'], 4)} | {_f(mmd['real_split_half'], 4)} "
        "(real half vs half) | lower |",
        f"| pairwise MS-SSIM within set | {_f(ms['synthetic']['mean'])} ± {_f(ms['synthetic']['std'])} | "
        f"{_f(ms['real']['mean'])} ± {_f(ms['real']['std'])} (within real) | close to real (higher = less diverse) |",
        f"| pair consistency mean Dice | {_f(cons['synthetic']['mean_dice'])} | "
        f"{_f(real_dice.get('mean_dice'))} (held-out real) | higher |",
        f"| nearest-real NCC median / max | {_f(mem['ncc']['median'])} / {_f(mem['ncc']['max'])} | "
        f"{_f(rr.get('median'))} / {_f(rr.get('max'))} (real to other real) | not above real |",
        f"| near-copies (NCC ≥ {mem['threshold']}) | {mem['num_flagged']} of {s['num_synthetic']} | | 0 |",
        f"| samples with every class | {_f(lab['all_classes_fraction']['synthetic'])} | "
        f"{_f(lab['all_classes_fraction']['real'])} | close to real |",
    ]
    det = metrics.get("detectability")
    if det:
        lines.append(f"| detectability ROC AUC (3D CNN, {det['num_folds']}-fold CV) | {_f(det['auc'])} ± "
                     f"{_f(det['auc_std'])} | 0.5 (indistinguishable) | lower (1.0 = trivially fake) |")
    lines += _fidelity_lines(metrics.get("autoencoder_fidelity"), s.get("model"))
    lines += _detectability_lines(det)
    lines += [
        "",
        "## Labels",
        "",
        f"Connected components: {lab['components_note']}.",
        "",
        "| class | real volume mm³ (mean ± std) | synthetic volume mm³ | W1 mm³ | W1 / real mean | components "
        "real / synth (mean) | single-component fraction real / synth | Dice synth | Dice real |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in lab["classes"].items():
        vr, vs = c["volume_mm3"]["real"], c["volume_mm3"]["synthetic"]
        comp = c.get("components")
        comp_mean = f"{_f(comp['real']['mean'], 2)} / {_f(comp['synthetic']['mean'], 2)}" if comp else "n/a"
        comp_single = (f"{_f(comp['real']['fraction_single'], 2)} / {_f(comp['synthetic']['fraction_single'], 2)}"
                       if comp else "n/a")
        lines.append(
            f"| {name} | {_f(vr['mean'], 1)} ± {_f(vr['std'], 1)} | {_f(vs['mean'], 1)} ± {_f(vs['std'], 1)} | "
            f"{_f(c['wasserstein_mm3'], 1)} | {_f(c['wasserstein_relative'])} | {comp_mean} | {comp_single} | "
            f"{_f(cons['synthetic']['dice'].get(name))} | {_f(real_dice.get('dice', {}).get(name))} |")
    if figures:
        lines += ["", "## Figures", ""]
        lines += [f"![{title}]({fname})" for title, fname in figures.items()]
    if metrics.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in metrics["warnings"]]
    t = metrics.get("timing_s", {})
    if t:
        lines += ["", "Timing (s): " + ", ".join(f"{k.removesuffix('_s')} {v:.1f}" for k, v in t.items())]
    lines += ["", "What each metric means and its caveats: see duodiff's `docs/evaluation.md`.", ""]
    return "\n".join(lines)


def _fidelity_lines(fid: dict[str, Any] | None, model: str | None) -> list[str]:
    lines = ["", "## Autoencoder fidelity (real cases: encode to the posterior mean, decode)", ""]
    if not fid:
        return lines + ["Not measured: no model was given (pass --model, or image_autoencoder= / "
                        "label_autoencoder= to evaluate())."]
    lines += ["| autoencoder | metric | mean ± std | median | worst case | better |", "|---|---|---|---|---|---|"]
    img = fid.get("image")
    if img:
        for key, title, worst, better in (("psnr_db", "PSNR (dB, data range 1)", "min", "higher"),
                                          ("ssim", "SSIM", "min", "higher"), ("l1", "L1 (mean abs. error)", "max",
                                                                              "lower")):
            v = img[key]
            lines.append(f"| image | {title} | {_f(v['mean'])} ± {_f(v['std'])} | {_f(v['median'])} | "
                         f"{_f(v[worst])} | {better} |")
    lab = fid.get("label")
    if lab:
        for name, d in lab["dice"].items():
            lines.append(f"| label | Dice {name} | {_f(d)} | | {_f(lab['dice_min'][name])} | higher |")
    n = (img or lab)["num_cases"]
    return lines + ["", f"Over the {n} real cases; no generated image can be sharper than the image autoencoder's "
                        "reconstructions."]


def _detectability_lines(det: dict[str, Any] | None) -> list[str]:
    lines = ["", "## Detectability (a 3D CNN trained to tell real from synthetic images)", ""]
    if not det:
        return lines + ["Skipped (detector_steps = 0)."]
    folds = ", ".join(_f(a) for a in det["fold_auc"])
    return lines + [
        f"ROC AUC {_f(det['auc'])} ± {_f(det['auc_std'])} (mean ± std over {det['num_folds']} stratified folds: "
        f"{folds}; pooled held-out scores {_f(det['pooled_auc'])}); {det['num_real']} real vs "
        f"{det['num_synthetic']} synthetic volumes, {det['num_steps']} steps per fold, seed {det['seed']}. "
        "0.5 = indistinguishable, 1.0 = every synthetic image is recognised.",
        "",
        f"Detector: {det['network']}.",
    ]


def _figures(ev: Evaluation, out: Path, real: PairSet | None, synthetic: PairSet | None,
             num_montage: int) -> dict[str, str]:
    try:
        from ..optional import require_matplotlib
        from ..preview import plot_pairs

        plt = require_matplotlib()
    except ImportError:
        return {}
    figs: dict[str, str] = {}
    names = list(ev.metrics["labels"]["classes"])
    if real is not None and synthetic is not None:
        k = min(num_montage, len(real), len(synthetic))
        images = [real.images[i, 0].numpy() for i in range(k)] + [synthetic.images[i, 0].numpy() for i in range(k)]
        labels = [real.labels[i, 0].numpy() for i in range(k)] + [synthetic.labels[i, 0].numpy() for i in range(k)]
        titles = [f"real {n}" for n in real.names[:k]] + [f"synthetic {n}" for n in synthetic.names[:k]]
        plot_pairs(images, labels, out / "montage.png", titles=titles, num_classes=len(names) + 1,
                   label_names=["background", *names])
        figs["real (top) vs synthetic (bottom) pairs"] = "montage.png"
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), squeeze=False)
    for j, name in enumerate(names):
        ax = axes[0, j]
        vr, vs = ev.real_volumes[:, j], ev.synthetic_volumes[:, j]
        bins = np.histogram_bin_edges(np.concatenate([vr, vs]), bins=20)
        ax.hist(vr, bins=bins, alpha=0.55, density=True, label=f"real (n={vr.size})")
        ax.hist(vs, bins=bins, alpha=0.55, density=True, label=f"synthetic (n={vs.size})")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("volume (mm³)", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "label_volumes.png", dpi=110)
    plt.close(fig)
    figs["label volume distributions"] = "label_volumes.png"
    if ev.nearest_ncc:
        fig, ax = plt.subplots(figsize=(4.5, 3.0))
        for key, label in (("real", "real -> nearest other real"), ("synthetic", "synthetic -> nearest real")):
            if key in ev.nearest_ncc:
                ax.hist(ev.nearest_ncc[key], bins=20, range=(min(0.0, float(np.min(ev.nearest_ncc[key]))), 1.0),
                        alpha=0.55, density=True, label=label)
        ax.axvline(ev.metrics["memorization"]["threshold"], color="k", linestyle="--", linewidth=1,
                   label="near-copy threshold")
        ax.set_xlabel("nearest-neighbour NCC", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "memorization.png", dpi=110)
        plt.close(fig)
        figs["nearest-neighbour correlation (memorisation)"] = "memorization.png"
    return figs


def write_report(
    evaluation: Evaluation,
    out_dir: str | os.PathLike,
    *,
    real: PairSet | None = None,
    synthetic: PairSet | None = None,
    num_montage: int = 4,
    save_segmenter: bool = True,
) -> dict[str, Path]:
    """Write ``report.json``, ``report.md``, figures (needs matplotlib) and the segmenter weights.

    Args:
        evaluation: what :func:`~duodiff.metrics.evaluate.evaluate` returned.
        out_dir: output folder (created).
        real, synthetic: the evaluated sets, for the montage (omit to skip it).
        num_montage: cases of each set in the montage.
        save_segmenter: save a trained :class:`~duodiff.segmenter.SliceSegmenter` as
            ``segmenter.safetensors`` + ``segmenter.json`` (reload with ``SliceSegmenter.load(out_dir)``).

    Returns:
        name -> path of every file written.
    """
    from ..segmenter import SliceSegmenter

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    figs = _figures(evaluation, out, real, synthetic, num_montage)
    written.update({name: out / name for name in figs.values()})
    if not figs:
        evaluation.metrics.setdefault("warnings", []).append(
            "matplotlib is not installed: no figures were written (pip install 'duodiff[plot]').")
    if save_segmenter and isinstance(evaluation.segmenter, SliceSegmenter) \
            and evaluation.metrics["setup"]["segmenter"].get("trained_here"):
        written["segmenter.safetensors"] = evaluation.segmenter.save(out)
        written["segmenter.json"] = out / "segmenter.json"
    evaluation.metrics["figures"] = figs
    written["report.json"] = write_json(out / "report.json", evaluation.metrics)
    with atomic_write(out / "report.md", suffix=".md") as tmp:
        tmp.write_text(markdown_report(evaluation.metrics, figs))
    written["report.md"] = out / "report.md"
    return written
