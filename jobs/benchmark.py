"""Measurements that take too long for the test suite.

    python jobs/benchmark.py runtime [--shape llava-1.5-7b --layers 4 | --model PATH] [--out DIR]
    python jobs/benchmark.py selection [--n 576 --dim 4096 --keeps 192,128,64 --repeats 7]

`runtime` (the default when no subcommand is given) measures what pruning saves in the real
runtime, every figure taken side by side in one run: for each method x keep against unpruned,
at each batch size, prefill and end-to-end seconds per sample and the speedup, next to the
speedup the FLOPs predict (`pruner.flops`); the selection's own time as a fraction of the
pruned prefill; peak memory and KV-cache bytes; and VLM-Pruner's selection at chunk 16 vs
chunk 1 on the model's real layer K-1 signals. Settings are measured in interleaved rounds
(a warm-up round, then `--repeats` rounds) so that load from other processes falls on all of
them alike; every figure is the median over rounds, spread = max - min. It prints a Markdown
report and writes runtime.json + runtime.md under --out (a local folder or a pyarrow URI such
as s3://bucket/prefix, for cluster runs).

`--shape llava-1.5-7b --layers L` builds random weights with LLaVA-1.5-7B's widths (CLIP
ViT-L/14-336, Llama-7B) and the LLM cut to L layers, in-process (no download), with the
bundled demo model's processor (336 px, 576 image tokens; a word-level tokenizer).

`selection` times each method's token selection alone on random inputs shaped like
LLaVA-1.5-7B's layer-2 signals, and VLM-Pruner with chunk 16 vs chunk 1.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import dataclasses
import json
import os
import posixpath
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from pruner.methods import METHODS, Signals  # noqa: E402


def _time(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median and spread (max - min) of `repeats` runs after one warm-up, in seconds."""
    fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs), max(runs) - min(runs)


# ====================================================================== selection alone


def bench_selection(n: int, dim: int, keeps: list[int], repeats: int, text: int = 60) -> list[dict]:
    side = int(n**0.5)
    if side * side != n:
        raise SystemExit(f"--n must be a square number of tokens (a grid), got {n}")
    g = torch.Generator().manual_seed(0)
    signals = Signals(
        grid=(side, side),
        keys=torch.randn(n, dim, generator=g), hidden=torch.randn(n, dim, generator=g),
        hidden_normed=torch.randn(n, dim, generator=g), attn_last=torch.rand(n, generator=g).softmax(0),
        text_keys=torch.randn(text, dim, generator=g), text_hidden_normed=torch.randn(text, dim, generator=g),
        features=torch.randn(n, dim, generator=g),
    )
    settings = [(name, {}) for name, m in METHODS.items() if m.run is not None]
    settings.append(("vlm-pruner", {"chunk": 1}))
    rows = []
    for name, params in settings:
        for keep in keeps:
            median, spread = _time(lambda: METHODS[name].run(signals, keep, **params), repeats)
            label = name + "".join(f" {k}={v}" for k, v in params.items())
            rows.append({"method": label, "keep": keep, "ms": median * 1e3, "spread_ms": spread * 1e3})
    return rows


def print_selection(args: argparse.Namespace) -> None:
    keeps = [int(k) for k in args.keeps.split(",")]
    rows = bench_selection(args.n, args.dim, keeps, args.repeats)
    print(f"Selection time, N={args.n}, D={args.dim}, CPU threads={torch.get_num_threads()} "
          f"(cores={os.cpu_count()}), median of {args.repeats} after a warm-up\n")
    print("| method | " + " | ".join(f"keep {k} (ms)" for k in keeps) + " |")
    print("|---|" + "---|" * len(keeps))
    for label in dict.fromkeys(r["method"] for r in rows):
        cells = [f"{r['ms']:.2f} ± {r['spread_ms'] / 2:.2f}" for r in rows if r["method"] == label]
        print(f"| {label} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


# ====================================================================== runtime: the model


def random_model(shape: str, layers: int | None, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """(model, processor): random weights with `shape`'s widths, the LLM cut to `layers`.
    The processor is the demo model's (336 px, word-level tokenizer); the image token id is
    its tokenizer's, inside the checkpoint's 32064-word vocabulary."""
    from transformers import AutoProcessor

    from pipeline.demo import MODEL_DIR
    from pruner.flops import SHAPES

    config = SHAPES[shape][0]()
    if layers is not None:
        config.text_config.num_hidden_layers = layers
    processor = AutoProcessor.from_pretrained(MODEL_DIR)
    tok = processor.tokenizer
    config.image_token_id = tok.convert_tokens_to_ids(processor.image_token)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config.text_config, name, getattr(tok, name))
    return random_weights(config, dtype, device, seed), processor


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


def workload(vlm, batch: int, question_tokens: int, seed: int = 0) -> list:
    """`batch` prepared samples: seeded synthetic scenes (distinct images), one question of
    `question_tokens` tokens, so every prompt has the same length (no padding)."""
    from pipeline.demo import scenes

    words = ("what is the color of the small object near the top left corner , and is there a large "
             "blue square , a red circle or a green triangle ? list the objects .").split()
    tok = vlm.tokenizer
    question = ""
    for i in range(10 * question_tokens):
        candidate = " ".join(words[j % len(words)] for j in range(i + 1))
        if len(tok(candidate, add_special_tokens=False)["input_ids"]) > question_tokens:
            break
        question = candidate
    rng = random.Random(seed)
    images = [scenes.render(scenes.sample_scene(rng)) for _ in range(batch)]
    return vlm.preprocess(images, [question] * batch)


# ====================================================================== runtime: meters


def _sync(device: torch.device) -> None:
    """Wait for the device, so that wall-clock times are the device's."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


class PrefillMeter:
    """Times inside a real prefill: the selection (`select`, i.e. the lazy signals it reads
    and the method's `run`, plus FastV's extra attention row) and each run of consecutive
    decoder layers (`run_layers`). The runtime calls these through its module globals, so
    the meter wraps them there while `active`. Synchronizes CUDA so times are the device's."""

    def __init__(self, device: torch.device):
        self.device = device
        self.selection = 0.0
        self.segments: list[tuple[int, int, int, float]] = []  # (layers, batch, tokens, seconds)

    @contextmanager
    def active(self) -> Iterator[PrefillMeter]:
        from pruner import runtime

        self.selection, self.segments = 0.0, []
        saved = {name: getattr(runtime, name) for name in ("select", "last_row_attention", "run_layers")}

        def on_selection(seconds: float, *args) -> None:
            self.selection += seconds

        def on_layers(seconds: float, adapter, layers, h, *args, **kwargs) -> None:
            self.segments.append((len(layers), h.shape[0], h.shape[1], seconds))

        try:
            runtime.select = self._timed(saved["select"], on_selection)
            runtime.last_row_attention = self._timed(saved["last_row_attention"], on_selection)
            runtime.run_layers = self._timed(saved["run_layers"], on_layers)
            yield self
        finally:
            for name, fn in saved.items():
                setattr(runtime, name, fn)

    def _timed(self, fn: Callable, record: Callable) -> Callable:
        def timed(*args, **kwargs):
            _sync(self.device)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            _sync(self.device)
            record(time.perf_counter() - start, *args, **kwargs)
            return out
        return timed


def kv_bytes(cache) -> int:
    """Bytes of keys and values the cache holds for the tokens seen so far (layer i: its
    first lengths[i] positions; the room preallocated for decoding is not counted)."""
    total = 0
    for keys, values, n in zip(cache.keys, cache.values, cache.lengths):
        if keys is not None:
            total += keys[:, :, :n].nbytes + values[:, :, :n].nbytes
    return total


def kv_bytes_formula(text_config: Any, full_layers: int, prompt: int, prompt_kept: int, itemsize: int) -> int:
    """One sample's KV bytes after prefill: the first `full_layers` layers hold the whole
    prompt, the others the kept prompt (text tokens counted in both)."""
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    per_token_layer = 2 * kv_heads * head_dim * itemsize
    layers = text_config.num_hidden_layers
    return per_token_layer * (full_layers * prompt + (layers - full_layers) * prompt_kept)


# ====================================================================== runtime: measuring


@dataclass(frozen=True)
class Setting:
    """One row: a method (with parameters) at a budget; method "none" is the baseline."""

    method: str
    keep: int | None = None
    params: tuple = ()

    @property
    def label(self) -> str:
        return self.method + "".join(f" {k}={v}" for k, v in self.params)


def parse_methods(text: str) -> list[tuple[str, tuple]]:
    """"vlm-pruner,fastv,vlm-pruner:chunk=1" -> [(name, ((param, value), ...)), ...]."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, *params = item.split(":")
        if name not in METHODS or name == "none":
            raise SystemExit(f"unknown method {name!r} in --methods; choose from "
                             f"{', '.join(m for m in METHODS if m != 'none')}")
        pairs = []
        for p in params:
            key, _, value = p.partition("=")
            pairs.append((key, json.loads(value) if value else True))
        METHODS[name].check_params(dict(pairs))
        out.append((name, tuple(pairs)))
    return out


@dataclass
class Runs:
    """Raw per-round figures of one setting at one batch size (seconds per batch)."""

    prefill: list[float] = field(default_factory=list)
    selection: list[float] = field(default_factory=list)
    end_to_end: list[float] = field(default_factory=list)
    segments: list[list[tuple]] = field(default_factory=list)  # per round: PrefillMeter.segments
    peak_prefill: int = 0
    peak_generate: int = 0
    kv_bytes: int = 0
    prompt_tokens: int = 0
    prompt_tokens_kept: int = 0
    image_tokens_kept: int = 0


def measure_batch(model, processor, settings: list[Setting], batch: int, *, prune_layer: int, repeats: int,
                  warmup: int, new_tokens: int, question_tokens: int, log: Callable[[str], None],
                  capture: dict | None = None) -> dict[Setting, Runs]:
    """Interleaved rounds over the settings at one batch size. The first `warmup` (>= 1)
    rounds are not timed; the first of them measures peak memory and the KV cache instead,
    so that no timed run carries a memory meter. When `capture` is a dict,
    the first VLM-Pruner warm-up stores sample 0's real Signals under "signals"."""
    from pruner import PrunedVLM
    from pruner.runtime import collate, prefill

    vlms = {}
    for s in settings:
        budget = {} if s.method == "none" else {"keep": s.keep}
        vlm = PrunedVLM(model, processor, method=s.method, prune_layer=prune_layer, **budget, **dict(s.params))
        vlm.eos = {-1}  # never stop early: every sample generates exactly new_tokens
        vlms[s] = vlm
    any_vlm = next(iter(vlms.values()))
    device = any_vlm.device
    samples = workload(any_vlm, batch, question_tokens)
    with torch.inference_mode():
        collated = collate(any_vlm.adapter, samples, device)
    runs = {s: Runs() for s in settings}
    meter = PrefillMeter(device)

    for round_ in range(warmup + repeats):
        timed = round_ >= warmup
        for s, vlm in vlms.items():
            r = runs[s]
            plan = vlm.plan
            if not timed and capture is not None and "signals" not in capture and s.method == "vlm-pruner":
                plan = dataclasses.replace(plan, method=dataclasses.replace(
                    plan.method, run=_recording(plan.method.run, capture)))
            # prefill alone: the batch is collated (vision tower run) outside the timed region
            mem = PeakMemory(device) if round_ == 0 else nullcontext()
            with torch.inference_mode(), meter.active(), mem:
                _sync(device)
                start = time.perf_counter()
                _, state = prefill(vlm.adapter, plan, collated, room=new_tokens)
                _sync(device)
                seconds = time.perf_counter() - start
            if timed:
                r.prefill.append(seconds)
                r.selection.append(meter.selection)
                r.segments.append(meter.segments)
            elif round_ == 0:
                r.peak_prefill = mem.peak
                r.kv_bytes = kv_bytes(state.cache) // batch
                r.prompt_tokens = state.prompt_tokens[0]
                r.prompt_tokens_kept = state.prompt_tokens_kept[0]
                r.image_tokens_kept = len(state.selections[0].indices)
            del state
            # end to end: collate (vision tower) + prefill + new_tokens - 1 decode steps
            mem = PeakMemory(device) if round_ == 0 else nullcontext()
            with mem:
                _sync(device)
                start = time.perf_counter()
                out = vlm.generate_prepared(samples, new_tokens)
                _sync(device)
                seconds = time.perf_counter() - start
            assert all(o.generated_tokens == new_tokens for o in out)
            if timed:
                r.end_to_end.append(seconds)
            elif round_ == 0:
                r.peak_generate = mem.peak
            log(f"batch {batch} {'round ' + str(round_ - warmup + 1) if timed else 'warm-up'} {s.label} "
                f"keep {s.keep}: prefill {r.prefill[-1] if timed else float('nan'):.2f} s, "
                f"end-to-end {seconds:.2f} s")
    return runs


def _recording(run: Callable, capture: dict) -> Callable:
    def recording(signals, keep, **params):
        capture.setdefault("signals", signals)
        return run(signals, keep, **params)
    return recording


def _stats(xs: list[float]) -> tuple[float, float]:
    return (statistics.median(xs), max(xs) - min(xs)) if xs else (float("nan"), float("nan"))


def summarize(model, runs_by_batch: dict[int, dict[Setting, Runs]], *, prune_layer: int, new_tokens: int,
              sample_vision: dict) -> list[dict]:
    """One row per (batch, setting): medians per sample, speedups, FLOPs predictions, memory."""
    from pruner.flops import LLMShape, full_layers, sample_flops

    text = model.config.text_config
    llm = LLMShape.of(text)
    itemsize = next(model.parameters()).element_size()
    rows = []
    for batch, runs in runs_by_batch.items():
        base = runs[Setting("none")]
        base_prefill, _ = _stats(base.prefill)
        base_e2e, _ = _stats(base.end_to_end)
        for s, r in runs.items():
            stage = METHODS[s.method].stage
            n, kept = r.prompt_tokens, r.prompt_tokens_kept
            full = full_layers(stage, prune_layer, text.num_hidden_layers) if kept < n else text.num_hidden_layers
            flops = sample_flops(model.config, sample_vision, prompt_tokens=n, prompt_tokens_kept=kept,
                                 generated_tokens=new_tokens, stage=stage, prune_layer=prune_layer)
            flops_none = sample_flops(model.config, sample_vision, prompt_tokens=n, prompt_tokens_kept=n,
                                      generated_tokens=new_tokens, stage="none")
            prefill, prefill_spread = _stats(r.prefill)
            e2e, e2e_spread = _stats(r.end_to_end)
            selection, _ = _stats(r.selection)
            prefill_speedup = base_prefill / prefill
            e2e_speedup = base_e2e / e2e
            predicted_prefill = flops_none.flops_prefill / flops.flops_prefill
            predicted_e2e = flops.flops_total_unpruned / flops.flops_total
            rates = _layer_rates(llm, r.segments, n)
            formula = kv_bytes_formula(text, full, n, kept, itemsize)
            formula_none = kv_bytes_formula(text, text.num_hidden_layers, n, n, itemsize)
            rows.append({
                "method": s.label, "keep": s.keep, "batch": batch,
                "prompt_tokens": n, "prompt_tokens_kept": kept, "image_tokens_kept": r.image_tokens_kept,
                "prefill_s": prefill / batch, "prefill_spread_s": prefill_spread / batch,
                "prefill_speedup": prefill_speedup, "prefill_speedup_flops": predicted_prefill,
                "prefill_vs_flops": prefill_speedup / predicted_prefill,
                "e2e_s": e2e / batch, "e2e_spread_s": e2e_spread / batch,
                "e2e_speedup": e2e_speedup, "e2e_speedup_flops": predicted_e2e,
                "e2e_vs_flops": e2e_speedup / predicted_e2e,
                "selection_ms": selection * 1e3,
                "selection_frac": statistics.median([a / b for a, b in zip(r.selection, r.prefill)]),
                "layers_full_gflops_per_s": rates["full"], "layers_kept_gflops_per_s": rates["kept"],
                "peak_prefill_bytes": r.peak_prefill, "peak_generate_bytes": r.peak_generate,
                "kv_bytes": r.kv_bytes, "kv_bytes_formula": formula,
                "kv_ratio": r.kv_bytes / base.kv_bytes, "kv_ratio_formula": formula / formula_none,
                "prefill_runs_s": r.prefill, "selection_runs_s": r.selection, "e2e_runs_s": r.end_to_end,
            })
    return rows


def _layer_rates(llm, segments_per_round: list[list[tuple]], prompt: int) -> dict[str, float | None]:
    """Median FLOP rate (GFLOP/s, the measured-style count) of the decoder layers that ran
    on the full prompt and of those that ran on the kept prompt."""
    rates: dict[str, list[float]] = {"full": [], "kept": []}
    for segments in segments_per_round:
        flops = {"full": 0, "kept": 0}
        seconds = {"full": 0.0, "kept": 0.0}
        for layers, batch, tokens, secs in segments:
            part = "full" if tokens >= prompt else "kept"
            flops[part] += layers * batch * llm.layer(tokens, tokens)
            seconds[part] += secs
        for part in rates:
            if seconds[part] > 0:
                rates[part].append(flops[part] / seconds[part] / 1e9)
    return {part: statistics.median(xs) if xs else None for part, xs in rates.items()}


def chunk_comparison(signals: Signals, keeps: list[int], chunks: list[int], repeats: int) -> list[dict]:
    """VLM-Pruner's selection alone on real signals, per keep and chunk size."""
    rows = []
    for keep in keeps:
        for chunk in chunks:
            median, spread = _time(lambda: METHODS["vlm-pruner"].run(signals, keep, chunk=chunk), repeats)
            rows.append({"keep": keep, "chunk": chunk, "ms": median * 1e3, "spread_ms": spread * 1e3})
    return rows


# ====================================================================== runtime: report


def targets(rows: list[dict], keep: int, method: str = "vlm-pruner") -> list[dict]:
    """The issue's targets, where the rows hold what they need."""
    def row(batch: int, label: str = method) -> dict | None:
        return next((r for r in rows if r["batch"] == batch and r["method"] == label and
                     (r["keep"] == keep or label == "none")), None)

    out = []
    b1, batches = row(1), sorted({r["batch"] for r in rows})
    if b1:
        out.append({"target": f"{method} keep {keep}, batch 1: measured prefill speedup >= 0.8 x FLOPs-predicted",
                    "value": b1["prefill_vs_flops"], "limit": 0.8, "met": b1["prefill_vs_flops"] >= 0.8})
    for b in batches:
        r = row(b)
        if r:
            out.append({"target": f"{method} keep {keep}, batch {b}: selection <= 5 % of the pruned prefill",
                        "value": r["selection_frac"], "limit": 0.05, "met": r["selection_frac"] <= 0.05})
    big = max(batches)
    if b1 and big > 1 and row(big):
        for phase in ("e2e", "prefill"):
            ratio = b1[f"{phase}_s"] / row(big)[f"{phase}_s"]
            name = "end-to-end" if phase == "e2e" else "prefill"
            out.append({"target": f"{method} keep {keep}: batch {big} {name} throughput >= 1.3 x batch 1",
                        "value": ratio, "limit": 1.3, "met": ratio >= 1.3})
    if b1:
        err = b1["kv_ratio"] / b1["kv_ratio_formula"] - 1
        out.append({"target": f"{method} keep {keep}: KV cache / unpruned within 5 % of (K*n + (T-K)*n_kept) / (T*n)",
                    "value": err, "limit": 0.05, "met": abs(err) <= 0.05,
                    "detail": f"measured {b1['kv_ratio']:.4f}, formula {b1['kv_ratio_formula']:.4f}"})
    return out


def markdown(meta: dict, rows: list[dict], chunks: list[dict], goals: list[dict]) -> str:
    mb = 2**20
    lines = [
        f"Model: {meta['model']}; {meta['dtype']} on {meta['device']}; torch threads {meta['threads']} "
        f"(cores {meta['cores']}). Prompt {meta['prompt_tokens']} tokens ({meta['image_tokens']} image), "
        f"{meta['new_tokens']} new tokens, pruning after layer K-1 (K = {meta['prune_layer']}). "
        f"Median of {meta['repeats']} interleaved rounds after {meta['warmup']} warm-up round(s); "
        f"± = half the spread (max - min).",
        "",
        "Time, seconds per sample. Speedups against unpruned at the same batch size; FLOPs = the speedup "
        "`pruner.flops` predicts (measured-style, 2 per multiply-add); meas./FLOPs = how close to that limit. "
        "Prefill = the LLM on the collated batch; end to end = vision tower + prefill + decode.",
        "",
        "| method | keep | batch | prefill s | speedup | FLOPs | meas./FLOPs | end-to-end s | speedup | FLOPs | meas./FLOPs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['keep'] or '-'} | {r['batch']} | {r['prefill_s']:.3f} ± {r['prefill_spread_s'] / 2:.3f} "
            f"| {r['prefill_speedup']:.2f}x | {r['prefill_speedup_flops']:.2f}x | {r['prefill_vs_flops']:.2f} "
            f"| {r['e2e_s']:.3f} ± {r['e2e_spread_s'] / 2:.3f} | {r['e2e_speedup']:.2f}x "
            f"| {r['e2e_speedup_flops']:.2f}x | {r['e2e_vs_flops']:.2f} |")
    lines += [
        "",
        "Selection, layers and memory. Selection = the runtime's `select` (signals + the method) and FastV's "
        "attention row, per batch, and its share of the pruned prefill. GFLOP/s = the rate at which the decoder "
        "layers ran on the full prompt (layers < K) and on the kept prompt (layers >= K): where the kept layers "
        "run slower, the measured speedup falls short of the FLOPs. Peak = most bytes allocated above the weights "
        f"during prefill / during generate ({meta['memory']}). KV = keys and values cached per sample after "
        "prefill; ratio to unpruned, measured and from (K*n + (T-K)*n_kept) / (T*n).",
        "",
        "| method | keep | batch | selection ms | % of prefill | GFLOP/s full / kept layers | peak MiB prefill "
        "| peak MiB generate | KV MiB/sample | KV ratio | formula |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rate = " / ".join("-" if r[f"layers_{p}_gflops_per_s"] is None else f"{r[f'layers_{p}_gflops_per_s']:.1f}"
                          for p in ("full", "kept"))
        lines.append(
            f"| {r['method']} | {r['keep'] or '-'} | {r['batch']} | {r['selection_ms']:.1f} | {100 * r['selection_frac']:.2f} % "
            f"| {rate} "
            f"| {r['peak_prefill_bytes'] / mb:.0f} | {r['peak_generate_bytes'] / mb:.0f} | {r['kv_bytes'] / mb:.1f} "
            f"| {r['kv_ratio']:.3f} | {r['kv_ratio_formula']:.3f} |")
    if chunks:
        keeps = list(dict.fromkeys(c["keep"] for c in chunks))
        sizes = list(dict.fromkeys(c["chunk"] for c in chunks))
        lines += ["", "VLM-Pruner selection alone on the model's real layer K-1 signals (sample 0), ms, "
                      "median ± half spread:", "",
                  "| keep | " + " | ".join(f"chunk {c}" for c in sizes) + " | chunk "
                  f"{sizes[-1]} / chunk {sizes[0]} |", "|---|" + "---|" * (len(sizes) + 1)]
        for k in keeps:
            ms = {c["chunk"]: c for c in chunks if c["keep"] == k}
            cells = [f"{ms[c]['ms']:.1f} ± {ms[c]['spread_ms'] / 2:.1f}" for c in sizes]
            lines.append(f"| {k} | " + " | ".join(cells) + f" | {ms[sizes[-1]]['ms'] / ms[sizes[0]]['ms']:.2f}x |")
    if goals:
        lines += ["", "Targets:", ""]
        for g in goals:
            value = f"{100 * g['value']:+.2f} %" if "KV" in g["target"] else (
                f"{100 * g['value']:.2f} %" if g["limit"] == 0.05 else f"{g['value']:.2f}")
            detail = f" ({g['detail']})" if "detail" in g else ""
            lines.append(f"- {'MET' if g['met'] else 'MISSED'}: {g['target']}: {value}{detail}")
    return "\n".join(lines) + "\n"


def write_outputs(out: str, report: dict, text: str) -> None:
    import pyarrow.fs as pafs

    if "://" in out:
        fs, root = pafs.FileSystem.from_uri(out)
    else:
        fs, root = pafs.LocalFileSystem(), posixpath.abspath(out)
    fs.create_dir(root, recursive=True)
    for name, data in (("runtime.json", json.dumps(report, indent=1)), ("runtime.md", text)):
        with fs.open_output_stream(posixpath.join(root, name)) as f:
            f.write(data.encode())


def run_runtime(args: argparse.Namespace) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not args.quiet else (lambda msg: None)
    start = time.perf_counter()
    if args.shape:
        model, processor = random_model(args.shape, args.layers, dtype, device, args.seed)
        name = f"random {args.shape} widths, LLM cut to {model.config.text_config.num_hidden_layers} layers"
    else:
        from transformers import AutoConfig, AutoProcessor

        from pipeline.demo import MODEL_DIR
        from pruner.models import adapter_class

        path = args.model or str(MODEL_DIR)
        cls = adapter_class(AutoConfig.from_pretrained(path).model_type).model_class
        model = cls.from_pretrained(path, dtype=dtype, use_safetensors=True, attn_implementation="sdpa")
        model, processor = model.to(device).eval(), AutoProcessor.from_pretrained(path)
        name = path if args.model else f"demo model ({path})"
    log(f"model ready in {time.perf_counter() - start:.1f} s: {name}")

    keeps = [int(k) for k in args.keeps.split(",")]
    settings = [Setting("none")] + [Setting(m, k, p) for m, p in parse_methods(args.methods) for k in keeps]
    from pruner import PrunedVLM

    sample = workload(PrunedVLM(model, processor), 1, args.question_tokens)[0]
    meta = {
        "model": name, "dtype": str(dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "threads": torch.get_num_threads(), "cores": os.cpu_count(), "prompt_tokens": len(sample.input_ids),
        "image_tokens": int((sample.input_ids == model.config.image_token_id).sum()),
        "new_tokens": args.new_tokens, "prune_layer": args.prune_layer, "repeats": args.repeats,
        "warmup": args.warmup, "weights_bytes": sum(p.nbytes for p in model.parameters()),
        "memory": "CUDA allocator peak" if device.type == "cuda" else
        ("glibc mallinfo2 in-use bytes sampled every 0.5 ms" if _MALLINFO2 else "resident set size, sampled"),
        "command": " ".join(sys.argv),
    }
    capture: dict = {}
    chunks: list[dict] = []
    runs_by_batch = {}
    for b in (int(x) for x in args.batches.split(",")):
        runs_by_batch[b] = measure_batch(
            model, processor, settings, b, prune_layer=args.prune_layer, repeats=args.repeats, warmup=args.warmup,
            new_tokens=args.new_tokens, question_tokens=args.question_tokens, log=log,
            capture=capture if args.chunks else None)
        if args.chunks and "signals" in capture and not chunks:
            sizes = [int(c) for c in args.chunks.split(",")]
            chunks = chunk_comparison(capture["signals"], keeps, sizes, args.selection_repeats)
        rows = summarize(model, runs_by_batch, prune_layer=args.prune_layer, new_tokens=args.new_tokens,
                         sample_vision=sample.vision)
        goals = targets(rows, args.target_keep)
        meta["seconds"] = time.perf_counter() - start
        text = markdown(meta, rows, chunks, goals)
        report = {"meta": meta, "rows": rows, "chunks": chunks, "targets": goals}
        if args.out:  # after every batch size, so that a killed run keeps what it measured
            write_outputs(args.out, report, text)
    print(text)
    return report


# ====================================================================== the caption job vs a loop


def bench_pipeline(args: argparse.Namespace) -> dict:
    """Rows/s of the caption job (Ray Data) on the demo data vs a plain Python loop calling
    PrunedVLM.generate on the same rows with the same batch size. The loop decodes images
    itself and its model is loaded before the clock starts; the job's time is its pipeline's
    (actor start-up and model load included, Ray's own start not)."""
    import io

    import pyarrow.parquet as pq
    import ray
    from PIL import Image

    from pipeline.demo import EVAL_PARQUET, MODEL_DIR
    from pipeline.job import JobConfig, actor_threads, run
    from pruner import PrunedVLM

    rows = pq.read_table(EVAL_PARQUET).slice(0, args.rows).to_pylist()
    vlm = PrunedVLM.from_pretrained(str(MODEL_DIR), method="vlm-pruner", keep=64)
    start = time.perf_counter()
    for i in range(0, len(rows), args.batch_size):
        chunk = rows[i : i + args.batch_size]
        images = [Image.open(io.BytesIO(r["image"])) for r in chunk]
        vlm.generate(images, [r["question"] for r in chunk], max_new_tokens=args.max_new_tokens)
    loop = len(rows) / (time.perf_counter() - start)
    cfg = JobConfig(output=args.output, limit=len(rows), batch_size=args.batch_size, overwrite=True,
                    max_new_tokens=args.max_new_tokens, threads_per_actor=args.threads_per_actor)
    job = run(cfg)
    result = {"rows": len(rows), "batch_size": args.batch_size, "loop_rows_per_second": round(loop, 3),
              "job_rows_per_second": job["rows_per_second"], "job_over_loop": round(job["rows_per_second"] / loop, 3),
              "job_wall_seconds": job["wall_seconds"], "torch_threads": torch.get_num_threads(),
              "actor_threads": actor_threads(cfg, ray.cluster_resources()["CPU"])}
    print(json.dumps(result, indent=1))
    return result


def bench_resume(args: argparse.Namespace) -> dict:
    """The driver's resume bookkeeping and summary at --rows finished rows (no model), measured
    in a fresh process so that its peak memory is this work's alone."""
    import subprocess
    import tempfile

    from pipeline.scale import write_finished

    folder = args.output or tempfile.mkdtemp(prefix="resume-scale-")
    start = time.perf_counter()
    job_id = write_finished(folder, args.rows, args.rows_per_file)
    print(f"wrote {args.rows:,} finished rows in {time.perf_counter() - start:.0f} s to {folder}", file=sys.stderr)
    code = f"import json; from pipeline.scale import measure; print(json.dumps(measure({folder!r}, {job_id!r})))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(result, indent=1))
    return result


# ====================================================================== CLI


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    rt = sub.add_parser("runtime", help="measured speed, memory and selection overhead against the FLOPs limit")
    source = rt.add_mutually_exclusive_group()
    source.add_argument("--model", help="checkpoint path or name (default: the bundled demo model)")
    source.add_argument("--shape", choices=["llava-1.5-7b"],
                        help="random weights with this checkpoint's widths (no download)")
    rt.add_argument("--layers", type=int, help="with --shape: LLM layers (default: the checkpoint's)")
    rt.add_argument("--methods", default="vlm-pruner,fastv,dart,divprune",
                    help="comma-separated; parameters after colons, e.g. vlm-pruner:chunk=1 (default: %(default)s)")
    rt.add_argument("--keeps", default="192,128,64")
    rt.add_argument("--batches", default="1,8")
    rt.add_argument("--prune-layer", type=int, default=2, help="K: in-LLM methods prune after layer K-1")
    rt.add_argument("--repeats", type=int, default=5, help="timed rounds (median and spread)")
    rt.add_argument("--warmup", type=int, default=1, help="untimed rounds first (the first measures memory)")
    rt.add_argument("--new-tokens", type=int, default=16, help="generated per sample (EOS ignored)")
    rt.add_argument("--question-tokens", type=int, default=60, help="question length (LLaVA-1.5: ~646-token prompt)")
    rt.add_argument("--chunks", default="16,1", help="VLM-Pruner chunk sizes to compare ('' to skip)")
    rt.add_argument("--selection-repeats", type=int, default=7)
    rt.add_argument("--target-keep", type=int, default=64, help="keep the targets are checked at")
    rt.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on CUDA, float32 on CPU")
    rt.add_argument("--device", help="default: cuda when available, else cpu")
    rt.add_argument("--seed", type=int, default=0)
    rt.add_argument("--out", help="write runtime.json and runtime.md here (folder or URI, e.g. s3://...)")
    rt.add_argument("--quiet", action="store_true", help="no progress lines on stderr")

    sel = sub.add_parser("selection", help="time token selection alone, per method and budget")
    sel.add_argument("--n", type=int, default=576, help="image tokens (a square grid)")
    sel.add_argument("--dim", type=int, default=4096, help="key and hidden width")
    sel.add_argument("--keeps", default="192,128,64")
    sel.add_argument("--repeats", type=int, default=7)
    sel.add_argument("--json", help="also write the rows here")

    res = sub.add_parser("resume", help="driver memory and seconds of resume + summary at N finished rows (no model)")
    res.add_argument("--rows", type=int, default=10_000_000)
    res.add_argument("--rows-per-file", type=int, default=65_536)
    res.add_argument("--output", help="folder for the synthetic output (default: a new temporary folder)")
    pipe = sub.add_parser("pipeline", help="the caption job's rows/s vs a plain PrunedVLM.generate loop (demo data)")
    pipe.add_argument("--rows", type=int, default=400)
    pipe.add_argument("--batch-size", type=int, default=8)
    pipe.add_argument("--max-new-tokens", type=int, default=32)
    pipe.add_argument("--output", default="out/bench-pipeline")
    pipe.add_argument("--threads-per-actor", type=int, help="default: the job's (the node's CPUs)")
    return p


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, "runtime")  # the flags are the main mode
    args = parser().parse_args(argv)
    if args.what == "selection":
        print_selection(args)
    elif args.what == "resume":
        bench_resume(args)
    elif args.what == "pipeline":
        bench_pipeline(args)
    else:
        if args.layers is not None and not args.shape:
            raise SystemExit("--layers needs --shape")
        if args.warmup < 1 or args.repeats < 1:
            raise SystemExit("--warmup and --repeats must be >= 1 (the warm-up measures memory)")
        run_runtime(args)


if __name__ == "__main__":
    main()
