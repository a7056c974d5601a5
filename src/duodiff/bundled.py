"""The default model shipped inside the package (trained on MSD Task04 hippocampus, CC-BY-SA 4.0).

>>> import duodiff
>>> pipe = duodiff.load_bundled()  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["BUNDLED_MODEL", "bundled_model_path", "load_bundled"]

#: Name of the bundled model folder inside ``duodiff/weights``.
BUNDLED_MODEL = "hippocampus"


def bundled_model_path(name: str = BUNDLED_MODEL) -> Path:
    """Folder of a model shipped with the package; raises if it is not installed."""
    path = Path(__file__).parent / "weights" / name
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"The bundled model {name!r} is not in this installation ({str(path)!r}). Reinstall duodiff from a "
            "release, or pass --model / a folder written by `duodiff train`."
        )
    return path


#: The bundled weights are stored as fp16 safetensors (half the size) and loaded into float32 networks.
BUNDLED_VARIANT = "fp16"


def load_bundled(name: str = BUNDLED_MODEL, **kwargs: Any):
    """Load a bundled model offline: ``duodiff.load_bundled()``; kwargs go to ``from_pretrained``."""
    from .pipeline import DuoDiffusion

    kwargs.setdefault("variant", BUNDLED_VARIANT)
    return DuoDiffusion.from_pretrained(bundled_model_path(name), **kwargs)
