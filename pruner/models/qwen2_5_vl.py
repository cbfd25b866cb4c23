"""Qwen2.5-VL: Qwen2-VL's layout and M-RoPE; the vision tower adds window attention and
reorders windows back itself, so its output is in the same row-major merged order. Its
`get_rope_index` spaces a video's temporal ids by the time between temporal patches
(`second_per_grid_ts`, from the processor); still images are unchanged."""
from transformers import Qwen2_5_VLForConditionalGeneration

from .qwen2_vl import Qwen2VLAdapter


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    model_types = ("qwen2_5_vl",)
    model_class = Qwen2_5_VLForConditionalGeneration
    vision_keys = Qwen2VLAdapter.vision_keys + ("second_per_grid_ts",)
    rope_keys = Qwen2VLAdapter.rope_keys + ("second_per_grid_ts",)
