"""One adapter per VLM family; `adapter_class` picks it from a checkpoint's `model_type`."""
from __future__ import annotations

from .base import Adapter, ImageLayout, Prepared
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen2_5_vl import Qwen2_5_VLAdapter
from .qwen2_vl import Qwen2VLAdapter

ADAPTERS: list[type[Adapter]] = [LlavaAdapter, LlavaNextAdapter, LlavaOnevisionAdapter, Qwen2VLAdapter,
                                 Qwen2_5_VLAdapter]


def adapter_class(model_type: str) -> type[Adapter]:
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls
    supported = ", ".join(t for cls in ADAPTERS for t in cls.model_types)
    raise ValueError(f"unsupported model architecture {model_type!r}; supported: {supported}")


__all__ = ["ADAPTERS", "Adapter", "ImageLayout", "Prepared", "adapter_class"]
