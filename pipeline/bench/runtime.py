"""The runtime benchmark behind `jobs/benchmark.py`: what pruning saves in the real runtime.

For each method x keep against unpruned, at each batch size: prefill and end-to-end seconds
per sample and the speedup, next to the speedup the FLOPs predict (`pruner.flops`); the
selection's own time as a fraction of the pruned prefill; peak memory and KV-cache bytes;
and VLM-Pruner's selection at chunk 16 vs chunk 1 on the model's real layer K-1 signals.
Settings are measured in interleaved rounds (warm-up rounds, then `repeats` rounds) so that
load from other processes falls on all of them alike; every figure is the median over
rounds, spread = max - min. `bench_selection` times each method's selection alone on random
inputs. The tools (meters, random weights, workload) are in `pipeline.bench.profiling`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from pruner.flops import LLMShape, full_layers, sample_flops
from pruner.methods import METHODS, Signals
from . import roofline
from .profiling import (PeakMemory, PrefillMeter, RandomTower, copy_bandwidth, decode_weight_bytes, kv_bytes,
                        layer_weight_bytes, matmul_rate, sync, time_runs, vision_weight_bytes, workload)
from pruner.runtime import Decoder, State, collate, prefill
from pruner.vlm import PrunedVLM

# ---------------------------------------------------------------------- selection alone


def bench_selection(n: int, dim: int, keeps: list[int], repeats: int, text: int = 60, *,
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    backends: tuple[str, ...] = ("auto",)) -> list[dict]:
    """Each method's `run` alone on one random sample shaped like layer K-1's signals, ms per
    call (median of `repeats` after a warm-up); VLM-Pruner once a backend ("auto": unlabelled)."""
    side = _side(n)
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    signals = Signals(
        grid=(side, side),
        keys=torch.randn(n, dim, generator=g), hidden=torch.randn(n, dim, generator=g),
        hidden_normed=torch.randn(n, dim, generator=g), attn_last=torch.rand(n, generator=g).softmax(0),
        text_keys=torch.randn(text, dim, generator=g), text_hidden_normed=torch.randn(text, dim, generator=g),
        features=torch.randn(n, dim, generator=g),
    )
    signals = Signals(grid=signals.grid, **{f.name: getattr(signals, f.name).to(device, dtype)
                                            for f in dataclasses.fields(signals) if f.name != "grid"})
    on = [{} if b == "auto" else {"backend": b} for b in backends]
    settings = [(name, params) for name, m in METHODS.items() if m.run is not None
                for params in (on if name == "vlm-pruner" else [{}])]
    settings += [("vlm-pruner", {"chunk": 1, **params}) for params in on]
    rows = []
    for name, params in settings:
        for keep in keeps:
            def call():
                out = METHODS[name].run(signals, keep, **params)
                sync(device)
                return out
            assert len(call().indices) == keep, (name, params, keep)
            median, spread = time_runs(call, repeats)
            label = Setting(name, keep, tuple(params.items())).label
            rows.append({"method": label, "keep": keep, "ms": median * 1e3, "spread_ms": spread * 1e3})
    return rows


def bench_selection_batches(n: int, dim: int, keeps: list[int], batches: list[int], repeats: int, *,
                            device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                            backends: tuple[str, ...] = ("auto",)) -> list[dict]:
    """VLM-Pruner's `select_batch` alone on random [B, N, dim] keys and hidden states: ms per
    batch for each backend x batch x keep, in interleaved rounds (one untimed round first).
    Before timing, each backend's tokens are compared with the torch backend's on the same
    inputs ("same": samples with identical indices)."""
    from pruner.methods import vlm_pruner

    side = _side(n)
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    inputs = {b: (torch.randn(b, n, dim, generator=g).to(device, dtype), torch.randn(b, n, dim, generator=g).to(device, dtype))
              for b in batches}
    settings = [(backend, b, keep) for b in batches for keep in keeps for backend in backends]

    def call(backend: str, b: int, keep: int) -> list:
        out = vlm_pruner.select_batch(*inputs[b], (side, side), keep, backend=backend)
        sync(device)
        return out

    same = {}
    for backend, b, keep in settings:
        got, want = call(backend, b, keep), call("torch", b, keep)
        assert all(len(idx) == keep for idx, _ in got), (backend, b, keep)
        same[backend, b, keep] = sum(torch.equal(i, j) for (i, _), (j, _) in zip(got, want))
    runs: dict[tuple, list[float]] = {s: [] for s in settings}
    for round_ in range(1 + repeats):
        for s in settings:
            start = time.perf_counter()
            call(*s)
            if round_:
                runs[s].append(time.perf_counter() - start)
    auto = "auto: triton" if vlm_pruner._on_triton("auto", device) else "auto: torch"
    return [{"backend": auto if backend == "auto" else backend, "batch": b, "keep": keep,
             "ms": statistics.median(runs[backend, b, keep]) * 1e3,
             "spread_ms": _spread(runs[backend, b, keep]) * 1e3, "same": same[backend, b, keep]}
            for backend, b, keep in settings]


def selection_share(model, processor, images: Callable[[int], list], keep: int, batches: list[int], *,
                    backends: tuple[str, ...], repeats: int, warmup: int = 1, prune_layer: int = 2,
                    question_tokens: int = 60, log: Callable[[str], None] = lambda msg: None) -> list[dict]:
    """VLM-Pruner's selection inside the real prefill (the runtime's `select`: its signals and
    the method) at `keep`, a row per backend and batch: ms per batch, its share of the pruned
    prefill, and the pruned prefill against the unpruned one, all from `measure_batch`'s
    interleaved rounds (prefill only)."""
    settings = [Setting("none")] + [Setting("vlm-pruner", keep, (("backend", b),)) for b in backends]
    rows = []
    for batch in batches:
        runs = measure_batch(model, processor, settings, images(batch), prune_layer=prune_layer, repeats=repeats,
                             warmup=warmup, new_tokens=0, question_tokens=question_tokens, log=log)
        unpruned = statistics.median(runs[settings[0]].prefill)
        for s in settings[1:]:
            r = runs[s]
            assert r.image_tokens_kept == keep < r.image_tokens, (s, r.image_tokens, r.image_tokens_kept)
            prefill_s = statistics.median(r.prefill)
            rows.append({
                "backend": dict(s.params)["backend"], "batch": batch, "keep": keep, "image_tokens": r.image_tokens,
                "selection_ms": statistics.median(r.selection) * 1e3, "selection_spread_ms": _spread(r.selection) * 1e3,
                "share": statistics.median([a / b for a, b in zip(r.selection, r.prefill)]),
                "prefill_ms": prefill_s * 1e3, "prefill_spread_ms": _spread(r.prefill) * 1e3,
                "unpruned_prefill_ms": unpruned * 1e3, "prefill_speedup": unpruned / prefill_s,
            })
    return rows


def selection_markdown(rows: list[dict], n: int, dim: int, repeats: int, device: str = "CPU",
                       batch_rows: list[dict] = (), share_rows: list[dict] = (), model: str = "") -> str:
    """`bench_selection`'s rows as a Markdown table, method x keep; then, where given,
    `bench_selection_batches`' and `selection_share`'s."""
    keeps = list(dict.fromkeys(r["keep"] for r in rows))
    where = f"CPU threads={torch.get_num_threads()} (cores={os.cpu_count()})" if device == "CPU" else device
    lines = [f"Selection time, N={n}, D={dim}, {where}, median of {repeats} after a warm-up", "",
             "| method | " + " | ".join(f"keep {k} (ms)" for k in keeps) + " |",
             "|---|" + "---|" * len(keeps)]
    for label in dict.fromkeys(r["method"] for r in rows):
        cells = [f"{r['ms']:.2f} ± {r['spread_ms'] / 2:.2f}" for r in rows if r["method"] == label]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if batch_rows:
        lines += ["", f"VLM-Pruner's `select_batch` alone, ms per batch, random [B, {n}, {dim}] inputs, median ± half "
                      f"the spread of {repeats} interleaved rounds; same = samples whose tokens equal the torch "
                      "backend's", "",
                  "| backend | batch | keep | ms per batch | same |", "|---|---|---|---|---|"]
        lines += [f"| {r['backend']} | {r['batch']} | {r['keep']} | {r['ms']:.2f} ± {r['spread_ms'] / 2:.2f} "
                  f"| {r['same']}/{r['batch']} |" for r in batch_rows]
    if share_rows:
        lines += ["", f"VLM-Pruner inside the prefill ({model}): the runtime's selection (its signals and the "
                      "method) per batch and its share of the pruned prefill; pruned prefill against unpruned; "
                      "median ± half the spread of interleaved rounds", "",
                  "| backend | batch | keep | selection ms | % of pruned prefill | pruned prefill ms "
                  "| unpruned prefill ms | prefill speedup |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['backend']} | {r['batch']} | {r['keep']} of {r['image_tokens']} "
                  f"| {r['selection_ms']:.2f} ± {r['selection_spread_ms'] / 2:.2f} | {100 * r['share']:.1f} % "
                  f"| {r['prefill_ms']:.1f} ± {r['prefill_spread_ms'] / 2:.1f} | {r['unpruned_prefill_ms']:.1f} "
                  f"| {r['prefill_speedup']:.2f}x |" for r in share_rows]
    return "\n".join(lines)


def _side(n: int) -> int:
    side = int(n**0.5)
    if side * side != n:
        raise SystemExit(f"--n must be a square number of tokens (a grid), got {n}")
    return side


def _spread(xs: list[float]) -> float:
    return max(xs) - min(xs)


# ---------------------------------------------------------------------- runtime: measuring


@dataclass(frozen=True)
class Setting:
    """One row: a method (with parameters) at a budget, `keep` tokens or a pruning `rate`;
    method "none" is the baseline; `compiled`: decode steps through `torch.compile` (the
    runtime's compiled `Decoder`), measured beside the same setting eager."""

    method: str
    keep: int | None = None
    params: tuple = ()
    rate: float | None = None
    compiled: bool = False

    @property
    def label(self) -> str:
        return self.method + "".join(f" {k}={v}" for k, v in self.params) + (" compiled" if self.compiled else "")


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
    decode: list[float] = field(default_factory=list)  # seconds a decode step
    end_to_end: list[float] = field(default_factory=list)
    warm_up: float = 0.0  # a compiled setting's `PrunedVLM.warm_up`: compiling, where it came first
    segments: list[list[tuple]] = field(default_factory=list)  # per round: PrefillMeter.segments
    peak_prefill: int = 0
    peak_generate: int = 0
    kv_bytes: int = 0
    prompt_tokens: int = 0
    prompt_tokens_kept: int = 0
    image_tokens: int = 0  # prunable visual tokens of sample 0
    image_tokens_kept: int = 0


def measure_batch(model, processor, settings: list[Setting], images: list, *, prune_layer: int, repeats: int,
                  warmup: int, new_tokens: int, question_tokens: int, log: Callable[[str], None],
                  capture: dict | None = None) -> dict[Setting, Runs]:
    """Interleaved rounds over the settings at one batch size, one sample per image. The
    first `warmup` (>= 1) rounds are not timed; the first of them measures peak memory and
    the KV cache instead, so that no timed run carries a memory meter. When `capture` is a
    dict, the first VLM-Pruner warm-up stores sample 0's real Signals under "signals".
    `new_tokens` 0: prefill only (no decode or end-to-end runs). Compiled settings share one
    compiled decoder and are warmed up (`PrunedVLM.warm_up`, timed) before the rounds."""
    vlms = {}
    device = next(model.parameters()).device
    compiled = Decoder(compiled=True, device=device)  # one compilation per segment structure
    for s in settings:
        budget = {} if s.method == "none" else {"keep": s.keep} if s.rate is None else {"rate": s.rate}
        vlm = PrunedVLM(model, processor, method=s.method, prune_layer=prune_layer, compile=s.compiled, **budget,
                        **dict(s.params))
        if s.compiled:
            vlm.decoder = compiled
        vlm.eos = {-1}  # never stop early: every sample generates exactly new_tokens
        vlms[s] = vlm
    any_vlm = next(iter(vlms.values()))
    samples = workload(any_vlm, images, question_tokens)
    batch = len(samples)
    with torch.inference_mode():
        collated = collate(any_vlm.adapter, samples, device)
    runs = {s: Runs() for s in settings}
    for s, vlm in vlms.items():
        if s.compiled and new_tokens > 0:
            runs[s].warm_up = vlm.warm_up(batch, new_tokens)
            log(f"batch {batch} {s.label} {budget_label(s.keep, s.rate)}: warm-up {runs[s].warm_up:.1f} s")

    for round_ in range(warmup + repeats):
        timed = round_ >= warmup
        for s, vlm in vlms.items():
            r = runs[s]
            plan = vlm.plan
            if not timed and capture is not None and "signals" not in capture and s.method == "vlm-pruner":
                plan = dataclasses.replace(plan, method=dataclasses.replace(
                    plan.method, run=_recording(plan.method.run, capture), run_batch=None))  # one sample a call
            # prefill alone: the batch is collated (vision tower run) outside the timed region
            mem = PeakMemory(device) if round_ == 0 else nullcontext()
            meter = PrefillMeter(device)
            with torch.inference_mode(), mem:
                sync(device)
                start = time.perf_counter()
                logits, state = prefill(vlm.adapter, plan, collated, room=max(new_tokens - 1, 0), observer=meter,
                                        decoder=vlm.decoder)
                sync(device)
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
                r.image_tokens = state.image_tokens[0]
                r.image_tokens_kept = len(state.selections[0].indices)
            if timed and new_tokens > 1:
                r.decode.append(decode_seconds(vlm, state, logits, new_tokens - 1))
            del state, logits
            if new_tokens == 0:
                log(f"batch {batch} {'round ' + str(round_ - warmup + 1) if timed else 'warm-up'} {s.label} "
                    f"{budget_label(s.keep, s.rate)}: prefill {seconds:.2f} s")
                continue
            # end to end: collate (vision tower) + prefill + new_tokens - 1 decode steps
            mem = PeakMemory(device) if round_ == 0 else nullcontext()
            with mem:
                sync(device)
                start = time.perf_counter()
                out = vlm.generate_prepared(samples, new_tokens)
                sync(device)
                seconds = time.perf_counter() - start
            assert all(o.generated_tokens == new_tokens for o in out)
            if timed:
                r.end_to_end.append(seconds)
            elif round_ == 0:
                r.peak_generate = mem.peak
            log(f"batch {batch} {'round ' + str(round_ - warmup + 1) if timed else 'warm-up'} {s.label} "
                f"{budget_label(s.keep, s.rate)}: prefill {r.prefill[-1] if timed else float('nan'):.2f} s, "
                f"decode {1e3 * r.decode[-1] if timed and r.decode else float('nan'):.1f} ms/step, "
                f"end-to-end {seconds:.2f} s")
    return runs


def decode_seconds(vlm: PrunedVLM, state: State, logits: torch.Tensor, steps: int) -> float:
    """Seconds a decode step, over `steps` greedy steps from a prefill's state and logits
    (as `generate_tokens` runs them, without its EOS checks)."""
    device = logits.device
    b = logits.shape[0]
    with torch.inference_mode():  # inference tensors, as in `generate_tokens`: others would recompile the step
        tokens = torch.zeros(state.cache.rows, dtype=torch.long, device=device)  # [R]
        positions = torch.arange(steps, device=device)
        vlm.decoder.ready(state, tokens)
        sync(device)
        start = time.perf_counter()
        for n in range(steps):
            tokens[:b] = logits[:b].argmax(dim=-1)
            logits = vlm.decoder(vlm.adapter, state, tokens, positions[n])
        sync(device)
    return (time.perf_counter() - start) / steps


def _recording(run: Callable, capture: dict) -> Callable:
    def recording(signals, keep, **params):
        capture.setdefault("signals", signals)
        return run(signals, keep, **params)
    return recording


def budget_label(keep: int | None, rate: float | None) -> str:
    return f"rate {rate:g}" if rate is not None else f"keep {keep}" if keep is not None else "unpruned"


def _stats(xs: list[float]) -> tuple[float, float]:
    return (statistics.median(xs), max(xs) - min(xs)) if xs else (float("nan"), float("nan"))


def summarize(model, runs_by_batch: dict[int, dict[Setting, Runs]], *, prune_layer: int, new_tokens: int,
              sample_vision: dict | int, roof: roofline.Roof | None = None) -> list[dict]:
    """One row per (batch, setting): medians per sample, speedups (against unpruned decoded
    the same way, eager or compiled), FLOPs predictions, memory, decode ms a step and, given
    the device's measured limits `roof`, the decode floor (the bytes a step must read: the
    decoder layers' and LM head's weights, the batch's KV cache, over the bandwidth) and the
    roofline prediction per phase (`pipeline.bench.roofline`) with the speedup it predicts."""
    text = model.config.text_config
    llm = LLMShape.of(text)
    itemsize = next(model.parameters()).element_size()
    weights = decode_weight_bytes(model)
    layer = layer_weight_bytes(model)
    phase_weights = roofline.Weights(vision=vision_weight_bytes(model), layer=layer, head=weights - llm.layers * layer)
    rows = []
    for batch, runs in runs_by_batch.items():
        for s, r in runs.items():
            base = runs[Setting("none", compiled=s.compiled)]
            base_prefill, _ = _stats(base.prefill)
            base_e2e, _ = _stats(base.end_to_end)
            eager = runs.get(dataclasses.replace(s, compiled=False))
            stage = METHODS[s.method].stage
            n, kept = r.prompt_tokens, r.prompt_tokens_kept
            full = full_layers(stage, prune_layer, llm.layers, pruned=kept < n)
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
            formula = llm.kv_bytes(full, n, kept, itemsize)
            formula_none = llm.kv_bytes(llm.layers, n, n, itemsize)
            decode, decode_spread = _stats(r.decode)
            floor = (weights + batch * r.kv_bytes) / roof.bandwidth if roof else None
            roofs = {}  # phase -> (least seconds a batch, bound), this setting's and unpruned's
            if roof:
                for key, (k, f) in (("this", (kept, full)), ("none", (n, llm.layers))):
                    work = roofline.phases(llm, phase_weights, batch=batch, n=n, kept=k, full=f,
                                           steps=max(new_tokens - 1, 0), itemsize=itemsize,
                                           vision_flops=flops.flops_vision)
                    roofs[key] = roofline.predict(roof, work)
            predicted_roofline = _roofline_speedups(roofs)
            rows.append({
                "method": s.label, "keep": s.keep, "rate": s.rate, "batch": batch, "compiled": s.compiled,
                "prompt_tokens": n, "prompt_tokens_kept": kept, "image_tokens": r.image_tokens,
                "image_tokens_kept": r.image_tokens_kept,
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
                "decode_ms": decode * 1e3, "decode_spread_ms": decode_spread * 1e3,
                "decode_floor_ms": None if floor is None else floor * 1e3,
                "decode_vs_floor": None if floor is None else decode / floor,
                "decode_speedup_compiled": _stats(eager.decode)[0] / decode if s.compiled and eager else None,
                "e2e_speedup_compiled": _stats(eager.end_to_end)[0] / e2e if s.compiled and eager else None,
                "warm_up_s": r.warm_up,
                "roofline_ms": {p: 1e3 * t / batch for p, (t, _) in roofs["this"].items()} if roofs else None,
                "roofline_bound": {p: bound for p, (_, bound) in roofs["this"].items()} if roofs else None,
                "prefill_speedup_roofline": predicted_roofline["prefill"],
                "prefill_vs_roofline": _ratio(prefill_speedup, predicted_roofline["prefill"]),
                "e2e_speedup_roofline": predicted_roofline["e2e"],
                "e2e_vs_roofline": _ratio(e2e_speedup, predicted_roofline["e2e"]),
                "prefill_runs_s": r.prefill, "selection_runs_s": r.selection, "decode_runs_s": r.decode,
                "e2e_runs_s": r.end_to_end,
            })
    return rows


def _roofline_speedups(roofs: dict) -> dict[str, float | None]:
    """Unpruned's least time over this setting's, for the prefill phases and for all."""
    if not roofs:
        return {"prefill": None, "e2e": None}
    return {"prefill": roofline.total(roofs["none"], roofline.PREFILL) / roofline.total(roofs["this"], roofline.PREFILL),
            "e2e": roofline.total(roofs["none"]) / roofline.total(roofs["this"])}


def _ratio(a: float, b: float | None) -> float | None:
    return None if b is None else a / b


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
            median, spread = time_runs(lambda: METHODS["vlm-pruner"].run(signals, keep, chunk=chunk), repeats)
            rows.append({"keep": keep, "chunk": chunk, "ms": median * 1e3, "spread_ms": spread * 1e3})
    return rows


# ---------------------------------------------------------------------- the whole run


def run(model, processor, name: str, images: Callable[[int], list], *, settings: list[Setting],
        batches: list[int], prune_layer: int, repeats: int, warmup: int, new_tokens: int, question_tokens: int,
        chunks: list[int], selection_repeats: int, target_keep: int | None, log: Callable[[str], None],
        save: Callable[[dict, str], None] | None = None, started: float | None = None,
        target_rate: float | None = None) -> tuple[dict, str]:
    """Measure `settings` (the first must be Setting("none")) at each batch size on
    `images(batch)` (images or videos), and VLM-Pruner's chunk sizes `chunks` (none:
    skipped). The targets are checked at `target_rate` when given, else at `target_keep`.
    A model whose vision tower is a `RandomTower` is reported so, its FLOPs without the
    tower. After every batch size, `save(report, markdown)` (so that a killed run keeps what
    it measured). `started`: when the clock of meta["seconds"] started (default: now).
    Returns (report, markdown)."""
    started = time.perf_counter() if started is None else started
    device = next(model.parameters()).device
    probe = PrunedVLM(model, processor, compile=False)
    sample = workload(probe, images(1), question_tokens)[0]
    tower = not isinstance(getattr(model.model, "vision_tower", None), RandomTower)
    meta = {
        "model": name, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "threads": torch.get_num_threads(), "cores": os.cpu_count(), "prompt_tokens": len(sample.input_ids),
        "image_tokens": int(torch.isin(sample.input_ids, torch.tensor(probe.adapter.visual_token_ids)).sum()),
        "prunable_tokens": len(probe.adapter.layout(sample.input_ids, sample.vision).positions),
        "frames": next((int(v.shape[1]) for k, v in sample.vision.items() if k == "pixel_values_videos"), 0),
        "vision_tower": tower,
        "new_tokens": new_tokens, "prune_layer": prune_layer, "repeats": repeats,
        "warmup": warmup, "weights_bytes": sum(p.nbytes for p in model.parameters()),
        "decode_weights_bytes": decode_weight_bytes(model),
        # the device's limits, measured once a run: the decode floor and the roofline
        "bandwidth": copy_bandwidth(device, 1 << 30 if device.type == "cuda" else 1 << 28),  # bytes/s
        "matmul_rate": matmul_rate(device, next(model.parameters()).dtype),  # FLOP/s
        "memory": PeakMemory.method(device), "command": " ".join(sys.argv),
    }
    keeps = list(dict.fromkeys(s.keep for s in settings if s.keep is not None))
    rates = list(dict.fromkeys(s.rate for s in settings if s.rate is not None))
    capture: dict = {}
    chunk_rows: list[dict] = []
    runs_by_batch = {}
    for b in batches:
        runs_by_batch[b] = measure_batch(
            model, processor, settings, images(b), prune_layer=prune_layer, repeats=repeats, warmup=warmup,
            new_tokens=new_tokens, question_tokens=question_tokens, log=log, capture=capture if chunks else None)
        if chunks and "signals" in capture and not chunk_rows:
            n = len(capture["signals"].keys)
            budgets = keeps + [max(1, round(n * (1 - r))) for r in rates]  # as PrunedVLM.keep_for
            chunk_rows = chunk_comparison(capture["signals"], list(dict.fromkeys(budgets)), chunks,
                                          selection_repeats)
        rows = summarize(model, runs_by_batch, prune_layer=prune_layer, new_tokens=new_tokens,
                         sample_vision=sample.vision if tower else 0,
                         roof=roofline.Roof(meta["matmul_rate"], meta["bandwidth"]))
        goals = targets(rows, target_keep, rate=target_rate)
        meta["seconds"] = time.perf_counter() - started
        text = markdown(meta, rows, chunk_rows, goals)
        report = {"meta": meta, "rows": rows, "chunks": chunk_rows, "targets": goals}
        if save is not None:
            save(report, text)
    return report, text


# ---------------------------------------------------------------------- report


def targets(rows: list[dict], keep: int | None, method: str = "vlm-pruner", rate: float | None = None) -> list[dict]:
    """The runtime's targets (prefill speedup against the FLOPs prediction, selection share,
    KV cache, batching gain, end to end against the roofline: compiled where measured) at
    `keep` (or `rate`), where the rows hold what they need."""
    def row(batch: int, label: str = method) -> dict | None:
        return next((r for r in rows if r["batch"] == batch and r["method"] == label and
                     ((r["keep"], r["rate"]) == (keep if rate is None else None, rate) or label == "none")), None)

    budget = budget_label(keep, rate)

    out = []
    b1, batches = row(1), sorted({r["batch"] for r in rows})
    if b1:
        out.append({"target": f"{method} {budget}, batch 1: measured prefill speedup >= 0.8 x FLOPs-predicted",
                    "value": b1["prefill_vs_flops"], "limit": 0.8, "met": b1["prefill_vs_flops"] >= 0.8})
    for b in batches:
        r = row(b)
        if r:
            out.append({"target": f"{method} {budget}, batch {b}: selection <= 5 % of the pruned prefill",
                        "value": r["selection_frac"], "limit": 0.05, "met": r["selection_frac"] <= 0.05})
    big = max(batches)
    if b1 and big > 1 and row(big):
        for phase in ("e2e", "prefill") if b1["e2e_runs_s"] else ("prefill",):
            ratio = b1[f"{phase}_s"] / row(big)[f"{phase}_s"]
            name = "end-to-end" if phase == "e2e" else "prefill"
            out.append({"target": f"{method} {budget}: batch {big} {name} throughput >= 1.3 x batch 1",
                        "value": ratio, "limit": 1.3, "met": ratio >= 1.3})
    for b in batches:
        r = row(b, f"{method} compiled") or row(b)
        if r and r["e2e_runs_s"] and r["e2e_vs_roofline"] is not None:
            out.append({"target": f"{r['method']} {budget}, batch {b}: measured end-to-end speedup >= 0.8 x "
                                  "roofline-predicted", "value": r["e2e_vs_roofline"], "limit": 0.8,
                        "met": r["e2e_vs_roofline"] >= 0.8})
    if b1:
        err = b1["kv_ratio"] / b1["kv_ratio_formula"] - 1
        out.append({"target": f"{method} {budget}: KV cache / unpruned within 5 % of (K*n + (T-K)*n_kept) / (T*n)",
                    "value": err, "limit": 0.05, "met": abs(err) <= 0.05,
                    "detail": f"measured {b1['kv_ratio']:.4f}, formula {b1['kv_ratio_formula']:.4f}"})
    return out


def _budget_cell(r: dict) -> str:
    """The keep column: the keep, or the tokens a rate kept (sample 0) and the rate."""
    if r["rate"] is not None:
        return f"{r['image_tokens_kept']} (rate {r['rate']:g})"
    return str(r["keep"] or "-")


def roofline_markdown(meta: dict, rows: list[dict]) -> str:
    """The roofline table: each phase's least time and its bound, and the end-to-end and
    prefill speedups measured, FLOPs-predicted and roofline-predicted; then one line naming
    the settings whose gain the roofline caps well below the FLOPs'."""
    names = {"vision": "vision", "prefill_full": "prefill < K", "prefill_kept": "prefill >= K", "decode": "decode"}
    lines = [
        f"Roofline: each phase's least time, the larger of its FLOPs over the measured matmul rate "
        f"({meta['matmul_rate'] / 1e12:.2f} TFLOP/s) and its bytes (weights read, KV cache written or read) over the "
        f"measured bandwidth ({meta['bandwidth'] / 1e9:.0f} GB/s), ms per sample, B = bound by bytes, F = by FLOPs; "
        "decode is bound step by step (`pipeline.bench.roofline`). Speedups against unpruned at the same batch size: "
        "measured, FLOPs-predicted, roofline-predicted (the phases' least times summed) and measured / roofline.",
        "",
        "| method | keep | batch | " + " | ".join(f"{names[p]} ms" for p in roofline.PHASES)
        + " | end-to-end speedup | FLOPs | roofline | meas./roofline | prefill speedup | roofline | meas./roofline |",
        "|---|---|---|" + "---|" * (len(roofline.PHASES) + 7),
    ]

    def cell(x: float | None, suffix: str = "") -> str:
        return "-" if x is None or x != x else f"{x:.2f}{suffix}"  # None or NaN (prefill only)

    for r in rows:
        phases = [f"{r['roofline_ms'][p]:.3g} ({r['roofline_bound'][p][0].upper()})" if r["roofline_ms"].get(p)
                  else "-" for p in roofline.PHASES]
        lines.append("| " + " | ".join([
            r["method"], _budget_cell(r), str(r["batch"]), *phases,
            cell(r["e2e_speedup"], "x"), cell(r["e2e_speedup_flops"] if r["e2e_runs_s"] else None, "x"),
            cell(r["e2e_speedup_roofline"] if r["e2e_runs_s"] else None, "x"), cell(r["e2e_vs_roofline"]),
            cell(r["prefill_speedup"], "x"), cell(r["prefill_speedup_roofline"], "x"), cell(r["prefill_vs_roofline"]),
        ]) + " |")
    capped = roofline_caps(rows, meta["new_tokens"])
    return "\n".join(lines + (["", capped] if capped else []))


def roofline_caps(rows: list[dict], new_tokens: int) -> str | None:
    """One line naming the pruned settings whose end-to-end gain the roofline caps below
    0.8 of the FLOPs' (decode reads every weight each step, so at small batches pruning saves
    only the KV cache's share of its bytes), or None."""
    capped = [r for r in rows if r["e2e_runs_s"] and r["e2e_speedup_roofline"]
              and r["e2e_speedup_roofline"] < 0.8 * r["e2e_speedup_flops"]]
    if not capped:
        return None
    where = "; ".join(f"{r['method']} {_budget_cell(r)} at batch {r['batch']}: {r['e2e_speedup_roofline']:.2f}x "
                      f"(FLOPs: {r['e2e_speedup_flops']:.2f}x)" for r in capped)
    return (f"The roofline caps the end-to-end gain with {new_tokens} new tokens, well below the FLOPs' "
            f"prediction (bytes-bound phases, chiefly decode reading every weight each step, hardly shrink with "
            f"the prompt): {where}.")


def decode_markdown(meta: dict, rows: list[dict]) -> str:
    """The decode table: ms a step, eager and compiled, against the floor where measured."""
    gbps = f"{meta['bandwidth'] / 1e9:.0f} GB/s" if meta.get("bandwidth") else None
    floor = (f" Floor = the bytes a step must read (decoder layers, norm and LM head: "
             f"{meta['decode_weights_bytes'] / 2**30:.2f} GiB; the batch's KV cache) over the measured copy "
             f"bandwidth ({gbps})." if gbps else " No floor: no copy bandwidth was measured.")
    lines = [
        f"Decode, ms a step (a batch of {meta['new_tokens'] - 1} greedy steps after prefill, median ± half spread). "
        "Compiled = `torch.compile` of the static-cache step (CUDA: also CUDA graphs); x eager = its speedup over "
        "the same setting eager, for the step and end to end; warm-up s = `PrunedVLM.warm_up` before the rounds, "
        f"which compiles where it comes first.{floor}",
        "",
        "| method | keep | batch | decode ms/step | floor ms | / floor | x eager (step) | x eager (end to end) "
        "| warm-up s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    for r in rows:
        if r["decode_runs_s"]:
            compiled = [cell(r["decode_speedup_compiled"]), cell(r["e2e_speedup_compiled"]),
                        f"{r['warm_up_s']:.1f}"] if r["compiled"] else ["-"] * 3
            cells = [r["method"], _budget_cell(r), str(r["batch"]),
                     f"{r['decode_ms']:.2f} ± {r['decode_spread_ms'] / 2:.2f}", cell(r["decode_floor_ms"]),
                     cell(r["decode_vs_floor"]), *compiled]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(meta: dict, rows: list[dict], chunks: list[dict], goals: list[dict]) -> str:
    mb = 2**20
    video = f"a {meta['frames']}-frame video" if meta.get("frames") else "an image"
    tower = ("" if meta.get("vision_tower", True) else
             " The vision tower was replaced by random features of its output shape (`RandomTower`): "
             "end to end and its FLOPs leave the tower out; prefill is unaffected.")
    lines = [
        f"Model: {meta['model']}; {meta['dtype']} on {meta['device']}; torch threads {meta['threads']} "
        f"(cores {meta['cores']}). Prompt {meta['prompt_tokens']} tokens with {video}: {meta['image_tokens']} "
        f"visual placeholders, {meta['prunable_tokens']} prunable; "
        f"{meta['new_tokens']} new tokens{'' if meta['new_tokens'] else ' (prefill only)'}, "
        f"pruning after layer K-1 (K = {meta['prune_layer']}). "
        f"Median of {meta['repeats']} interleaved rounds after {meta['warmup']} warm-up round(s); "
        f"± = half the spread (max - min).{tower}",
        "",
        "Time, seconds per sample. Speedups against unpruned at the same batch size; FLOPs = the speedup "
        "`pruner.flops` predicts (measured-style, 2 per multiply-add); meas./FLOPs = how close to that limit. "
        "Prefill = the LLM on the collated batch; end to end = vision tower + prefill + decode.",
        "",
        "| method | keep | batch | prefill s | speedup | FLOPs | meas./FLOPs "
        "| end-to-end s | speedup | FLOPs | meas./FLOPs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {_budget_cell(r)} | {r['batch']} "
            f"| {r['prefill_s']:.3f} ± {r['prefill_spread_s'] / 2:.3f} "
            f"| {r['prefill_speedup']:.2f}x | {r['prefill_speedup_flops']:.2f}x | {r['prefill_vs_flops']:.2f} "
            + (f"| {r['e2e_s']:.3f} ± {r['e2e_spread_s'] / 2:.3f} | {r['e2e_speedup']:.2f}x "
               f"| {r['e2e_speedup_flops']:.2f}x | {r['e2e_vs_flops']:.2f} |"
               if r["e2e_runs_s"] else "| - | - | - | - |"))  # prefill only
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
            f"| {r['method']} | {_budget_cell(r)} | {r['batch']} "
            f"| {r['selection_ms']:.1f} | {100 * r['selection_frac']:.2f} % "
            f"| {rate} "
            f"| {r['peak_prefill_bytes'] / mb:.0f} | {r['peak_generate_bytes'] / mb:.0f} | {r['kv_bytes'] / mb:.1f} "
            f"| {r['kv_ratio']:.3f} | {r['kv_ratio_formula']:.3f} |")
    if any(r["roofline_ms"] for r in rows):
        lines += ["", roofline_markdown(meta, rows)]
    if any(r["decode_runs_s"] for r in rows):
        lines += ["", decode_markdown(meta, rows)]
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
