"""Preview montages: axial / coronal / sagittal with a label overlay, from folders or single files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from duodiff import DuoSample
from duodiff.data.folders import find_cases
from duodiff.io import spacing_affine, write_nifti
from duodiff.preview import montage_figure, plot_pairs, preview_folder
from duodiff.testing import phantom_pair

pytest.importorskip("matplotlib")


def read_png(path):
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return mpimg.imread(path)


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    pairs = [phantom_pair((16, 20, 12), num_classes=3, seed=s) for s in range(3)]
    images = torch.from_numpy(np.stack([p[0] / 1000.0 for p in pairs])[:, None].astype(np.float32))
    labels = torch.from_numpy(np.stack([p[1] for p in pairs])[:, None].astype(np.int64))
    out = tmp_path_factory.mktemp("samples")
    DuoSample(images=images, labels=labels, affine=spacing_affine((1, 1, 1)), spacing=(1.0, 1.0, 1.0),
              label_names=("background", "a", "b"), seeds=[0, 1, 2]).save(out)
    return out


def test_plot_pairs_with_labels(tmp_path):
    img, lab = phantom_pair((16, 16, 16), num_classes=3, seed=0)
    png = plot_pairs([img, img], [lab, lab], tmp_path / "sub" / "m.png", titles=["a", "b"])
    pixels = read_png(png)
    h, w = pixels.shape[:2]
    assert w > 2 * h  # 2 rows x 6 columns (3 planes, with and without overlay)
    # the overlay adds colour: some pixels are not grey
    rgb = pixels[..., :3]
    assert float(np.abs(rgb[..., 0] - rgb[..., 2]).max()) > 0.1


def test_plot_pairs_without_labels_is_grey(tmp_path):
    img, _ = phantom_pair((16, 16, 16), seed=1)
    pixels = read_png(plot_pairs([img], [None], tmp_path / "m.png"))
    rgb = pixels[..., :3]
    assert float(np.abs(rgb[..., 0] - rgb[..., 2]).max()) < 0.02


def test_plot_pairs_needs_images(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        plot_pairs([], [], tmp_path / "m.png")


def test_preview_folder_errors_are_the_shared_readers(tmp_path):
    with pytest.raises(FileNotFoundError, match="must contain 'imagesTr' and 'labelsTr'"):
        preview_folder(tmp_path, tmp_path / "m.png")
    img, lab = phantom_pair((16, 16, 16), seed=0)
    write_nifti(tmp_path / "imagesTr" / "a_0000.nii.gz", img, np.eye(4))
    (tmp_path / "labelsTr").mkdir()
    # an image without label was previewed without overlay; now refused as everywhere else
    with pytest.raises(FileNotFoundError, match="Image a_0000.nii.gz has no label"):
        preview_folder(tmp_path, tmp_path / "m.png")


def test_preview_folder_limits_cases(sample_dir, tmp_path):
    one = read_png(preview_folder(sample_dir, tmp_path / "one.png", max_cases=1))
    three = read_png(preview_folder(sample_dir, tmp_path / "three.png", max_cases=3))
    assert three.shape[0] > 2 * one.shape[0]


def test_preview_single_file_with_label(sample_dir, tmp_path):
    case = find_cases(sample_dir)[0]
    png = preview_folder(case.images[0], tmp_path / "single.png", label=case.label)
    assert read_png(png).shape[1] > 0


def test_preview_label_shape_mismatch(tmp_path):
    img, lab = phantom_pair((16, 16, 16), seed=0)
    write_nifti(tmp_path / "img.nii.gz", img, np.eye(4))
    write_nifti(tmp_path / "lab.nii.gz", lab[:8], np.eye(4))
    with pytest.raises(ValueError, match=r"image shape \(16, 16, 16\) != label shape \(8, 16, 16\)"):
        preview_folder(tmp_path / "img.nii.gz", tmp_path / "m.png", label=tmp_path / "lab.nii.gz")


def test_preview_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="Nothing to preview"):
        preview_folder(tmp_path / "nope", tmp_path / "m.png")


# ---------------------------------------------------------------- colour legend (issue 17, point 8)
def legend_entries(fig) -> list[tuple[str, tuple[float, ...]]]:
    """(name, RGB) of each entry of the figure's one legend."""
    assert len(fig.legends) == 1
    legend = fig.legends[0]
    return [(t.get_text(), tuple(round(float(c), 4) for c in h.get_facecolor()[:3]))
            for t, h in zip(legend.get_texts(), legend.legend_handles)]


def test_legend_names_each_foreground_class_in_its_overlay_colour():
    import matplotlib.pyplot as plt

    img, lab = phantom_pair((16, 16, 16), num_classes=3, seed=0)
    fig = montage_figure([img], [lab], label_names=("background", "outer", "inner"))
    tab10 = plt.get_cmap("tab10")
    assert legend_entries(fig) == [(name, tuple(round(float(c), 4) for c in tab10(i)[:3]))
                                   for i, name in ((1, "outer"), (2, "inner"))]
    plt.close(fig)
    fig = montage_figure([img], [lab])  # no names: generic ones, never a missing legend
    assert [name for name, _ in legend_entries(fig)] == ["class 1", "class 2"]
    plt.close(fig)
    fig = montage_figure([img], [lab], label_names=("background", "a", "b", "c"))  # a class absent from the slices
    assert [name for name, _ in legend_entries(fig)] == ["a", "b", "c"]
    plt.close(fig)


def test_no_labels_no_legend():
    import matplotlib.pyplot as plt

    img, _ = phantom_pair((16, 16, 16), seed=1)
    fig = montage_figure([img], [None])
    assert fig.legends == []
    plt.close(fig)


@pytest.fixture
def drawn(monkeypatch):
    """The figures :func:`plot_pairs` draws, recorded."""
    import duodiff.preview as preview

    figures = []

    def spy(*args, **kwargs):
        figures.append(montage_figure(*args, **kwargs))
        return figures[-1]

    monkeypatch.setattr(preview, "montage_figure", spy)
    return figures


def test_preview_legend_uses_the_dataset_json_names(sample_dir, tmp_path, drawn, capsys):
    from tests.cli.test_main import call_main

    code, _, err = call_main(["preview", str(sample_dir), "--out", str(tmp_path / "p.png")], capsys)
    assert code == 0, err
    case = find_cases(sample_dir)[0]
    preview_folder(case.images[0], tmp_path / "single.png", label=case.label)  # labelsTr/../dataset.json
    assert [[name for name, _ in legend_entries(fig)] for fig in drawn] == [["a", "b"], ["a", "b"]]


def test_sample_preview_legend_names_the_models_classes(tiny_model_dir, tmp_path, drawn, capsys):
    from tests.cli.test_main import call_main

    out = tmp_path / "s"
    code, _, err = call_main(["sample", "-m", str(tiny_model_dir), "-n", "1", "--steps", "2", "--out", str(out),
                              "--preview", str(out / "p.png"), "--no-progress"], capsys)
    assert code == 0, err
    assert [name for name, _ in legend_entries(drawn[0])] == ["anterior", "posterior"]
