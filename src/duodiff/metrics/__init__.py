"""Offline quality metrics for synthetic (image, label) pairs, and the report of ``duodiff evaluate``.

Everything runs without downloads: feature networks are trained on the real data (or given).

>>> from duodiff.metrics import load_pairs, evaluate, write_report  # doctest: +SKIP
>>> real = load_pairs("Task04_Hippocampus", volume_shape=pipe.config.volume_shape)  # doctest: +SKIP
"""

from .autoencoder import image_reconstruction, label_reconstruction, psnr, reconstruct
from .consistency import dice_per_class, pair_consistency
from .data import REAL_PREPROCESSING, PairSet, find_cases, load_pairs, parse_cases, read_label_names
from .detectability import build_detector, detectability, stratified_folds
from .evaluate import Evaluation, evaluate
from .features import HubFeatureNetwork, load_hub_feature_network, slice_features, volume_features
from .fid import feature_statistics, fid_2p5d, frechet_distance, frechet_distance_from_stats, sqrtm_psd
from .labels import class_volumes, component_counts, contains_all_classes, label_statistics, wasserstein_1d
from .memorization import nearest_real, normalized_cross_correlation
from .mmd import gaussian_mmd, median_bandwidth
from .report import markdown_report, write_report
from .ssim import ms_ssim, ms_ssim_weights, pairwise_ms_ssim, ssim

__all__ = [
    "PairSet",
    "load_pairs",
    "find_cases",
    "parse_cases",
    "read_label_names",
    "REAL_PREPROCESSING",
    "evaluate",
    "Evaluation",
    "write_report",
    "markdown_report",
    "slice_features",
    "volume_features",
    "HubFeatureNetwork",
    "load_hub_feature_network",
    "sqrtm_psd",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_stats",
    "fid_2p5d",
    "ssim",
    "ms_ssim",
    "ms_ssim_weights",
    "pairwise_ms_ssim",
    "gaussian_mmd",
    "median_bandwidth",
    "class_volumes",
    "wasserstein_1d",
    "component_counts",
    "contains_all_classes",
    "label_statistics",
    "pair_consistency",
    "dice_per_class",
    "normalized_cross_correlation",
    "nearest_real",
    "psnr",
    "reconstruct",
    "image_reconstruction",
    "label_reconstruction",
    "detectability",
    "stratified_folds",
    "build_detector",
]
