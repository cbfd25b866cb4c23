"""Token-selection methods and the registry the runtime dispatches through.

Each method module is pure tensor code and declares where it runs (`STAGE`), which signals
it reads (`NEEDS`), its tunable parameters (`PARAMS`) and an adapter `run(signals, keep,
**params) -> Selection`; a method whose selection is a sequential greedy loop also gives
`run_batch(signals_list, keep, **params) -> list[Selection]` for samples that share N, grid
and budget, so that a GPU pays one sample's kernel launches per batch, not one per sample.
The runtime computes only the signals a method needs and never looks at a method's name.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Literal

from torch import Tensor

from . import dart, divprune, fastv, vlm_pruner
from ._common import Grid, Selection

Stage = Literal["none", "projector", "layer"]
SIGNALS = frozenset({"keys", "hidden", "hidden_normed", "attn_last", "text_keys",
                     "text_hidden_normed", "features"})


@dataclass
class Signals:
    """One sample's view of its image tokens at the point where the method runs."""

    grid: Grid  # (H, W) or a list of grids, N tokens in all
    keys: Tensor | None = None  # [N, Dk] layer K-1 keys after rotary, heads flattened
    hidden: Tensor | None = None  # [N, D] layer K-1 outputs
    hidden_normed: Tensor | None = None  # [N, D] the same through the LLM's final norm
    attn_last: Tensor | None = None  # [N] last prompt token's attention, head-averaged
    text_keys: Tensor | None = None  # [T, Dk]
    text_hidden_normed: Tensor | None = None  # [T, D]
    features: Tensor | None = None  # [N, D] projector outputs (before the LLM)


@dataclass(frozen=True)
class Method:
    name: str
    stage: Stage  # "projector": before layer 0; "layer": after layer K-1; "none": never prunes
    needs: frozenset[str] = field(default_factory=frozenset)
    params: tuple[str, ...] = ()
    run: Callable[..., Selection] | None = None
    run_batch: Callable[..., list[Selection]] | None = None  # same results as `run` per sample

    def check_params(self, params: dict) -> None:
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            allowed = ", ".join(self.params) or "none"
            raise ValueError(f"method {self.name!r} has no parameter(s) {', '.join(unknown)}; "
                             f"it takes: {allowed}")


def _from_module(name: str, module: ModuleType) -> Method:
    assert module.NEEDS <= SIGNALS, module.NEEDS - SIGNALS
    return Method(name, module.STAGE, module.NEEDS, module.PARAMS, module.run, getattr(module, "run_batch", None))


METHODS: dict[str, Method] = {
    "none": Method("none", "none"),
    "vlm-pruner": _from_module("vlm-pruner", vlm_pruner),
    "fastv": _from_module("fastv", fastv),
    "dart": _from_module("dart", dart),
    "divprune": _from_module("divprune", divprune),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None


__all__ = ["METHODS", "Method", "Selection", "Signals", "Grid", "get_method"]
