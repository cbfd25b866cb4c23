"""Batched generation with visual-token pruning: prefill, decode_step, generate_tokens.

Prefill runs layers < K on the full left-padded batch, asks the method which image tokens
each sample keeps, rebuilds the batch from the kept tokens (original order, original
position ids, merged hidden states where the method merges), re-pads it, and runs layers
>= K on that shorter batch. Each layer caches only what it saw, so the cache below K holds
the full prompt and the cache from K on the pruned one. Decoding is unchanged by pruning:
every layer attends over its own cache with its own padding mask.

`prefill` (and `generate_tokens`, which passes it on) takes an optional `observer`, a
timing hook in the spirit of gpt-fast's `callback`: see `Observer`.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .methods import Method, Selection, Signals
from .models import Adapter, Prepared
from .workarounds import register_attention


# ---------------------------------------------------------------------- attention


def _with_last_row(inner: Callable) -> Callable:
    """Wrap an attention function so that one call can also report the last query's
    attention row (FastV's signal) while attention itself stays SDPA: `pruner_last_row` is
    called with (module, query, key, mask, scaling) before attention runs."""

    def attention(module, query, key, value, attention_mask, *, pruner_last_row=None, **kwargs):
        if pruner_last_row is not None:
            pruner_last_row(module, query, key, attention_mask, kwargs["scaling"])
        return inner(module, query, key, value, attention_mask, **kwargs)

    return attention


def last_row_attention(module, query: Tensor, key: Tensor, mask: Tensor | None, scaling: float) -> Tensor:
    """softmax(q_last . K^T * scaling) over the causal row, averaged over heads: [B, S]."""
    q = query[:, :, -1:, :].float()  # [B, H, 1, hd]
    k = key.float().repeat_interleave(query.shape[1] // key.shape[1], dim=1)  # [B, H, S, hd]
    scores = q @ k.transpose(-1, -2) * scaling  # [B, H, 1, S]
    if mask is not None:
        scores = scores + mask[:, :, -1:, : k.shape[2]].float()
    return scores.softmax(-1).mean(dim=1)[:, 0]  # [B, S]


ATTENTION = register_attention(_with_last_row)  # {"sdpa": "pruner_sdpa", "eager": "pruner_eager"}


def causal_mask(pad: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive mask [B, 1, S, S]: causal, padding keys hidden; every token sees itself so
    padding rows stay finite."""
    s = pad.shape[1]
    eye = torch.eye(s, dtype=torch.bool, device=pad.device)
    allowed = torch.ones_like(eye).tril() & pad[:, None, :] | eye  # [B, S, S]
    return _additive(allowed[:, None], dtype)


def decode_mask(pad: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive mask [B, 1, 1, S] for one new token over a cache with padding `pad` [B, S]."""
    return _additive(pad[:, None, None, :], dtype)


def _additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)


# ---------------------------------------------------------------------- cache


def bucket(n: int) -> int:
    """n rounded up to one of 16 sizes per power of two (at least 16 apart): a job's prompts
    fall into a few capacities, each at most 1/16 larger than needed."""
    step = max(16, 1 << max(n.bit_length() - 5, 0))
    return -(-n // step) * step


def batch_bucket(b: int) -> int:
    """Rows a batch of b runs as when shapes are bucketed: the next power of two."""
    return 1 << (b - 1).bit_length()


class KVCache:
    """Keys and values per layer, allocated once per batch at a layer's first write (its
    prompt): `rows` x (prompt width + `room` decode steps, rounded by `capacity`). The layers
    of one segment share a prompt width, so they share a capacity. Implements the `update`
    call of transformers' attention modules: in prefill it writes the prompt at columns
    [0, L) and returns them; in a decode step (`pruner_cache_position` [1] given) it writes the new
    token's key and value at that column and returns the whole buffer, which the step
    attends to under its segment's mask. Nothing grows: a step has the same shapes every time."""

    def __init__(self, num_layers: int, room: int, rows: int, capacity: Callable[[int], int] = lambda n: n,
                 alloc: Callable[[int, tuple, Tensor], Tensor] | None = None):
        self.keys: list[Tensor | None] = [None] * num_layers  # [R, kv_heads, capacity, hd]
        self.values: list[Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers  # prompt width per layer
        self.room, self.rows, self.capacity = room, rows, capacity
        self.alloc = alloc or (lambda i, shape, like: like.new_zeros(shape))
        self.batch = 0  # real rows (the rest, up to `rows`, pad the batch to its bucket)

    def update(self, key: Tensor, value: Tensor, layer_idx: int, kwargs: dict | None = None) -> tuple[Tensor, Tensor]:
        i = layer_idx
        column = (kwargs or {}).get("pruner_cache_position")
        if column is not None:  # decode: one token, at a position given as a tensor
            self.keys[i].index_copy_(2, column, key)
            self.values[i].index_copy_(2, column, value)
            return self.keys[i], self.values[i]
        b, h, n, d = key.shape
        capacity = self.capacity(n + self.room)
        self.keys[i] = self.alloc(2 * i, (self.rows, h, capacity, d), key)
        self.values[i] = self.alloc(2 * i + 1, (self.rows, value.shape[1], capacity, value.shape[3]), value)
        self.keys[i][:b, :, :n] = key
        self.values[i][:b, :, :n] = value
        self.lengths[i], self.batch = n, b
        return key, value


# ---------------------------------------------------------------------- batch


@dataclass
class Batch:
    """A left-padded batch on the model's device."""

    input_ids: Tensor  # [B, L]
    pad: Tensor  # [B, L] bool, real tokens
    embeds: Tensor  # [B, L, D]
    positions: Tensor  # [P, B, L]
    visual: Tensor  # [B, L] bool, every visual placeholder (prunable or not, e.g. newlines)
    image_positions: list[Tensor]  # per sample [N_b], columns of prunable visual tokens
    grids: list
    frames: list[int]  # per sample, video frames (0 for an image)


def collate(adapter: Adapter, samples: list[Prepared], device: torch.device,
            normalize: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None) -> Batch:
    """The samples as one left-padded batch on `device`, visual features in place;
    `normalize` maps the vision inputs once there (`Preprocessor.normalize`: uint8 pixels)."""
    lengths = torch.tensor([len(s.input_ids) for s in samples])
    b, width = len(samples), int(lengths.max())
    offsets = width - lengths  # left padding per sample
    input_ids = torch.zeros(b, width, dtype=torch.long)
    pad = torch.arange(width)[None, :] >= offsets[:, None]  # [B, L]
    input_ids[pad] = torch.cat([s.input_ids for s in samples])
    input_ids, pad = input_ids.to(device), pad.to(device)

    vision = {k: v.to(device) for k, v in adapter.collate_vision(samples).items()}
    if normalize is not None:
        vision = normalize(vision)
    embeds = adapter.embed_tokens(input_ids)  # [B, L, D]
    features = adapter.features(vision)
    for token_id in adapter.visual_token_ids:  # each kind of placeholder gets its own features
        placeholders = (input_ids == token_id) & pad
        feats = features.get(token_id, embeds.new_empty(0, embeds.shape[-1]))  # [n, D]
        if int(placeholders.sum()) != feats.shape[0]:
            raise ValueError(f"the prompts hold {int(placeholders.sum())} placeholders of token {token_id} but "
                             f"the vision tower made {feats.shape[0]} features for them")
        embeds[placeholders] = feats.to(embeds.dtype)
    layouts = [adapter.layout(s.input_ids, s.vision) for s in samples]
    visual_ids = torch.tensor(adapter.visual_token_ids, device=device)
    return Batch(
        input_ids=input_ids, pad=pad, embeds=embeds,
        positions=adapter.positions(input_ids, pad, vision),
        visual=torch.isin(input_ids, visual_ids) & pad,
        image_positions=[lay.positions.to(device) + int(off) for lay, off in zip(layouts, offsets)],
        grids=[lay.grid for lay in layouts],
        frames=[lay.frames for lay in layouts],
    )


def compact(kept: Tensor, *xs: Tensor) -> tuple[Tensor, ...]:
    """Keep the marked tokens of each row in order, left-padded to the longest row.
    kept: [B, L] bool; each x: [B, L, ...]. Returns (pad [B, L'], *xs as [B, L', ...])."""
    counts = kept.sum(dim=1)  # [B]
    width = int(counts.max())
    dest = kept.long().cumsum(dim=1) - 1 + (width - counts)[:, None]  # [B, L] new column
    rows, cols = kept.nonzero(as_tuple=True)
    new_cols = dest[rows, cols]
    pad = torch.zeros(kept.shape[0], width, dtype=torch.bool, device=kept.device)
    pad[rows, new_cols] = True
    out = [pad]
    for x in xs:
        y = x.new_zeros((kept.shape[0], width, *x.shape[2:]))
        y[rows, new_cols] = x[rows, cols]
        out.append(y)
    return tuple(out)


# ---------------------------------------------------------------------- pruning


@dataclass(frozen=True)
class Plan:
    """What to prune: the method, each sample's budget as a function of its N, the layer
    K after whose predecessor in-LLM methods run, and the method's parameters."""

    method: Method
    keep_for: Callable[[int], int]
    prune_layer: int = 2
    params: dict = field(default_factory=dict)


def select(plan: Plan, batch: Batch, signals: dict[str, Callable[[int, Tensor], Tensor]]) -> list[Selection]:
    """One Selection a sample. Samples that share N, grid and budget go to the method's
    `run_batch` together where it has one, else one `run` a sample.
    signals[name](b, columns) -> that sample's tensor."""
    out: list[Selection | None] = [None] * len(batch.image_positions)
    groups: dict[tuple, list[int]] = {}
    for b, (cols, grid) in enumerate(zip(batch.image_positions, batch.grids)):
        n = len(cols)
        budget = plan.keep_for(n)
        if budget >= n:
            out[b] = Selection(torch.arange(n, device=cols.device))
        else:
            groups.setdefault((n, repr(grid), budget), []).append(b)
    missing = plan.method.needs - signals.keys()
    if groups and missing:
        raise ValueError(f"method {plan.method.name!r} needs {sorted(missing)}, not available "
                         f"at its stage ({plan.method.stage})")
    for (_, _, budget), members in groups.items():
        sigs = [Signals(grid=batch.grids[b], **{name: signals[name](b, batch.image_positions[b])
                                                 for name in plan.method.needs}) for b in members]
        if plan.method.run_batch is not None:
            picked = plan.method.run_batch(sigs, budget, **plan.params)
        else:
            picked = [plan.method.run(s, budget, **plan.params) for s in sigs]
        for b, sel in zip(members, picked):
            out[b] = sel
    return out


def apply(batch_pad: Tensor, hidden: Tensor, image_positions: list[Tensor],
          selections: list[Selection]) -> tuple[Tensor, Tensor]:
    """Mark dropped image tokens and write merged states: (kept [B, L], hidden [B, L, D])."""
    kept = batch_pad.clone()
    hidden = hidden.clone()
    for b, (cols, sel) in enumerate(zip(image_positions, selections)):
        kept[b, cols] = False
        kept_cols = cols[sel.indices]
        kept[b, kept_cols] = True
        if sel.merged is not None:
            hidden[b, kept_cols] = sel.merged.to(hidden.dtype)
    return kept, hidden


# ---------------------------------------------------------------------- prefill / decode


@dataclass
class Segment:
    """Consecutive layers that share one prompt (the full one below K, the kept one from K
    on) and so one cache capacity and one decode mask."""

    layers: range
    pad: Tensor  # [B, L] bool, the prompt's real tokens
    prompt: Tensor | None = None  # [R, C] bool: pad over the cache's R rows and C columns, for decode
    width: Tensor | None = None  # [1] long: L, the column decode step 0 writes


@dataclass
class State:
    cache: KVCache
    segments: list[Segment]
    next_position: Tensor  # [R] position of the first generated token (0 on padding rows)
    num_position_dims: int
    selections: list[Selection]
    image_tokens: list[int]
    prompt_tokens: list[int]
    prompt_tokens_kept: list[int]
    pruned_positions: Tensor | None = None  # [P, B, L'] positions entering layer K


Observer = Callable[..., AbstractContextManager]
"""A timing hook for `prefill`: `observer(segment, **info)` returns a context manager that
wraps one segment of the work, entered when it starts and left when it ends:

    observer("layers", layers=range, shape=(B, L))  decoder layers `layers` on h [B, L, D]: for
                                                   in-LLM methods 0..K-1 on the whole prompt, then
                                                   K.. on the kept one; otherwise one segment of
                                                   every layer (projector-stage: the kept prompt)
    observer("selection")                          the method's selection (its signals and its
                                                   `run`), and FastV's attention row inside layer
                                                   K-1 (so nested in that "layers" segment)

It sees no tensors; a meter synchronizes the device itself. None (the default) costs nothing."""


def _observe(observer: Observer | None, segment: str, **info) -> AbstractContextManager:
    return nullcontext() if observer is None else observer(segment, **info)


def run_layers(adapter: Adapter, layers: range, h: Tensor, mask: Tensor, rope: tuple[Tensor, Tensor],
               cache: KVCache, last_row: Callable | None = None, column: Tensor | None = None) -> Tensor:
    """h: [B, L, D] through `layers`; the last one's attention also calls `last_row` (see
    `_with_last_row`); `column` [1]: decoding, each layer's cache writes there."""
    for i in layers:
        extra = {"pruner_last_row": last_row} if last_row is not None and i == layers[-1] else {}
        if column is not None:
            extra["pruner_cache_position"] = column
        h = adapter.layers[i](h, attention_mask=mask, position_embeddings=rope, cache=cache, **extra)
    return h


def logits_last(adapter: Adapter, h: Tensor) -> Tensor:
    return adapter.lm_head(adapter.norm(h[:, -1]))  # [B, V]


def prefill(adapter: Adapter, plan: Plan, batch: Batch, room: int,
            observer: Observer | None = None, decoder: Decoder | None = None) -> tuple[Tensor, State]:
    """Run the prompt through the LLM, pruning as `plan` says, into a cache with `room`
    decode steps after each segment's prompt (shaped and allocated as `decoder` says: by
    default the batch's exact shapes). Returns last-token logits [B, V] and the decoding
    state. `observer` is told of each segment (see `Observer`)."""
    num_layers = len(adapter.layers)
    cache = (decoder or EAGER).cache(num_layers, room, batch.pad.shape[0])
    h, pad, positions = batch.embeds, batch.pad, batch.positions
    prompt_tokens = pad.sum(dim=1).tolist()
    next_position = positions.amax(dim=(0, 2)) + 1  # [B]; padding columns hold small ids
    stage = plan.method.stage
    selections = [Selection(torch.arange(len(c), device=c.device)) for c in batch.image_positions]
    segments: list[Segment] = []
    pruned_positions = None

    if stage == "projector":
        with _observe(observer, "selection"):
            selections = select(plan, batch, {"features": lambda b, cols: h[b, cols]})
        kept, h = apply(pad, h, batch.image_positions, selections)
        pad, h, kept_pos = compact(kept, h, positions.movedim(0, 2))
        positions = adapter.projector_positions(kept_pos.movedim(2, 0), pad)
        next_position = positions.amax(dim=(0, 2)) + 1
        pruned_positions = positions

    start = 0
    if stage == "layer":
        K = plan.prune_layer
        last_row: list[Tensor] = []  # [B, S], appended by layer K-1's attention

        def row(*args) -> None:
            with _observe(observer, "selection"):
                last_row.append(last_row_attention(*args))

        needs_row = "attn_last" in plan.method.needs
        with _observe(observer, "layers", layers=range(0, K), shape=tuple(h.shape[:2])):
            h = run_layers(adapter, range(0, K), h, causal_mask(pad, h.dtype), adapter.rope(h, positions), cache,
                           row if needs_row else None)
        segments.append(Segment(range(0, K), pad))
        with _observe(observer, "selection"):
            selections = select(plan, batch, _layer_signals(adapter, batch, h, cache.keys[K - 1], last_row))
        kept, h = apply(pad, h, batch.image_positions, selections)
        pad, h, kept_pos = compact(kept, h, positions.movedim(0, 2))
        positions = pruned_positions = kept_pos.movedim(2, 0)
        start = K

    with _observe(observer, "layers", layers=range(start, num_layers), shape=tuple(h.shape[:2])):
        if stage == "none":  # the whole prompt: enough work a launch that compiling buys nothing
            h = run_layers(adapter, range(start, num_layers), h, causal_mask(pad, h.dtype),
                           adapter.rope(h, positions), cache)
        else:  # the kept prompt, short enough that kernel launches can dominate
            h = (decoder or EAGER).kept_layers(adapter, range(start, num_layers), h, pad, positions, cache)
    segments.append(Segment(range(start, num_layers), pad))
    for seg in segments:  # what decode attends to in each segment's cache
        capacity = cache.keys[seg.layers[0]].shape[2]
        seg.prompt = torch.zeros(cache.rows, capacity, dtype=torch.bool, device=pad.device)
        seg.prompt[: seg.pad.shape[0], : seg.pad.shape[1]] = seg.pad
        seg.width = torch.tensor([seg.pad.shape[1]], device=pad.device)
    state = State(
        cache=cache, segments=segments, next_position=_rows(next_position, cache.rows),
        num_position_dims=positions.shape[0], selections=selections,
        image_tokens=[len(c) for c in batch.image_positions], prompt_tokens=prompt_tokens,
        prompt_tokens_kept=pad.sum(dim=1).tolist(), pruned_positions=pruned_positions,
    )
    return logits_last(adapter, h), state


def _rows(x: Tensor, rows: int) -> Tensor:
    """x [B, ...] padded with zero rows to [rows, ...]."""
    return torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])]) if rows > x.shape[0] else x


def _layer_signals(adapter: Adapter, batch: Batch, h: Tensor, keys: Tensor,
                   last_row: list[Tensor]) -> dict[str, Callable[[int, Tensor], Tensor]]:
    """Lazy per-sample signals after layer K-1; only the ones a method needs are computed.
    h: [B, L, D] layer K-1 output; keys: [>= B, kv_heads, >= L, hd] its cache (after rotary)."""
    text = batch.pad & ~batch.visual  # [B, L]; image and video placeholders are never text

    def key_rows(b: int, cols: Tensor) -> Tensor:
        return keys[b, :, cols].transpose(0, 1).flatten(1)  # [n, kv_heads * hd]

    def text_cols(b: int) -> Tensor:
        return text[b].nonzero().squeeze(1)

    return {
        "keys": key_rows,
        "hidden": lambda b, cols: h[b, cols],
        "hidden_normed": lambda b, cols: adapter.norm(h[b, cols]),
        "attn_last": lambda b, cols: last_row[0][b, cols],
        "text_keys": lambda b, cols: key_rows(b, text_cols(b)),
        "text_hidden_normed": lambda b, cols: adapter.norm(h[b, text_cols(b)]),
    }


class _Kept:
    """A cache that keeps each layer's keys and values as computed (the `update` call of
    transformers' attention modules), for `kept_prefill` to return them."""

    def __init__(self):
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []

    def update(self, key: Tensor, value: Tensor, layer_idx: int, kwargs: dict | None = None) -> tuple[Tensor, Tensor]:
        self.keys.append(key)
        self.values.append(value)
        return key, value


def kept_prefill(adapter: Adapter, layers: range, h: Tensor, pad: Tensor,
                 positions: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """The prefill of `layers` on h [R, W, D] (pad [R, W], positions [P, R, W]) as one
    function of tensors, for `Decoder` to compile: returns h and each layer's keys and
    values [R, kv_heads, W, hd], which the caller writes into its cache."""
    kept = _Kept()
    h = run_layers(adapter, layers, h, causal_mask(pad, h.dtype), adapter.rope(h, positions), kept)
    return h, kept.keys, kept.values


def decode_step(adapter: Adapter, state: State, tokens: Tensor, step: Tensor) -> Tensor:
    """One new token per row through every layer. tokens: [R], one per cache row; step: []
    long, the decode steps before this one. Each layer writes the token's key and value at
    column (its prompt width + step) and attends over its whole capacity under a mask: the
    prompt's real tokens and the tokens written since. The same shapes every step and no
    host work, so it compiles, and on CUDA replays as one graph. Returns logits [R, V]."""
    h = adapter.embed_tokens(tokens[:, None])  # [R, 1, D]
    pos = (state.next_position + step)[None, :, None].expand(state.num_position_dims, -1, 1)  # [P, R, 1]
    rope = adapter.rope(h, pos)
    for seg in state.segments:
        column = seg.width + step  # [1]
        cols = torch.arange(seg.prompt.shape[1], device=tokens.device)  # [C]
        allowed = seg.prompt | (cols >= seg.width) & (cols <= column)  # [R, C]
        h = run_layers(adapter, seg.layers, h, decode_mask(allowed, h.dtype), rope, state.cache, column=column)
    return logits_last(adapter, h)


def _dynamo_settings():
    """Dynamic only where `Decoder` marks it (a segment's layer range must stay a constant);
    a graph per model and segment structure, never silently eager past dynamo's limit of 8."""
    return torch._dynamo.config.patch(automatic_dynamic_shapes=False, cache_size_limit=64)


class Decoder:
    """How decode steps, and the prefill's layers on a pruned prompt, run. Eager (the
    default): the batch's exact shapes, fresh cache buffers, `decode_step` and the layers as
    they are. Compiled: `decode_step` through `torch.compile`; on CUDA also captured as CUDA
    graphs (mode "reduce-overhead"), one a shape, replayed as one launch a step. A graph
    reads its cache at fixed addresses and is captured per shape, so there the batch is
    padded to `batch_bucket` rows, capacities are rounded by `bucket`, and cache buffers are
    kept and reused by every batch of the same shape. On CUDA the layers after a selection
    (`kept_layers`) are compiled and captured too, by length bucket: at a few dozen kept
    tokens a row they are launch-bound as decode is. `buckets`, `reuse` and `prefill` force
    the shaping, the reuse and the compiled prefill on or off (to test them on a CPU)."""

    def __init__(self, compiled: bool = False, device: torch.device | str = "cpu", buckets: bool | None = None,
                 reuse: bool | None = None, prefill: bool | None = None):
        self.compiled = compiled
        self.graphs = compiled and torch.device(device).type == "cuda"
        self.buckets = self.graphs if buckets is None else buckets
        self.reuse = self.graphs if reuse is None else reuse
        self.prefill = compiled and (self.graphs if prefill is None else prefill)
        self.buffers: dict[tuple, Tensor] = {}
        self.compiled_step = self.compiled_prefill = None
        mode = "reduce-overhead" if self.graphs else None
        if compiled:  # fullgraph: a graph break would be host work inside the step
            self.compiled_step = torch.compile(decode_step, fullgraph=True, mode=mode)
        if self.prefill:
            self.compiled_prefill = torch.compile(kept_prefill, fullgraph=True, mode=mode)

    def cache(self, num_layers: int, room: int, batch: int) -> KVCache:
        rows = max(batch, 2) if self.compiled else batch  # one row would compile a graph of its own
        if not self.buckets:
            return KVCache(num_layers, room, rows)
        return KVCache(num_layers, room, batch_bucket(rows), bucket, self._buffer if self.reuse else None)

    def _buffer(self, i: int, shape: tuple, like: Tensor) -> Tensor:
        """Cache buffer i of this shape, kept for the next batch of the same shape; at most
        4 shapes a buffer are kept (a new one drops the least recently used)."""
        key = (i, shape, like.dtype, like.device)
        buf = self.buffers.pop(key, None)
        if buf is None:
            mine = [k for k in self.buffers if k[0] == i]
            for k in mine[: max(0, len(mine) - 3)]:
                del self.buffers[k]
            buf = like.new_zeros(shape)
            torch._dynamo.mark_static_address(buf)
        self.buffers[key] = buf  # most recently used last
        return buf

    def kept_layers(self, adapter: Adapter, layers: range, h: Tensor, pad: Tensor, positions: Tensor,
                    cache: KVCache) -> Tensor:
        """h [B, L, D] (pad [B, L], positions [P, B, L]) through `layers`, each writing its
        prompt into `cache`. Compiled: on the cache's rows and the length rounded by `bucket`
        where shapes are bucketed, so that one captured graph serves every batch whose kept
        prompt falls in the same bucket. The padding goes to the right of the prompt, where
        causal attention keeps it out of every real token's row, and is dropped after."""
        if not self.prefill:
            return run_layers(adapter, layers, h, causal_mask(pad, h.dtype), adapter.rope(h, positions), cache)
        b, n = pad.shape
        rows, width = cache.rows, bucket(n) if self.buckets else n
        h_in = torch.nn.functional.pad(h, (0, 0, 0, width - n, 0, rows - b))  # [R, W, D]
        pad_in = torch.nn.functional.pad(pad, (0, width - n, 0, rows - b))  # [R, W], False past the prompt
        positions_in = torch.nn.functional.pad(positions, (0, width - n, 0, rows - b))  # [P, R, W]
        for x, dims in ((h_in, (0, 1)), (pad_in, (0, 1)), (positions_in, (1, 2))):
            for d in dims:
                torch._dynamo.maybe_mark_dynamic(x, d)
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with _dynamo_settings():
            out, keys, values = self.compiled_prefill(adapter, layers, h_in, pad_in, positions_in)
        for i, k, v in zip(layers, keys, values):  # [R, kv_heads, W, hd]: the batch's prompt into the cache
            cache.update(k[:b, :, :n], v[:b, :, :n], i)
        return out[:b, :n]

    def ready(self, state: State, tokens: Tensor) -> None:
        """Before a batch's first step: its rows and capacities are marked dynamic, so that
        one compilation serves every batch size and prompt length."""
        if not self.compiled:
            return
        for x in [*state.cache.keys, *state.cache.values]:  # [R, kv_heads, C, hd]
            torch._dynamo.maybe_mark_dynamic(x, 0)
            torch._dynamo.maybe_mark_dynamic(x, 2)
        for seg in state.segments:  # [R, C]
            torch._dynamo.maybe_mark_dynamic(seg.prompt, 0)
            torch._dynamo.maybe_mark_dynamic(seg.prompt, 1)
        torch._dynamo.maybe_mark_dynamic(state.next_position, 0)
        torch._dynamo.maybe_mark_dynamic(tokens, 0)

    def __call__(self, adapter: Adapter, state: State, tokens: Tensor, step: Tensor) -> Tensor:
        if not self.compiled:
            return decode_step(adapter, state, tokens, step)
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's logits are consumed
        with _dynamo_settings():
            return self.compiled_step(adapter, state, tokens, step)


EAGER = Decoder()


# ---------------------------------------------------------------------- generation


def sample(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> Tensor:
    """Greedy when temperature <= 0, else nucleus sampling. logits: [B, V] -> [B]."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = (logits.float() / temperature).softmax(dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p  # keeps at least the top token
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def generate_tokens(adapter: Adapter, plan: Plan, batch: Batch, max_new_tokens: list[int], eos: set[int],
                    temperature: float = 0.0, top_p: float = 1.0,
                    generator: torch.Generator | None = None,
                    observer: Observer | None = None, decoder: Decoder | None = None,
                    check_every: int | None = None) -> tuple[list[list[int]], State]:
    """Token ids per sample, up to and including its first EOS, at most its max_new_tokens.
    Whether every sample is done is asked every `check_every` steps (default: every step on
    a CPU, where asking costs nothing; every 8 on CUDA, where it waits for the device); the
    tokens a sample makes after its EOS are dropped. `observer` is passed to `prefill`."""
    decoder = decoder or EAGER
    device = batch.pad.device
    check_every = check_every or (8 if device.type == "cuda" else 1)
    b, most = len(max_new_tokens), max(max_new_tokens)
    limit = torch.tensor(max_new_tokens, device=device)  # [B]
    logits, state = prefill(adapter, plan, batch, room=max(most - 1, 0), observer=observer, decoder=decoder)
    eos_ids = torch.tensor(sorted(eos), device=device)
    steps = torch.arange(most, device=device)  # step n's input is steps[n]: no host-to-device copy a step
    tokens = torch.zeros(state.cache.rows, dtype=torch.long, device=device)  # [R]; rows past B pad the batch
    decoder.ready(state, tokens)
    out: list[Tensor] = []
    done = limit <= 0
    for n in range(most):
        tokens[:b] = sample(logits[:b], temperature, top_p, generator)
        out.append(torch.where(done, -1, tokens[:b]))
        done = done | torch.isin(tokens[:b], eos_ids) | (limit <= n + 1)
        if n + 1 == most or (n + 1) % check_every == 0 and bool(done.all()):
            break
        logits = decoder(adapter, state, tokens, steps[n])
    ids = torch.stack(out, dim=1).tolist() if out else [[] for _ in max_new_tokens]
    return [[t for t in row if t >= 0] for row in ids], state
