"""DART: duplication-aware selection. Pivot tokens (image and text, by key norm) each claim
the image tokens least similar to them, so the kept set covers what the pivots do not."""
from __future__ import annotations

import torch
from torch import Tensor

from ._common import Selection, check_keep, check_matrix, unit_rows

STAGE = "layer"
NEEDS = frozenset({"keys", "hidden_normed", "text_keys", "text_hidden_normed"})
PARAMS = ("pivots_img", "pivots_txt")


def select(
    keys: Tensor,
    hidden_normed: Tensor,
    text_keys: Tensor,
    text_hidden_normed: Tensor,
    keep: int,
    *,
    pivots_img: int = 4,
    pivots_txt: int = 4,
) -> Tensor:
    """Return exactly `keep` image-token indices, ascending.

    keys [N, Dk] / text_keys [T, Dk]: layer K-1 keys; hidden_normed [N, D] /
    text_hidden_normed [T, D]: layer K-1 outputs through the LLM's final norm. Image pivots
    count inside the budget (the reference adds them on top); text pivots only steer.
    """
    keep = check_keep(keep)
    hidden_normed = check_matrix("hidden_normed", hidden_normed)
    n = hidden_normed.shape[0]
    keys = check_matrix("keys", keys, rows=n)
    for name, value in (("pivots_img", pivots_img), ("pivots_txt", pivots_txt)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if pivots_img + pivots_txt == 0:
        raise ValueError("pivots_img + pivots_txt must be >= 1")
    t = _text_rows("text_keys", text_keys, keys.shape[1])
    if _text_rows("text_hidden_normed", text_hidden_normed, hidden_normed.shape[1]) != t:
        raise ValueError(f"text_keys has {t} rows but text_hidden_normed has {text_hidden_normed.shape[0]}")
    if keep >= n:
        return torch.arange(n, device=keys.device)

    img_pivots = _top_l1(keys, min(pivots_img, keep))
    txt_pivots = _top_l1(text_keys, min(pivots_txt, t)) if t else []
    x = unit_rows(hidden_normed)  # [N, D]
    pivot_vecs = torch.cat([x[img_pivots], unit_rows(text_hidden_normed)[txt_pivots]])  # [P, D]
    taken = torch.zeros(n, dtype=torch.bool, device=x.device)
    taken[img_pivots] = True
    # quotas split the rest of the budget evenly; the first pivots take the remainder
    share, extra = divmod(keep - len(img_pivots), len(pivot_vecs))
    for p, vec in enumerate(pivot_vecs):
        quota = share + (p < extra)
        if quota == 0:
            continue
        sim = (x @ vec).masked_fill(taken, torch.inf)  # [N]; taken tokens never chosen
        taken[sim.sort(stable=True).indices[:quota]] = True
    return taken.nonzero().squeeze(1)


def run(signals, keep: int, **params) -> Selection:
    return Selection(select(signals.keys, signals.hidden_normed, signals.text_keys,
                            signals.text_hidden_normed, keep, **params))


def _top_l1(keys: Tensor, count: int) -> list[int]:
    norms = keys.float().abs().sum(dim=1)
    return norms.sort(descending=True, stable=True).indices[:count].tolist()


def _text_rows(name: str, x: object, width: int) -> int:
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != width:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 2-D tensor [T, {width}] (T may be 0), got {shape}")
    return x.shape[0]
