"""Copy a trained hippocampus run into the package as the bundled model, with its model card.

    python examples/hippocampus/bundle.py --run runs/hippocampus --quality docs/results/bundled/quality.json \
        [--control docs/results/control/controllability.md] [--evaluate docs/results/evaluate/report.json] \
        [--trained-with "duodiff train examples/hippocampus/first_model.toml" ...]

The card records the data and its CC-BY-SA 4.0 attribution, the split, steps and wall time per stage, and the
quality numbers measured against the held-out test cases. Stages the run took from an earlier model
(``[model] init_from``) are described by that model's stage record (``--previous-stages``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tomllib
from pathlib import Path

from duodiff import DuoDiffusion
from duodiff.hub import model_card

ROOT = Path(__file__).resolve().parents[2]
TARGET = ROOT / "src" / "duodiff" / "weights" / "hippocampus"


def card_text(pipe: DuoDiffusion, run: Path, quality: dict | None, control_md: str | None,
              evaluate: dict | None = None, trained_with: list[str] | None = None,
              previous_stages: Path | None = None, limitations: str | None = None) -> str:
    stages = json.loads((run / "logs" / "stages.json").read_text())
    cfg = json.loads((run / "train_config.json").read_text())
    inherited = sorted(n for n, st in stages.items() if "init_from" in st)
    if inherited:  # describe them by the record of the model they were taken from
        if previous_stages is None or not previous_stages.is_file():
            raise FileNotFoundError(f"Stages {inherited} come from [model] init_from; pass --previous-stages with the "
                                    "stages.json of that model (docs/results/training/hippocampus_stages.json).")
        prev = json.loads(previous_stages.read_text())
        stages = {n: (dict(prev[n], inherited=True) if n in inherited else st) for n, st in stages.items()}
    split = json.loads((ROOT / "examples" / "hippocampus" / "split.json").read_text())
    total = sum(s.get("total_seconds", s.get("seconds", 0)) for s in stages.values())
    lines = [
        "## Training data",
        "",
        "Medical Segmentation Decathlon Task04 Hippocampus (Simpson et al., 2019; data from Vanderbilt University "
        "Medical Center), 200 of its 260 labelled MRI cases, **CC-BY-SA 4.0** "
        "(https://creativecommons.org/licenses/by-sa/4.0/). These weights are a derivative of that data and are "
        "shared under the same licence. Labels: 0 background, 1 Anterior, 2 Posterior hippocampus.",
        "",
        f"Split (fixed, `examples/hippocampus/split.json`): {len(split['train'])} train / {len(split['val'])} val / "
        f"{len(split['test'])} test cases. Only the train cases were used for training; the test cases were never "
        "read by training and are used by the benchmarks.",
        "",
        "Preprocessing: RAS orientation, per-volume 0.5/99.5-percentile clip scaled to [0, 1], crop/pad to "
        "32 x 48 x 32 voxels (1 mm) centred on the hippocampus.",
        "",
        "## Training",
        "",
        ("Trained with " + ", then ".join(f"`{c}`" for c in trained_with) if trained_with else
         "`DUODIFF_DATA=../shared/data duodiff train examples/hippocampus/first_model.toml`"
         + (", then `duodiff train examples/hippocampus/first_model_finetune.toml --stage "
            + " --stage ".join(n for n, st in stages.items() if "finetuned_from" in st) + " --finetune`"
            if any("finetuned_from" in st for st in stages.values()) else ""))
        + f" on a 2-core CPU, seed {cfg['seed']}. Total wall time {total / 60:.0f} min "
        "(the machine was shared with other jobs, so this is an upper bound)."
        + (f" Stages {', '.join(inherited)} were taken unchanged from the previous bundled model "
           "(`[model] init_from = \"bundled\"`); their rows are that model's training record." if inherited else ""),
        "",
        "| stage | steps | batch | wall time (min) | notes |",
        "|---|---|---|---|---|",
    ]
    for name, s in stages.items():
        sc = cfg["stages"][name]
        if s.get("inherited"):  # trained by the original recipe
            sc = tomllib.loads((ROOT / "examples" / "hippocampus" / "first_model.toml").read_text())["stages"][name]
        notes = []
        if "val_dice" in s:
            notes.append("val Dice " + ", ".join(f"{k} {v:.3f}" for k, v in s["val_dice"].items()))
        if "val_psnr_db" in s:
            notes.append(f"val PSNR {s['val_psnr_db']:.2f} dB, SSIM {s['val_ssim']:.3f}")
        if "val_l1" in s:
            notes.append(f"val L1 {s['val_l1']:.4f}")
        if "scale_factor" in s:
            notes.append(f"scale factor {s['scale_factor']:.3f}")
        steps, seconds = s.get("total_steps", s.get("steps")), s.get("total_seconds", s.get("seconds", 0))
        if "finetuned_from" in s:
            notes.insert(0, f"{s['finetuned_from']['steps']} steps, then fine-tuned {s['steps']} more "
                            "(warm restart, `--finetune`)")
        if s.get("inherited"):
            notes.insert(0, "from the previous bundled model")
        lines.append(f"| {name} | {steps} | {sc['batch_size']} | {seconds / 60:.1f} | {'; '.join(notes)} |")
    if quality:
        q = quality
        lines += ["", "## Quality (64 samples vs the 20 real test cases)", "",
                  f"Sampler {q['meta']['sampler']}, seed {q['meta']['seed']}; `benchmarks/bundled_quality.py`.", "",
                  "| check | target | result |", "|---|---|---|"]
        for name, r in q["volume"].items():
            lines.append(f"| median {name} volume vs real | within ±20 % | {r['synthetic_median_voxels']:.0f} vs "
                         f"{r['real_median_voxels']:.0f} voxels ({100 * r['relative_difference']:+.1f} %) — "
                         f"{'met' if r['within_20pct'] else 'NOT met'} |")
        a = q["all_classes_present"]
        lines.append(f"| samples containing every class | >= 90 % | {100 * a['synthetic']:.1f} % — "
                     f"{'met' if a['target_met'] else 'NOT met'} |")
        m = q["mean_intensity"]
        lines.append(f"| mean intensity order of classes | as in real data ({' < '.join(m['order_real'])}) | "
                     f"{' < '.join(m['order_synthetic'])} — {'met' if m['same_order'] else 'NOT met'} |")
    if evaluate:
        lines += ["", "## Fidelity (`duodiff evaluate`, 64 samples vs the 20 real test cases)", "",
                  "| check | target | result |", "|---|---|---|"]
        fa = evaluate.get("autoencoder_fidelity") or {}
        if fa.get("image"):
            psnr, ssim = fa["image"]["psnr_db"]["mean"], fa["image"]["ssim"]["mean"]
            lines.append(f"| image autoencoder PSNR / SSIM on real cases | >= 28 dB / >= 0.90 | {psnr:.2f} dB / "
                         f"{ssim:.3f} — {'met' if psnr >= 28 and ssim >= 0.9 else 'NOT met'} |")
        if fa.get("label"):
            dice = fa["label"]["dice"]
            lines.append("| label autoencoder Dice per class | >= 0.97 | "
                         + ", ".join(f"{k} {v:.3f}" for k, v in dice.items())
                         + f" — {'met' if min(dice.values()) >= 0.97 else 'NOT met'} |")
        fid = evaluate["fid_2p5d"]
        ratio = fid["mean"] / fid["real_split_half"]["mean"]
        lines.append(f"| FID-2.5D vs real half-vs-half | <= 3x | {fid['mean']:.3f} vs "
                     f"{fid['real_split_half']['mean']:.3f} ({ratio:.1f}x) — {'met' if ratio <= 3 else 'NOT met'} |")
        pc = evaluate["pair_consistency"]
        syn = pc["synthetic"]["mean_dice"] if isinstance(pc["synthetic"], dict) else pc["synthetic"]
        ref = pc["real_heldout"]["mean_dice"] if isinstance(pc["real_heldout"], dict) else pc["real_heldout"]
        lines.append(f"| pair consistency (segmenter Dice on synthetic pairs) | >= 0.80 | {syn:.3f} (held-out real "
                     f"{ref:.3f}) — {'met' if syn >= 0.8 else 'NOT met'} |")
        det = evaluate.get("detectability")
        if det:
            lines.append(f"| detectability ROC AUC (real vs synthetic 3D CNN, {det['num_folds']}-fold) | aim <= 0.85 | "
                         f"{det['auc']:.3f} ± {det['auc_std']:.3f} |")
        lines += ["", "Command and full report: docs/evaluation.md and docs/results/evaluate/report.md of the duodiff "
                      "repository (the segmenter of `docs/results/evaluate` is reused so FID numbers compare)."]
    if control_md:
        lines += ["", "## Volume conditioning", "", control_md.replace("# Controllability", "### Controllability")]
    gap_text = ""
    if quality and quality["mean_intensity"].get("adjacent_gaps"):
        g = {f"{x['higher']}-{x['lower']}": x for x in quality["mean_intensity"]["adjacent_gaps"]}
        fmt = "{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]".format
        cells = {k: {kind: fmt(mean=v[kind]["mean"], lo=v[kind]["ci95"][0], hi=v[kind]["ci95"][1])
                     for kind in ("real", "synthetic")} for k, v in g.items()}
        bg = next((k for k in cells if k.startswith("background-")), None)
        ap_gap = next((k for k in cells if not k.startswith("background-")), None)
        if bg:
            darker = g[bg]["synthetic"]["mean"] > g[bg]["real"]["mean"]
            gap_text += (f" The hippocampus is {'darker' if darker else 'less dark'} against its surroundings than "
                         f"in real scans ({bg} mean "
                         f"intensity gap per volume, 95 % interval: synthetic {cells[bg]['synthetic']}, real "
                         f"{cells[bg]['real']}).")
        if ap_gap:
            gap_text += (f" The Anterior/Posterior difference is tiny even in real data ({ap_gap}: real "
                         f"{cells[ap_gap]['real']}, synthetic {cells[ap_gap]['synthetic']}), so whether 64 samples "
                         "reproduce that order is close to a coin flip.")
    lines += ["", "## Limitations", "",
              f"Small CPU-trained model ({total / 60:.0f} min on 2 cores) at 32 x 48 x 32 voxels. "
              + (limitations or "Label shapes and volumes match the real data well, but images are blurrier and "
                 "blob-like compared with real MRI, and the image ControlNet follows the label only loosely.")
              + gap_text + " Intended for demos, tests and as a starting point, not for clinical use."]
    return model_card(pipe, license="cc-by-sa-4.0", extra="\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run", default=str(ROOT / "runs" / "hippocampus"))
    ap.add_argument("--quality", default=None)
    ap.add_argument("--control", default=None)
    ap.add_argument("--evaluate", default=None, help="report.json of duodiff evaluate on the test cases")
    ap.add_argument("--trained-with", action="append", default=None, help="a command that trained the run (repeat)")
    ap.add_argument("--previous-stages",
                    default=str(ROOT / "docs" / "results" / "training" / "hippocampus_stages.json"),
                    help="stages.json of the model that [model] init_from took components from")
    ap.add_argument("--limitations", default=None, help="what the model does not do well, measured (card text)")
    args = ap.parse_args()
    run = Path(args.run)
    pipe = DuoDiffusion.from_pretrained(run / "model")
    quality = json.loads(Path(args.quality).read_text()) if args.quality else None
    control = Path(args.control).read_text() if args.control else None
    evaluate = json.loads(Path(args.evaluate).read_text()) if args.evaluate else None
    from duodiff.hub import TRAINING_CASES, save_pipeline

    split = json.loads((ROOT / "examples" / "hippocampus" / "split.json").read_text())
    provenance = {"data": "msd_hippocampus", "split": "split.json", "train": split["train"], "val": split["val"]}
    # ship fp16 weights only (half the size); load_bundled() loads them back into float32 networks
    if TARGET.exists():
        shutil.rmtree(TARGET)
    card = card_text(pipe, run, quality, control, evaluate, args.trained_with, Path(args.previous_stages),
                     args.limitations)
    save_pipeline(pipe, TARGET, variant="fp16", card=card,
                  extra_files={TRAINING_CASES: json.dumps(provenance, indent=1) + "\n"})
    print(f"bundled model written to {TARGET}")


if __name__ == "__main__":
    main()
