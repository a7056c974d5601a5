"""Import networks trained with MONAI Generative 0.2.3 (the original paper's stack) or MONAI core.

Old checkpoints are PyTorch ``.pt`` files. They are read with ``torch.load(weights_only=True)``, which
refuses arbitrary Python objects, converted to MONAI-core key names, loaded strictly and written as a
normal duodiff folder (safetensors only). Normal loading never reads ``.pt`` files.

Modules: :mod:`~duodiff.convert.state_dicts` (safe ``.pt`` reading, wrapper prefixes),
:mod:`~duodiff.convert.monai_generative` (0.2.3 -> MONAI-core key mapping, one component's import) and
:mod:`~duodiff.convert.importing` (five checkpoints -> pipeline -> folder, what ``duodiff convert`` runs).

Example:
    >>> from duodiff.convert import convert_checkpoints
    >>> convert_checkpoints("config.json", {"label_autoencoder": "lae.pt", ...}, "model/")  # doctest: +SKIP
"""

from __future__ import annotations

from .importing import convert_checkpoints, import_checkpoints, read_pipeline_config
from .monai_generative import ComponentImport, import_component, rename_old_controlnet_keys
from .state_dicts import load_checkpoint, strip_wrapper_prefixes

__all__ = [
    "ComponentImport",
    "read_pipeline_config",
    "load_checkpoint",
    "import_component",
    "rename_old_controlnet_keys",
    "strip_wrapper_prefixes",
    "import_checkpoints",
    "convert_checkpoints",
]
