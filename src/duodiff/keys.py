"""Dictionary-key constants shared by the data layer, the pipeline and the CLI.

Using constants (as MONAI does) keeps the keys spelled the same everywhere.
"""

from __future__ import annotations

__all__ = ["IMAGE", "LABEL", "IS_SYNTHETIC", "SEED", "COMPONENTS", "MODEL_INDEX", "CONFIG_NAME", "SCHEDULER"]

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
