"""Qwen2-VL: native-resolution ViT, 2x2 patch merging, 3-D M-RoPE positions; images and video.

What differs from the LLaVA defaults:
* the processor returns flat patches `pixel_values` [n_patches, C*T*P*P] and
  `image_grid_thw` [1, 3] (pre-merge patch grid) per image, so N varies with image size;
  a video likewise gives `pixel_values_videos` and `video_grid_thw` (t = frames / 2: the
  patch embedding takes two frames at a time, `temporal_patch_size`);
* the LLM sees the merged grid (grid_h / 2) x (grid_w / 2), row-major, per temporal patch:
  a video's tokens sit on a (t, grid_h / 2, grid_w / 2) grid under `video_token_id`;
* positions are 3-D (temporal, height, width) ids from the model's own `get_rope_index`:
  text runs 1-D, an image's tokens take (start, start + row, start + col), and the text
  after an image continues from start + max(rows, cols); a video's temporal id grows by
  one a temporal patch (Qwen2.5-VL: spaced by its time between patches).
"""
from __future__ import annotations

import torch
from torch import Tensor
from transformers import Qwen2VLForConditionalGeneration

from .base import Adapter, ImageLayout, Prepared

TEXT, IMAGE, VIDEO = 0, 1, 2  # transformers' mm_token_type_ids values


class Qwen2VLAdapter(Adapter):
    model_types = ("qwen2_vl",)
    model_class = Qwen2VLForConditionalGeneration
    takes_video = True
    # what the vision tower and `get_rope_index` need; `mm_token_type_ids` is per token and
    # is derived from input_ids where positions are built, so samples of different lengths
    # still collate
    vision_keys = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
    rope_keys = ("image_grid_thw", "video_grid_thw")

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)  # same module layout as LLaVA: model.model.language_model, model.lm_head
        self.video_token_id = model.config.video_token_id
        self.visual_token_ids = (self.image_token_id, self.video_token_id)
        self.merge = model.config.vision_config.spatial_merge_size
        self.temporal_patch = model.config.vision_config.temporal_patch_size

    # ------------------------------------------------------------------ preprocessing

    @classmethod
    def collate_vision(cls, samples: list[Prepared]) -> dict[str, Tensor]:
        """Flat patches and grids of all samples' images, and of their videos, each
        concatenated in sample order (the order the vision tower splits its output back by
        and `get_rope_index` reads grids in). A batch may mix images and videos."""
        out = {}
        for k in cls.vision_keys:
            parts = [s.vision[k] for s in samples if k in s.vision]
            if parts:
                out[k] = torch.cat(parts)
        return out

    @classmethod
    def channels(cls, pixels: Tensor) -> Tensor:
        """Flat patches [n, C * T * P * P] hold each patch channel after channel: [n, C, T * P * P, 1]."""
        return pixels.view(pixels.shape[0], 3, -1, 1)

    # ------------------------------------------------------------------ model side

    def features(self, vision: dict[str, Tensor]) -> dict[int, Tensor]:
        """Vision tower and patch merger on the images and on the videos: [n, D] per id."""
        out = super().features(vision)
        if "pixel_values_videos" in vision:
            videos = self.model.model.get_video_features(
                pixel_values_videos=vision["pixel_values_videos"], video_grid_thw=vision["video_grid_thw"])
            out[self.video_token_id] = torch.cat(videos.pooler_output)
        return out

    def image_features(self, vision: dict[str, Tensor]) -> list[Tensor]:
        """Vision tower and patch merger, split per image: [h/2 * w/2, D] each."""
        out = self.model.model.get_image_features(
            pixel_values=vision["pixel_values"], image_grid_thw=vision["image_grid_thw"])
        return list(out.pooler_output)

    def layout(self, input_ids: Tensor, vision: dict[str, Tensor]) -> ImageLayout:
        """Visual tokens of one sample and the merged grid the LLM sees (not the pre-merge
        patch grid the reference code uses for width): (h, w) for an image, (t, h, w) for a
        video, t temporal patches of `temporal_patch_size` frames each."""
        video = "video_grid_thw" in vision
        token = self.video_token_id if video else self.image_token_id
        positions = (input_ids == token).nonzero().squeeze(1)
        t, h, w = (int(x) for x in vision["video_grid_thw" if video else "image_grid_thw"].reshape(-1, 3)[0])
        grid = (t, h // self.merge, w // self.merge) if video else (h // self.merge, w // self.merge)
        if len(positions) != t * (h // self.merge) * (w // self.merge):
            raise ValueError(f"{len(positions)} {'video' if video else 'image'} tokens in the prompt but grid_thw "
                             f"{(t, h, w)} makes {t * (h // self.merge) * (w // self.merge)}")
        return ImageLayout(positions, grid, frames=t * self.temporal_patch if video else 0)

    def token_types(self, input_ids: Tensor) -> Tensor:
        """transformers' `mm_token_type_ids` (text 0, image 1, video 2), from the ids."""
        types = torch.full_like(input_ids, TEXT, dtype=torch.int)
        types[input_ids == self.image_token_id] = IMAGE
        types[input_ids == self.video_token_id] = VIDEO
        return types

    def positions(self, input_ids: Tensor, pad: Tensor, vision: dict[str, Tensor]) -> Tensor:
        """3-D M-RoPE ids [3, B, L] of a left-padded batch, by the model's own `get_rope_index`
        (it skips padding, which keeps id 0). The runtime's first decode position,
        max(ids) + 1, is transformers' rule: rope_delta = max(ids) + 1 - real length, and a new
        token at text position real length + step gets real length + step + delta."""
        grids = {k: vision[k] for k in self.rope_keys if k in vision}
        ids, _ = self.model.model.get_rope_index(
            input_ids, mm_token_type_ids=self.token_types(input_ids), attention_mask=pad.long(), **grids)
        return ids

    def projector_positions(self, kept: Tensor | None, pad: Tensor) -> Tensor:
        """DivPrune on Qwen: the kept tokens keep their original 3-D ids. Renumbering them
        contiguously, as the reference does for 1-D positions, has no meaning here: an image
        token's id is its (row, col) in the image, not a rank in the sequence, and text after
        the image continues from start + max(rows, cols), not from start + N."""
        return kept

    def rope(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Qwen's rotary embedding reads all three id rows: positions [3, B, L]."""
        return self.rotary(x, positions)
