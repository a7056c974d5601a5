"""Draw docs/img/pipeline_diagram.png (the two sampling stages of DuoDiffusion) with matplotlib.

Run from the repository root: ``python docs/make_pipeline_diagram.py``.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUT = Path(__file__).resolve().parent / "img" / "pipeline_diagram.png"

# (key, x, y, text, colour)
BOXES = [
    ("seed", 0.6, 3.0, "seed s\n(per sample)", "#eeeeee"),
    ("nl", 2.6, 4.1, "noise  z_T\n(N, C, h, w, d)\nstream 'label'", "#f6f6f6"),
    ("lunet", 4.9, 4.1, "label_unet\nDiffusionModelUNet\nT steps (DDIM/DDPM/PNDM)", "#dbe9f6"),
    ("lae", 7.3, 4.1, "label_autoencoder\n.decode(z / scale)\nAutoencoderKL", "#dbe9f6"),
    ("argmax", 9.5, 4.1, "argmax over K\nlabels int64\n(N, 1, H, W, D)", "#fde9c9"),
    ("ni", 2.6, 1.5, "noise  z_T\n(N, C, h, w, d)\nstream 'image'", "#f6f6f6"),
    ("onehot", 9.5, 2.8, "one-hot\n(N, K, H, W, D)", "#fde9c9"),
    ("cnet", 7.3, 2.8, "image_controlnet\nControlNet\n(condition at image res.)", "#e3f1df"),
    ("iunet", 4.9, 1.5, "image_unet\nDiffusionModelUNet\n+ ControlNet residuals", "#e3f1df"),
    ("iae", 7.3, 0.4, "image_autoencoder\n.decode(z / scale)\nAutoencoderKL", "#e3f1df"),
    ("img", 9.5, 0.4, "images float32\n(N, C, H, W, D)\nclamped to [0, 1]", "#fde9c9"),
]

ARROWS = [
    ("seed", "nl", ""), ("seed", "ni", ""), ("nl", "lunet", ""), ("lunet", "lae", "z_0"),
    ("lae", "argmax", ""), ("argmax", "onehot", ""), ("onehot", "cnet", ""),
    ("cnet", "iunet", "residuals"), ("ni", "iunet", ""), ("iunet", "iae", "z_0"), ("iae", "img", ""),
]


def _edge(x0: float, y0: float, x1: float, y1: float, hw: float, hh: float) -> tuple[float, float]:
    """Where the line from box centre (x0, y0) towards (x1, y1) leaves a box of half size (hw, hh)."""
    dx, dy = x1 - x0, y1 - y0
    t = min(hw / abs(dx) if dx else float("inf"), hh / abs(dy) if dy else float("inf"))
    return x0 + t * dx, y0 + t * dy


def main() -> Path:
    fig, ax = plt.subplots(figsize=(12, 5.6))
    ax.set_xlim(-0.4, 10.7)
    ax.set_ylim(-0.4, 5.0)
    ax.set_axis_off()
    w, h = 1.9, 0.78
    pos = {}
    for key, x, y, text, colour in BOXES:
        ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.05", fc=colour, ec="#555555"))
        ax.text(x, y, text, ha="center", va="center", fontsize=8.5)
        pos[key] = (x, y)
    for a, b, label in ARROWS:
        (x0, y0), (x1, y1) = pos[a], pos[b]
        start = _edge(x0, y0, x1, y1, w / 2 + 0.08, h / 2 + 0.08)
        end = _edge(x1, y1, x0, y0, w / 2 + 0.08, h / 2 + 0.08)
        arrow = FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, color="#333333",
                                shrinkA=0, shrinkB=0, lw=1.2)
        ax.add_patch(arrow)
        if label:
            mid = ((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + 0.1)
            ax.text(*mid, label, ha="center", fontsize=7.5, color="#333333")
    ax.text(0.2, 4.75, "Stage 1: label latent diffusion", fontsize=11, weight="bold", color="#2b5d8a")
    ax.text(-0.2, 0.3, "Stage 2: ControlNet-conditioned image latent diffusion", fontsize=11, weight="bold",
            color="#3b7a35")
    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=120)
    plt.close(fig)
    return OUT


if __name__ == "__main__":
    print(main())
