"""LLaVA-NeXT (AnyRes): a base tile plus a high-res grid of tiles, one newline token a row.

An image's placeholder block holds, in order, the base tile's side x side tokens, then the
high-res tiles' tokens as one grid, unpadded to the image's aspect ratio, row by row, each
row followed by an "image newline" token. The prunable tokens are the base and high-res
tokens, each part on its own grid; newline tokens are never pruned (they carry the image
token id, so the runtime does not count them as text either).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import LlavaNextForConditionalGeneration
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from .base import Adapter, ImageLayout, Prepared


class LlavaNextAdapter(Adapter):
    """Same LLM and positions as LLaVA-1.5; the vision inputs and the layout differ."""

    model_types = ("llava_next",)
    model_class = LlavaNextForConditionalGeneration

    @classmethod
    def collate_vision(cls, samples: list[Prepared]) -> dict[str, Tensor]:
        """pixel_values [1, P_b, 3, H, W] padded with zero tiles to the batch's largest P, as
        the processor pads a batch (the model drops the padding using image_sizes);
        image_sizes [1, 2] each, (height, width) of the original image."""
        pixels = [s.vision["pixel_values"] for s in samples]
        most = max(p.shape[1] for p in pixels)
        pixels = [F.pad(p, (0, 0, 0, 0, 0, 0, 0, most - p.shape[1])) for p in pixels]
        return {"pixel_values": torch.cat(pixels), "image_sizes": torch.cat([s.vision["image_sizes"] for s in samples])}

    def image_features(self, vision: dict[str, Tensor]) -> list[Tensor]:
        """Per sample, base tile then unpadded high-res rows with their newlines: [n_b, D]."""
        cfg = self.model.config
        out = self.model.model.get_image_features(  # packs the tiles with the model's image_newline
            pixel_values=vision["pixel_values"].to(self.model.dtype),
            image_sizes=vision["image_sizes"],
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        )
        return list(out.pooler_output)

    def layout(self, input_ids: Tensor, vision: dict[str, Tensor]) -> ImageLayout:
        """Base-tile and high-res tokens of one sample, newlines left out; grid
        [(side, side), (rows, cols)] with the high-res grid after unpadding."""
        if "image_sizes" not in vision:
            raise ValueError("LLaVA-NeXT's image layout depends on the image's size: pass the sample's "
                             "vision inputs (with image_sizes) to layout")
        placeholders = (input_ids == self.image_token_id).nonzero().squeeze(1)
        vcfg = self.model.config.vision_config
        side = vcfg.image_size // vcfg.patch_size
        rows, cols = self.hires_grid(vision["image_sizes"][0])
        base = side * side
        if len(placeholders) != base + rows * (cols + 1):
            raise ValueError(f"the prompt holds {len(placeholders)} image tokens but {self.model_types[0]} packs "
                             f"{base} base + {rows} x ({cols} + 1 newline) high-res tokens for this image")
        hires = base + torch.arange(rows * (cols + 1)).view(rows, cols + 1)[:, :cols].flatten()
        prunable = torch.cat([torch.arange(base), hires]).to(placeholders.device)
        return ImageLayout(placeholders[prunable], [(side, side), (rows, cols)])

    def hires_grid(self, image_size: Tensor) -> tuple[int, int]:
        """(rows, cols) of the high-res token grid after unpadding, for an image of
        image_size = (height, width): what the model's pack_image_features makes."""
        cfg = self.model.config
        tile = cfg.vision_config.image_size
        side = tile // cfg.vision_config.patch_size
        tiles_h, tiles_w = get_anyres_image_grid_shape(image_size.tolist(), cfg.image_grid_pinpoints, tile)
        rows, cols = unpad_image(torch.empty(0, tiles_h * side, tiles_w * side), image_size.tolist()).shape[1:]
        return int(rows), int(cols)
