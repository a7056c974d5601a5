"""One dataset-folder reader: every reader (train, evaluate, export, from_folder, preview) accepts and refuses the
same cases of MSD / nnU-Net v2 folders with the same message; geometry and label checks; dataset.json labels;
the model's recorded preprocessing (cases 01, 02 and 08 of issue 14)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from duodiff import DuoDiffusion, SyntheticPairDataset
from duodiff.data.folders import (
    DEFAULT_INTENSITY_PERCENTILES,
    BadCaseError,
    DatasetJsonError,
    find_cases,
    read_case,
    read_dataset_labels,
    read_label_names,
)
from duodiff.export import export_nnunet
from duodiff.io import spacing_affine, write_nifti
from duodiff.metrics import load_pairs
from duodiff.testing import phantom_pair, tiny_pipeline
from duodiff.train.config import DataConfig
from duodiff.train.data import prepare_dataset, preprocess_case

SHAPE = (16, 16, 16)
MSD_LABELS = {"labels": {"0": "background", "1": "a", "2": "b"}, "modality": {"0": "MRI"}}
V2_LABELS = {"labels": {"background": 0, "a": 1, "b": 2}, "channel_names": {"0": "MRI"}, "file_ending": ".nii.gz"}


# ------------------------------------------------------------------------------------------ folder builders
def _write(root: Path, image_name: str, image: np.ndarray, label_name: str | None, label: np.ndarray,
           affine=None, label_affine=None) -> None:
    affine = np.eye(4) if affine is None else affine
    write_nifti(root / "imagesTr" / image_name, image, affine)
    if label_name is not None:
        write_nifti(root / "labelsTr" / label_name, label, affine if label_affine is None else label_affine)


def _translation(x: float, y: float) -> np.ndarray:
    t = np.eye(4)
    t[:2, 3] = [x, y]
    return t


def make_folder(root: Path, variant: str) -> Path:
    """A two-case dataset folder in one of the layouts MSD / nnU-Net v2 allow, or with one broken case."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    meta = dict(V2_LABELS if "v2" in variant or variant.startswith("nnunet") else MSD_LABELS)
    if "two-channels" in variant:
        meta["channel_names" if "channel_names" in meta else "modality"] = {"0": "MRI", "1": "MRI2"}
    (root / "dataset.json").write_text(json.dumps(meta))
    pairs = {f"case_{i}": phantom_pair(SHAPE, seed=i) for i in range(2)}
    for i, (name, (img, lab)) in enumerate(pairs.items()):
        broken = i == 1  # the second case carries the fault of a broken variant
        if variant == "msd":
            _write(root, f"{name}.nii.gz", img, f"{name}.nii.gz", lab)
        elif variant == "msd-nii":
            _write(root, f"{name}.nii", img, f"{name}.nii", lab)
        elif variant == "msd-v2-labels-mixed-endings":
            _write(root, f"{name}.nii", img, f"{name}.nii.gz", lab)
        elif variant == "msd-4d-two-channels":
            _write(root, f"{name}.nii.gz", np.stack([img, img * 2], axis=-1), f"{name}.nii.gz", lab)
        elif variant == "msd-lps-orientation":
            lps = np.diag([-1.0, -1.0, 1.0, 1.0])
            _write(root, f"{name}.nii.gz", img, f"{name}.nii.gz", lab, affine=lps)
        elif variant == "msd-label-stored-flipped":  # same world grid, the label stored in LPS axis order
            _write(root, f"{name}.nii.gz", img, None, lab)
            write_nifti(root / "labelsTr" / f"{name}.nii.gz", lab[::-1, ::-1].copy(),
                        _translation(SHAPE[0] - 1, SHAPE[1] - 1) @ np.diag([-1.0, -1.0, 1.0, 1.0]))
        elif variant == "nnunet":
            _write(root, f"{name}_0000.nii.gz", img, f"{name}.nii.gz", lab)
        elif variant == "nnunet-nii":
            _write(root, f"{name}_0000.nii", img, f"{name}.nii", lab)
        elif variant == "nnunet-two-channels":
            _write(root, f"{name}_0000.nii.gz", img, f"{name}.nii.gz", lab)
            write_nifti(root / "imagesTr" / f"{name}_0001.nii.gz", img * 3, np.eye(4))
        elif variant == "nnunet-hidden-files":
            _write(root, f"{name}_0000.nii.gz", img, f"{name}.nii.gz", lab)
            (root / "imagesTr" / f"._{name}_0000.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
            (root / "labelsTr" / f"._{name}.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
            (root / "imagesTr" / ".DS_Store").write_bytes(b"junk")
            (root / "labelsTr" / "notes.txt").write_text("not a volume")
        elif variant == "broken-missing-label":
            _write(root, f"{name}_0000.nii.gz", img, None if broken else f"{name}.nii.gz", lab)
        elif variant == "broken-missing-image":
            _write(root, f"{name}_0000.nii.gz", img, f"{name}.nii.gz", lab)
            if broken:
                (root / "imagesTr" / f"{name}_0000.nii.gz").unlink()
        elif variant == "broken-shifted-label":
            shifted = np.eye(4)
            shifted[0, 3] = 20.0 if broken else 0.0
            _write(root, f"{name}_0000.nii.gz", img, f"{name}.nii.gz", lab, label_affine=shifted)
        elif variant == "broken-label-spacing":
            _write(root, f"{name}.nii.gz", img, f"{name}.nii.gz", lab,
                   label_affine=spacing_affine((2.0, 2.0, 2.0)) if broken else None)
        elif variant == "broken-float-labels":
            bad = lab.astype(np.float32)
            if broken:
                bad[bad == 1] = np.nextafter(np.float32(1), np.float32(0))  # 0.99999994
            _write(root, f"{name}_0000.nii.gz", img, f"{name}.nii.gz", bad)
        elif variant == "broken-channel-gap":
            _write(root, f"{name}_0000.nii.gz", img, f"{name}.nii.gz", lab)
            if broken:
                (root / "imagesTr" / f"{name}_0000.nii.gz").rename(root / "imagesTr" / f"{name}_0002.nii.gz")
                write_nifti(root / "imagesTr" / f"{name}_0000.nii.gz", img, np.eye(4))
        elif variant == "broken-shape":
            _write(root, f"{name}_0000.nii.gz", img[:, :, :12] if broken else img, f"{name}.nii.gz", lab)
        else:  # pragma: no cover
            raise AssertionError(variant)
    return root


VALID = ["msd", "msd-nii", "msd-v2-labels-mixed-endings", "msd-4d-two-channels", "msd-lps-orientation",
         "msd-label-stored-flipped", "nnunet", "nnunet-nii", "nnunet-two-channels", "nnunet-hidden-files"]
BROKEN = ["broken-missing-label", "broken-missing-image", "broken-shifted-label", "broken-label-spacing",
          "broken-float-labels", "broken-channel-gap", "broken-shape"]


# ------------------------------------------------------------------------------------------ the readers
def _train(folder: Path, tmp: Path) -> list[str]:
    data, _ = prepare_dataset(DataConfig(root=str(folder)), SHAPE, cache_dir=tmp / "cache", progress=False)
    return data.names


def _evaluate(folder: Path, tmp: Path) -> list[str]:
    return load_pairs(folder, volume_shape=SHAPE).names


def _export(folder: Path, tmp: Path) -> list[str]:
    out = export_nnunet(tmp / "raw", dataset_id=1, name="X", real=folder, progress=False)
    return out.real_cases


def _from_folder(folder: Path, tmp: Path) -> list[str]:
    ds = SyntheticPairDataset.from_folder(folder)
    for i in range(len(ds)):  # items are read lazily: read every one
        ds[i]
    return [c.name for c in ds._cases]


def _preview(folder: Path, tmp: Path) -> list[str]:
    pytest.importorskip("matplotlib")
    import duodiff.preview as preview

    shown: list[str] = []
    real_plot = preview.plot_pairs

    def plot(images, labels, out, *, titles=None, **kw):
        shown.extend(titles)
        return real_plot(images, labels, out, titles=titles, **kw)

    preview.plot_pairs = plot
    try:
        preview.preview_folder(folder, tmp / "p.png", max_cases=100)
    finally:
        preview.plot_pairs = real_plot
    return shown


READERS = {"train": _train, "evaluate": _evaluate, "export": _export, "from_folder": _from_folder,
           "preview": _preview}


def _outcome(reader, folder: Path, tmp: Path):
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        return "ok", reader(folder, tmp)
    except (OSError, ValueError) as e:
        return type(e), str(e)


@pytest.mark.parametrize("variant", VALID + BROKEN)
def test_every_reader_accepts_and_refuses_the_same_cases_with_the_same_message(tmp_path, variant):
    folder = make_folder(tmp_path / "data", variant)
    # what the shared reader says: the reference every command must repeat
    try:
        expected = ("ok", [read_case(c).name for c in find_cases(folder)])
    except (OSError, ValueError) as e:
        expected = (type(e), str(e))
    if variant in VALID:
        assert expected == ("ok", ["case_0", "case_1"])
    else:
        assert expected[0] != "ok" and "case_1" in expected[1]
    for name, reader in READERS.items():
        kind, got = _outcome(reader, folder, tmp_path / name)
        assert kind == expected[0], f"{name}: {kind} {got}"
        if kind == "ok":
            assert got == expected[1], name
        else:  # training adds how to skip bad cases; the message itself is the shared one
            assert expected[1] in got, f"{name}: {got!r} does not repeat {expected[1]!r}"


def test_valid_variants_read_the_same_voxels(tmp_path):
    """MSD / nnU-Net, .nii / .nii.gz, 4D / per-channel files and LPS / RAS storage give the same arrays."""
    ref = read_case(find_cases(make_folder(tmp_path / "msd", "msd"))[0])
    for variant in ("msd-nii", "nnunet", "nnunet-nii", "msd-lps-orientation", "msd-label-stored-flipped",
                    "nnunet-hidden-files"):
        pair = read_case(find_cases(make_folder(tmp_path / variant, variant))[0])
        if variant == "msd-lps-orientation":  # stored flipped; reoriented to RAS it is the same volume flipped back
            np.testing.assert_array_equal(pair.image, ref.image[:, ::-1, ::-1])
            continue
        np.testing.assert_array_equal(pair.image, ref.image)
        np.testing.assert_array_equal(pair.label, ref.label)
    four_d = read_case(find_cases(make_folder(tmp_path / "4d", "msd-4d-two-channels"))[0])
    two = read_case(find_cases(make_folder(tmp_path / "2ch", "nnunet-two-channels"))[0])
    assert four_d.image.shape == two.image.shape == (2, *SHAPE)
    np.testing.assert_array_equal(four_d.image[1], 2 * ref.image[0])


# ------------------------------------------------------------------------------------------ case01: geometry
def _case01_folder(tmp: Path, label_affine: np.ndarray) -> Path:
    """case01: same voxel shape, label origin 20 mm off or label voxels 2 mm (written with qform and sform)."""
    root = tmp / "data"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(json.dumps(MSD_LABELS))
    image, label = phantom_pair((32, 32, 32))
    write_nifti(root / "imagesTr" / "case1.nii.gz", image, np.eye(4))
    write_nifti(root / "labelsTr" / "case1.nii.gz", label, label_affine)
    return root


SHIFTED = np.eye(4)
SHIFTED[0, 3] = 20.0


@pytest.mark.parametrize("label_affine, label_geometry", [
    (SHIFTED, "label spacing (1.0, 1.0, 1.0) mm, origin (20.0, 0.0, 0.0) mm"),
    (np.diag([2.0, 2.0, 2.0, 1.0]), "label spacing (2.0, 2.0, 2.0) mm, origin (0.0, 0.0, 0.0) mm"),
], ids=["origin-shifted-20mm", "voxel-size-2mm"])
def test_case01_label_on_another_grid_is_refused_by_training_and_export(tmp_path, label_affine, label_geometry):
    root = _case01_folder(tmp_path, label_affine)
    for target_spacing in ((), (1.0, 1.0, 1.0)):
        with pytest.raises(BadCaseError) as info:
            preprocess_case(find_cases(root)[0], DataConfig(root=str(root), target_spacing=target_spacing),
                            (32, 32, 32), [0, 1, 2])
        msg = str(info.value)
        assert "case 'case1'" in msg and "not on the same voxel grid" in msg
        assert "image spacing (1.0, 1.0, 1.0) mm, origin (0.0, 0.0, 0.0) mm" in msg and label_geometry in msg
    with pytest.raises(ValueError, match="case 'case1'.*not on the same voxel grid"):
        export_nnunet(tmp_path / "raw", dataset_id=901, name="Mismatch", real=root, progress=False)
    assert not (tmp_path / "raw" / "Dataset901_Mismatch").exists()


def test_export_writes_a_flipped_label_in_the_images_axis_order(tmp_path):
    folder = make_folder(tmp_path / "d", "msd-label-stored-flipped")
    out = export_nnunet(tmp_path / "raw", dataset_id=2, name="Flip", real=folder, progress=False)
    img = nib.load(out.path / "imagesTr" / "case_0_0000.nii.gz")
    lab = nib.load(out.path / "labelsTr" / "case_0.nii.gz")
    np.testing.assert_allclose(lab.affine, img.affine)
    np.testing.assert_array_equal(np.asarray(lab.dataobj), phantom_pair(SHAPE, seed=0)[1])


def test_geometry_tolerance_accepts_float_rounding(tmp_path):
    nearly = np.eye(4)
    nearly[:3, 3] = 1e-5  # float32 header rounding, far below the 1e-3 mm tolerance
    root = _case01_folder(tmp_path, nearly)
    assert read_case(find_cases(root)[0]).label.shape == (1, 32, 32, 32)


# ------------------------------------------------------------------------------------------ case08: labels
def _case08_folder(root: Path) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    label = np.zeros(SHAPE, dtype=np.float32)
    label.reshape(-1)[:500] = np.nextafter(np.float32(1), np.float32(0))  # 0.99999994
    label.reshape(-1)[500:800] = np.float32(1.9999999)
    rng = np.random.default_rng(0)
    write_nifti(root / "imagesTr" / "c0_0000.nii.gz", rng.random(SHAPE).astype(np.float32), np.eye(4))
    write_nifti(root / "labelsTr" / "c0.nii.gz", label, np.eye(4))
    return root


def test_case08_from_folder_refuses_float_labels_instead_of_truncating(tmp_path):
    ds = SyntheticPairDataset.from_folder(_case08_folder(tmp_path / "d"))
    with pytest.raises(BadCaseError, match=r"case 'c0'.*non-integer values \(e.g. 0.99999994, 1.9999999\)"):
        ds[0]


def test_case08_every_reader_refuses_float_labels(tmp_path):
    root = _case08_folder(tmp_path / "d")
    (root / "dataset.json").write_text(json.dumps(MSD_LABELS))
    for name, reader in READERS.items():
        kind, msg = _outcome(reader, root, tmp_path / name)
        assert kind is BadCaseError and "never rounds or truncates" in msg, name


def test_integer_valued_float_labels_are_accepted(tmp_path):
    root = make_folder(tmp_path / "d", "nnunet")
    _, lab = phantom_pair(SHAPE, seed=0)
    write_nifti(root / "labelsTr" / "case_0.nii.gz", lab.astype(np.float32), np.eye(4))
    pair = read_case(find_cases(root)[0])
    assert pair.label.dtype == np.int64
    np.testing.assert_array_equal(pair.label[0], lab)


# ------------------------------------------------------------------------------------------ case02: dataset.json
REGIONS = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "whole": [1, 2], "core": 2},
           "regions_class_order": [1, 2], "numTraining": 2, "file_ending": ".nii.gz"}


def test_case02_region_labels_give_a_clear_error_in_duodiff_train(tmp_path, capsys):
    from duodiff.cli.main import main

    root = make_folder(tmp_path / "Dataset900_Regions", "nnunet")
    (root / "dataset.json").write_text(json.dumps(REGIONS))
    cfg = tmp_path / "train.toml"
    cfg.write_text(f'output_dir = "{tmp_path / "run"}"\ndevice = "cpu"\nprogress = false\n'
                   f'[data]\nroot = "{root}"\n[model]\npreset = "tiny"\nvolume_shape = [16, 16, 16]\n')
    assert main(["train", str(cfg), "--stage", "label_autoencoder"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "dataset.json" in err and "region-based labels are not supported" in err
    assert "[data].label_values" in err and "[model].label_names" in err and "int()" not in err
    # with the values and names given, the region entries are never parsed
    data, values = prepare_dataset(DataConfig(root=str(root), label_values=(0, 1, 2)), SHAPE,
                                   cache_dir=tmp_path / "cache", progress=False)
    assert values == [0, 1, 2] and data.names == ["case_0", "case_1"]


@pytest.mark.parametrize("labels, expected", [
    ({"0": "background", "1": "a", "2": "b"}, {0: "background", 1: "a", 2: "b"}),  # MSD
    ({"background": 0, "b": 2, "a": 1}, {0: "background", 1: "a", 2: "b"}),  # nnU-Net v2
    ({"background": 0, "tumour": 4}, {0: "background", 4: "tumour"}),  # values with gaps (training remaps)
], ids=["msd", "nnunet-v2", "gaps"])
def test_dataset_json_label_layouts(tmp_path, labels, expected):
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": labels}))
    assert read_dataset_labels(tmp_path) == expected


@pytest.mark.parametrize("labels, fragment", [
    ({"background": 0, "whole": [1, 2]}, "region-based labels are not supported"),
    ({"background": "0", "a": 1.5}, "must map names to integer ids"),
    ({"background": 0, "a": 0}, "distinct"),
], ids=["regions", "mixed", "duplicate-ids"])
def test_dataset_json_bad_labels(tmp_path, labels, fragment):
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": labels}))
    with pytest.raises(DatasetJsonError, match=fragment) as info:
        read_dataset_labels(tmp_path)
    assert "dataset.json" in str(info.value) and "[data].label_values" in str(info.value)


def test_label_names_are_never_invented(tmp_path):
    """Training used to name a value missing from dataset.json 'class_4'; now that is an error."""
    from duodiff.data.folders import dataset_label_names

    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1}}))
    assert dataset_label_names(tmp_path, [0, 1]) == ("background", "a")
    with pytest.raises(DatasetJsonError, match=r"names no class for label value\(s\) \[4\]"):
        dataset_label_names(tmp_path, [0, 1, 4])
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 2}}))
    with pytest.raises(DatasetJsonError, match="0..1 without gaps"):
        read_label_names(tmp_path)  # export / evaluate need ids 0..K-1


# ------------------------------------------------------------------------------------------ preprocessing
def test_evaluate_normalises_with_the_training_preprocessing(tmp_path):
    """load_pairs and training share one normalisation: the same percentiles give the same voxels."""
    root = make_folder(tmp_path / "d", "msd")
    for percentiles in ((0.5, 99.5), (5.0, 95.0)):
        cfg = DataConfig(root=str(root), intensity_percentiles=percentiles)
        img, lab, _ = preprocess_case(find_cases(root)[0], cfg, SHAPE, [0, 1, 2])
        ps = load_pairs(root, volume_shape=SHAPE, cases=["case_0"], intensity_percentiles=percentiles)
        np.testing.assert_array_equal(ps.images[0].numpy(), img)
        np.testing.assert_array_equal(ps.labels[0].numpy(), lab)
        assert ps.info["intensity_percentiles"] == list(percentiles)
    assert load_pairs(root, volume_shape=SHAPE).info["intensity_percentiles"] == list(DEFAULT_INTENSITY_PERCENTILES)


def test_model_records_its_preprocessing_and_old_models_load(tmp_path):
    from duodiff.bundled import bundled_model_path

    assert DuoDiffusion.from_pretrained(bundled_model_path(), variant="fp16").config.intensity_percentiles == (0.5,
                                                                                                             99.5)
    # a model saved before the percentiles were recorded (no key in its model_index.json) loads with None, and
    # evaluate then assumes 0.5 / 99.5
    tiny_pipeline().save_pretrained(tmp_path / "old")
    index = tmp_path / "old" / "model_index.json"
    meta = json.loads(index.read_text())
    meta["pipeline"].pop("intensity_percentiles", None)
    index.write_text(json.dumps(meta))
    assert DuoDiffusion.from_pretrained(tmp_path / "old").config.intensity_percentiles is None
    pipe = tiny_pipeline()
    pipe = DuoDiffusion(pipe.config.replace(intensity_percentiles=(2.0, 98.0)), pipe.components())
    pipe.save_pretrained(tmp_path / "m")
    assert DuoDiffusion.from_pretrained(tmp_path / "m").config.intensity_percentiles == (2.0, 98.0)


def test_training_records_intensity_percentiles(tmp_path):
    from duodiff.train import TrainConfig
    from duodiff.train.trainer import Trainer

    root = make_folder(tmp_path / "d", "msd")
    cfg = TrainConfig.from_dict({"data": {"root": str(root), "intensity_percentiles": [1.0, 99.0]},
                                 "model": {"preset": "tiny", "volume_shape": list(SHAPE)},
                                 "output_dir": str(tmp_path / "run"), "progress": False})
    trainer = Trainer(cfg)
    pipe = trainer.load_pipeline()
    assert pipe.config.intensity_percentiles == (1.0, 99.0)
    assert pipe.config.label_names == ("background", "a", "b")
    pipe.save_pretrained(trainer.model_dir)
    assert trainer.load_pipeline().config.intensity_percentiles == (1.0, 99.0)
    other = Trainer(cfg.replace(data=cfg.data.replace(intensity_percentiles=(0.5, 99.5))))
    with pytest.raises(ValueError, match=r"intensity percentiles \(1.0, 99.0\).*\[data\].intensity_percentiles"):
        other.load_pipeline()


def test_cli_evaluate_reads_the_models_percentiles(tmp_path, monkeypatch):
    import duodiff.metrics as metrics
    from duodiff.cli.main import main

    pipe = tiny_pipeline()
    DuoDiffusion(pipe.config.replace(intensity_percentiles=(2.0, 98.0)), pipe.components()).save_pretrained(
        tmp_path / "m")
    seen = []

    def fake_load_pairs(folder, **kwargs):
        seen.append(kwargs["intensity_percentiles"])
        raise ValueError("stop here")

    monkeypatch.setattr(metrics, "load_pairs", fake_load_pairs)
    assert main(["evaluate", "--model", str(tmp_path / "m"), "--real", str(tmp_path), "--out",
                 str(tmp_path / "r")]) == 2
    assert seen == [(2.0, 98.0)]
