"""Where pruner/ relies on transformers' internals, each with why and what would replace it;
tests/test_workarounds.py fails when transformers changes under one.

(Ray's and pyarrow's are in `pipeline.workarounds`: pruner/ imports neither pipeline/ nor Ray.)
"""
from __future__ import annotations

from collections.abc import Callable

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import eager_attention_forward


def register_attention(wrap: Callable[[Callable], Callable], prefix: str = "pruner") -> dict[str, str]:
    """Register `wrap` of transformers' plain SDPA and eager attention functions as attention
    implementations `{prefix}_sdpa` and `{prefix}_eager`; returns their names by the plain
    one's. Registering is public (`AttentionInterface`), but the plain functions are not
    exported: SDPA's is imported from its integration module, eager's from Llama's modeling
    file (each family here has the same one). Exported plain functions would replace this."""
    names = {"sdpa": f"{prefix}_sdpa", "eager": f"{prefix}_eager"}
    AttentionInterface.register(names["sdpa"], wrap(sdpa_attention_forward))
    AttentionInterface.register(names["eager"], wrap(eager_attention_forward))
    return names
