"""Axial / coronal / sagittal montages of generated (or real) pairs with a label overlay."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .io import NIFTI_SUFFIX, read_nifti
from .optional import require_matplotlib

__all__ = ["montage_figure", "plot_pairs", "preview_folder", "preview_path", "PREVIEW_NAME"]

#: file written inside a folder given as the preview destination
PREVIEW_NAME = "preview.png"


def _slices(vol: np.ndarray, center: Sequence[int]) -> list[np.ndarray]:
    x, y, z = center
    # RAS volume (H=x, W=y, D=z): axial = z-slice, coronal = y-slice, sagittal = x-slice
    return [np.rot90(vol[:, :, z]), np.rot90(vol[:, y, :]), np.rot90(vol[x, :, :])]


def plot_pairs(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray | None],
    out: str | os.PathLike,
    *,
    titles: Sequence[str] | None = None,
    num_classes: int | None = None,
    label_names: Sequence[str] | None = None,
    alpha: float = 0.35,
) -> Path:
    """Save a montage: one row per case, columns axial / coronal / sagittal (image | image + labels), with a
    colour legend naming the foreground classes when labels are shown.

    Args:
        images: each ``(H, W, D)`` float.
        labels: each ``(H, W, D)`` int or ``None``.
        out: PNG path.
        titles: one per row.
        num_classes: classes including background (default: the largest label id + 1).
        label_names: class names, background first (default ``class 1``, ``class 2``, ...).
    """
    plt = require_matplotlib()
    fig = montage_figure(images, labels, titles=titles, num_classes=num_classes, label_names=label_names,
                         alpha=alpha)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def montage_figure(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray | None],
    *,
    titles: Sequence[str] | None = None,
    num_classes: int | None = None,
    label_names: Sequence[str] | None = None,
    alpha: float = 0.35,
):
    """The matplotlib ``Figure`` that :func:`plot_pairs` saves (arguments as there); close it when done."""
    plt = require_matplotlib()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    n = len(images)
    if n == 0:
        raise ValueError("Nothing to preview: no images were given.")
    with_labels = any(lab is not None for lab in labels)
    cols = 6 if with_labels else 3
    fig, axes = plt.subplots(n, cols, figsize=(2.0 * cols, 2.0 * n + (0.4 if with_labels else 0.0)),
                             squeeze=False)
    k = num_classes or max([len(label_names or ())] + [int(lab.max()) + 1 for lab in labels if lab is not None]
                           + [2])
    colors = plt.get_cmap("tab10")(np.arange(max(k, 2)) % 10)
    colors[0, 3] = 0.0
    cmap = ListedColormap(colors)
    planes = ("axial", "coronal", "sagittal")
    for r, (img, lab) in enumerate(zip(images, labels)):
        if lab is not None and np.any(lab > 0):
            center = [int(round(c)) for c in np.argwhere(lab > 0).mean(0)]
        else:
            center = [s // 2 for s in img.shape]
        lo, hi = np.percentile(img, [0.5, 99.5])
        for p, sl in enumerate(_slices(img, center)):
            ax = axes[r, p]
            ax.imshow(sl, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
            ax.set_axis_off()
            if r == 0:
                ax.set_title(planes[p], fontsize=8)
            if lab is not None:
                ax2 = axes[r, p + 3]
                ax2.imshow(sl, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
                ax2.imshow(_slices(lab, center)[p], cmap=cmap, vmin=0, vmax=len(colors) - 1, alpha=alpha,
                           interpolation="nearest")
                ax2.set_axis_off()
                if r == 0:
                    ax2.set_title(f"{planes[p]} + labels", fontsize=8)
        if titles:
            axes[r, 0].text(-0.05, 0.5, titles[r], transform=axes[r, 0].transAxes, rotation=90, va="center",
                            ha="right", fontsize=7)
    bottom = 0.0
    if with_labels:  # the overlay's colours, named: one entry per foreground class
        names = list(label_names) if label_names is not None and len(label_names) == k else None
        handles = [Patch(facecolor=colors[i, :3], label=names[i] if names else f"class {i}") for i in range(1, k)]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False,
                   title="labels", title_fontsize=8)
        bottom = 0.4 / fig.get_figheight() + 0.02
    fig.tight_layout(rect=(0.0, bottom, 1.0, 1.0))
    return fig


def preview_path(out: str | os.PathLike, *, will_exist: Sequence[str | os.PathLike] = ()) -> Path:
    """The PNG a preview destination ``out`` names: an existing folder gets :data:`PREVIEW_NAME` inside it, a
    name without suffix gets ``.png``. No folder is ever created: the parent must exist (or be one of
    ``will_exist``, folders the caller creates first).

    Raises:
        ValueError: ``out`` is empty. FileNotFoundError: its folder does not exist.
    """
    if not str(out).strip():
        raise ValueError("The preview path is empty; pass a PNG file (or an existing folder for "
                         f"{PREVIEW_NAME} inside it).")
    p = Path(out).expanduser()
    if p.is_dir():
        return p / PREVIEW_NAME
    if not p.suffix:
        p = p.with_name(p.name + ".png")
    parent = p.parent
    planned = {Path(w).expanduser().resolve() for w in will_exist}
    if not parent.is_dir() and parent.resolve() not in planned:
        raise FileNotFoundError(f"Cannot write the preview {str(p)!r}: the folder {str(parent)!r} does not exist. "
                                "Create it first or choose another path (duodiff does not create folders for "
                                "previews).")
    return p


def preview_folder(path: str | os.PathLike, out: str | os.PathLike, *, max_cases: int = 4,
                   label: str | os.PathLike | None = None) -> Path:
    """Montage of up to ``max_cases`` pairs from a sample folder, or of one NIfTI image (+ optional label).

    A folder (``imagesTr`` + ``labelsTr``, MSD or nnU-Net layout) is listed and its cases are read by
    :mod:`duodiff.data.folders`, as ``duodiff train`` reads them: the same cases are refused with the same
    messages (an image without label, image and label on different grids, non-integer labels). The first
    image channel is shown, reoriented to RAS.

    ``out`` is resolved by :func:`preview_path` (an existing folder gets ``preview.png`` inside it; missing
    folders are an error, never created); the path written is returned. The legend names the classes of the
    folder's ``dataset.json`` (for a single image: of the ``dataset.json`` two folders above ``label``).
    """
    from .data.layout import Case, find_cases
    from .data.reading import read_case

    out = preview_path(out)
    path = Path(path)
    if path.is_dir():
        cases = find_cases(path)[:max_cases]
        pairs = [read_case(c) for c in cases]
        images = [p.image[0] for p in pairs]
        labels: list[np.ndarray | None] = [p.label[0] for p in pairs]
        titles = [p.name for p in pairs]
        names = _label_names(path)
    elif path.is_file():
        name = path.name.replace(NIFTI_SUFFIX, "")
        names = None
        if label:
            pair = read_case(Case(name, (path,), Path(label)))
            images, labels = [pair.image[0]], [pair.label[0]]
            names = _label_names(Path(label).parent.parent)  # labelsTr/<case> of a dataset folder
        else:
            img, _ = read_nifti(path)
            images, labels = [(img[..., 0] if img.ndim == 4 else img).astype(np.float32)], [None]
        titles = [name]
    else:
        raise FileNotFoundError(f"Nothing to preview at {str(path)!r}: pass a sample folder or a NIfTI file.")
    return plot_pairs(images, labels, out, titles=titles, label_names=names)


def _label_names(folder: Path) -> tuple[str, ...] | None:
    """Class names from ``folder/dataset.json`` for the legend; ``None`` (generic names) without a usable one."""
    from .data.dataset_json import read_label_names

    try:
        return read_label_names(folder)
    except (OSError, ValueError):  # no or unusable dataset.json: the preview still draws, with generic names
        return None
