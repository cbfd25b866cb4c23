"""Visual-token pruning for VLM inference. `from pruner import PrunedVLM`."""
from __future__ import annotations

from typing import Any

__all__ = ["Generation", "PrunedVLM", "Preprocessor"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import pruner.methods` stays light (no transformers import).
    if name in __all__:
        from . import vlm

        return getattr(vlm, name)
    raise AttributeError(f"module 'pruner' has no attribute {name!r}")
