"""Compute every duodiff quality metric for a synthetic set against a real one.

>>> from duodiff.metrics import PairSet, evaluate  # doctest: +SKIP
>>> result = evaluate(real, synthetic, num_classes=3)  # doctest: +SKIP
>>> result.metrics["fid_2p5d"]["mean"]  # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..segmenter import PLANES, SliceSegmenter, train_segmenter
from .autoencoder import image_reconstruction, label_reconstruction
from .consistency import pair_consistency
from .data import PairSet
from .detectability import detectability
from .features import slice_features
from .fid import frechet_distance
from .labels import class_volumes, label_statistics
from .memorization import nearest_real
from .mmd import gaussian_mmd
from .ssim import pairwise_ms_ssim

__all__ = ["Evaluation", "evaluate", "FEATURE_NETWORK_DESCRIPTION"]

FEATURE_NETWORK_DESCRIPTION = (
    "Encoder of duodiff's SliceSegmenter: a 2D monai.networks.nets.BasicUNet (features {features}, batch norm) "
    "trained for {steps} steps to segment axial, coronal and sagittal slices of {n} real pairs; FID/MMD features "
    "are the global-average-pooled bottleneck activations ({dim} numbers per slice)."
)


@dataclass
class Evaluation:
    """What :func:`evaluate` returns.

    Attributes:
        metrics: the JSON-serialisable report (see ``docs/evaluation.md``).
        segmenter: the segmenter used for pair consistency (trained here or given), if any.
        real_volumes: float64 ``(N_real, K - 1)`` class volumes in mm^3 (for figures).
        synthetic_volumes: float64 ``(N_synth, K - 1)``.
        nearest_ncc: ``{"synthetic": (N_synth,), "real": (N_ref,)}`` nearest-neighbour NCC values.
    """

    metrics: dict[str, Any]
    segmenter: nn.Module | None
    real_volumes: np.ndarray
    synthetic_volumes: np.ndarray
    nearest_ncc: dict[str, np.ndarray] = field(default_factory=dict)


def _split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = int(round(n * fraction))
    k = min(max(k, 1), n - 1) if n >= 2 and fraction > 0 else 0
    return sorted(perm[k:]), sorted(perm[:k])


def _check_sets(real: PairSet, synthetic: PairSet, num_classes: int) -> None:
    if real.images.shape[1:] != synthetic.images.shape[1:]:
        raise ValueError(
            f"Real volumes {tuple(real.images.shape[1:])} and synthetic volumes {tuple(synthetic.images.shape[1:])} "
            "(C, H, W, D) differ; load the real pairs with volume_shape= the model's volume_shape.")
    for name, s in (("real", real), ("synthetic", synthetic)):
        if len(s) < 2:
            raise ValueError(f"The {name} set has {len(s)} pair(s); evaluation needs at least 2 of each.")
        hi = int(s.labels.max())
        if int(s.labels.min()) < 0 or hi >= num_classes:
            raise ValueError(f"The {name} labels hold id {hi}, outside range(0, {num_classes}). Pass the model's "
                             "num_classes or remap the labels.")


def evaluate(
    real: PairSet,
    synthetic: PairSet,
    *,
    num_classes: int,
    label_names: Sequence[str] | None = None,
    segmenter: nn.Module | Callable[[torch.Tensor], torch.Tensor] | None = None,
    feature_network: nn.Module | None = None,
    memorization_reference: PairSet | None = None,
    segmenter_data: PairSet | None = None,
    segmenter_steps: int = 300,
    holdout_fraction: float = 0.2,
    copy_threshold: float = 0.95,
    max_pairs: int | None = 500,
    image_autoencoder: nn.Module | None = None,
    label_autoencoder: nn.Module | None = None,
    detector_steps: int = 150,
    detector_folds: int = 5,
    seed: int = 0,
    progress: bool = True,
) -> Evaluation:
    """Compare ``synthetic`` pairs with ``real`` ones on every metric of :mod:`duodiff.metrics`.

    Args:
        real: real pairs on the model's grid (:func:`duodiff.metrics.load_pairs` with ``volume_shape``).
        synthetic: synthetic pairs (same ``C, H, W, D``).
        num_classes: classes including background.
        label_names: class names, background first.
        segmenter: maps volumes ``(B, C, H, W, D)`` to class scores ``(B, K, H, W, D)``. ``None``: train a
            :class:`~duodiff.segmenter.SliceSegmenter` on ``1 - holdout_fraction`` of the real pairs; its
            Dice on the held-out rest is the real reference for pair consistency.
        feature_network: slice feature network for FID / MMD. ``None``: the segmenter's encoder (which
            requires ``segmenter`` to be ``None`` or a ``SliceSegmenter``).
        memorization_reference: the model's training images, for the memorisation check; ``None`` uses
            ``real`` (say so in the report if it is not the training set).
        segmenter_data: real pairs to train the segmenter on (e.g. the model's training split); then all of
            ``real`` serves as the held-out reference. ``None``: train on ``1 - holdout_fraction`` of ``real``.
        segmenter_steps: training steps when a segmenter is trained here.
        holdout_fraction: share of real pairs held out from segmenter training.
        copy_threshold: nearest-neighbour NCC at which a synthetic image is flagged as a near-copy.
        max_pairs: most pairs per set for pairwise MS-SSIM.
        image_autoencoder: the model's image ``AutoencoderKL``: its reconstructions of the real images are
            scored (PSNR / SSIM / L1, :func:`~duodiff.metrics.image_reconstruction`). ``None``: skipped.
        label_autoencoder: the model's label ``AutoencoderKL``: per-class Dice of its reconstructions of the
            real labels (:func:`~duodiff.metrics.label_reconstruction`). ``None``: skipped.
        detector_steps: training steps per fold of the real-vs-synthetic detector
            (:func:`~duodiff.metrics.detectability`); 0 skips the check.
        detector_folds: cross-validation folds of the detector (at most the size of the smaller set; fewer
            are used, with a warning, when a set is smaller).
        seed: seeds the segmenter, the detector, the splits and the pair subsets.
        progress: show progress bars.

    Returns:
        :class:`Evaluation`.
    """
    _check_sets(real, synthetic, num_classes)
    if isinstance(detector_steps, bool) or not isinstance(detector_steps, int) or detector_steps < 0:
        raise ValueError(f"detector_steps must be an int >= 0 (0 skips detectability), got {detector_steps!r}.")
    if isinstance(detector_folds, bool) or not isinstance(detector_folds, int) or detector_folds < 2:
        raise ValueError(f"detector_folds must be an int >= 2, got {detector_folds!r}.")
    names = list(label_names) if label_names else [f"class_{k}" for k in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"Got {len(names)} label_names for num_classes={num_classes}.")
    timing: dict[str, float] = {}
    warnings: list[str] = []
    setup: dict[str, Any] = {"num_real": len(real), "num_synthetic": len(synthetic), "num_classes": num_classes,
                             "label_names": names, "volume_shape": list(real.images.shape[2:]),
                             "image_channels": int(real.images.shape[1]), "seed": seed}

    # 1. segmenter (trained on real pairs unless given)
    t = time.perf_counter()
    seg_info: dict[str, Any]
    if segmenter is None:
        if segmenter_data is not None:
            if segmenter_data.images.shape[1:] != real.images.shape[1:]:
                raise ValueError(f"segmenter_data volumes {tuple(segmenter_data.images.shape[1:])} must match the "
                                 f"real ones {tuple(real.images.shape[1:])}.")
            seg_train, held = segmenter_data, real
        else:
            train_idx, held_idx = _split(len(real), holdout_fraction, seed)
            seg_train = real.subset(train_idx)
            held = real.subset(held_idx) if held_idx else None
        segmenter = train_segmenter(seg_train.images, seg_train.labels, num_classes=num_classes,
                                    num_steps=segmenter_steps, seed=seed, progress=progress)
        seg_info = {"trained_here": True, "train_set": "segmenter_data" if segmenter_data is not None else "real",
                    "train_cases": seg_train.names,
                    "heldout_cases": held.names if held else [], **getattr(segmenter, "info", {})}
        if held is None:
            warnings.append("Too few real pairs to hold any out: the segmenter's real Dice is not measured.")
    else:
        held = real
        seg_info = {"trained_here": False, "class": type(segmenter).__name__, **getattr(segmenter, "info", {})}
        warnings.append("A given segmenter was used: its real-data Dice is measured on all real pairs, which may "
                        "include its training data.")
    timing["segmenter_s"] = time.perf_counter() - t

    # 2. feature network
    if feature_network is None:
        if not isinstance(segmenter, SliceSegmenter):
            raise TypeError("Pass feature_network= when the segmenter is not a duodiff SliceSegmenter (its encoder is "
                            "the default feature network).")
        feature_network = segmenter.encoder
        n_seg = seg_info.get("num_train_volumes", "?")
        feature_desc = FEATURE_NETWORK_DESCRIPTION.format(
            features=list(segmenter.features), steps=seg_info.get("num_steps", "?"), n=n_seg,
            dim=segmenter.feature_dim)
    else:
        feature_desc = f"user-given {type(feature_network).__name__}"
    setup["feature_network"] = feature_desc
    setup["segmenter"] = seg_info

    # 3. FID-2.5D + MMD on slice features
    t = time.perf_counter()
    half_a, half_b = _split(len(real), 0.5, seed + 1)
    fid: dict[str, Any] = {}
    fid_ref: dict[str, float] = {}
    vol_feats: dict[str, list[torch.Tensor]] = {"real": [], "synthetic": []}
    for plane in PLANES:
        fr = slice_features(real.images, feature_network, plane)
        fs = slice_features(synthetic.images, feature_network, plane)
        fid[plane] = frechet_distance(fr, fs)
        per_vol_r = fr.reshape(len(real), -1, fr.shape[-1])
        fid_ref[plane] = frechet_distance(per_vol_r[half_a].flatten(0, 1), per_vol_r[half_b].flatten(0, 1))
        vol_feats["real"].append(per_vol_r.mean(1))
        vol_feats["synthetic"].append(fs.reshape(len(synthetic), -1, fs.shape[-1]).mean(1))
    fid["mean"] = sum(fid[p] for p in PLANES) / len(PLANES)
    fid_ref["mean"] = sum(fid_ref[p] for p in PLANES) / len(PLANES)
    fid["real_split_half"] = fid_ref
    vr, vs = torch.cat(vol_feats["real"], 1), torch.cat(vol_feats["synthetic"], 1)
    mmd = gaussian_mmd(vr, vs)
    mmd["real_split_half"] = gaussian_mmd(vr[half_a], vr[half_b], bandwidth=mmd["bandwidth"])["mmd2"]
    timing["fid_mmd_s"] = time.perf_counter() - t

    # 4. diversity
    t = time.perf_counter()
    ms = {"synthetic": pairwise_ms_ssim(synthetic.images, max_pairs=max_pairs, seed=seed),
          "real": pairwise_ms_ssim(real.images, max_pairs=max_pairs, seed=seed)}
    timing["ms_ssim_s"] = time.perf_counter() - t

    # 5. label statistics
    t = time.perf_counter()
    labels = label_statistics(real.labels, synthetic.labels, num_classes=num_classes, label_names=names,
                              real_spacing=real.spacing, synthetic_spacing=synthetic.spacing)
    timing["labels_s"] = time.perf_counter() - t

    # 6. pair consistency
    t = time.perf_counter()
    consistency = {"synthetic": pair_consistency(synthetic.images, synthetic.labels, segmenter,
                                                 num_classes=num_classes, label_names=names)}
    if held is not None:
        consistency["real_heldout"] = pair_consistency(held.images, held.labels, segmenter, num_classes=num_classes,
                                                       label_names=names)
        consistency["real_heldout"]["num_cases"] = len(held)
    timing["consistency_s"] = time.perf_counter() - t

    # 7. memorisation
    t = time.perf_counter()
    ref = memorization_reference if memorization_reference is not None else real
    if ref.images.shape[1:] != synthetic.images.shape[1:]:
        raise ValueError(f"memorization_reference volumes {tuple(ref.images.shape[1:])} must match the synthetic "
                         f"ones {tuple(synthetic.images.shape[1:])}.")
    mem = nearest_real(synthetic.images, ref.images, real_names=ref.names, synthetic_names=synthetic.names,
                       threshold=copy_threshold)
    mem["reference_set"] = "memorization_reference" if memorization_reference is not None else "real"
    nearest: dict[str, np.ndarray] = {"synthetic": np.array([d["ncc"] for d in mem["nearest"]])}
    if len(ref) >= 2:
        rr = nearest_real(ref.images, ref.images, threshold=copy_threshold, exclude_self=True, with_ssim=False)
        mem["real_to_real_ncc"] = rr["ncc"]
        nearest["real"] = np.array([d["ncc"] for d in rr["nearest"]])
    if memorization_reference is None:
        warnings.append("Memorisation was checked against the --real set; pass the model's training images "
                        "(memorization_reference / --train-real) to check against what it actually saw.")
    timing["memorization_s"] = time.perf_counter() - t

    # 8. autoencoder fidelity on the real cases (an upper bound on what the pipeline can generate)
    t = time.perf_counter()
    fidelity: dict[str, Any] = {}
    if image_autoencoder is not None:
        fidelity["image"] = image_reconstruction(image_autoencoder, real.images, names=real.names)
    if label_autoencoder is not None:
        fidelity["label"] = label_reconstruction(label_autoencoder, real.labels, num_classes=num_classes,
                                                 label_names=names, names=real.names)
    if fidelity:
        timing["autoencoder_s"] = time.perf_counter() - t

    # 9. detectability: cross-validated real-vs-synthetic classifier
    detect: dict[str, Any] | None = None
    if detector_steps > 0:
        t = time.perf_counter()
        folds = min(detector_folds, len(real), len(synthetic))
        if folds < detector_folds:
            warnings.append(f"Detectability used {folds} folds instead of {detector_folds}: the smaller set has "
                            f"only {min(len(real), len(synthetic))} volumes.")
        detect = detectability(real.images, synthetic.images, num_folds=folds, num_steps=detector_steps,
                               seed=seed, progress=progress)
        timing["detectability_s"] = time.perf_counter() - t

    # 10. warnings about the comparison itself
    if any(abs(a - b) > 1e-3 * max(abs(b), 1e-6) for a, b in zip(real.spacing, synthetic.spacing)):
        warnings.append(f"Real voxel spacing {tuple(real.spacing)} mm differs from the synthetic spacing "
                        f"{tuple(synthetic.spacing)} mm; volumes were not resampled, so image metrics compare "
                        "different physical scales (label volumes use each set's own spacing).")
    if len(real.info.get("spacings", [])) > 1:
        warnings.append(f"Real cases have {len(real.info['spacings'])} different spacings; only the first "
                        f"({tuple(real.spacing)}) is used for label volumes.")
    lost = real.info.get("label_voxels_lost", {})
    if lost.get("total", 0) > 0:
        warnings.append(f"Cropping real cases to {tuple(real.images.shape[2:])} cut off {lost['total']} label "
                        f"voxel(s) in {lost['cases_affected']} case(s) (at most {lost['max_per_case']} in one).")
    if min(len(real), len(synthetic)) < 20:
        warnings.append("Fewer than 20 volumes in a set: FID, MMD and the volume distributions are noisy.")

    metrics = {
        "setup": setup,
        "fid_2p5d": fid,
        "mmd": mmd,
        "ms_ssim": ms,
        "labels": labels,
        "pair_consistency": consistency,
        "memorization": mem,
        "autoencoder_fidelity": fidelity or None,
        "detectability": detect,
        "warnings": warnings,
        "timing_s": {k: round(v, 3) for k, v in timing.items()},
    }
    return Evaluation(metrics=metrics, segmenter=segmenter,
                      real_volumes=class_volumes(real.labels, num_classes, real.spacing),
                      synthetic_volumes=class_volumes(synthetic.labels, num_classes, synthetic.spacing),
                      nearest_ncc=nearest)
