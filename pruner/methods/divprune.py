"""DivPrune: max-min diversity on the projector outputs, before the LLM sees them."""
from __future__ import annotations

import torch
from torch import Tensor

from ._common import Selection, check_keep, check_matrix, unit_rows

STAGE = "projector"  # runs on the image features entering the LLM
NEEDS = frozenset({"features"})
PARAMS: tuple[str, ...] = ()
_BLOCK = 1024  # rows per block when finding the first token: memory O(block * N)


def select(features: Tensor, keep: int) -> Tensor:
    """features: [N, D]. Distance is 1 - cosine. First the token whose nearest neighbour is
    farthest; then, greedily, the token farthest from its nearest selected token. Ascending."""
    keep = check_keep(keep)
    features = check_matrix("features", features)
    n = features.shape[0]
    if keep >= n:
        return torch.arange(n, device=features.device)
    x = unit_rows(features)  # [N, D]
    nearest_other = torch.empty(n, device=x.device)
    for start in range(0, n, _BLOCK):
        dist = 1 - x[start : start + _BLOCK] @ x.T  # [b, N]
        rows = torch.arange(dist.shape[0], device=x.device)
        dist[rows, rows + start] = torch.inf  # a token is not its own neighbour
        nearest_other[start : start + _BLOCK] = dist.min(dim=1).values
    first = int(nearest_other.argmax())
    chosen = [first]
    to_chosen = 1 - x @ x[first]  # [N] distance to the nearest chosen token
    to_chosen[first] = -torch.inf
    for _ in range(keep - 1):
        nxt = int(to_chosen.argmax())
        chosen.append(nxt)
        to_chosen = torch.minimum(to_chosen, 1 - x @ x[nxt])
        to_chosen[nxt] = -torch.inf
    return torch.tensor(chosen, device=x.device).sort().values


def run(signals, keep: int) -> Selection:
    return Selection(select(signals.features, keep))
