"""NIfTI reading/writing with correct affines, atomic file writes, nnU-Net / MSD folder layouts."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

__all__ = [
    "spacing_affine",
    "atomic_write",
    "write_nifti",
    "read_nifti",
    "check_finite",
    "NonFiniteError",
    "write_json",
    "nnunet_dataset_json",
    "NIFTI_SUFFIX",
]

NIFTI_SUFFIX = ".nii.gz"


class NonFiniteError(ValueError):
    """A volume holds NaN or +-Inf values (read from disk, about to be written, or just generated)."""


def spacing_affine(spacing: Sequence[float], origin: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """A 4x4 RAS affine with voxel size ``spacing`` (mm) and ``origin`` (mm)."""
    affine = np.eye(4, dtype=np.float64)
    affine[:3, :3] = np.diag([float(s) for s in spacing])
    affine[:3, 3] = [float(o) for o in origin]
    return affine


def _umask() -> int:
    """The process umask (``os.umask`` can only be read by setting it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: read once at import (os.umask is process-wide; reading it later could race with other threads).
#: Permissions of a newly created file / folder under the umask (``mkstemp`` files are 0600, ``mkdtemp`` 0700).
_UMASK = _umask()
_FILE_MODE = 0o666 & ~_UMASK
_DIR_MODE = 0o777 & ~_UMASK


def chmod_as_new(root: str | os.PathLike) -> None:
    """Give ``root`` and everything under it the permissions a plain ``mkdir`` / ``open`` would have given.

    For trees built in a ``tempfile.mkdtemp`` folder (private 0700) and then moved into place: a model or dataset
    folder that other users of a shared machine cannot read is a surprise.
    """
    root = Path(root)
    os.chmod(root, _DIR_MODE if root.is_dir() else _FILE_MODE)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), _DIR_MODE)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), _FILE_MODE)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically.

    If the body raises, the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _FILE_MODE)  # like a normal write, not mkstemp's private 0600
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_nifti(
    path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, *, description: str | None = None
) -> Path:
    """Write a 3D (or 4D, channels last) array as NIfTI atomically.

    Args:
        path: destination ending in ``.nii.gz`` or ``.nii``.
        array: ``(H, W, D)`` voxel data; its dtype is kept (labels as uint8/int16, images as float32).
        affine: 4x4 voxel-to-RAS-mm matrix.
        description: optional NIfTI ``descrip`` header text (at most 80 ASCII characters).

    Writes what it is given (tests use it to make broken files); writers of generated or processed volumes
    check them first (:meth:`duodiff.DuoSample.save` refuses NaN/Inf before writing anything).
    """
    path = Path(path)
    if not path.name.endswith((".nii.gz", ".nii")):
        raise ValueError(f"NIfTI paths must end in '.nii.gz' or '.nii', got {str(path)!r}.")
    img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    if description is not None:
        img.header["descrip"] = description.encode("ascii")[:80]
    data = img.to_bytes()
    if path.name.endswith(".gz"):
        data = gzip.compress(data, compresslevel=1, mtime=0)  # nibabel's default level; mtime=0: same bytes every run
    # serialise in memory, so the temporary name need not end in .nii.gz: a leftover from a killed process
    # is never matched by '*.nii.gz' (nnU-Net, dataset.json counts, previews)
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
    return path


def check_finite(array: np.ndarray, what: str) -> np.ndarray:
    """Return ``array`` unchanged if every value is finite; otherwise raise naming ``what``.

    Raises:
        NonFiniteError: ``array`` holds NaN or +-Inf values (counts are given in the message).
    """
    if np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.complexfloating):
        finite = np.isfinite(array)
        if not finite.all():
            n_nan = int(np.isnan(array).sum())
            n_inf = int(finite.size - finite.sum()) - n_nan
            raise NonFiniteError(
                f"{what} contains {n_nan} NaN and {n_inf} Inf value(s) out of {array.size}. duodiff does not "
                "replace them silently; fix or remove the volume (e.g. np.nan_to_num) and try again."
            )
    return array


def read_nifti(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file; returns ``(array, affine)``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is empty, not a readable NIfTI, or holds NaN/Inf values.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No NIfTI file at {str(path)!r}.")
    if path.stat().st_size == 0:
        raise ValueError(f"{str(path)!r} is empty (0 bytes); expected a NIfTI volume.")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for corrupt files
        raise ValueError(f"{str(path)!r} is not a readable NIfTI file: {e}") from e
    check_finite(data, repr(str(path)))
    return data, np.asarray(img.affine, dtype=np.float64)


def write_json(path: str | os.PathLike, data: Mapping[str, Any]) -> Path:
    """Write sorted, indented JSON atomically."""
    path = Path(path)
    with atomic_write(path, suffix=".json") as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def nnunet_dataset_json(
    *,
    label_names: Sequence[str],
    num_training: int,
    channel_names: Sequence[str] = ("MRI",),
    name: str | None = None,
    description: str | None = None,
) -> dict[str, Any]:
    """An nnU-Net v2 ``dataset.json`` dict (``channel_names``, ``labels`` name->id, ...)."""
    out: dict[str, Any] = {
        "channel_names": {str(i): c for i, c in enumerate(channel_names)},
        "labels": {n: i for i, n in enumerate(label_names)},
        "numTraining": int(num_training),
        "file_ending": NIFTI_SUFFIX,
    }
    if name:
        out["name"] = name
    if description:
        out["description"] = description
    return out
