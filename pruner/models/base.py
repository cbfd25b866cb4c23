"""What the runtime needs to know about a VLM family, and the Llama-style defaults.

An adapter answers three questions for its family: how a (image or video, question) pair
becomes tensors (processor only, no model), how visual features are computed and which
placeholder tokens they fill, and which position ids each token has. It reuses the
checkpoint's own modules; the runtime owns the layer loop, the cache and decoding.

A video is already-sampled frames, a uint8 array [T, H, W, 3]; families that take video
say so with `takes_video` and fill their video placeholders in `features`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..methods import Grid


@dataclass
class Prepared:
    """One sample after preprocessing: CPU tensors only, made where there is no model."""

    input_ids: Tensor  # [L], image or video placeholders already expanded
    vision: dict[str, Tensor] = field(default_factory=dict)  # processor outputs for the vision tower


@dataclass
class ImageLayout:
    """Where a sample's prunable visual tokens (an image's or a video's) sit in its
    (unpadded) sequence, and their grid: (H, W), a list of (H, W), or (T, H, W) for video."""

    positions: Tensor  # [N] long, ascending
    grid: Grid
    frames: int = 0  # video frames the vision tower saw; 0 for an image


class Adapter:
    """Defaults fit LLaVA-style models: a Llama-like LLM at `model.model.language_model`,
    1-D positions, one image per sample. Families override what differs."""

    model_types: ClassVar[tuple[str, ...]] = ()
    model_class: ClassVar[Any] = None  # the transformers class that loads a checkpoint
    takes_video: ClassVar[bool] = False
    pixel_keys: ClassVar[tuple[str, ...]] = ("pixel_values", "pixel_values_videos")  # the processor's pixels

    def __init__(self, model: torch.nn.Module):
        self.model = model
        lm = model.model.language_model
        self.layers = lm.layers
        self.norm = lm.norm
        self.rotary = lm.rotary_emb
        self.embed_tokens = lm.embed_tokens
        self.lm_head = model.lm_head
        self.text_config = model.config.text_config
        self.image_token_id = model.config.image_token_id
        # every placeholder id the vision side fills: never text, and never a decode token
        self.visual_token_ids: tuple[int, ...] = (self.image_token_id,)

    # ------------------------------------------------------------------ preprocessing

    @classmethod
    def prompt(cls, processor: Any, question: str, kind: str = "image") -> str:
        """The checkpoint's chat template around one image (kind "image") or video ("video")."""
        messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)

    @classmethod
    def prepare(cls, processor: Any, visual: Image.Image | np.ndarray, question: str, uint8: bool = False) -> Prepared:
        """One sample: an RGB image, or a video as uint8 frames [T, H, W, 3] (taken as given:
        no frame sampling). `uint8`: pixels resized but neither rescaled nor normalised, a
        quarter of float32's bytes to ship between processes (see `channels`)."""
        raw = {"do_rescale": False, "do_normalize": False} if uint8 else {}
        if isinstance(visual, Image.Image):
            out = processor(images=[visual], text=[cls.prompt(processor, question)], return_tensors="pt", **raw)
        elif not cls.takes_video:
            raise ValueError(f"the {cls.model_types[0]} family takes images only, not video")
        else:
            out = processor(videos=[visual], text=[cls.prompt(processor, question, "video")], return_tensors="pt",
                            do_sample_frames=False, **raw)
        vision = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask") and isinstance(v, Tensor)}
        return Prepared(input_ids=out["input_ids"][0], vision=vision)

    @classmethod
    def channels(cls, pixels: Tensor) -> Tensor:
        """The processor's pixels with the colour channel at dim -3, so that a [3, 1, 1] mean
        and std broadcast: images, tiles and frames are [..., 3, H, W] as they are."""
        return pixels

    @classmethod
    def collate_vision(cls, samples: list[Prepared]) -> dict[str, Tensor]:
        """Vision inputs of several samples as one batch for the vision tower."""
        return {k: torch.cat([s.vision[k] for s in samples]) for k in samples[0].vision}

    # ------------------------------------------------------------------ model side

    def features(self, vision: dict[str, Tensor]) -> dict[int, Tensor]:
        """Placeholder token id -> the features of all its placeholders in the batch, in
        sequence order: [n, D]. Images only here; video families add their video id."""
        if "pixel_values" not in vision:
            return {}
        return {self.image_token_id: torch.cat(self.image_features(vision))}

    def image_features(self, vision: dict[str, Tensor]) -> list[Tensor]:
        """Per sample, the embeddings of all its image placeholder tokens, in order: [n_b, D]."""
        cfg = self.model.config
        out = self.model.model.get_image_features(
            pixel_values=vision["pixel_values"].to(self.model.dtype),
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        )
        return list(out.pooler_output)

    def layout(self, input_ids: Tensor, vision: dict[str, Tensor]) -> ImageLayout:
        """Prunable visual tokens of one sample (input_ids: [L], unpadded)."""
        positions = (input_ids == self.image_token_id).nonzero().squeeze(1)
        vcfg = self.model.config.vision_config
        side = vcfg.image_size // vcfg.patch_size
        return ImageLayout(positions, (side, side))

    def positions(self, input_ids: Tensor, pad: Tensor, vision: dict[str, Tensor]) -> Tensor:
        """Position ids [P, B, L] for a left-padded batch (P = 1 here; 3 for M-RoPE)."""
        return self.projector_positions(None, pad)

    def projector_positions(self, kept: Tensor | None, pad: Tensor) -> Tensor:
        """Positions after pruning before the LLM: contiguous, as DivPrune's reference does.
        kept: [P, B, L'] the kept tokens' original ids; pad: [B, L'] real tokens."""
        return (pad.long().cumsum(-1) - 1).clamp(min=0)[None]

    def rope(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Rotary (cos, sin) for positions [P, B, L]."""
        return self.rotary(x, positions[0])
