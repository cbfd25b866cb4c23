"""DivPrune: max-min diversity on the projector outputs, before the LLM sees them."""
from __future__ import annotations

import torch
from torch import Tensor

from ._common import Selection, check_keep, check_matrix, same_rows, unit_rows

STAGE = "projector"  # runs on the image features entering the LLM
NEEDS = frozenset({"features"})
PARAMS: tuple[str, ...] = ()
_DIST_BYTES = 1 << 30  # distance matrices held at once: samples run in groups that fit (one at least)


def select(features: Tensor, keep: int) -> Tensor:
    """features: [N, D]. Distance is 1 - cosine. First the token whose nearest neighbour is
    farthest; then, greedily, the token farthest from its nearest selected token. Ascending."""
    return select_batch([features], keep)[0]


def select_batch(features: list[Tensor], keep: int) -> list[Tensor]:
    """`select` for B samples with the same N in one pass: the same indices as B calls."""
    keep = check_keep(keep)
    features = [check_matrix("features", f) for f in features]
    if not features:
        return []
    n = same_rows("features", features)
    if keep >= n:
        return [torch.arange(n, device=f.device) for f in features]
    group = max(1, _DIST_BYTES // (4 * n * n))
    return [idx for lo in range(0, len(features), group) for idx in _greedy(features[lo : lo + group], keep)]


def run(signals, keep: int) -> Selection:
    return Selection(select(signals.features, keep))


def run_batch(signals: list, keep: int) -> list[Selection]:
    """One call for samples that share N and the budget; equal to `[run(s, keep) for s in signals]`."""
    return [Selection(idx) for idx in select_batch([s.features for s in signals], keep)]


def _greedy(features: list[Tensor], keep: int) -> Tensor:
    """[B, keep] ascending, 1 <= keep < N.

    Each sample's distances come from its own [N, D] @ [D, N] matmul: a batched one may round
    differently, and near-ties must break the same way whatever the batch. The greedy then
    runs on all B at once with gathers, minimum and argmax, which are exact and need no host
    sync, so one step is a handful of kernels for the whole batch. Holding the distances costs
    4 * N^2 bytes a sample (1.3 MB at N = 576, 2.2 GB for a 23k-token clip), hence the groups.
    """
    b, n = len(features), features[0].shape[0]
    device = features[0].device
    dist = torch.empty(b, n, n, device=device)  # [B, N, N] 1 - cosine
    for i, f in enumerate(features):
        x = unit_rows(f)  # [N, D]
        dist[i] = 1 - x @ x.T
    dist.diagonal(dim1=1, dim2=2).fill_(torch.inf)  # a token is not its own neighbour
    rows = torch.arange(b, device=device)
    chosen = torch.empty(b, keep, dtype=torch.long, device=device)
    chosen[:, 0] = dist.amin(dim=2).argmax(dim=1)  # nearest neighbour farthest; ties: lowest index
    to_chosen = dist[rows, chosen[:, 0]]  # [B, N] distance to the nearest chosen token
    for step in range(1, keep):
        to_chosen.scatter_(1, chosen[:, step - 1 : step], -torch.inf)  # never chosen twice
        chosen[:, step] = to_chosen.argmax(dim=1)
        to_chosen = torch.minimum(to_chosen, dist[rows, chosen[:, step]])
    return chosen.sort(dim=1).values
