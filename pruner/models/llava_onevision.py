"""LLaVA-OneVision / LLaVA-Video: SigLIP, a Qwen2 LLM (1-D RoPE), AnyRes-max images and
pooled video frames.

An image's placeholder block is the base tile's side x side tokens (no newline), then the
high-res tiles as one grid, unpadded to the image's aspect ratio, each row followed by an
"image newline" token, as in LLaVA-NeXT; unlike LLaVA-NeXT, a grid larger than
`anyres_max_M` allows (sqrt(rows * cols / (M * side^2)) > 1.1) is first shrunk bilinearly.
A video's block (`video_token_id`) is every frame's side x side grid pooled to
ceil(side / 2) squared, frame after frame, then one newline for the whole clip: T * 196 + 1
tokens at 384 px. The prunable tokens are the base, high-res and frame tokens; newlines are
never pruned. A video's tokens sit on a (T, h, w) grid.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from transformers import LlavaOnevisionForConditionalGeneration

from .base import ImageLayout, Prepared
from .llava_next import LlavaNextAdapter


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-NeXT's image path (the model's own packing adds the shrink), plus video."""

    model_types = ("llava_onevision",)
    model_class = LlavaOnevisionForConditionalGeneration
    takes_video = True

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self.video_token_id = model.config.video_token_id
        self.visual_token_ids = (self.image_token_id, self.video_token_id)

    @classmethod
    def collate_vision(cls, samples: list[Prepared]) -> dict[str, Tensor]:
        """Images as LLaVA-NeXT collates them; every video's frames as one clip
        pixel_values_videos [1, sum T, 3, H, W] (the tower, projector and pooling treat frames
        independently, so clips of different lengths share one call), with video_frames [V]."""
        images = [s for s in samples if "pixel_values" in s.vision]
        out = super().collate_vision(images) if images else {}
        clips = [s.vision["pixel_values_videos"][0] for s in samples if "pixel_values_videos" in s.vision]
        if clips:
            out["pixel_values_videos"] = torch.cat(clips)[None]  # [1, sum T, 3, H, W]
            out["video_frames"] = torch.tensor([len(c) for c in clips])
        return out

    def features(self, vision: dict[str, Tensor]) -> dict[int, Tensor]:
        """Images through the model's packing; videos pooled per frame, each clip followed by
        the model's image_newline, as the model's get_video_features lays one clip out."""
        out = super().features(vision)
        if "pixel_values_videos" in vision:
            cfg = self.model.config
            pooled = self.model.model.get_video_features(
                pixel_values_videos=vision["pixel_values_videos"].to(self.model.dtype),
                vision_feature_layer=cfg.vision_feature_layer,
                vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            ).pooler_output  # [1, sum T * h * w + 1, D]: every frame, then one newline
            frames = int(vision["video_frames"].sum())
            tokens = pooled[0, :-1].unflatten(0, (frames, -1))  # [sum T, h * w, D]
            newline = pooled[0, -1:]  # [1, D]
            clips = tokens.split(vision["video_frames"].tolist())
            out[self.video_token_id] = torch.cat([torch.cat([c.flatten(0, 1), newline]) for c in clips])
        return out

    def layout(self, input_ids: Tensor, vision: dict[str, Tensor]) -> ImageLayout:
        """An image as LLaVA-NeXT's layout; a video's T x h x w frame tokens, newline left out."""
        if "pixel_values_videos" not in vision:
            return super().layout(input_ids, vision)
        placeholders = (input_ids == self.video_token_id).nonzero().squeeze(1)
        frames = vision["pixel_values_videos"].shape[1]
        side = self.pooled_side()
        n = frames * side * side
        if len(placeholders) != n + 1:
            raise ValueError(f"the prompt holds {len(placeholders)} video tokens but {frames} frames pool to "
                             f"{frames} x {side} x {side} + 1 newline")
        return ImageLayout(placeholders[:n], (frames, side, side), frames=frames)

    def pooled_side(self) -> int:
        """A frame's token grid side after the model's 2x bilinear pooling (`apply_pooling`)."""
        vcfg = self.model.config.vision_config
        return math.ceil(vcfg.image_size // vcfg.patch_size / 2)

    def hires_grid(self, image_size: Tensor) -> tuple[int, int]:
        """LLaVA-NeXT's unpadded grid, shrunk as `pack_image_features` shrinks it when it
        holds more than about `anyres_max_M` tiles' worth of tokens."""
        rows, cols = super().hires_grid(image_size)
        vcfg = self.model.config.vision_config
        side = vcfg.image_size // vcfg.patch_size
        most = int(self.model.config.vision_aspect_ratio.removeprefix("anyres_max_"))
        ratio = math.sqrt(rows * cols / (most * side**2))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
        return rows, cols
