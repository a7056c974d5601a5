"""Export real + synthetic pairs as an nnU-Net v2 raw dataset.

nnU-Net v2 raw layout (https://github.com/MIC-DKFZ/nnUNet/blob/master/documentation/dataset_format.md)::

    nnUNet_raw/Dataset501_HippoSynth/
        dataset.json          {"channel_names": {"0": "MRI"}, "labels": {"background": 0, ...},
                               "numTraining": N, "file_ending": ".nii.gz"}
        imagesTr/<case>_0000.nii.gz   one file per channel (_0000, _0001, ...)
        labelsTr/<case>.nii.gz

Real cases keep their names, voxels and headers (affines); synthetic cases are copied from a folder
written by ``duodiff sample`` or generated from a model. Source folders are listed and every case is checked
by :mod:`duodiff.data.folders`, the reader ``duodiff train`` uses, so export accepts exactly the cases
training accepts.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from .data.dataset_json import read_channel_names, read_label_names
from .data.layout import Case, find_cases
from .data.reading import read_case
from .io import NIFTI_SUFFIX, chmod_as_new, nnunet_dataset_json, write_json
from .schedulers import DEFAULT_NUM_INFERENCE_STEPS, DEFAULT_SCHEDULER, check_sampler_fits

__all__ = ["read_dataset_meta", "export_nnunet", "NnunetExport"]

_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


def read_dataset_meta(folder: str | os.PathLike) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None]:
    """``(label_names, channel_names)`` from ``folder/dataset.json`` (nnU-Net v2 or MSD); ``None`` when absent.

    Both are read by :mod:`duodiff.data.folders`, the parser every duodiff command uses.

    Raises:
        DatasetJsonError: invalid JSON, region-based labels, or label ids that are not 0..K-1.
    """
    return read_label_names(folder), read_channel_names(folder)


def _copy_as_niigz(src: Path, dst: Path) -> None:
    """Copy a NIfTI file to ``dst`` (``.nii.gz``) byte for byte, gzipping an uncompressed ``.nii``."""
    if src.name.endswith(".nii.gz"):
        shutil.copyfile(src, dst)
    else:
        with open(src, "rb") as fin, gzip.open(dst, "wb") as fout:
            shutil.copyfileobj(fin, fout)


def _write_case(case: Case, images_dir: Path, labels_dir: Path, num_channels: int) -> None:
    """Write one case in nnU-Net naming, keeping voxels and headers.

    The case is first read and checked by :func:`duodiff.data.folders.read_case`, as training reads it: a case
    ``duodiff train`` would refuse (different image/label grids, non-integer labels, NaN) is never exported.
    """
    pair = read_case(case)
    if pair.image.shape[0] != num_channels:
        raise ValueError(
            f"Case {case.name!r} has {pair.image.shape[0]} image channel(s), expected {num_channels} "
            "(channel_names). Every case needs the same channels."
        )
    if len(case.images) == 1 and len(nib.load(str(case.images[0])).shape) == 4:  # MSD 4D: split channels
        img = nib.load(str(case.images[0]))
        data = np.asarray(img.dataobj)
        for c in range(data.shape[3]):
            header = img.header.copy()
            out = nib.Nifti1Image(data[..., c], img.affine, header)
            nib.save(out, str(images_dir / f"{case.name}_{c:04d}{NIFTI_SUFFIX}"))
    else:
        for c, src in enumerate(case.images):
            _copy_as_niigz(Path(src), images_dir / f"{case.name}_{c:04d}{NIFTI_SUFFIX}")
    label_img, image_affine = nib.load(str(case.label)), nib.load(str(case.images[0])).affine
    if nib.orientations.aff2axcodes(label_img.affine) != nib.orientations.aff2axcodes(image_affine):
        # same world grid (read_case checked it) but stored in another axis order: nnU-Net needs the image's
        ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(label_img.affine),
                                               nib.orientations.io_orientation(image_affine))
        nib.save(label_img.as_reoriented(ornt), str(labels_dir / f"{case.name}{NIFTI_SUFFIX}"))
    else:
        _copy_as_niigz(Path(case.label), labels_dir / f"{case.name}{NIFTI_SUFFIX}")


@dataclass
class NnunetExport:
    """What :func:`export_nnunet` wrote.

    Attributes:
        path: the ``DatasetXXX_Name`` folder.
        real_cases: names of the real cases.
        synthetic_cases: names of the synthetic cases.
        label_names: class names, background first (id = position).
        channel_names: image channel names.
    """

    path: Path
    real_cases: list[str] = field(default_factory=list)
    synthetic_cases: list[str] = field(default_factory=list)
    label_names: tuple[str, ...] = ()
    channel_names: tuple[str, ...] = ()


def _is_model_source(source: str | os.PathLike) -> bool:
    p = Path(source)
    if p.is_dir():
        return (p / "model_index.json").is_file()
    return True  # not a local folder: a Hub repo id (from_pretrained reports bad ids)


def _agree(kind: str, real: tuple[str, ...] | None, synthetic: tuple[str, ...] | None, flag: str) -> None:
    if real is not None and synthetic is not None and tuple(real) != tuple(synthetic):
        raise ValueError(
            f"The real data's {kind} {list(real)} differ from the synthetic ones {list(synthetic)}. If the ids "
            f"mean the same classes/channels, pass {flag} to use one list for both; otherwise use a model trained "
            "on this data."
        )


def export_nnunet(
    out_root: str | os.PathLike,
    *,
    dataset_id: int,
    name: str,
    real: str | os.PathLike | None = None,
    synthetic: Any = None,
    num_synthetic: int | None = None,
    seed: int = 0,
    num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
    scheduler: str | None = DEFAULT_SCHEDULER,
    batch_size: int = 4,
    device: str | None = None,
    dtype: str | None = None,
    prefix: str = "duodiff",
    label_names: Sequence[str] | None = None,
    channel_names: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> NnunetExport:
    """Write ``out_root/Dataset{id:03d}_{name}/`` for nnU-Net v2 with real and synthetic training cases.

    Args:
        out_root: the nnU-Net raw folder (``$nnUNet_raw``).
        dataset_id: nnU-Net dataset id, 1..999 (no other dataset in ``out_root`` may use it).
        name: dataset name (letters, digits, ``_``, ``-``).
        real: folder with ``imagesTr``/``labelsTr`` (nnU-Net or MSD layout). Cases keep their names and
            NIfTI headers; MSD 4D images are split into ``_0000``, ``_0001``, ... files.
        synthetic: a folder written by ``duodiff sample``, a model folder or Hub id (loaded with
            ``DuoDiffusion.from_pretrained``), or a ``DuoDiffusion`` instance.
        num_synthetic: number of synthetic cases: required when generating; with a folder, the first
            ``num_synthetic`` cases by name (default all).
        seed: first seed when generating (case ``i`` uses ``seed + i``).
        num_inference_steps: denoising steps per stage when generating.
        scheduler: sampler when generating (``None``: each stage's own, DDIM or ``rflow``).
        batch_size: pairs per generation call.
        device: device to load a model on (model folders and Hub ids; default: CPU).
        dtype: autocast dtype when generating.
        prefix: synthetic case-name prefix (``<prefix>_s<seed>``).
        label_names: class names (background first); default from the real ``dataset.json``, else the
            synthetic source. Real and synthetic names must agree unless this is given.
        channel_names: image channel names (nnU-Net normalises ``"CT"`` differently from anything else);
            default from the real ``dataset.json``, else the synthetic source, else ``"MRI"``.
        overwrite: replace an existing ``DatasetXXX_Name`` folder.
        progress: show a progress bar while generating.

    Returns:
        :class:`NnunetExport` describing what was written. The folder is built in a temporary sibling
        and renamed into place, so a failed export leaves nothing half-written.

    Raises:
        ValueError: bad id/name, nothing to export, mismatching labels/channels, name clashes.
        FileExistsError: the dataset folder exists and ``overwrite`` is false.
    """
    from .pipeline import DuoDiffusion

    if isinstance(dataset_id, bool) or not isinstance(dataset_id, int) or not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset_id must be an int in 1..999, got {dataset_id!r}.")
    if not isinstance(name, str) or not _DATASET_NAME.match(name):
        raise ValueError(f"name must use letters, digits, '_' or '-' (e.g. 'HippoSynth'), got {name!r}.")
    if real is None and synthetic is None:
        raise ValueError("Nothing to export: pass real=DIR and/or synthetic=DIR_OR_MODEL.")
    if num_synthetic is not None and (isinstance(num_synthetic, bool) or not isinstance(num_synthetic, int)
                                      or num_synthetic < 1):
        raise ValueError(f"num_synthetic must be a positive int, got {num_synthetic!r}.")
    if num_synthetic is not None and synthetic is None:
        raise ValueError("num_synthetic needs a synthetic source (a sample folder or a model).")
    if not str(out_root).strip():
        raise ValueError("The nnU-Net raw folder (out_root / --out) is empty, e.g. an unset $nnUNet_raw; pass the "
                         "folder to write DatasetXXX_NAME/ into.")
    root = Path(out_root)
    folder_name = f"Dataset{dataset_id:03d}_{name}"
    target = root / folder_name
    if root.is_dir():
        clash = [p.name for p in root.glob(f"Dataset{dataset_id:03d}_*") if p.name != folder_name]
        if clash:
            raise ValueError(
                f"{str(root)!r} already has {clash} with dataset id {dataset_id}; nnU-Net needs unique ids. "
                "Choose another --dataset-id."
            )
    if target.exists() and not overwrite:
        raise FileExistsError(f"{str(target)!r} already exists; pass overwrite=True (--overwrite) to replace it.")

    # 1. gather sources and their metadata
    real_cases: list[Case] = find_cases(real) if real is not None else []
    real_labels, real_channels = read_dataset_meta(real) if real is not None else (None, None)
    pipe: DuoDiffusion | None = None
    syn_cases: list[Case] = []
    syn_labels = syn_channels = None
    if isinstance(synthetic, DuoDiffusion):
        if device is not None:
            raise ValueError("device applies to models loaded by export_nnunet; move a DuoDiffusion yourself "
                             "(pipe.to(device)) before passing it.")
        pipe = synthetic
    elif synthetic is not None and _is_model_source(synthetic):
        pipe = DuoDiffusion.from_pretrained(synthetic, device=device)
    elif synthetic is not None:
        syn_cases = find_cases(synthetic)
        if num_synthetic is not None:
            if num_synthetic > len(syn_cases):
                raise ValueError(
                    f"num_synthetic={num_synthetic} but {str(synthetic)!r} holds only {len(syn_cases)} pairs; "
                    "generate more with `duodiff sample` or lower -n."
                )
            syn_cases = syn_cases[:num_synthetic]
        syn_labels, syn_channels = read_dataset_meta(synthetic)
    if pipe is not None:
        if num_synthetic is None:
            raise ValueError("Generating from a model needs num_synthetic (-n N), the number of pairs to make.")
        check_sampler_fits(scheduler, pipe)  # before the dataset folder exists
        syn_labels = tuple(pipe.config.label_names)
        syn_channels = None
    if label_names is None:
        _agree("label names", real_labels, syn_labels, "label_names (--label-names)")
        labels = real_labels or syn_labels
    else:
        labels = tuple(label_names)
        for what, other in (("real", real_labels), ("synthetic", syn_labels)):
            if other is not None and len(other) != len(labels):
                raise ValueError(
                    f"label_names has {len(labels)} names but the {what} data has {len(other)} classes {list(other)}."
                )
    if not labels:
        raise ValueError(
            "No label names found: the real folder has no dataset.json. Pass label_names (--label-names), "
            "background first."
        )
    if channel_names is None:
        _agree("channel names", real_channels, syn_channels, "channel_names (--channel-names)")
        n_ch = pipe.config.image_channels if pipe is not None else None
        channels = real_channels or syn_channels or (
            ("MRI",) if (n_ch or 1) == 1 else tuple(f"MRI_{c}" for c in range(n_ch or 1))
        )
    else:
        channels = tuple(channel_names)
    if pipe is not None and pipe.config.image_channels != len(channels):
        raise ValueError(
            f"The model makes {pipe.config.image_channels}-channel images but the dataset has {len(channels)} "
            f"channel(s) {list(channels)}."
        )

    from .output import sample_name

    syn_names = (
        [c.name for c in syn_cases] if pipe is None
        else [sample_name(s, prefix) for s in range(seed, seed + (num_synthetic or 0))]
    )
    clash = sorted(set(syn_names) & {c.name for c in real_cases})
    if clash:
        raise ValueError(f"Synthetic case names {clash[:3]} clash with real ones; choose another prefix (--prefix).")

    # 2. write into a temporary sibling, then rename into place
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder_name}.tmp-", dir=root))
    try:
        chmod_as_new(tmp)  # mkdtemp makes it 0700; the dataset folder gets the permissions any new folder gets
        images_dir, labels_dir = tmp / "imagesTr", tmp / "labelsTr"
        images_dir.mkdir()
        labels_dir.mkdir()
        for case in real_cases:
            _write_case(case, images_dir, labels_dir, len(channels))
        for case in syn_cases:
            _write_case(case, images_dir, labels_dir, len(channels))
        if pipe is not None:
            _generate_into(pipe, tmp, seed=seed, n=num_synthetic or 0, prefix=prefix, channels=channels,
                           num_inference_steps=num_inference_steps, scheduler=scheduler, batch_size=batch_size,
                           dtype=dtype, progress=progress)
        meta = nnunet_dataset_json(
            label_names=labels, num_training=len(real_cases) + len(syn_names), channel_names=channels, name=name,
            description=f"{len(real_cases)} real + {len(syn_names)} synthetic (duodiff) training cases",
        )
        meta["duodiff_synthetic_cases"] = syn_names
        write_json(tmp / "dataset.json", meta)
        if target.exists():
            backup = root / f".{folder_name}.old-{os.getpid()}"
            os.replace(target, backup)
            os.replace(tmp, target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return NnunetExport(target, [c.name for c in real_cases], syn_names, tuple(labels), tuple(channels))


def _generate_into(pipe: Any, folder: Path, *, seed: int, n: int, prefix: str, channels: Sequence[str],
                   num_inference_steps: int, scheduler: str, batch_size: int, dtype: str | None,
                   progress: bool) -> None:
    from tqdm.auto import tqdm

    seeds = list(range(seed, seed + n))
    with tqdm(total=n, desc="synthetic pairs", disable=not progress) as bar:
        for start in range(0, n, batch_size):
            chunk = seeds[start : start + batch_size]
            out = pipe.sample(len(chunk), seed=chunk, num_inference_steps=num_inference_steps, scheduler=scheduler,
                              dtype=dtype, progress=False)
            out.save(folder, prefix=prefix, channel_names=channels)
            bar.update(len(chunk))
