"""The bad-input battery: every broken input fails with a typed error whose message names the problem.

Each case asserts the exception type and a fragment of the message; the CLI cases assert exit code 2
and exactly one ``duodiff <command>: error: ...`` line on stderr. Writes that fail half-way must leave
the previous model / output intact.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from duodiff import ConfigError, DuoDiffusion, keys, make_config
from duodiff.cli.main import main
from duodiff.config import ConfigTypeError
from duodiff.hub import ModelLoadError
from duodiff.io import read_nifti, spacing_affine, write_json, write_nifti
from duodiff.preview import preview_folder
from tests.conftest import error_lines

WEIGHTS = "model.safetensors"

# 2D test volumes make MONAI's Orientation warn before duodiff rejects them
pytestmark = pytest.mark.filterwarnings("ignore:axcodes:UserWarning")


# ------------------------------------------------------------------------------------------ helpers
def cli_error(argv: list[str], capsys) -> str:
    """Run the CLI in-process; assert exit code 2 and one error line (after any phase announcements); return it."""
    code = main(argv)
    err = error_lines(capsys.readouterr().err)
    assert code == 2, err
    assert len(err) == 1, err
    assert err[0].startswith(f"duodiff {argv[0]}: error: "), err[0]
    return err[0]


def _edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A copy in memory (``load_file`` may map the file, which is about to be overwritten)."""
    return {k: v.clone() for k, v in load_file(str(path)).items()}


def _edit_weights(path: Path, change: Callable[[dict], None]) -> None:
    state = _read_weights(path)
    change(state)
    save_file(state, str(path))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _pickle_as_safetensors(path: Path) -> None:
    torch.save(_read_weights(path), path)


def _bad_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:8] = (10**12).to_bytes(8, "little")  # header length far beyond the file
    path.write_bytes(bytes(data))


def _wider_image_unet(folder: Path) -> None:
    """A valid config whose image UNet/ControlNet are wider than the saved weights."""
    for name in ("image_unet", "image_controlnet"):
        _edit_json(folder / name / "config.json", lambda d: d.update(channels=[8, 24]))


def _rm(rel: str) -> Callable[[Path], None]:
    def f(folder: Path) -> None:
        target = folder / rel
        shutil.rmtree(target) if target.is_dir() else target.unlink()

    return f


def _write(rel: str, text: str) -> Callable[[Path], None]:
    return lambda folder: (folder / rel).write_text(text)


def _cfg(rel: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    return lambda folder: _edit_json(folder / rel, change)


def _pipeline_section(change: Callable[[dict], None]) -> Callable[[Path], None]:
    return _cfg(keys.MODEL_INDEX, lambda d: change(d["pipeline"]))


def _w(component: str, change: Callable[[Path], None]) -> Callable[[Path], None]:
    return lambda folder: change(folder / component / WEIGHTS)


# (case id, how to break a saved model folder, expected exception type, message fragment)
FOLDER_CASES = [
    ("truncated-safetensors", _w("image_unet", _truncate), ModelLoadError, "not a valid safetensors"),
    ("random-bytes-safetensors", _w("label_unet", lambda p: p.write_bytes(os.urandom(4096))), ModelLoadError,
     "not a valid safetensors"),
    ("empty-safetensors", _w("label_autoencoder", lambda p: p.write_bytes(b"")), ModelLoadError,
     "not a valid safetensors"),
    ("pickle-renamed-safetensors", _w("image_controlnet", _pickle_as_safetensors), ModelLoadError,
     "never loads pickles"),
    ("corrupt-safetensors-header", _w("image_autoencoder", _bad_header), ModelLoadError, "not a valid safetensors"),
    ("missing-component-folder", _rm("image_controlnet"), FileNotFoundError, "image_controlnet"),
    ("missing-weights-file", _rm(f"label_unet/{WEIGHTS}"), FileNotFoundError, "Missing weights"),
    ("missing-model-index", _rm(keys.MODEL_INDEX), FileNotFoundError, "model_index.json"),
    ("model-index-not-json", _write(keys.MODEL_INDEX, "{oops"), ConfigError, "not valid JSON"),
    ("model-index-other-library", _cfg(keys.MODEL_INDEX, lambda d: d.update(_class_name="UNet2DModel")),
     ConfigError, "does not describe a DuoDiffusion pipeline"),
    ("component-config-not-json", _write("image_unet/config.json", "[1, 2"), ConfigError, "not valid JSON"),
    ("scheduler-config-not-json", _write("scheduler/scheduler_config.json", "{"), ConfigError, "not valid JSON"),
    ("unknown-component-key", _cfg("image_unet/config.json", lambda d: d.update(chanels=[8, 16])), ConfigError,
     "chanels"),
    ("unknown-pipeline-key", _pipeline_section(lambda d: d.update(volume_shap=[16, 16, 16])), ConfigError,
     "volume_shap"),
    ("unknown-scheduler-key", _cfg("scheduler/scheduler_config.json", lambda d: d.update(beta=0.1)), ConfigError,
     "beta"),
    ("missing-required-key", _cfg("label_unet/config.json", lambda d: d.pop("in_channels")), ConfigError,
     "in_channels"),
    ("wrong-type-channels", _cfg("image_unet/config.json", lambda d: d.update(channels="8,16")), ConfigTypeError,
     "channels"),
    ("wrong-type-num-classes", _pipeline_section(lambda d: d.update(num_classes="3")), ConfigTypeError, "num_classes"),
    ("wrong-type-bool", _cfg("label_unet/config.json", lambda d: d.update(with_conditioning="no")), ConfigTypeError,
     "with_conditioning"),
    ("wrong-type-spacing", _pipeline_section(lambda d: d.update(spacing=[1, "a", 1])), ConfigTypeError, "spacing"),
    ("incompatible-norm-groups", _cfg("label_autoencoder/config.json", lambda d: d.update(norm_num_groups=3)),
     ConfigError, "norm_num_groups"),
    ("incompatible-volume-shape", _pipeline_section(lambda d: d.update(volume_shape=[15, 16, 16])), ConfigError,
     "not divisible"),
    ("incompatible-prediction-type", _cfg("scheduler/scheduler_config.json",
                                          lambda d: d.update(prediction_type="noise")), ConfigError,
     "prediction_type"),
    ("incompatible-betas", _cfg("scheduler/scheduler_config.json", lambda d: d.update(beta_start=0.5)),
     ConfigError, "beta_start < beta_end"),
    ("incompatible-num-classes", _pipeline_section(lambda d: d.update(num_classes=4, label_names=[])),
     ConfigError, "num_classes"),
    ("incompatible-label-names", _pipeline_section(lambda d: d.update(label_names=["bg", "a"])), ConfigError,
     "label_names"),
    ("incompatible-controlnet", _cfg("image_controlnet/config.json", lambda d: d.update(channels=[8, 24])),
     ConfigError, "must match image_unet"),
    ("negative-spacing", _pipeline_section(lambda d: d.update(spacing=[1.0, -1.0, 1.0])), ConfigError, "spacing"),
    ("weights-wrong-shape", _wider_image_unet, ModelLoadError, "wrong shape"),
    ("weights-missing-key", _w("label_unet", lambda p: _edit_weights(p, lambda s: s.pop(sorted(s)[0]))),
     ModelLoadError, "1 missing key"),
    ("weights-unexpected-key", _w("label_unet", lambda p: _edit_weights(p, lambda s: s.update(extra=torch.ones(1)))),
     ModelLoadError, "unexpected key(s) ['extra']"),
    ("weights-of-other-component", lambda f: shutil.copy(f / "image_autoencoder" / WEIGHTS,
                                                         f / "label_autoencoder" / WEIGHTS),
     ModelLoadError, "label_autoencoder's config"),
    ("weights-nan", _w("image_unet", lambda p: _edit_weights(
        p, lambda s: s.update({k: torch.full_like(v, float("nan")) for k, v in list(s.items())[:1]}))),
     ModelLoadError, "NaN or Inf"),
]


@pytest.fixture
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(tiny_model_dir, dst)
    return dst


@pytest.mark.parametrize("case_id, breaker, exc, fragment", FOLDER_CASES, ids=[c[0] for c in FOLDER_CASES])
def test_broken_model_folder(model_copy, capsys, case_id, breaker, exc, fragment):
    breaker(model_copy)
    with pytest.raises(exc) as info:
        DuoDiffusion.from_pretrained(model_copy)
    assert type(info.value) is exc
    assert fragment in str(info.value)
    # the CLI reports the same problem in one line with exit code 2
    line = cli_error(["info", str(model_copy)], capsys)
    assert fragment.split("(")[0].split("[")[0].strip() in line


def test_pickle_in_safetensors_is_never_executed(model_copy, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"x": Evil()}, model_copy / "image_unet" / WEIGHTS)
    with pytest.raises(ModelLoadError, match="never loads pickles"):
        DuoDiffusion.from_pretrained(model_copy)
    assert not marker.exists()


def test_missing_folder_and_file_instead_of_folder(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="No model folder"):
        DuoDiffusion.from_pretrained(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="No model folder"):
        DuoDiffusion.from_pretrained(tmp_path / "file.txt")
    assert "No model folder" in cli_error(["sample", "--model", str(tmp_path / "nope"), "--out",
                                           str(tmp_path / "o")], capsys)


def test_missing_variant_and_bad_variant(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match=r"variant="):
        DuoDiffusion.from_pretrained(tmp_path / "m", variant="fp16")
    with pytest.raises(ValueError, match=r"variant must be one of \[None, 'fp16'\], got 'fp8'"):
        DuoDiffusion.from_pretrained(tmp_path / "m", variant="fp8")


# ------------------------------------------------------------------------------------------ configs in code
@pytest.mark.parametrize("kwargs, exc, fragment", [
    (dict(name="huge"), ConfigError, "Unknown preset 'huge'"),
    (dict(volume_shape=(16, 16)), ConfigError, "volume_shape must have 3 sides"),
    (dict(num_classes=1), ConfigError, "num_classes must be >= 2"),
    (dict(prediction_type="x0"), ConfigError, "prediction_type"),
    (dict(label_names=("bg", "bg", "a")), ConfigError, "label_names must be unique"),
], ids=["unknown-preset", "2d-volume-shape", "one-class", "bad-prediction-type", "duplicate-label-names"])
def test_bad_preset_arguments(kwargs, exc, fragment):
    args = dict(name="tiny", num_classes=3) | kwargs
    with pytest.raises(exc, match=fragment):
        make_config(args.pop("name"), **args)


def test_config_from_non_mapping():
    from duodiff import PipelineConfig

    with pytest.raises(TypeError, match="PipelineConfig must be a mapping, got list"):
        PipelineConfig.from_dict([1, 2])


# ------------------------------------------------------------------------------------------ label maps
LABEL_CASES = [
    ("float-labels", lambda s: torch.zeros((1, 1, *s)), TypeError, "integer dtype"),
    ("bool-labels", lambda s: torch.zeros((1, 1, *s), dtype=torch.bool), TypeError, "integer dtype"),
    ("id-too-large", lambda s: torch.full((1, 1, *s), 3), ValueError, "found id 3"),
    ("negative-id", lambda s: torch.full((1, 1, *s), -1), ValueError, "found id -1"),
    ("wrong-spatial-shape", lambda s: torch.zeros((1, 1, 16, 16, 8), dtype=torch.long), ValueError,
     "got (1, 1, 16, 16, 8)"),
    ("missing-batch-dim", lambda s: torch.zeros(s, dtype=torch.long), ValueError, "got (16, 16, 16)"),
    ("two-channels", lambda s: torch.zeros((1, 2, *s), dtype=torch.long), ValueError, "got (1, 2, 16, 16, 16)"),
    ("empty-batch", lambda s: torch.zeros((0, 1, *s), dtype=torch.long), ValueError, "N=0"),
    ("not-an-array", lambda s: [[0, 1], [1, 0]], TypeError, "got list"),
    ("float-numpy", lambda s: np.zeros((1, *s), dtype=np.float32), TypeError, "integer dtype"),
]


@pytest.mark.parametrize("case_id, make, exc, fragment", LABEL_CASES, ids=[c[0] for c in LABEL_CASES])
def test_bad_label_maps(tiny_pipe, case_id, make, exc, fragment):
    with pytest.raises(exc) as info:
        tiny_pipe.generate_images(make((16, 16, 16)), seed=0, num_inference_steps=2, progress=False)
    assert fragment in str(info.value)


# ------------------------------------------------------------------------------------------ sampling arguments
SAMPLE_CASES = [
    ("zero-samples", dict(num_samples=0), ValueError, "num_samples must be a positive int"),
    ("steps-above-train", dict(num_inference_steps=5000), ValueError, "num_inference_steps"),
    ("steps-float", dict(num_inference_steps=2.5), TypeError, "num_inference_steps must be an int"),
    ("seed-count-mismatch", dict(num_samples=2, seed=[1, 2, 3]), ValueError, "Got 3 seeds for 2 samples"),
    ("negative-seed", dict(seed=-5), ValueError, "seeds must be >= 0"),
    ("seed-and-generator", dict(seed=1, generator=torch.Generator()), ValueError, "either seed or generator"),
    ("unknown-scheduler", dict(scheduler="euler"), ValueError, "scheduler must be one of"),
    ("bad-dtype", dict(dtype="int8"), ValueError, "dtype must be one of"),
    ("zero-batch", dict(batch_size=0), ValueError, "batch_size must be a positive int"),
    ("string-conditioning-scale", dict(conditioning_scale="1"), TypeError, "conditioning_scale must be a number"),
]


@pytest.mark.parametrize("case_id, kwargs, exc, fragment", SAMPLE_CASES, ids=[c[0] for c in SAMPLE_CASES])
def test_bad_sampling_arguments(tiny_pipe, case_id, kwargs, exc, fragment):
    args = dict(num_samples=1, num_inference_steps=2, progress=False) | kwargs
    with pytest.raises(exc) as info:
        tiny_pipe.sample(args.pop("num_samples"), **args)
    assert fragment in str(info.value)


# ------------------------------------------------------------------------------------------ volumes on disk
def _nifti(path: Path, array: np.ndarray) -> Path:
    write_nifti(path, array, spacing_affine((1, 1, 1)))
    return path


def _with(array: np.ndarray, index, value) -> np.ndarray:
    array[index] = value
    return array


def _gz_truncated(path: Path) -> Path:
    _nifti(path, np.random.default_rng(0).random((16, 16, 16), dtype=np.float32))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


VOLUME_CASES = [
    ("empty-file", lambda p: (p.write_bytes(b""), p)[1], ValueError, "is empty (0 bytes)"),
    ("text-file-named-nifti", lambda p: (p.write_text("not an image\n" * 50), p)[1], ValueError,
     "not a readable NIfTI"),
    ("truncated-nifti", _gz_truncated, ValueError, "not a readable NIfTI"),
    ("nan-volume", lambda p: _nifti(p, _with(np.ones((16, 16, 16), np.float32), (0, slice(None), 0), np.nan)),
     ValueError, "16 NaN and 0 Inf"),
    ("inf-volume", lambda p: _nifti(p, np.full((16, 16, 16), np.inf, np.float32)), ValueError, "0 NaN and 4096 Inf"),
]


@pytest.mark.parametrize("case_id, make, exc, fragment", VOLUME_CASES, ids=[c[0] for c in VOLUME_CASES])
def test_bad_volume_files(tmp_path, capsys, case_id, make, exc, fragment):
    path = make(tmp_path / "case.nii.gz")
    with pytest.raises(exc) as info:
        read_nifti(path)
    assert fragment in str(info.value) and "case.nii.gz" in str(info.value)
    line = cli_error(["preview", str(path), "--out", str(tmp_path / "p.png")], capsys)
    assert fragment in line
    assert not (tmp_path / "p.png").exists()


def test_missing_volume(tmp_path):
    with pytest.raises(FileNotFoundError, match="No NIfTI file at"):
        read_nifti(tmp_path / "none.nii.gz")


@pytest.fixture
def pair_folder(tmp_path: Path) -> Path:
    from duodiff.testing import phantom_pair

    root = tmp_path / "pairs"
    img, lab = phantom_pair((16, 16, 16), num_classes=3)
    _nifti(root / "imagesTr" / "a_0000.nii.gz", img)
    _nifti(root / "labelsTr" / "a.nii.gz", lab)
    return root


def test_preview_image_label_shape_mismatch(pair_folder, capsys):
    _nifti(pair_folder / "labelsTr" / "a.nii.gz", np.zeros((16, 16, 8), np.uint8))
    with pytest.raises(ValueError, match=r"'a': image shape \(16, 16, 16\) != label shape \(16, 16, 8\)"):
        preview_folder(pair_folder, pair_folder / "p.png")
    assert "(16, 16, 8)" in cli_error(["preview", str(pair_folder), "--out", str(pair_folder / "p.png")], capsys)


def test_preview_nan_image_in_a_folder(pair_folder):
    _nifti(pair_folder / "imagesTr" / "a_0000.nii.gz", np.full((16, 16, 16), np.nan, np.float32))
    with pytest.raises(ValueError, match="case 'a': the image contains NaN or Inf"):
        preview_folder(pair_folder, pair_folder / "p.png")


def test_preview_empty_and_missing_folders(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="must contain 'imagesTr' and 'labelsTr'"):
        preview_folder(tmp_path, tmp_path / "p.png")
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    with pytest.raises(FileNotFoundError, match="the dataset is empty"):
        preview_folder(tmp_path, tmp_path / "p.png")
    assert "the dataset is empty" in cli_error(["preview", str(tmp_path), "--out", str(tmp_path / "p.png")], capsys)


# ------------------------------------------------------------------------------------------ training data
@pytest.fixture
def train_data():
    return pytest.importorskip("duodiff.train.data")


def _dataset(root: Path, cases: dict[str, tuple[np.ndarray, np.ndarray]], affine=None) -> Path:
    affine = spacing_affine((1, 1, 1)) if affine is None else affine
    for name, (img, lab) in cases.items():
        write_nifti(root / "imagesTr" / f"{name}.nii.gz", img, affine)
        write_nifti(root / "labelsTr" / f"{name}.nii.gz", lab, affine)
    write_json(root / "dataset.json", {"labels": {"background": 0, "a": 1, "b": 2},
                                       "training": [{"image": f"./imagesTr/{n}.nii.gz",
                                                     "label": f"./labelsTr/{n}.nii.gz"} for n in cases]})
    return root


def _good_pair(shape=(20, 20, 20)):
    from duodiff.testing import phantom_pair

    return phantom_pair(shape, num_classes=3)


def _preprocess(train_data, root: Path):
    from duodiff.train.config import DataConfig

    cfg = DataConfig(root=str(root))
    (case,) = train_data.find_cases(root)
    return train_data.preprocess_case(case, cfg, (16, 16, 16), [0, 1, 2])


def test_training_empty_dataset_folder(train_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="must contain 'imagesTr' and 'labelsTr'"):
        train_data.find_cases(tmp_path)
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    with pytest.raises(FileNotFoundError, match="the dataset is empty"):
        train_data.find_cases(tmp_path)


def test_training_missing_dataset_folder(train_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train_data.find_cases(tmp_path / "nope")


def test_training_label_without_image(train_data, tmp_path):
    root = _dataset(tmp_path, {"a": _good_pair()})
    (root / "imagesTr" / "a.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="Label a.nii.gz has no image"):
        train_data.find_cases(root)


def test_training_datalist_points_at_missing_files(train_data, tmp_path):
    root = _dataset(tmp_path, {"a": _good_pair(), "b": _good_pair()})
    (root / "labelsTr" / "b.nii.gz").unlink()
    from duodiff.data.folders import cases_from_datalist

    with pytest.raises(FileNotFoundError, match=r"lists .*labelsTr/b.nii.gz.* does not exist"):
        cases_from_datalist(root / "dataset.json")


BAD_TRAINING_CASES = [
    ("nan-image", lambda: (np.full((20, 20, 20), np.nan, np.float32), _good_pair()[1]), "NaN or Inf"),
    ("inf-image", lambda: (np.where(_good_pair()[1] > 1, np.inf, 1.0).astype(np.float32), _good_pair()[1]),
     "NaN or Inf"),
    ("non-integer-labels", lambda: (_good_pair()[0], _good_pair()[1].astype(np.float32) * 0.5), "non-integer"),
    ("label-id-out-of-range", lambda: (_good_pair()[0], _good_pair()[1] * 3), "label values [3, 6]"),
    ("image-label-shape-mismatch", lambda: (_good_pair((20, 20, 24))[0], _good_pair()[1]), "!= label shape"),
    ("empty-label", lambda: (_good_pair()[0], np.zeros((20, 20, 20), np.uint8)), "empty"),
    ("constant-image", lambda: (np.ones((20, 20, 20), np.float32), _good_pair()[1]), "constant"),
]


@pytest.mark.parametrize("case_id, make, fragment", BAD_TRAINING_CASES, ids=[c[0] for c in BAD_TRAINING_CASES])
def test_training_bad_cases(train_data, tmp_path, case_id, make, fragment):
    root = _dataset(tmp_path, {"case": make()})
    with pytest.raises(train_data.BadCaseError) as info:
        _preprocess(train_data, root)
    assert fragment in str(info.value) and "'case'" in str(info.value)


def test_training_non_nifti_file(train_data, tmp_path):
    root = _dataset(tmp_path, {"case": _good_pair()})
    (root / "imagesTr" / "case.nii.gz").write_text("hello")
    with pytest.raises(train_data.BadCaseError, match="cannot read"):
        _preprocess(train_data, root)


def test_training_2d_slices(train_data, tmp_path):
    img, lab = _good_pair()
    root = _dataset(tmp_path, {"case": (img[:, :, 10], lab[:, :, 10])})
    with pytest.raises(train_data.BadCaseError, match=r"'case'.*needs one 3D volume per file"):
        _preprocess(train_data, root)


def test_training_reads_every_channel_of_an_msd_4d_image(train_data, tmp_path):
    img, lab = _good_pair()
    root = _dataset(tmp_path, {"case": (np.stack([img, 2 * img], axis=-1), lab)})  # MSD: channels last
    image, label, _ = _preprocess(train_data, root)
    assert image.shape == (2, 16, 16, 16) and label.shape == (1, 16, 16, 16)


# ------------------------------------------------------------------------------------------ output locations
def test_output_below_a_file(tiny_pipe, tmp_path, capsys, tiny_model_dir):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    out = tiny_pipe.sample(1, seed=0, num_inference_steps=2, progress=False)
    with pytest.raises(OSError, match="Choose a writable --out"):
        out.save(blocker / "sub")
    with pytest.raises(FileExistsError, match="is not a folder"):
        tiny_pipe.save_pretrained(blocker)
    line = cli_error(["sample", "--model", str(tiny_model_dir), "-n", "1", "--steps", "2", "--out", str(blocker)],
                     capsys)
    assert "exists and is not a folder" in line


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_output_folder(tiny_pipe, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        out = tiny_pipe.sample(1, seed=0, num_inference_steps=2, progress=False)
        with pytest.raises(OSError, match="Choose a writable --out"):
            out.save(ro / "sub")
        with pytest.raises(OSError, match="Choose a writable folder"):
            tiny_pipe.save_pretrained(ro / "model")
    finally:
        ro.chmod(0o700)


def test_nifti_path_with_wrong_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"must end in '.nii.gz' or '.nii'"):
        write_nifti(tmp_path / "x.png", np.zeros((2, 2, 2)), np.eye(4))


# ------------------------------------------------------------------------------------------ half-way failures
def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_model_save_failing_half_way_keeps_the_previous_model(tiny_pipe, tmp_path, monkeypatch):
    import duodiff.hub as hub

    target = tmp_path / "model"
    tiny_pipe.save_pretrained(target)
    before = _snapshot(target)
    other = DuoDiffusion.from_preset("tiny", num_classes=3, init_seed=1)
    calls = []

    def failing_save_file(state, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 3:  # third component: write half a file, then the disk is full
            Path(filename).write_bytes(b"\0" * 100)
            raise OSError(28, "No space left on device")
        return save_file(state, filename, metadata=metadata)

    monkeypatch.setattr(hub, "save_file", failing_save_file)
    with pytest.raises(OSError, match="No space left"):
        other.save_pretrained(target)
    assert _snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "temporary folders must be removed"
    loaded = DuoDiffusion.from_pretrained(target)
    for name in keys.COMPONENTS:
        a, b = getattr(loaded, name).state_dict(), getattr(tiny_pipe, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_output_write_failing_half_way_keeps_previous_files(tiny_pipe, tmp_path, monkeypatch):
    out_dir = tmp_path / "synthetic"
    first = tiny_pipe.sample(2, seed=0, num_inference_steps=2, progress=False)
    first.save(out_dir)
    before = _snapshot(out_dir)
    real_write_bytes = Path.write_bytes
    count = {"n": 0}

    def failing_write_bytes(self, data):
        count["n"] += 1
        if count["n"] == 3:  # overwrite of seed 1's image: half the bytes land, then the disk is full
            real_write_bytes(self, data[: len(data) // 2])
            raise OSError(28, "No space left on device")
        return real_write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", failing_write_bytes)
    with pytest.raises(OSError, match="No space left"):
        first.save(out_dir)  # same cases again: seed 0 is rewritten, seed 1's image write fails half-way
    monkeypatch.undo()
    after = _snapshot(out_dir)
    assert {k: v for k, v in after.items() if k in before} == before, "previous files changed"
    assert set(after) == set(before), "no partial or temporary file may remain"
    for rel in after:
        if rel.endswith(".nii.gz"):
            np.asarray(nib.load(out_dir / rel).dataobj)


def test_json_write_failing_half_way_keeps_previous_file(tmp_path, monkeypatch):
    path = write_json(tmp_path / "dataset.json", {"numTraining": 2})
    real_write_text = Path.write_text

    def failing_write_text(self, data, *args, **kwargs):
        real_write_text(self, data[:5], *args, **kwargs)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(Path, "write_text", failing_write_text)
    with pytest.raises(OSError, match="Input/output error"):
        write_json(path, {"numTraining": 3})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"numTraining": 2}
    assert os.listdir(tmp_path) == ["dataset.json"]


# ------------------------------------------------------------------------------------------ convert
def test_convert_bad_checkpoints(tiny_model_dir, tmp_path, capsys):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "whole.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("hello")
    base = ["convert", "--config", str(tiny_model_dir), "--out", str(tmp_path / "out")]
    for name in keys.COMPONENTS:
        base += [f"--{name.replace('_', '-')}", str(tmp_path / "whole.pt")]
    assert "refuses to unpickle" in cli_error(base, capsys)
    assert "is empty (0 bytes)" in cli_error([a.replace("whole.pt", "empty.pt") for a in base], capsys)
    assert "not a readable PyTorch checkpoint" in cli_error([a.replace("whole.pt", "text.pt") for a in base], capsys)
    assert "No checkpoint file" in cli_error([a.replace("whole.pt", "gone.pt") for a in base], capsys)
    assert "No pipeline config" in cli_error([a.replace(str(tiny_model_dir), str(tmp_path / "c.json"))
                                              for a in base], capsys)
    assert not (tmp_path / "out").exists()


def test_real_subprocess_exit_code_and_one_line(tmp_path):
    from tests.conftest import run_cli

    (tmp_path / "model_index.json").write_text("{")
    for name in keys.COMPONENTS:
        (tmp_path / name).mkdir()
    proc = run_cli(["info", str(tmp_path)])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("duodiff info: error: ") and "not valid JSON" in lines[0]


# ------------------------------------------------------------------------------------------ evaluation data
@pytest.fixture
def metrics_data():
    return pytest.importorskip("duodiff.metrics.data")


@pytest.mark.parametrize("case_id, make, fragment", [
    ("nan-image", lambda: (np.full((20, 20, 20), np.nan, np.float32), _good_pair()[1]), "NaN or Inf"),
    ("non-integer-labels", lambda: (_good_pair()[0], _good_pair()[1].astype(np.float32) * 0.5), "non-integer"),
    ("image-label-shape-mismatch", lambda: (_good_pair((20, 20, 24))[0], _good_pair()[1]), "same voxel grid"),
    ("2d-slices", lambda: (_good_pair()[0][:, :, 10], _good_pair()[1][:, :, 10]), "3D"),
], ids=["nan-image", "non-integer-labels", "image-label-shape-mismatch", "2d-slices"])
def test_evaluation_reader_bad_cases(metrics_data, tmp_path, case_id, make, fragment):
    root = _dataset(tmp_path, {"case": make()})
    with pytest.raises(ValueError) as info:
        metrics_data.load_pairs(root)
    assert fragment in str(info.value) and "'case'" in str(info.value)
