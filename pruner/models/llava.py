"""LLaVA-1.5: CLIP ViT-L/14 at 336 px, CLS dropped, 576 image tokens on a 24x24 grid."""
from transformers import LlavaForConditionalGeneration

from .base import Adapter


class LlavaAdapter(Adapter):
    """The base adapter's defaults are LLaVA-1.5's layout: nothing to override."""

    model_types = ("llava",)
    model_class = LlavaForConditionalGeneration
