"""The roofline: the least time each phase of a batch's generation can take on a device.

A phase can go no faster than its arithmetic at the device's matmul rate, nor than its
memory traffic at the device's bandwidth, so it takes at least the larger of the two. The
FLOPs alone (`pruner.flops`) overstate what pruning buys wherever a phase is bound by bytes:
a decode step reads every decoder weight whatever the prompt's length, so at batch 1 pruning
saves only the KV cache's share of its bytes. The phases:

    vision        the tower and projector: their FLOPs; their weights, read once
    prefill_full  layers < K on the whole prompt: their FLOPs; their weights, and the KV
                  cache they write
    prefill_kept  layers >= K on the kept prompt, then the final norm and the LM head on the
                  last position: their FLOPs; their weights and the KV cache they write
    decode        each step on its own: every layer, the norm and the LM head on one token a
                  row; the decode weights, and the KV cache the step reads (that step's)

Unpruned, K is every layer; projector-stage methods have K = 0. FLOPs are `pruner.flops`'
(measured-style); bytes count weights and the KV cache, not activations."""
from __future__ import annotations

from dataclasses import dataclass

from pruner.flops import LLMShape

PHASES = ("vision", "prefill_full", "prefill_kept", "decode")
PREFILL = ("prefill_full", "prefill_kept")


@dataclass(frozen=True)
class Roof:
    """A device's measured limits: `matmul` FLOP/s (a large matmul in the run's dtype) and
    `bandwidth` bytes/s (a device-to-device copy, reads and writes counted)."""

    matmul: float
    bandwidth: float

    def seconds(self, flops: float, nbytes: float) -> float:
        return max(flops / self.matmul, nbytes / self.bandwidth)


@dataclass(frozen=True)
class Weights:
    """Weight bytes a phase reads: the vision tower and projector, one decoder layer, and the
    final norm with the LM head."""

    vision: int
    layer: int
    head: int


def phases(llm: LLMShape, weights: Weights, *, batch: int, n: int, kept: int, full: int, steps: int,
           itemsize: int, vision_flops: int) -> dict[str, list[tuple[int, int]]]:
    """A batch's work by phase, as (FLOPs, bytes) items each bound on its own: one item a
    phase, one a step for decode. Every row has prompt n, kept prompt `kept`, `full` layers
    on the whole prompt (see `pruner.flops.full_layers`), `steps` decode steps after prefill;
    `vision_flops` a sample (0: no vision phase)."""
    rest = llm.layers - full
    kv = 2 * llm.kv_dim * itemsize  # bytes of keys and values a token and layer
    decode_weights = llm.layers * weights.layer + weights.head
    return {
        "vision": [(batch * vision_flops, weights.vision)] if vision_flops else [],
        "prefill_full": [(batch * full * llm.layer(n, n), full * (weights.layer + batch * n * kv))] if full else [],
        "prefill_kept": [(batch * (rest * llm.layer(kept, kept) + llm.lm_head()),
                          rest * (weights.layer + batch * kept * kv) + weights.head)],
        "decode": [(batch * (full * llm.layer(1, n + j) + rest * llm.layer(1, kept + j) + llm.lm_head()),
                    decode_weights + batch * kv * (full * (n + j) + rest * (kept + j)))
                   for j in range(1, steps + 1)],
    }


def predict(roof: Roof, work: dict[str, list[tuple[int, int]]]) -> dict[str, tuple[float, str]]:
    """Per phase: (least seconds, "flops" or "bytes": which bound most of its time)."""
    out = {}
    for phase, items in work.items():
        compute = sum(f for f, _ in items) / roof.matmul
        memory = sum(b for _, b in items) / roof.bandwidth
        out[phase] = (sum(roof.seconds(f, b) for f, b in items), "flops" if compute >= memory else "bytes")
    return out


def total(predicted: dict[str, tuple[float, str]], phases: tuple[str, ...] = PHASES) -> float:
    return sum(predicted[p][0] for p in phases if p in predicted)
