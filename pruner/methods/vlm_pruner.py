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

import torch
from torch import Tensor

from ._common import Grid, Selection, check_keep, check_matrix, grid_coords, unit_rows

STAGE = "layer"  # runs on layer K-1's signals, inside the LLM
NEEDS = frozenset({"keys", "hidden"})
PARAMS = ("official", "pivots", "chunk", "tau", "lam", "channels", "alpha", "temporal_scale")
TAU_STEP = 0.1


def select(
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
) -> tuple[Tensor, Tensor]:
    """Pick `keep` of the N image tokens; return (indices [k] ascending, merged hidden [k, D]).

    keys: [N, Dk] layer K-1 keys after rotary; hidden: [N, D] layer K-1 outputs;
    grid: (H, W) with H*W == N, a list of grids, or a video's (T, H, W) (see `grid_coords`);
    temporal_scale: s in the spatio-temporal distance, video only.
    `official=True` reproduces the reference code: a round that adds nothing ends the
    selection (fewer than `keep` may come back) and keep < pivots still keeps all pivots.
    """
    keep = check_keep(keep)
    hidden = check_matrix("hidden", hidden)
    n = hidden.shape[0]
    keys = check_matrix("keys", keys, rows=n)
    for name, value in (("pivots", pivots), ("chunk", chunk), ("channels", channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0, got {lam!r}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if isinstance(temporal_scale, bool) or not isinstance(temporal_scale, (int, float)) or not temporal_scale >= 0:
        raise ValueError(f"temporal_scale must be a number >= 0, got {temporal_scale!r}")
    coords, diag = grid_coords(grid, n, hidden.device, float(temporal_scale))
    if keep >= n:
        return torch.arange(n, device=hidden.device), hidden

    x = unit_rows(_screen_channels(hidden.float(), channels))  # [N, C]
    n_pivots = min(pivots if official else min(pivots, keep), n)
    order = _pivots(keys.float(), n_pivots)
    order = _bss(x, coords / diag, order, keep, chunk=chunk, tau=tau, lam=lam, official=official)
    kept = torch.tensor(order, device=hidden.device)  # selection order
    merged = _swa(x, hidden, kept, alpha)
    indices, perm = kept.sort()
    return indices, merged[perm]


def run(signals, keep: int, **params) -> Selection:
    indices, merged = select(signals.keys, signals.hidden, signals.grid, keep, **params)
    return Selection(indices, merged)


def _screen_channels(hidden: Tensor, channels: int) -> Tensor:
    """The `channels` columns with the highest variance over the image tokens."""
    if hidden.shape[1] <= channels:
        return hidden
    top = hidden.var(dim=0).topk(channels).indices
    return hidden[:, top]  # [N, C]


def _pivots(keys: Tensor, count: int) -> list[int]:
    """First: the largest L1 norm. Then farthest-point sampling on Euclidean key distance."""
    chosen = [int(keys.abs().sum(dim=1).argmax())]
    nearest = (keys - keys[chosen[0]]).norm(dim=1)  # [N] distance to the nearest pivot
    while len(chosen) < count:
        nxt = int(nearest.argmax())
        chosen.append(nxt)
        nearest = torch.minimum(nearest, (keys - keys[nxt]).norm(dim=1))
    return chosen


def _bss(
    x: Tensor, xy: Tensor, selected: list[int], keep: int, *,
    chunk: int, tau: float, lam: float, official: bool,
) -> list[int]:
    """Grow `selected` (in selection order) to `keep` tokens by rounds of chunked acceptance.

    The buffer factor (1 + lam * delta_i) depends on the candidate only, so
    max_s Mb[i, s] = (1 + lam * delta_i) * max_s M[i, s]; both maxima are kept as [N]
    vectors and updated as tokens are accepted: O(N) per accepted token.
    """
    n, dev = x.shape[0], x.device
    max_sim = torch.full((n,), -torch.inf, device=dev)  # [N] max_s M[i, s]
    min_dist = torch.full((n,), torch.inf, device=dev)  # [N] delta_i, normalized grid distance
    in_set = torch.zeros(n, dtype=torch.bool, device=dev)

    def add(new: list[int]) -> None:
        nonlocal max_sim, min_dist
        idx = torch.tensor(new, device=dev)
        max_sim = torch.maximum(max_sim, (x @ x[idx].T).max(dim=1).values)
        grid_dist = (xy[:, None, :] - xy[None, idx, :]).norm(dim=-1)  # [N, new]; xy: [N, 3]
        min_dist = torch.minimum(min_dist, grid_dist.min(dim=1).values)
        in_set[idx] = True

    def buffered(idx: Tensor) -> Tensor:
        return (1 + lam * min_dist[idx]) * max_sim[idx]

    add(selected)
    while len(selected) < keep:
        candidates = (~in_set).nonzero().squeeze(1)
        # round-start ranking: best score 1 - max Mb first, ties by index
        ranked = candidates[buffered(candidates).sort(stable=True).indices]
        added = 0
        for start in range(0, len(ranked), chunk):
            members = ranked[start : start + chunk]
            mb = buffered(members)
            accept = members[mb < tau]
            room = keep - len(selected)
            if len(accept) > room:  # overflow: the best of this chunk by the fresh scores
                accept = members[mb.sort(stable=True).indices[:room]]
            if len(accept) == 0:
                if start == 0:  # nothing passes: later members rank lower, S is unchanged
                    break
                continue
            selected += accept.tolist()
            added += len(accept)
            add(accept.tolist())
            if len(selected) == keep:
                break
        if added == 0 and official:
            break  # reference early stop: fewer than keep tokens
        tau += TAU_STEP
    return selected


def _swa(x: Tensor, hidden: Tensor, kept: Tensor, alpha: float) -> Tensor:
    """New hidden states of `kept` (in selection order): each dropped token joins the kept
    token it is most similar to (ties: the one selected first), weighted by similarity."""
    n = x.shape[0]
    dropped_mask = torch.ones(n, dtype=torch.bool, device=x.device)
    dropped_mask[kept] = False
    dropped = dropped_mask.nonzero().squeeze(1)
    out = hidden[kept].float()  # [k, D]
    if len(dropped) == 0:
        return out.to(hidden.dtype)
    sim = x[dropped] @ x[kept].T  # [Nd, k]
    best, owner = sim.max(dim=1)  # argmax takes the first maximum: earliest selected
    weights = torch.zeros(len(kept), len(dropped), device=x.device)  # [k, Nd]
    weights[owner, torch.arange(len(dropped), device=x.device)] = best
    total = weights.sum(dim=1, keepdim=True)  # [k, 1]
    merges = total.squeeze(1) > 0
    pooled = (weights / total.where(merges.unsqueeze(1), 1.0)) @ hidden[dropped].float()  # [k, D]
    out[merges] = alpha * out[merges] + (1 - alpha) * pooled[merges]
    return out.to(hidden.dtype)
