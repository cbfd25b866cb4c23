"""VLM-Pruner (arXiv 2512.02700): centrifugal, near-to-far selection of image tokens.

Pivots by key norm and farthest points, then Buffering for Spatial Sparsity (BSS) grows the
kept set outward in parallel chunks, then Similarity-Weighted Aggregation (SWA) folds each
dropped token into its most similar kept one.

This project's extension, video: a clip's tokens sit on a (T, H, W) grid, and BSS measures
how far a candidate is from the kept set in space and time,
sqrt(dx^2 + dy^2 + (s * dt)^2) with s = `temporal_scale` (default 1: one frame apart counts
as one token apart; Qwen's time step is one temporal patch of two frames), normalized by
the diagonal of the whole (s * T, H, W) box so that it stays in [0, 1] as the paper's does.
s = 0 overlays the frames, as multi-tile images are overlaid; a large s makes another frame
far away, so selection fills a frame's neighbourhood before moving in time. Images have no
time axis and are selected exactly as the paper describes. The budget is the whole clip's,
not a per-frame one.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from ._common import Grid, Selection, check_keep, check_matrix, grid_coords, unit_rows

STAGE = "layer"  # runs on layer K-1's signals, inside the LLM
NEEDS = frozenset({"keys", "hidden"})
PARAMS = ("official", "pivots", "chunk", "tau", "lam", "channels", "alpha", "temporal_scale", "backend")
BACKENDS = ("auto", "torch", "triton")
TAU_STEP = 0.1


def select(keys: Tensor, hidden: Tensor, grid: Grid, keep: int, **params) -> tuple[Tensor, Tensor]:
    """Pick `keep` of the N image tokens; return (indices [k] ascending, merged hidden [k, D]).

    keys: [N, Dk] layer K-1 keys after rotary; hidden: [N, D] layer K-1 outputs;
    grid: (H, W) with H*W == N, a list of grids, or a video's (T, H, W) (see `grid_coords`);
    params: `select_batch`'s (official, pivots, chunk, tau, lam, channels, alpha, temporal_scale,
    backend).
    """
    hidden = check_matrix("hidden", hidden)
    keys = check_matrix("keys", keys, rows=hidden.shape[0])
    return select_batch(keys[None], hidden[None], grid, keep, **params)[0]


def select_batch(
    keys: Tensor,
    hidden: Tensor,
    grid: Grid,
    keep: int,
    *,
    official: bool = False,
    pivots: int = 4,
    chunk: int = 16,
    tau: float = 0.8,
    lam: float = 0.5,
    channels: int = 256,
    alpha: float = 0.3,
    temporal_scale: float = 1.0,
    backend: str = "auto",
) -> list[tuple[Tensor, Tensor]]:
    """`select` for B samples that share N, the grid and the budget, in one pass of tensor
    ops over the batch: keys [B, N, Dk], hidden [B, N, D] -> one (indices, merged) a sample.

    The greedy rounds run in lockstep: every sample ranks its own candidates and walks its
    own chunks, and a sample whose round (or selection) has ended only idles. On a GPU the
    cost is then one sample's kernel launches, not B times them. `select` is this with B = 1,
    so a sample gets the same tokens alone or in a batch (up to the last bit of a batched
    matmul's rounding, which can differ with B).

    temporal_scale: s in the spatio-temporal distance, video only. `official=True`
    reproduces the reference code: a round that adds nothing ends the selection (fewer than
    `keep` may come back) and keep < pivots still keeps all pivots.

    backend: where the BSS rounds run. "torch": the lockstep tensor ops here, which ask the
    host after every chunk whether anything was accepted (cheap on a CPU, a queue drain each on
    a GPU); "triton": one Triton program a sample walks all its rounds on the device
    (`vlm_pruner_triton`), the same decisions with no host sync (the official mode reads its
    kept counts once); "auto": triton on CUDA, torch elsewhere. Pivots and SWA are the same
    tensor ops for both.
    """
    keep = check_keep(keep)
    for name, x in (("keys", keys), ("hidden", hidden)):
        if not isinstance(x, Tensor) or x.dim() != 3 or not x.is_floating_point() or x.shape[1] == 0:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a 3-D floating tensor [B, N, D] with N >= 1, got {shape}")
    if keys.shape[:2] != hidden.shape[:2]:
        raise ValueError(f"keys {tuple(keys.shape)} and hidden {tuple(hidden.shape)} differ in [B, N]")
    for name, value in (("pivots", pivots), ("chunk", chunk), ("channels", channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0, got {lam!r}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if isinstance(temporal_scale, bool) or not isinstance(temporal_scale, (int, float)) or not temporal_scale >= 0:
        raise ValueError(f"temporal_scale must be a number >= 0, got {temporal_scale!r}")
    on_triton = _on_triton(backend, hidden.device)
    n = hidden.shape[1]
    xyt = _coords(grid, n, hidden.device, float(temporal_scale))  # [N, 3]
    if keep >= n:
        return [(torch.arange(n, device=hidden.device), h) for h in hidden]

    x = unit_rows(_screen_channels(hidden.float(), channels))  # [B, N, C]
    n_pivots = min(pivots if official else min(pivots, keep), n)
    first = _pivots(keys.float(), n_pivots)  # [B, P]
    if on_triton:
        from .vlm_pruner_triton import bss
        order = bss(x, xyt, first, keep, chunk=chunk, tau=tau, lam=lam, official=official, step=TAU_STEP)
    else:
        order = _bss(x, xyt, first, keep, chunk=chunk, tau=tau, lam=lam, official=official)  # [B, N]
    kept, count = _by_order(order, max(keep, n_pivots))  # [B, K] in selection order, [B]
    merged = _swa(x, hidden, kept, alpha)  # [B, K, D]
    indices, perm = kept.sort(dim=1)  # padding (index N) sorts last
    merged = merged.gather(1, perm[:, :, None].expand_as(merged))
    # the exact-k mode always fills the budget: only the official mode's counts need the host
    sizes = count.tolist() if official else [keep] * len(count)
    return [(indices[i, :k], merged[i, :k]) for i, k in enumerate(sizes)]


def run(signals, keep: int, **params) -> Selection:
    indices, merged = select(signals.keys, signals.hidden, signals.grid, keep, **params)
    return Selection(indices, merged)


def run_batch(signals: list, keep: int, **params) -> list[Selection]:
    """One call for samples that share N, grid and budget (the runtime groups them)."""
    keys = torch.stack([s.keys for s in signals])  # [B, N, Dk]
    hidden = torch.stack([s.hidden for s in signals])  # [B, N, D]
    return [Selection(i, m) for i, m in select_batch(keys, hidden, signals[0].grid, keep, **params)]


def _on_triton(backend: str, device: torch.device) -> bool:
    """Whether `backend` runs the rounds in Triton on tensors on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if backend == "auto":
        return device.type == "cuda"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {device.type} tensors")
    return backend == "triton"


_COORDS: dict[tuple, Tensor] = {}


def _coords(grid: Grid, n: int, device: torch.device, temporal_scale: float) -> Tensor:
    """Normalized token coordinates (`grid_coords` / its diagonal), [N, 3], made once per grid
    and device: they are built on the host, and a copy to a GPU waits for its queue."""
    key = (repr(grid), n, str(device), temporal_scale)
    if key not in _COORDS:
        coords, diag = grid_coords(grid, n, device, temporal_scale)
        if len(_COORDS) >= 256:
            _COORDS.clear()
        _COORDS[key] = coords / diag
    return _COORDS[key]


def _screen_channels(hidden: Tensor, channels: int) -> Tensor:
    """The `channels` columns with the highest variance over a sample's image tokens."""
    if hidden.shape[2] <= channels:
        return hidden
    top = hidden.var(dim=1).topk(channels, dim=1).indices  # [B, C]
    return hidden.gather(2, top[:, None, :].expand(-1, hidden.shape[1], -1))  # [B, N, C]


def _pivots(keys: Tensor, count: int) -> Tensor:
    """First: the largest L1 norm. Then farthest-point sampling on Euclidean key distance.
    keys [B, N, Dk] -> [B, count] in the order chosen. Squared distances come from
    |a|^2 + |b|^2 - 2 a.b, a matmul, rather than from a [B, N, Dk] difference a pivot."""
    rows = torch.arange(keys.shape[0], device=keys.device)
    square = keys.square().sum(dim=2)  # [B, N]

    def distance2(p: Tensor) -> Tensor:  # [B] pivot -> [B, N]
        return (square + square[rows, p][:, None] - 2 * (keys @ keys[rows, p][:, :, None]).squeeze(2)).clamp_min(0)

    chosen = [keys.abs().sum(dim=2).argmax(dim=1)]  # [B]
    nearest = distance2(chosen[0])  # [B, N] squared distance to the nearest pivot
    while len(chosen) < count:
        nearest[rows, chosen[-1]] = -torch.inf  # never twice, even when all keys coincide
        chosen.append(nearest.argmax(dim=1))
        nearest = torch.minimum(nearest, distance2(chosen[-1]))
    return torch.stack(chosen, dim=1)


def _bss(
    x: Tensor, xyt: Tensor, first: Tensor, keep: int, *,
    chunk: int, tau: float, lam: float, official: bool,
) -> Tensor:
    """Grow the pivots to `keep` tokens by rounds of chunked acceptance; returns each token's
    position in the selection order, [B, N] (N: not selected).

    x [B, N, C] unit rows, xyt [N, 3] normalized coordinates, first [B, P] the pivots.
    The buffer factor (1 + lam * delta_i) depends on the candidate only, so
    max_s Mb[i, s] = (1 + lam * delta_i) * max_s M[i, s]; both maxima are kept as [B, N]
    and updated as tokens are accepted: O(N) per accepted token. Padding slots point at a
    sink column N that is never a candidate.
    """
    b, n, dev = x.shape[0], x.shape[1], x.device
    x = torch.cat([x, x.new_zeros(b, 1, x.shape[2])], dim=1)  # [B, N+1, C], row N: the sink
    xyt = torch.cat([xyt, xyt.new_zeros(1, 3)])  # [N+1, 3]
    rows = torch.arange(b, device=dev)[:, None]  # [B, 1]
    max_sim = torch.full((b, n + 1), -torch.inf, device=dev)  # max_s M[i, s]
    min_dist = torch.full((b, n + 1), torch.inf, device=dev)  # delta_i, normalized grid distance
    order = torch.full((b, n + 1), n, dtype=torch.long, device=dev)
    grow = 1 + lam * min_dist  # [B, N+1] the buffer factor 1 + lam * delta_i

    def add(members: Tensor, accept: Tensor, position: Tensor) -> None:
        """members, accept, position: [B, S]; accepted members take their order position."""
        nonlocal max_sim, min_dist, grow
        drop = ~accept[:, None, :]  # [B, 1, S]
        sim = (x @ x[rows, members].transpose(1, 2)).masked_fill(drop, -torch.inf)  # [B, N+1, S]
        max_sim = torch.maximum(max_sim, sim.max(dim=2).values)
        dist = (xyt[None, :, None, :] - xyt[members][:, None, :, :]).norm(dim=-1)  # [B, N+1, S]
        min_dist = torch.minimum(min_dist, dist.masked_fill(drop, torch.inf).min(dim=2).values)
        grow = 1 + lam * min_dist
        order.scatter_(1, members, torch.where(accept, position, order.gather(1, members)))

    def buffered(idx: Tensor) -> Tensor:
        return grow.gather(1, idx) * max_sim.gather(1, idx)

    p = first.shape[1]
    add(first, torch.ones_like(first, dtype=torch.bool), torch.arange(p, device=dev).expand(b, p))
    count = torch.full((b,), p, device=dev)
    active = count < keep  # [B] still selecting
    slots, positions = torch.arange(chunk, device=dev), torch.arange(n, device=dev)  # [S], [N]
    while bool(active.any()):
        candidates = order[:, :n] == n  # [B, N]
        # round-start ranking: best score 1 - max Mb first, ties by index
        score = (grow * max_sim)[:, :n].masked_fill(~candidates, torch.inf)
        ranked = score.sort(dim=1, stable=True).indices  # [B, N], this round's candidates first
        in_round, added, n_candidates = active.clone(), torch.zeros_like(count), (n - count)[:, None]
        # M only grows within a round and 1 + lam * delta >= 1, so a candidate whose M is
        # already >= max(tau, 0) cannot pass before the round ends: stop after the last chunk
        # that holds one that can (one host sync a round, not a walk over every chunk).
        hopeless = ((max_sim[:, :n] >= max(tau, 0.0)) | ~candidates).gather(1, ranked)  # [B, N], ranked order
        end = int(torch.where(hopeless | ~active[:, None], -1, positions).max()) + 1
        valid_all, members_all = _still_in_round(ranked, n_candidates, in_round)
        for start in range(0, max(end, 1), chunk):
            valid, members = valid_all[:, start : start + chunk], members_all[:, start : start + chunk]  # [B, S]
            accept = (buffered(members) < tau) & valid
            if not bool(accept.any()):  # most chunks: one sync and nothing to update
                if start == 0:
                    break  # nothing passes in the first chunk: later ones rank lower, the round is over
                continue
            taken, room = accept.sum(dim=1), keep - count
            position = count[:, None] + accept.cumsum(dim=1) - 1
            if bool((taken > room).any()):  # overflow: the best `room` by the fresh scores, in that order
                mb = buffered(members).masked_fill(~valid, torch.inf)
                rank = torch.empty_like(members).scatter_(1, mb.sort(dim=1, stable=True).indices,
                                                           slots[: members.shape[1]].expand_as(members))
                overflow = (taken > room)[:, None]
                accept = torch.where(overflow, rank < room[:, None], accept) & valid
                position = torch.where(overflow, count[:, None] + rank, position)
                taken = accept.sum(dim=1)
            add(members, accept, position)
            count, added = count + taken, added + taken
            in_round &= (count < keep) & ((taken > 0) | (start > 0))
            if not bool(in_round.any()):
                break
            valid_all, members_all = _still_in_round(ranked, n_candidates, in_round)
        if official:
            active &= added > 0  # reference early stop: fewer than keep tokens
        active &= count < keep
        tau += TAU_STEP
    return order[:, :n]


def _still_in_round(ranked: Tensor, n_candidates: Tensor, in_round: Tensor) -> tuple[Tensor, Tensor]:
    """Over a whole ranking [B, N]: which slots are this round's candidates of samples still in
    the round (valid [B, N]), and the ranking with every other slot pointed at the sink N."""
    n = ranked.shape[1]
    valid = (torch.arange(n, device=ranked.device) < n_candidates) & in_round[:, None]  # [B, N]
    return valid, ranked.masked_fill(~valid, n)


def _by_order(order: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Selected token indices in selection order, padded with N: ([B, size], count [B])."""
    n = order.shape[1]
    count = (order < n).sum(dim=1)
    kept = order.argsort(dim=1, stable=True)[:, :size]  # [B, size]
    return kept.masked_fill(torch.arange(size, device=order.device) >= count[:, None], n), count


def _swa(x: Tensor, hidden: Tensor, kept: Tensor, alpha: float) -> Tensor:
    """New hidden states of `kept` [B, K] (in selection order, N = padding): each dropped
    token joins the kept token it is most similar to (ties: the one selected first),
    weighted by similarity. Returns [B, K, D]; padding rows are zeros."""
    b, n = x.shape[:2]
    rows = torch.arange(b, device=x.device)[:, None]  # [B, 1]
    real = kept < n  # [B, K]
    safe = kept.clamp_max(n - 1)
    dropped = torch.ones(b, n + 1, dtype=torch.bool, device=x.device)
    dropped[rows, kept] = False
    dropped = dropped[:, :n]  # [B, N]
    sim = (x @ x[rows, safe].transpose(1, 2)).masked_fill(~real[:, None, :], -torch.inf)  # [B, N, K]
    best, owner = sim.max(dim=2)  # [B, N]; argmax takes the first maximum: earliest selected
    weights = torch.zeros(b, kept.shape[1], n, device=x.device)  # [B, K, N]
    weights.scatter_(1, owner[:, None, :], torch.where(dropped, best, 0.0)[:, None, :])
    total = weights.sum(dim=2, keepdim=True)  # [B, K, 1]
    merges = total > 0
    pooled = (weights / total.where(merges, 1.0)) @ hidden.float()  # [B, K, D]
    out = hidden[rows, safe].float()  # [B, K, D]
    out = torch.where(merges, alpha * out + (1 - alpha) * pooled, out).masked_fill(~real[:, :, None], 0.0)
    return out.to(hidden.dtype)
