"""The bundled hippocampus model ships with the package, loads offline and drives `duodiff sample` with no --model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np

import duodiff
from duodiff.bundled import bundled_model_path


def test_bundled_model_is_present_with_card():
    path = bundled_model_path()
    card = (path / "README.md").read_text()
    assert "library_name: duodiff" in card and "CC-BY-SA 4.0" in card
    assert "## Quality" in card  # the measured numbers are in the card
    sizes = sum(f.stat().st_size for f in path.rglob("*.safetensors"))
    assert sizes < 25 * 2**20


def test_load_bundled_and_sample():
    pipe = duodiff.load_bundled()
    assert pipe.config.label_names == ("background", "Anterior", "Posterior")
    assert pipe.config.volume_shape == (32, 48, 32) and pipe.config.attributes == ("volume",)
    out = pipe.sample(1, seed=0, num_inference_steps=3, dtype="bfloat16", progress=False)
    assert out.images.shape == (1, 1, 32, 48, 32)
    assert set(out.labels.unique().tolist()) <= {0, 1, 2}


def test_cli_sample_without_model_uses_bundled_offline(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "duodiff.cli.main", "sample", "-n", "2", "--out", str(tmp_path / "s"),
                        "--steps", "2", "--no-progress", "--dtype", "bfloat16"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    labels = sorted((tmp_path / "s" / "labelsTr").glob("*.nii.gz"))
    assert len(labels) == 2
    img = nib.load(str(labels[0]))
    assert img.shape == (32, 48, 32) and np.allclose(np.diag(img.affine)[:3], 1.0)
    meta = json.loads((tmp_path / "s" / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "Anterior": 1, "Posterior": 2}


def _card_snippet(card: str) -> str:
    start = card.index("```python\n") + len("```python\n")
    return card[start:card.index("```", start)]


def test_the_model_cards_snippet_runs_as_written(tmp_path):
    """The bundled card's Python snippet, with only its placeholder replaced by the folder, runs in a fresh
    interpreter (default threads, default sampler and dtype) and gives what its comment promises."""
    path = bundled_model_path()
    snippet = _card_snippet((path / "README.md").read_text())
    assert '"<this repo or folder>"' in snippet
    code = snippet.replace('"<this repo or folder>"', repr(str(path))) + (
        "\nimport torch\n"
        "assert out.images.shape == (4, 1, 32, 48, 32) and 0 <= out.images.min() and out.images.max() <= 1\n"
        "assert out.labels.shape == (4, 1, 32, 48, 32) and out.labels.dtype == torch.int64\n"
        "print('SNIPPET OK')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS",)}
    env["DUODIFF_CACHE"] = str(tmp_path / "cache")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "SNIPPET OK" in proc.stdout, proc.stderr[-2000:]
