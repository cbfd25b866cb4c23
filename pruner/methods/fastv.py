"""FastV: keep the image tokens the last prompt token attends to most at layer K-1."""
from __future__ import annotations

import torch
from torch import Tensor

from ._common import Selection, check_keep

STAGE = "layer"
NEEDS = frozenset({"attn_last"})
PARAMS: tuple[str, ...] = ()


def select(attn_last: Tensor, keep: int) -> Tensor:
    """attn_last: [N] head-averaged attention of the last prompt token over the image tokens.
    Returns the top-`keep` indices, ascending (ties: the lower index)."""
    keep = check_keep(keep)
    if not isinstance(attn_last, Tensor) or attn_last.dim() != 1 or attn_last.numel() == 0:
        shape = tuple(attn_last.shape) if isinstance(attn_last, Tensor) else type(attn_last).__name__
        raise ValueError(f"attn_last must be a non-empty 1-D tensor [N], got {shape}")
    n = attn_last.shape[0]
    if keep >= n:
        return torch.arange(n, device=attn_last.device)
    order = torch.nan_to_num(attn_last.float(), nan=-torch.inf).sort(descending=True, stable=True).indices
    return order[:keep].sort().values


def run(signals, keep: int) -> Selection:
    return Selection(select(signals.attn_last, keep))
