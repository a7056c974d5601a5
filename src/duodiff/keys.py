"""Dictionary-key constants shared by the data layer, the pipeline and the CLI.

Using constants (as MONAI does) keeps the keys spelled the same everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["IMAGE", "LABEL", "IS_SYNTHETIC", "SEED", "COMPONENTS", "MODEL_INDEX", "CONFIG_NAME", "SCHEDULER",
           "component_mismatch"]

IMAGE = "image"
LABEL = "label"
IS_SYNTHETIC = "is_synthetic"
SEED = "seed"

#: The five network components of a Duo-Diffusion pipeline, in sampling order.
#: The same strings are attributes, ``model_index.json`` keys and sub-folder names.
COMPONENTS = ("label_autoencoder", "label_unet", "image_autoencoder", "image_unet", "image_controlnet")
SCHEDULER = "scheduler"
MODEL_INDEX = "model_index.json"
CONFIG_NAME = "config.json"


def component_mismatch(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """How ``names`` differ from :data:`COMPONENTS`: ``(missing, unknown)``, the components it lacks (in sampling
    order) and the names that are no component (sorted); both empty when ``names`` has exactly the five."""
    names = set(names)
    return [k for k in COMPONENTS if k not in names], sorted(names - set(COMPONENTS))
