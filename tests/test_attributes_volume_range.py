"""Out-of-range volume requests (issue 14, fault 9): above the field of view is an error, far outside the training
range warns with the range; the same in sample, sample_labels, the CLI and SyntheticPairDataset."""

from __future__ import annotations

import warnings

import pytest

from duodiff import DuoDiffusion, SyntheticPairDataset
from duodiff.attributes import OutOfTrainingRangeWarning, field_of_view_ml
from duodiff.cli.main import main
from duodiff.testing import randomize_weights

NAMES = ("background", "a", "b")
KW = dict(seed=0, num_inference_steps=2, progress=False)
#: 16^3 voxels of 1 x 1 x 1 mm: the whole field of view is 4.096 mL
FOV_ML = 4.096


@pytest.fixture(scope="module")
def conditioned() -> DuoDiffusion:
    """Trained (as far as the statistics go) on log1p(voxels) 5 +- 0.7: 3 std = 17-1211 voxels = 0.0172-1.21 mL."""
    pipe = randomize_weights(DuoDiffusion.from_preset("tiny", num_classes=3, label_names=NAMES,
                                                      attributes=["volume"]))
    pipe.config = pipe.config.replace(attribute_mean=(5.0, 5.0), attribute_std=(0.7, 0.7))
    return pipe


@pytest.fixture
def no_sampling(conditioned, monkeypatch):
    def boom(*a, **k):  # pragma: no cover - must not be reached
        raise AssertionError("sampling started")

    monkeypatch.setattr(conditioned, "_generate_labels", boom)
    return conditioned


def test_field_of_view():
    assert field_of_view_ml((16, 16, 16), (1, 1, 1)) == pytest.approx(FOV_ML)
    assert field_of_view_ml((32, 48, 32), (1.5, 1, 0.5)) == pytest.approx(36.864)


@pytest.mark.parametrize("request_", [{"a": 1379}, {1: 1379.0}, [{"a": 0.2}, {"b": 1379}]],
                         ids=["name", "class-id", "per-sample"])
def test_request_above_the_field_of_view_is_refused_before_sampling(no_sampling, request_):
    for call in (lambda: no_sampling.sample(2, class_volumes=request_, **KW),
                 lambda: no_sampling.sample_labels(2, class_volumes=request_, **KW)):
        with pytest.raises(ValueError, match=r"1379 mL is larger than the whole field of view, 4\.096 mL") as info:
            call()
        assert "16x16x16 voxels of 1x1x1 mm" in str(info.value) and "1379 voxels would be 1.379 mL" in str(info.value)


def test_requests_summing_above_the_field_of_view_are_refused(no_sampling):
    with pytest.raises(ValueError, match=r"5 mL in total, more than the whole field of view, 4\.096 mL"):
        no_sampling.sample(1, class_volumes={"a": 2.5, "b": 2.5}, **KW)


def test_far_outside_the_training_range_warns_with_the_range(conditioned):
    with pytest.warns(OutOfTrainingRangeWarning, match=r"'a'\] = 3\.5 mL is far outside the training range.*"
                                                       r"about 0\.0172-1\.21 mL") as record:
        out = conditioned.sample_labels(1, class_volumes={"a": 3.5}, **KW)
    assert out.shape == (1, 1, 16, 16, 16) and len(record) == 1
    with pytest.warns(OutOfTrainingRangeWarning, match=r"'b'\] = 0\.002 mL"):
        conditioned.check_class_volumes({"b": 0.002})


def test_requests_inside_the_training_range_are_silent(conditioned):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        conditioned.sample_labels(2, class_volumes=[{"a": 0.15}, {1: 1.0, "b": 0.05}], **KW)


def test_synthetic_dataset_checks_its_sample_kwargs_at_construction(conditioned, monkeypatch):
    monkeypatch.setattr(conditioned, "_generate_labels", lambda *a, **k: pytest.fail("generated"))
    with pytest.raises(ValueError, match="1379 mL is larger than the whole field of view"):
        SyntheticPairDataset(conditioned, 4, num_inference_steps=2, sample_kwargs={"class_volumes": {"a": 1379}})
    with pytest.warns(OutOfTrainingRangeWarning, match="training range"):
        SyntheticPairDataset(conditioned, 4, num_inference_steps=2, sample_kwargs={"class_volumes": {"a": 3.5}})


@pytest.fixture(scope="module")
def conditioned_dir(conditioned, tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "conditioned"
    conditioned.save_pretrained(path)
    return path


def test_cli_refuses_a_voxel_count_in_one_line_before_writing(conditioned_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["sample", "-m", str(conditioned_dir), "-n", "1", "--out", str(out), "--steps", "2",
                 "--no-progress", "--class-volume", "a=1379"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("duodiff sample: error:") and "1379 mL" in err and "4.096 mL" in err
    assert not out.exists()


def test_cli_warns_outside_the_training_range(conditioned_dir, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.warns(OutOfTrainingRangeWarning, match="training range"):
        code = main(["sample", "-m", str(conditioned_dir), "-n", "1", "--out", str(out), "--steps", "2",
                     "--no-progress", "--class-volume", "a=3.5"])
    assert code == 0 and len(list((out / "labelsTr").glob("*.nii.gz"))) == 1
