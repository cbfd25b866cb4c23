"""Argument checks and small tensor helpers shared by the selection methods."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# One (H, W) token grid; several (H, W) grids whose tokens are concatenated in order
# (LLaVA-NeXT / OneVision: base tile, then the high-res grid), each covering the whole
# image; or one (T, H, W) video grid, frame after frame, each frame row-major.
Grid = tuple[int, int] | tuple[int, int, int] | Sequence[tuple[int, int]]


@dataclass(frozen=True)
class Selection:
    """What a method returns to the runtime: kept image-token indices (ascending), and the
    kept tokens' new hidden states when the method merges (None: keep them as they are)."""

    indices: Tensor  # [k] long, ascending
    merged: Tensor | None = None  # [k, D]


def check_keep(keep: object) -> int:
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise ValueError(f"keep must be an int >= 1, got {keep!r}")
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    return keep


def check_matrix(name: str, x: object, rows: int | None = None) -> Tensor:
    """A 2-D floating tensor, optionally with a given number of rows."""
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 2-D floating tensor [N, D], got {shape}")
    if rows is not None and x.shape[0] != rows:
        raise ValueError(f"{name} has {x.shape[0]} rows, expected {rows} (one per image token)")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty: there are no image tokens to select from")
    return x


def same_rows(name: str, tensors: Sequence[Tensor]) -> int:
    """N, the rows every tensor of a batch shares (one per image token)."""
    counts = sorted({t.shape[0] for t in tensors})
    if len(counts) > 1:
        raise ValueError(f"{name}: a batch needs the same number of image tokens in every sample, got {counts}")
    return counts[0]


def unit_rows(x: Tensor) -> Tensor:
    """fp32 rows scaled to unit L2 norm; zero rows stay zero and NaNs become zero, so
    similarities are always finite."""
    x = torch.nan_to_num(x.float())
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def grid_coords(grid: Grid, n: int, device: torch.device | None = None,
                temporal_scale: float = 1.0) -> tuple[Tensor, float]:
    """Token coordinates `[N, 3]` as (x, y, s * t) and the diagonal that normalizes distances.

    An image's tokens have t = 0, so distances between them are the plain 2-D grid
    distances. With several image grids, each is scaled into the frame of the largest one,
    since every grid covers the same image: a token's coordinates then say where in the
    image it looks. A video grid (T, H, W) puts frame t at depth s * t (s = temporal_scale),
    and the diagonal is that of the whole box, sqrt(H^2 + W^2 + (s * T)^2), so normalized
    distances stay in [0, 1] however long the clip; s = 0 overlays the frames.
    """
    if _is_video_grid(grid):
        t, h, w = grid
        xy, diag = grid_coords((h, w), h * w, device)
        if t * h * w != n:
            raise ValueError(f"grid {grid!r} holds {t * h * w} tokens but there are {n} image tokens")
        depth = temporal_scale * torch.arange(t, device=device).repeat_interleave(h * w).float()  # [N]
        coords = torch.cat([xy.repeat(t, 1)[:, :2], depth[:, None]], dim=1)  # [N, 3]
        return coords, math.sqrt(h**2 + w**2 + (temporal_scale * t) ** 2)
    grids = [tuple(grid)] if _is_single_grid(grid) else [tuple(g) for g in grid]
    for g in grids:
        if len(g) != 2 or not all(isinstance(v, int) and v >= 1 for v in g):
            raise ValueError(f"grid must be (H, W) or (T, H, W) with positive ints, or a list of (H, W); "
                             f"got {grid!r}")
    total = sum(h * w for h, w in grids)
    if total != n:
        raise ValueError(f"grid {grid!r} holds {total} tokens but there are {n} image tokens")
    big_h = max(h for h, _ in grids)
    big_w = max(w for _, w in grids)
    parts = []
    for h, w in grids:
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        xy = torch.stack([xs.flatten(), ys.flatten()], dim=1).float()  # [h*w, 2]
        if (h, w) != (big_h, big_w):
            xy = (xy + 0.5) * torch.tensor([big_w / w, big_h / h]) - 0.5
        parts.append(xy)
    xy = torch.cat(parts)  # [N, 2]
    coords = torch.cat([xy, torch.zeros(n, 1)], dim=1)  # [N, 3], t = 0
    return coords.to(device), math.sqrt(big_h**2 + big_w**2)


def _is_single_grid(grid: Grid) -> bool:
    return isinstance(grid, (tuple, list)) and len(grid) == 2 and all(isinstance(v, int) for v in grid)


def _is_video_grid(grid: Grid) -> bool:
    return isinstance(grid, tuple) and len(grid) == 3 and all(isinstance(v, int) and v >= 1 for v in grid)
