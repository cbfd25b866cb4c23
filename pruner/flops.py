"""Per-sample FLOPs: vision tower + projector, prefill, decode; pruned and unpruned.

Two conventions:

* **Measured-style** (`Flops.flops_*`): 2 FLOPs per multiply-add of every matmul that runs
  for the sample, from the model config and the sample's real token counts. This is what
  `torch.utils.flop_counter.FlopCounterMode` counts on the same forward; like it, we leave
  out everything that is not a matmul or convolution (norms, activations, softmax, rotary,
  embedding lookups, bias adds) and the selection methods' own arithmetic.
* **Paper convention** (`Flops.paper_prefill_reduction`): per LLM layer
  `F(n) = 4 n d^2 + 2 n^2 d + 2 n d m` (multiply-adds, two-matrix MLP), prefill only,
  reported as the reduction against the unpruned prefill, for comparison with published
  tables only.

What the counts mean:

* `prompt_tokens` is the sample's whole input sequence: chat template, question and every
  image placeholder token (LLaVA-NeXT: its newline tokens too). Padding in a batch is never
  the sample's cost, so only the sample's own lengths enter.
* Prefill runs the first `full_layers` decoder layers on the whole prompt and the rest on
  the kept prompt: `full_layers` is K for in-LLM methods, 0 for projector-stage methods
  (they prune before layer 0) and every layer when nothing is pruned. Attention is counted
  over the full n x n score matrix, as eager attention computes it.
* The LM head runs on the last prompt position at prefill and on every decoded token;
  generation stops right after sampling the last token, so G generated tokens cost one
  prefill and G - 1 decode forwards. Decode step j (1-based) attends over `n + j` keys in the
  layers that hold the full prompt and `n_kept + j` in the others.
* The vision tower is counted as it runs: every encoder layer, even when the features are
  taken from an earlier layer (LLaVA's `vision_feature_layer = -2` still runs the last CLIP
  layer: transformers runs the whole tower and picks `hidden_states[-2]`).
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

# text models whose MLP is two plain matrices (fc1, act, fc2); every other is gated (SwiGLU)
PLAIN_MLP_TEXT_MODELS = frozenset({"gpt2", "gptj", "gpt_neox", "opt", "phi", "falcon", "bloom", "starcoder2"})


# ---------------------------------------------------------------------- result


@dataclass(frozen=True)
class Flops:
    """One sample's FLOPs (measured-style unless named `paper_`)."""

    flops_vision: int  # vision tower + projector (Qwen: + patch merger)
    flops_prefill: int  # LLM prefill, with pruning, LM head on the last position
    flops_decode: int  # the G - 1 decode forwards, LM head on each
    flops_total: int  # vision + prefill + decode
    flops_total_unpruned: int  # the same sample and generated length with no pruning
    paper_prefill: int  # PAPER CONVENTION: LLM prefill, F(n) per layer, with pruning
    paper_prefill_unpruned: int  # PAPER CONVENTION: the same without pruning

    @property
    def paper_prefill_reduction(self) -> float:
        """PAPER CONVENTION: 1 - pruned / unpruned LLM prefill, in [0, 1)."""
        return 1 - self.paper_prefill / self.paper_prefill_unpruned


# ---------------------------------------------------------------------- LLM


@dataclass(frozen=True)
class LLMShape:
    """What the decoder's FLOPs depend on."""

    layers: int
    hidden: int  # d
    q_dim: int  # num_heads * head_dim
    kv_dim: int  # num_kv_heads * head_dim (GQA)
    intermediate: int  # m
    mlp_matrices: int  # 3 for gated (SwiGLU) MLPs, 2 for plain ones
    vocab: int

    @classmethod
    def of(cls, text_config: Any) -> LLMShape:
        c = text_config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        return cls(
            layers=c.num_hidden_layers, hidden=c.hidden_size, q_dim=c.num_attention_heads * head_dim,
            kv_dim=kv_heads * head_dim, intermediate=c.intermediate_size,
            mlp_matrices=2 if c.model_type in PLAIN_MLP_TEXT_MODELS else 3, vocab=c.vocab_size,
        )

    def layer(self, n: int, context: int) -> int:
        """One decoder layer: n new tokens attending over `context` keys (cache + new)."""
        d = self.hidden
        projections = 2 * n * d * (2 * self.q_dim + 2 * self.kv_dim)  # q, o and k, v
        attention = 2 * 2 * n * context * self.q_dim  # scores and weighted sum
        mlp = 2 * self.mlp_matrices * n * d * self.intermediate
        return projections + attention + mlp

    def lm_head(self, positions: int = 1) -> int:
        return 2 * positions * self.hidden * self.vocab

    def prefill(self, full_layers: int, n: int, n_kept: int) -> int:
        """Layers < full_layers on the whole prompt (n), the rest on the kept prompt."""
        return (full_layers * self.layer(n, n) + (self.layers - full_layers) * self.layer(n_kept, n_kept)
                + self.lm_head())

    def decode(self, full_layers: int, n: int, n_kept: int, steps: int) -> int:
        """`steps` one-token forwards; each layer attends over its own cache length."""
        return sum(full_layers * self.layer(1, n + j) + (self.layers - full_layers) * self.layer(1, n_kept + j)
                   + self.lm_head() for j in range(1, steps + 1))

    def kv_bytes(self, full_layers: int, n: int, n_kept: int, itemsize: int) -> int:
        """One sample's KV-cache bytes after prefill: layers < full_layers hold the whole prompt
        (n), the rest the kept prompt; keys and values of kv_dim each per token and layer."""
        return 2 * self.kv_dim * itemsize * (full_layers * n + (self.layers - full_layers) * n_kept)

    def paper_layer(self, n: int) -> int:
        """PAPER CONVENTION per layer: F(n) = 4 n d^2 + 2 n^2 d + 2 n d m."""
        d, m = self.hidden, self.intermediate
        return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m

    def paper_prefill(self, full_layers: int, n: int, n_kept: int) -> int:
        return full_layers * self.paper_layer(n) + (self.layers - full_layers) * self.paper_layer(n_kept)


def full_layers(stage: str, prune_layer: int, num_layers: int, pruned: bool = True) -> int:
    """How many leading decoder layers see the whole prompt, for a method stage; every layer
    when the sample was not `pruned` (its budget kept every token)."""
    if not pruned:
        return num_layers
    return {"layer": prune_layer, "projector": 0}.get(stage, num_layers)


# ---------------------------------------------------------------------- vision


def _encoder_layer(s: int, h: int, m: int, mlp_matrices: int = 2) -> int:
    """A ViT block on s tokens with full attention: q, k, v, o, scores, weighted sum, MLP."""
    return 2 * 4 * s * h * h + 2 * 2 * s * s * h + 2 * mlp_matrices * s * h * m


def _patch_vit(vcfg: Any, pixel_values: Tensor, cls_token: int) -> tuple[int, int, int]:
    """CLIP / SigLIP on pixel_values [..., C, H, W] (LLaVA-NeXT: one image per tile).
    Returns (FLOPs, tiles, tokens per tile)."""
    tiles = math.prod(pixel_values.shape[:-3])
    c, height, width = (int(x) for x in pixel_values.shape[-3:])
    p, h = vcfg.patch_size, vcfg.hidden_size
    patches = (height // p) * (width // p)
    s = patches + cls_token
    flops = 2 * patches * (c * p * p) * h  # patch embedding (a stride-p convolution)
    flops += vcfg.num_hidden_layers * _encoder_layer(s, h, vcfg.intermediate_size)
    return tiles * flops, tiles, s


def _pixels(vision: Mapping[str, Tensor]) -> Tensor:
    """An image's tiles, or a video's frames [1, T, 3, H, W]: the tower runs once per frame
    (LLaVA-OneVision pools each frame's tokens after the projector, which costs no matmul)."""
    return vision["pixel_values"] if "pixel_values" in vision else vision["pixel_values_videos"]


def _clip(vcfg: Any, vision: Mapping[str, Tensor]) -> tuple[int, int, int]:
    return _patch_vit(vcfg, _pixels(vision), cls_token=1)


def _siglip(vcfg: Any, vision: Mapping[str, Tensor]) -> tuple[int, int, int]:
    flops, tiles, s = _patch_vit(vcfg, _pixels(vision), cls_token=0)
    if getattr(vcfg, "vision_use_head", True):  # attention pooling: one probe query, then an MLP
        h, m = vcfg.hidden_size, vcfg.intermediate_size
        head = 2 * h * h + 2 * s * h * 2 * h + 2 * 2 * s * h + 2 * h * h + 2 * 2 * h * m
        flops += tiles * head
    return flops, tiles, s


def _grids(vision: Mapping[str, Tensor]) -> list[tuple[int, int, int]]:
    """Qwen's (t, h, w) patch grids of the sample's images and videos."""
    out = []
    for key in ("image_grid_thw", "video_grid_thw"):
        if key in vision:
            out += [tuple(int(x) for x in row) for row in vision[key].reshape(-1, 3).tolist()]
    return out


def _qwen_vit(vcfg: Any, grids: list[tuple[int, int, int]], dim: int, mlp: int, mlp_matrices: int,
              out_dim: int, windows: list[int] | None) -> int:
    """Qwen ViT: 3-D patch embedding, blocks with attention within each frame (or window),
    then the patch merger (m x m neighbours concatenated, two-layer MLP)."""
    p, tp, merge = vcfg.patch_size, vcfg.temporal_patch_size, vcfg.spatial_merge_size
    frames = [h * w for t, h, w in grids for _ in range(t)]  # full attention runs per frame
    s = sum(frames)
    flops = 2 * s * (vcfg.in_channels * tp * p * p) * dim  # patch embedding (Conv3d)
    per_block = 2 * 4 * s * dim * dim + 2 * mlp_matrices * s * dim * mlp  # qkv, proj, MLP
    full_blocks = set(getattr(vcfg, "fullatt_block_indexes", range(vcfg.depth)))
    for i in range(vcfg.depth):
        segments = frames if windows is None or i in full_blocks else windows
        flops += per_block + sum(2 * 2 * n * n * dim for n in segments)
    ctx = dim * merge * merge
    merged = s // (merge * merge)
    return flops + 2 * merged * ctx * ctx + 2 * merged * ctx * out_dim


def _window_sizes(vcfg: Any, grids: list[tuple[int, int, int]]) -> list[int]:
    """Qwen2.5-VL's attention windows: per frame, a grid of w x w merged tokens from the
    top-left corner (edge windows smaller), each merged token being merge^2 patches."""
    merge = vcfg.spatial_merge_size
    w = vcfg.window_size // merge // vcfg.patch_size
    sizes = []
    for t, h, wd in grids:
        rows, cols = h // merge, wd // merge
        frame = [min(w, rows - r) * min(w, cols - c) * merge * merge
                 for r in range(0, rows, w) for c in range(0, cols, w)]
        sizes += frame * t
    return sizes


def _qwen2_vl(vcfg: Any, vision: Mapping[str, Tensor]) -> tuple[int, int, int]:
    grids = _grids(vision)
    dim = vcfg.embed_dim
    flops = _qwen_vit(vcfg, grids, dim, int(dim * vcfg.mlp_ratio), 2, vcfg.hidden_size, None)
    return flops, 0, 0


def _qwen2_5_vl(vcfg: Any, vision: Mapping[str, Tensor]) -> tuple[int, int, int]:
    grids = _grids(vision)
    flops = _qwen_vit(vcfg, grids, vcfg.hidden_size, vcfg.intermediate_size, 3, vcfg.out_hidden_size,
                      _window_sizes(vcfg, grids))
    return flops, 0, 0


# vision config model_type -> counter returning (FLOPs, tiles, tokens per tile); tiles and
# tokens size LLaVA's projector, Qwen's towers include their merger and return 0, 0
TOWERS = {
    "clip_vision_model": _clip,
    "siglip_vision_model": _siglip,
    "qwen2_vl_vision": _qwen2_vl,
    "qwen2_5_vl_vision": _qwen2_5_vl,
}


def _llava_tiles(config: Any, vision: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """LLaVA-NeXT pads a batch's tiles to the most any image has; the tower runs only the
    image's own (from image_sizes), as transformers' get_image_features does."""
    pixels = vision.get("pixel_values")
    if pixels is None or pixels.dim() != 5 or "image_sizes" not in vision:
        return vision
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    tiles = sum(image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
                for size in vision["image_sizes"].reshape(-1, 2).tolist())
    return {**vision, "pixel_values": pixels.reshape(-1, *pixels.shape[-3:])[:tiles]}


def vision_flops(config: Any, vision: Mapping[str, Tensor]) -> int:
    """Vision tower + projector for one sample's vision inputs (only their shapes are read,
    and Qwen's grid_thw values). LLaVA: pixel_values [1, 3, H, W]; LLaVA-NeXT / OneVision:
    [1, P, 3, H, W] tiles; OneVision video: pixel_values_videos [1, T, 3, H, W]; Qwen2-VL /
    Qwen2.5-VL: flat patches with image_grid_thw or video_grid_thw [1, 3]."""
    if not vision:
        return 0
    vcfg = config.vision_config
    try:
        tower = TOWERS[vcfg.model_type]
    except KeyError:
        raise ValueError(f"no FLOPs counter for vision tower {vcfg.model_type!r}; "
                         f"supported: {', '.join(TOWERS)}") from None
    if getattr(config, "image_grid_pinpoints", None) is not None:
        vision = _llava_tiles(config, vision)
    flops, tiles, s = tower(vcfg, vision)
    layer = getattr(config, "vision_feature_layer", None)
    if layer is not None:  # LLaVA-style two-layer projector on every tile's selected features
        tokens = s - (1 if config.vision_feature_select_strategy == "default" else 0)
        d_in = vcfg.hidden_size * (1 if isinstance(layer, int) else len(layer))
        d = config.text_config.hidden_size
        flops += tiles * 2 * tokens * (d_in * d + d * d)
    return flops


# ---------------------------------------------------------------------- per sample


def sample_flops(config: Any, vision: Mapping[str, Tensor] | int, *, prompt_tokens: int,
                 prompt_tokens_kept: int, generated_tokens: int, stage: str = "layer",
                 prune_layer: int = 2) -> Flops:
    """One sample's FLOPs. `vision` is the sample's vision inputs (or their FLOPs);
    `stage` is the method's ("none", "projector" or "layer"), `prune_layer` its K."""
    llm = LLMShape.of(config.text_config)
    n, kept = prompt_tokens, prompt_tokens_kept
    full = full_layers(stage, prune_layer, llm.layers, pruned=kept < n)
    steps = max(generated_tokens - 1, 0)
    vision_part = vision if isinstance(vision, int) else vision_flops(config, vision)
    prefill, decode = llm.prefill(full, n, kept), llm.decode(full, n, kept, steps)
    unpruned = vision_part + llm.prefill(llm.layers, n, n) + llm.decode(llm.layers, n, n, steps)
    return Flops(flops_vision=vision_part, flops_prefill=prefill, flops_decode=decode,
                 flops_total=vision_part + prefill + decode, flops_total_unpruned=unpruned,
                 paper_prefill=llm.paper_prefill(full, n, kept),
                 paper_prefill_unpruned=llm.paper_prefill(llm.layers, n, n))


# ---------------------------------------------------------------------- shapes


def llava_1_5_7b_config() -> Any:
    """LLaVA-1.5-7B's config (CLIP ViT-L/14 at 336 px, Vicuna-7B), no weights needed."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    return LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
        text_config=LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                num_key_value_heads=32, intermediate_size=11008, vocab_size=32064),
        image_token_index=32000, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def llava_video_7b_config() -> Any:
    """LLaVA-Video-7B-Qwen2's config (llava-hf/LLaVA-Video-7B-Qwen2-hf), no weights needed:
    SigLIP-so400m at 384 px, patch 14 (27 x 27 = 729 patches a frame, no CLS); so400m has 27
    layers and LLaVA-OneVision reads the penultimate, so the checkpoint keeps 26 and reads the
    last (vision_feature_layer -1, "full"), as transformers' LlavaOnevisionConfig defaults do.
    Qwen2-7B: 28 layers, d 3584, 28 heads, 4 KV heads, MLP 18944, vocabulary 152064.
    anyres_max_9 images; a video's frames are pooled 27 x 27 -> 14 x 14 after the projector,
    so a T-frame clip is T * 196 + 1 tokens (one newline, never pruned)."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    return LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                                         num_attention_heads=16, image_size=384, patch_size=14,
                                         vision_use_head=False),
        text_config=Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                                tie_word_embeddings=False),
        image_token_index=151646, video_token_index=151647, vision_feature_layer=-1,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9", tie_word_embeddings=False,
    )


VIDEO_FRAMES = 32  # the sample clip of the "llava-video-7b" shape

# shape name -> (config builder, one sample's vision inputs on the meta device, prunable
# visual tokens N); "llava-video-7b": a 32-frame clip, 32 * 196 frame tokens (+ 1 newline)
SHAPES = {
    "llava-1.5-7b": (llava_1_5_7b_config, lambda: {"pixel_values": torch.empty(1, 3, 336, 336, device="meta")}, 576),
    "llava-video-7b": (llava_video_7b_config,
                       lambda: {"pixel_values_videos": torch.empty(1, VIDEO_FRAMES, 3, 384, 384, device="meta")},
                       VIDEO_FRAMES * 14 * 14),
}
# LLaVA-1.5's chat template "USER: <image>\n{question} ASSISTANT:" around the question, with
# the Llama tokenizer: <s>, "USER:" (3), "\n", "ASSISTANT:" (5); an estimate, see --template-tokens
LLAVA_TEMPLATE_TOKENS = 10


def table(shape: str, question_tokens: int, generated: int, keeps: list[int], prune_layer: int = 2,
          template_tokens: int = LLAVA_TEMPLATE_TOKENS) -> str:
    """The FLOPs columns for one sample of `shape`, unpruned and at each keep."""
    build, vision, n_image = SHAPES[shape]
    config = build()
    prompt = template_tokens + n_image + question_tokens
    v = vision_flops(config, vision())
    rows = [("unpruned", prompt, sample_flops(config, v, prompt_tokens=prompt, prompt_tokens_kept=prompt,
                                              generated_tokens=generated, stage="none"))]
    for k in keeps:
        kept = prompt - n_image + min(k, n_image)
        rows.append((f"keep {k}", kept, sample_flops(config, v, prompt_tokens=prompt, prompt_tokens_kept=kept,
                                                     generated_tokens=generated, prune_layer=prune_layer)))
    head = (f"{shape}: prompt {prompt} tokens ({template_tokens} template + {n_image} image + {question_tokens} "
            f"question), {generated} generated; K = {prune_layer}: layers 0..{prune_layer - 1} see the whole prompt, "
            f"the rest the kept one\n"
            "measured-style GFLOPs (2 per multiply-add); paper-convention reduction = LLM prefill only, "
            "F(n) = 4nd^2 + 2n^2d + 2ndm\n")
    cols = ["", "kept", "vision", "prefill", "decode", "total", "unpruned", "saved", "paper red."]
    lines = ["{:>9} {:>5} {:>9} {:>10} {:>9} {:>10} {:>10} {:>7} {:>10}".format(*cols)]
    for name, kept, f in rows:
        saved = 1 - f.flops_total / f.flops_total_unpruned
        lines.append(f"{name:>9} {kept:>5} {f.flops_vision / 1e9:>9.1f} {f.flops_prefill / 1e9:>10.1f} "
                     f"{f.flops_decode / 1e9:>9.1f} {f.flops_total / 1e9:>10.1f} {f.flops_total_unpruned / 1e9:>10.1f} "
                     f"{saved:>7.2%} {f.paper_prefill_reduction:>10.2%}")
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Per-sample FLOPs of a model shape, unpruned and pruned.")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llava-1.5-7b")
    parser.add_argument("--question-tokens", type=int, default=60)
    parser.add_argument("--template-tokens", type=int, default=LLAVA_TEMPLATE_TOKENS)
    parser.add_argument("--generated", type=int, default=32)
    parser.add_argument("--keep", type=int, nargs="+", default=[192, 128, 64])
    parser.add_argument("--prune-layer", type=int, default=2)
    args = parser.parse_args(argv)
    print(table(args.shape, args.question_tokens, args.generated, args.keep, args.prune_layer,
                args.template_tokens))


if __name__ == "__main__":
    main()
