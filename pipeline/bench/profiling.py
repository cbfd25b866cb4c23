"""Measuring tools: timers, peak-memory and prefill meters, KV-cache bytes, random weights
with a real checkpoint's widths, and a synthetic workload. `pipeline.bench.runtime` uses them.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

# ---------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    """Wait for the device, so that wall-clock times are the device's."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median and spread (max - min) of `repeats` runs after one warm-up, in seconds."""
    fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs), max(runs) - min(runs)


class PrefillMeter:
    """Times inside a real prefill, as its observer (`pruner.runtime.Observer`):
    `prefill(..., observer=meter)`. `.selection` sums the selection (the lazy signals it
    reads and the method's `run`, plus FastV's extra attention row); `.segments` lists each
    run of consecutive decoder layers. Synchronizes CUDA so times are the device's."""

    def __init__(self, device: torch.device):
        self.device = device
        self.selection = 0.0
        self.segments: list[tuple[int, int, int, float]] = []  # (layers, batch, tokens, seconds)

    @contextmanager
    def __call__(self, segment: str, layers: range = range(0), shape: tuple[int, int] = (0, 0)) -> Iterator[None]:
        sync(self.device)
        start = time.perf_counter()
        yield
        sync(self.device)
        seconds = time.perf_counter() - start
        if segment == "selection":
            self.selection += seconds
        else:
            self.segments.append((len(layers), *shape, seconds))


# ---------------------------------------------------------------------- memory


class PeakMemory:
    """Peak bytes allocated during the block, above the level at its start (`.peak`).

    CUDA: the caching allocator's own peak. CPU: glibc's bytes in use (`mallinfo2`: heap in
    use + mmapped blocks, which is where torch's CPU tensors live), sampled every 0.5 ms by a
    thread; resident set size where mallinfo2 is missing. Resident size alone cannot be used:
    glibc keeps freed heap pages, so a run after a bigger one would look free."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base = _cpu_bytes_in_use()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _cpu_bytes_in_use() - self._base)
            self._stop.wait(0.0005)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _cpu_bytes_in_use() - self._base)

    @staticmethod
    def method(device: torch.device) -> str:
        """What `.peak` measures on `device`, in words."""
        if device.type == "cuda":
            return "CUDA allocator peak"
        return "glibc mallinfo2 in-use bytes sampled every 0.5 ms" if _MALLINFO2 else "resident set size, sampled"


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _load_mallinfo2() -> Callable[[], _MallInfo2] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _load_mallinfo2()


def _cpu_bytes_in_use() -> int:
    if _MALLINFO2 is not None:
        info = _MALLINFO2()
        return info.uordblks + info.hblkhd
    import psutil

    return psutil.Process().memory_info().rss


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes a second a device-to-device copy moves, reads and writes counted (median of
    `repeats` copies of `nbytes`): the memory bandwidth a decode step can hope for."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times)


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 5) -> float:
    """FLOP/s of a square matmul in `dtype` (median of `repeats` after a warm-up), 2 per
    multiply-add: the arithmetic rate a large prefill can hope for. `size` defaults to 8192
    on CUDA (long enough to time), 1024 elsewhere."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)

    def call() -> None:
        a @ b
        sync(device)

    median, _ = time_runs(call, repeats)
    return 2 * size**3 / median


def vision_weight_bytes(model: torch.nn.Module) -> int:
    """Weight bytes the vision side reads once a forward: everything outside the LLM and
    its LM head (the tower and the projector)."""
    llm = {id(p) for m in (model.model.language_model, model.lm_head) for p in m.parameters()}
    return sum(p.nbytes for p in model.parameters() if id(p) not in llm)


def layer_weight_bytes(model: torch.nn.Module) -> int:
    """Weight bytes of one decoder layer (they are all alike)."""
    layers = model.model.language_model.layers
    return sum(p.nbytes for p in layers.parameters()) // len(layers)


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Weight bytes a decode step reads: the LLM's decoder layers, final norm and LM head
    (the embedding table is read a row a sample, so it does not count)."""
    lm = model.model.language_model
    modules = [lm.layers, lm.norm, model.lm_head]
    return sum(p.nbytes for m in modules for p in m.parameters())


def kv_bytes(cache) -> int:
    """Bytes of keys and values the cache holds for the batch's prompts (layer i: its first
    lengths[i] positions of the batch's rows; the room preallocated for decoding, and rows
    that pad the batch to a bucket, are not counted). The formula is
    `pruner.flops.LLMShape.kv_bytes`."""
    total = 0
    for keys, values, n in zip(cache.keys, cache.values, cache.lengths):
        if keys is not None:
            total += keys[: cache.batch, :, :n].nbytes + values[: cache.batch, :, :n].nbytes
    return total


# ---------------------------------------------------------------------- models and inputs


def random_model(shape: str, layers: int | None, processor: Any, dtype: torch.dtype, device: torch.device,
                 seed: int = 0) -> torch.nn.Module:
    """Random weights with `shape`'s widths (`pruner.flops.SHAPES`), the LLM cut to `layers`,
    for `processor` (its tokenizer's image token id must lie inside the shape's vocabulary;
    the demo model's does)."""
    from pruner.flops import SHAPES

    config = SHAPES[shape][0]()
    if layers is not None:
        config.text_config.num_hidden_layers = layers
    tok = processor.tokenizer
    config.image_token_id = tok.convert_tokens_to_ids(processor.image_token)
    if hasattr(config, "video_token_id") and hasattr(processor, "video_token"):
        config.video_token_id = tok.convert_tokens_to_ids(processor.video_token)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config.text_config, name, getattr(tok, name))
    return random_weights(config, dtype, device, seed)


def random_weights(config: Any, dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """The config's model with random weights, built on the meta device and filled in place
    (normal(0, initializer_range) for matrices and embeddings, ones for norm weights, zeros
    for biases): seconds, where transformers' own initialisation of a 7B-wide model takes
    about a minute."""
    from pruner.models import adapter_class

    with torch.device("meta"):
        model = adapter_class(config.model_type).model_class(config).to(dtype)
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    std = config.text_config.initializer_range
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1 and "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=g)
        _fill_buffers(model, config, device)
    return model.eval()


def _fill_buffers(model: torch.nn.Module, config: Any, device: torch.device) -> None:
    """Buffers hold constants, not weights: recompute them after `to_empty`."""
    rotary = type(model.model.language_model.rotary_emb)(config.text_config)
    for name, buf in model.named_buffers():
        if name.endswith("position_ids"):  # CLIP's [1, patches + 1]
            buf.copy_(torch.arange(buf.shape[-1], device=device).expand_as(buf))
        elif name.endswith("inv_freq"):  # the rotary embedding's inv_freq and original_inv_freq
            buf.copy_(rotary.inv_freq)
        else:
            raise NotImplementedError(f"random_model does not know how to fill buffer {name!r}")


def shape_processor(shape: str) -> Any | None:
    """A processor for `shape` without a download where the demo model's cannot serve:
    LLaVA-OneVision / LLaVA-Video (`onevision_processor`); None for LLaVA-1.5 shapes."""
    from pruner.flops import SHAPES

    return onevision_processor() if SHAPES[shape][0]().model_type == "llava_onevision" else None


def onevision_processor() -> Any:
    """LLaVA-OneVision's processor at the checkpoints' defaults (384 px, anyres_max_9 tiles,
    729 tokens a tile, video frames pooled to 14 x 14) around a word-level tokenizer of the
    workload's words, with the chat template "USER : <video> {question} ASSISTANT :"."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor,
                              PreTrainedTokenizerFast)

    words = ["<unk>", "<pad>", "<s>", "</s>", "<image>", "<video>", "USER", ":", "ASSISTANT"]
    words += sorted(set(QUESTION_WORDS) - set(words))
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", extra_special_tokens={"image_token": "<image>",
                                                                          "video_token": "<video>"})
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}USER : {% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<image> {% elif c['type'] == 'video' %}<video> "
                "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% else %}ASSISTANT : "
                "{{ m['content'][0]['text'] }} </s> {% endif %}{% endfor %}"
                "{% if add_generation_prompt %}ASSISTANT :{% endif %}")
    return LlavaOnevisionProcessor(image_processor=LlavaOnevisionImageProcessor(),
                                   video_processor=LlavaOnevisionVideoProcessor(), tokenizer=tok,
                                   num_image_tokens=729, vision_feature_select_strategy="full",
                                   vision_aspect_ratio="anyres_max_9", chat_template=template)


class RandomTower(torch.nn.Module):
    """In place of a LLaVA-family vision tower (CLIP / SigLIP): random hidden states of the
    tower's output shape, [images or frames, patches (+ CLS), width], for every layer, so the
    projector, pooling and packing after it run as they do. For CPU runs where the tower is too
    slow (SigLIP-so400m on a 32-frame clip); the prefill meter times only the LLM."""

    def __init__(self, config: Any, seed: int = 0):
        super().__init__()
        vcfg = config.vision_config
        self.tokens = (vcfg.image_size // vcfg.patch_size) ** 2 + (vcfg.model_type == "clip_vision_model")
        self.width, self.layers, self.seed = vcfg.hidden_size, vcfg.num_hidden_layers, seed

    def forward(self, pixel_values: torch.Tensor, **kwargs: Any) -> Any:
        from types import SimpleNamespace

        g = torch.Generator(device=pixel_values.device).manual_seed(self.seed)
        h = torch.randn(pixel_values.shape[0], self.tokens, self.width, generator=g, device=pixel_values.device)
        h = h.to(pixel_values.dtype)
        return SimpleNamespace(hidden_states=(h,) * (self.layers + 1), last_hidden_state=h, pooler_output=None)


def random_vision_tower(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replace `model`'s vision tower with a `RandomTower` (its weights are freed)."""
    model.model.vision_tower = RandomTower(model.config, seed)
    return model


def random_clips(n: int, frames: int, size: int = 384, seed: int = 0) -> list:
    """n random uint8 videos [frames, size, size, 3] (content does not matter with random weights)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8) for _ in range(n)]


QUESTION_WORDS = ("what is the color of the small object near the top left corner , and is there a large "
                  "blue square , a red circle or a green triangle ? list the objects .").split()


def workload(vlm, images: Sequence, question_tokens: int) -> list:
    """Prepared samples, one per image, each with the same question of `question_tokens`
    tokens, so every prompt has the same length (no padding) when the images share a size."""
    tok = vlm.tokenizer
    question = ""
    for i in range(10 * question_tokens):
        candidate = " ".join(QUESTION_WORDS[j % len(QUESTION_WORDS)] for j in range(i + 1))
        if len(tok(candidate, add_special_tokens=False)["input_ids"]) > question_tokens:
            break
        question = candidate
    return vlm.preprocess(list(images), [question] * len(images))

