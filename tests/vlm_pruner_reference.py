"""The sequential, one-sample VLM-Pruner that `pruner.methods.vlm_pruner` replaced with a
batched lockstep version: a token-by-token reading of the paper, kept as an independent
path that the batched code must agree with."""
from __future__ import annotations

import torch
from torch import Tensor

from pruner.methods._common import grid_coords, unit_rows

TAU_STEP = 0.1


def select(keys: Tensor, hidden: Tensor, grid, keep: int, *, official: bool = False, pivots: int = 4,
           chunk: int = 16, tau: float = 0.8, lam: float = 0.5, channels: int = 256, alpha: float = 0.3,
           temporal_scale: float = 1.0) -> tuple[Tensor, Tensor]:
    n = hidden.shape[0]
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
