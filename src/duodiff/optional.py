"""Optional dependencies: import them where needed, or say in one line what to install."""

from __future__ import annotations

from typing import Any

__all__ = ["require_matplotlib"]


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` with the non-interactive ``Agg`` backend (previews, report figures, training curves).

    Raises:
        ImportError: matplotlib is not installed; the message says ``pip install 'duodiff[plot]'``.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("Previews need matplotlib: pip install 'duodiff[plot]'.") from e
    return plt
