"""DART: duplication-aware selection. Pivot tokens (image and text, by key norm) each claim
the image tokens least similar to them, so the kept set covers what the pivots do not."""
from __future__ import annotations

import torch
from torch import Tensor

from ._common import Selection, check_keep, check_matrix, same_rows, unit_rows

STAGE = "layer"
NEEDS = frozenset({"keys", "hidden_normed", "text_keys", "text_hidden_normed"})
PARAMS = ("pivots_img", "pivots_txt")

Sample = tuple[Tensor, Tensor, Tensor, Tensor]  # keys, hidden_normed, text_keys, text_hidden_normed


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
    sample = (keys, hidden_normed, text_keys, text_hidden_normed)
    return select_batch([sample], keep, pivots_img=pivots_img, pivots_txt=pivots_txt)[0]


def select_batch(samples: list[Sample], keep: int, *, pivots_img: int = 4, pivots_txt: int = 4) -> list[Tensor]:
    """`select` for B samples with the same N in one pass (T may differ): the same indices as B calls."""
    keep = check_keep(keep)
    for sample in samples:
        _check(*sample, pivots_img, pivots_txt)
    if not samples:
        return []
    n = same_rows("hidden_normed", [h for _, h, _, _ in samples])
    if keep >= n:
        return [torch.arange(n, device=k.device) for k, _, _, _ in samples]
    if pivots_img == 0 and any(tk.shape[0] == 0 for _, _, tk, _ in samples):
        raise ValueError("pivots_img is 0 and a sample has no text tokens: there is no pivot to select by")
    return list(_select(samples, keep, pivots_img, pivots_txt))


def run(signals, keep: int, **params) -> Selection:
    return Selection(select(signals.keys, signals.hidden_normed, signals.text_keys,
                            signals.text_hidden_normed, keep, **params))


def run_batch(signals: list, keep: int, **params) -> list[Selection]:
    """One call for samples that share N and the budget; equal to `[run(s, keep, **params) for s in signals]`."""
    samples = [(s.keys, s.hidden_normed, s.text_keys, s.text_hidden_normed) for s in signals]
    return [Selection(idx) for idx in select_batch(samples, keep, **params)]


def _select(samples: list[Sample], keep: int, pivots_img: int, pivots_txt: int) -> Tensor:
    """[B, keep] ascending, 1 <= keep < N, at least one pivot per sample.

    Sums (key norms, similarities) are taken per sample with the shapes of a single call, since
    a batched op may round differently and near-ties must break the same way whatever the
    batch. The quota loop then runs on all B at once with stable sorts and scatters, which are
    exact and need no host sync. Samples differ only in their number of text pivots, hence in
    how the budget is split: each gets its own row of quotas, 0 past its last pivot.
    """
    b, n = len(samples), samples[0][1].shape[0]
    device = samples[0][1].device
    n_img = min(pivots_img, keep)
    norms = torch.stack([_l1(k) for k, _, _, _ in samples])  # [B, N]
    img_pivots = norms.sort(dim=1, descending=True, stable=True).indices[:, :n_img]  # [B, n_img]
    n_pivots = [n_img + min(pivots_txt, tk.shape[0]) for _, _, tk, _ in samples]
    sims = torch.zeros(b, max(n_pivots), n, device=device)  # [B, P, N]; rows past a sample's pivots stay 0
    for i, (_, hidden, text_keys, text_hidden) in enumerate(samples):
        x = unit_rows(hidden)  # [N, D]
        vecs = x[img_pivots[i]]  # [n_img, D]
        if n_pivots[i] > n_img:
            txt = _l1(text_keys).sort(descending=True, stable=True).indices[: n_pivots[i] - n_img]
            vecs = torch.cat([vecs, unit_rows(text_hidden)[txt]])  # [P_i, D]
        sims[i, : n_pivots[i]] = vecs @ x.T
    quotas = [_quotas(keep - n_img, count, sims.shape[1]) for count in n_pivots]
    quota = torch.tensor(quotas).to(device, non_blocking=True)  # [B, P]; pageable host to device: no sync
    rank = torch.arange(n, device=device)
    taken = torch.zeros(b, n, dtype=torch.bool, device=device).scatter_(1, img_pivots, True)  # [B, N]
    for p in range(sims.shape[1]):
        if not any(row[p] for row in quotas):
            continue
        order = sims[:, p].masked_fill(taken, torch.inf).sort(dim=1, stable=True).indices  # taken ones last
        taken |= torch.zeros_like(taken).scatter_(1, order, rank < quota[:, p, None])  # the first quota of each row
    return torch.where(taken, rank, n).sort(dim=1).values[:, :keep]  # exactly keep taken per row


def _quotas(budget: int, pivots: int, width: int) -> list[int]:
    """The budget split evenly over the pivots, the first ones taking the remainder; 0 up to width."""
    share, extra = divmod(budget, pivots)
    return [share + (p < extra) for p in range(pivots)] + [0] * (width - pivots)


def _check(keys: Tensor, hidden_normed: Tensor, text_keys: Tensor, text_hidden_normed: Tensor,
           pivots_img: int, pivots_txt: int) -> None:
    hidden_normed = check_matrix("hidden_normed", hidden_normed)
    keys = check_matrix("keys", keys, rows=hidden_normed.shape[0])
    for name, value in (("pivots_img", pivots_img), ("pivots_txt", pivots_txt)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if pivots_img + pivots_txt == 0:
        raise ValueError("pivots_img + pivots_txt must be >= 1")
    t = _text_rows("text_keys", text_keys, keys.shape[1])
    if _text_rows("text_hidden_normed", text_hidden_normed, hidden_normed.shape[1]) != t:
        raise ValueError(f"text_keys has {t} rows but text_hidden_normed has {text_hidden_normed.shape[0]}")


def _l1(keys: Tensor) -> Tensor:
    return keys.float().abs().sum(dim=1)  # [rows]


def _text_rows(name: str, x: object, width: int) -> int:
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != width:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 2-D tensor [T, {width}] (T may be 0), got {shape}")
    return x.shape[0]
