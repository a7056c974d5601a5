"""What a finished stage draws for a quick look: its loss curve and, once the pipeline can sample, a grid of pairs.

Both are optional (matplotlib); without it training goes on and logs one line.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import torch

from ..pipeline import DuoDiffusion

__all__ = ["write_previews", "plot_curve"]

logger = logging.getLogger(__name__)


def write_previews(out: Path, stage: str, run_name: str, pipe: DuoDiffusion, device: torch.device, *,
                   samples: bool) -> None:
    """``out/logs/<run_name>.png`` (the loss curves of ``<run_name>.csv``) and, with ``samples``, four pairs
    sampled with seeds 0-3 in ``out/previews/<stage>.png``."""
    try:
        from ..preview import plot_pairs
    except ImportError:  # pragma: no cover
        return
    try:
        plot_curve(out / "logs" / f"{run_name}.csv", out / "logs" / f"{run_name}.png")
        if samples:
            s = pipe.to(device).sample(4, seed=0, num_inference_steps=25, progress=False)
            plot_pairs([i[0].numpy() for i in s.images], [lab[0].numpy() for lab in s.labels],
                       out / "previews" / f"{stage}.png", titles=[f"seed {x}" for x in s.seeds],
                       num_classes=pipe.config.num_classes, label_names=pipe.config.label_names or None)
    except ImportError:  # matplotlib missing: previews are optional
        logger.info("matplotlib not installed; skipping previews")


def plot_curve(csv_file: Path, png: Path) -> None:
    """Every loss column of a training log (``step`` on x, log-scale y) into ``png``; nothing without the log."""
    from ..optional import require_matplotlib

    if not csv_file.is_file():
        return
    plt = require_matplotlib()
    with open(csv_file) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3))
    for key in rows[0]:
        if key in ("step", "lr", "seconds", "skipped_steps"):
            continue
        ax.plot(steps, [float(r[key]) for r in rows], label=key)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(csv_file.stem)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
