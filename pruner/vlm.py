"""`PrunedVLM`: load a Hugging Face VLM checkpoint and generate answers with pruning.

Preprocessing (`Preprocessor`) needs only the processor, so a pipeline can run it in CPU
workers and hand ready tensors to the model workers; `PrunedVLM.generate` composes both.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig, AutoProcessor

from .flops import Flops, sample_flops
from .methods import get_method
from .models import Adapter, Prepared, adapter_class
from .runtime import ATTENTION, Decoder, Plan, collate, generate_tokens

DEFAULT_KEEP = 64


@dataclass
class Generation:
    """One sample's answer and its token accounting."""

    text: str
    token_ids: list[int]
    image_tokens: int  # prunable visual tokens in the prompt (N), an image's or a video's
    image_tokens_kept: int  # k
    prompt_tokens: int
    prompt_tokens_kept: int  # tokens entering the layers after pruning
    generated_tokens: int
    kept_indices: list[int]  # into the N visual tokens, ascending
    flops: Flops | None = None  # see pruner.flops
    frames: int = 0  # video frames the vision tower saw (Qwen pads to an even count); 0 for an image


Visual = Image.Image | np.ndarray | Sequence[Image.Image]  # an image, or a video's frames


class Preprocessor:
    """Chat template, tokenizing and image / video preparation for one checkpoint: no model
    needed. A video is its already-sampled frames: a list of PIL images or a uint8 array
    [T, H, W, 3]; every frame is used. `uint8`: samples keep their resized pixels as uint8,
    a quarter of float32's bytes between processes; `normalize` (in `collate`, on the model's
    device) rescales and normalises them as the processor would have."""

    def __init__(self, processor: Any, adapter_cls: type[Adapter], uint8: bool = False):
        self.processor = processor
        self.adapter_cls = adapter_cls
        self.uint8 = uint8

    @classmethod
    def from_pretrained(cls, path: str, uint8: bool = False) -> Preprocessor:
        config = AutoConfig.from_pretrained(path)
        return cls(AutoProcessor.from_pretrained(path), adapter_class(config.model_type), uint8)

    def __call__(self, image: Visual, question: str) -> Prepared:
        """One sample: `image` is a PIL image or a video (list of PIL frames, or uint8 [T, H, W, 3])."""
        if not isinstance(question, str):
            raise ValueError(f"each question must be a string, got {type(question).__name__}")
        return self.adapter_cls.prepare(self.processor, as_visual(image), question, self.uint8)

    def normalize(self, vision: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """uint8 pixels as the processor's float32 output: x * rescale_factor, less the mean,
        over the std, per colour channel (to within float rounding); other tensors as given."""
        out = dict(vision)
        for key in self.adapter_cls.pixel_keys:
            x = vision.get(key)
            if x is None or x.dtype != torch.uint8:
                continue
            p = self.processor.video_processor if key == "pixel_values_videos" else self.processor.image_processor
            mean, std = (torch.tensor(v, device=x.device).view(3, 1, 1) for v in (p.image_mean, p.image_std))
            channels = self.adapter_cls.channels(x).float()  # [..., 3, H, W]
            out[key] = ((channels * p.rescale_factor - mean) / std).view(x.shape)
        return out

    def many(self, images: Sequence[Visual], questions: Sequence[str]) -> list[Prepared]:
        if len(images) != len(questions):
            raise ValueError(f"got {len(images)} images but {len(questions)} questions: one image per question")
        return [self(image, q) for image, q in zip(images, questions)]


class PrunedVLM:
    """A VLM whose prefill prunes image tokens with one of `pruner.methods.METHODS`."""

    def __init__(self, model: torch.nn.Module, processor: Any, *, method: str = "vlm-pruner",
                 keep: int | None = None, rate: float | None = None, prune_layer: int = 2,
                 attention: str = "sdpa", compile: bool | str = "auto", **method_params: Any):
        self.adapter = adapter_class(model.config.model_type)(model)
        self.model = model
        self.preprocessor = Preprocessor(processor, type(self.adapter))
        self.method = get_method(method)
        self.method.check_params(method_params)
        self.keep, self.rate = budget(self.method.stage, keep, rate)
        num_layers = len(self.adapter.layers)
        if self.method.stage == "layer" and not (isinstance(prune_layer, int) and 1 <= prune_layer < num_layers):
            raise ValueError(f"prune_layer must be an int in [1, {num_layers - 1}] for this "
                             f"{num_layers}-layer LLM, got {prune_layer!r}")
        self.prune_layer = prune_layer
        self.plan = Plan(self.method, self.keep_for, prune_layer, dict(method_params))
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {sorted(ATTENTION)}, got {attention!r}")
        model.set_attn_implementation({"text_config": ATTENTION[attention]})  # the LLM's; the vision tower's stays
        tokenizer = getattr(processor, "tokenizer", processor)
        eos = model.generation_config.eos_token_id
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])
        self.tokenizer = tokenizer
        self.compiled = compiles(compile, self.device)
        self.decoder = Decoder(self.compiled, self.device)
        self.compile_seconds = 0.0  # spent in `warm_up`

    @classmethod
    def from_pretrained(cls, path: str, method: str = "vlm-pruner", keep: int | None = None,
                        rate: float | None = None, prune_layer: int = 2, dtype: torch.dtype | str | None = None,
                        device: str | torch.device | None = None, attention: str = "sdpa",
                        compile: bool | str = "auto", **method_params: Any) -> PrunedVLM:
        """Load weights (safetensors only, no remote code) and the checkpoint's processor.
        `compile`: decode steps through `torch.compile` (see `compiles`); call `warm_up`
        to pay for it before the first batch."""
        get_method(method).check_params(method_params)  # fail before loading weights
        budget(get_method(method).stage, keep, rate)
        compiles(compile, torch.device("cpu"))
        config = AutoConfig.from_pretrained(path)
        adapter = adapter_class(config.model_type)
        device, dtype = placement(device, dtype)
        model = adapter.model_class.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                    attn_implementation="sdpa")
        model = model.to(device).eval()
        return cls(model, AutoProcessor.from_pretrained(path), method=method, keep=keep, rate=rate,
                   prune_layer=prune_layer, attention=attention, compile=compile, **method_params)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def keep_for(self, n: int) -> int:
        """Budget for a sample with n image tokens: keep clamped to n, or n * (1 - rate) rounded."""
        if self.rate is not None:
            return max(1, round(n * (1 - self.rate)))
        return min(self.keep, n)

    def warm_up(self, batch_size: int, max_new_tokens: int) -> float:
        """Compile the decode step (on CUDA also capture it, and compile and capture the
        prefill's layers after the selection) on a batch of `batch_size` gray images
        decoding `max_new_tokens`, so that a job's first batch pays nothing; returns the
        seconds it took (also in `compile_seconds`). Eager: nothing to do, 0."""
        if not self.compiled:
            return 0.0
        start = time.perf_counter()
        gray = Image.new("RGB", (336, 336), (128, 128, 128))
        samples = self.preprocess([gray] * batch_size, ["Describe the image."] * batch_size)
        with torch.inference_mode():  # EOS off: every step runs; three of them at least (CUDA graphs record on the second)
            batch = collate(self.adapter, samples, self.device)
            generate_tokens(self.adapter, self.plan, batch, [max(max_new_tokens, 4)] * batch_size, set(),
                            decoder=self.decoder)
        self.compile_seconds = time.perf_counter() - start
        return self.compile_seconds

    def preprocess(self, images: Sequence[Visual], questions: Sequence[str]) -> list[Prepared]:
        return self.preprocessor.many(images, questions)

    def generate(self, images: Sequence[Visual], questions: Sequence[str],
                 max_new_tokens: int | Sequence[int] = 64, **sampling: Any) -> list[Generation]:
        return self.generate_prepared(self.preprocess(images, questions), max_new_tokens, **sampling)

    @torch.inference_mode()
    def generate_prepared(self, samples: Sequence[Prepared], max_new_tokens: int | Sequence[int] = 64,
                          temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> list[Generation]:
        """Answers for preprocessed samples, as one batch. Greedy unless temperature > 0."""
        if len(samples) == 0:
            raise ValueError("empty batch: pass at least one image and question")
        limits = [max_new_tokens] * len(samples) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(limits) != len(samples) or any(not isinstance(m, int) or m < 0 for m in limits):
            raise ValueError(f"max_new_tokens must be an int >= 0 or one per sample, got {max_new_tokens!r}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        batch = collate(self.adapter, list(samples), self.device, self.preprocessor.normalize)
        token_ids, state = generate_tokens(self.adapter, self.plan, batch, limits, self.eos,
                                           temperature, top_p, generator, decoder=self.decoder)
        return [
            Generation(
                text=self.tokenizer.decode(ids, skip_special_tokens=True).strip(),
                token_ids=ids,
                image_tokens=state.image_tokens[b],
                image_tokens_kept=len(state.selections[b].indices),
                prompt_tokens=state.prompt_tokens[b],
                prompt_tokens_kept=state.prompt_tokens_kept[b],
                generated_tokens=len(ids),
                kept_indices=state.selections[b].indices.tolist(),
                flops=sample_flops(self.model.config, samples[b].vision, prompt_tokens=state.prompt_tokens[b],
                                   prompt_tokens_kept=state.prompt_tokens_kept[b], generated_tokens=len(ids),
                                   stage=self.method.stage, prune_layer=self.prune_layer),
                frames=batch.frames[b],
            )
            for b, ids in enumerate(token_ids)
        ]


def placement(device: str | torch.device | None = None,
              dtype: torch.dtype | str | None = None) -> tuple[torch.device, torch.dtype | str]:
    """Where to load a model: cuda when available, else cpu; bfloat16 on CUDA, float32 on CPU."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype


def compiles(compile: bool | str, device: torch.device) -> bool:
    """Whether decode compiles (and on CUDA the prefill's layers after the selection): True /
    False as given; "auto": on CUDA, where a step replays as one CUDA graph, not on a CPU,
    where compiling takes longer than it saves on a job of a few thousand rows
    (docs/compile.md)."""
    if compile == "auto":
        return device.type == "cuda"
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
    return compile


def as_visual(x: Any) -> Image.Image | np.ndarray:
    """An RGB PIL image, or a video as a uint8 array [T, H, W, 3] (from a list of PIL frames
    of one size, or such an array as it is)."""
    if isinstance(x, Image.Image):
        return x.convert("RGB")
    if isinstance(x, (list, tuple)) and x and all(isinstance(f, Image.Image) for f in x):
        sizes = {f.size for f in x}
        if len(sizes) > 1:
            raise ValueError(f"a video's frames must share one size, got {sorted(sizes)}")
        return np.stack([np.asarray(f.convert("RGB")) for f in x])  # [T, H, W, 3]
    if isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 4 and x.shape[0] >= 1 and x.shape[3] == 3:
        return x
    what = f"array {x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
    raise ValueError("each question needs a PIL image or a video (a list of PIL frames or a uint8 array "
                     f"[T, H, W, 3]), got {what}")


def budget(stage: str, keep: int | None, rate: float | None) -> tuple[int | None, float | None]:
    """Validate keep / rate; default keep when neither is given."""
    if keep is not None and rate is not None:
        raise ValueError("give keep or rate, not both")
    if rate is not None:
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
            raise ValueError(f"rate must be in [0, 1), got {rate!r}")
        return None, float(rate)
    if keep is None:
        return DEFAULT_KEEP, None
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an int >= 1, got {keep!r}")
    return keep, None
