"""VLM-Pruner's BSS rounds as one Triton program a sample: `bss` is `vlm_pruner._bss` without
the host.

The torch rounds ask the host, chunk after chunk, whether anything was accepted, so on a GPU
each chunk drains the queue. Here each program walks its own sample's rounds and chunks in a
loop on the device, one launch a call and no host sync: a round ranks its candidates by
counting, for every key, the smaller ones (keys: score bits and index, so ties go to the
lower index as in a stable sort); a chunk reads its scores from the running maxima; only an
accepted chunk streams the rows of x (every token's similarity to it, O(N C)). The running
maxima, the ranking and the selection order are small per-sample scratch rows that stay in
cache.

The decisions are the torch rounds', in the same float arithmetic: fp32 scores, tau stepped
in fp64 and compared in fp32 (as torch compares a tensor with a Python float), no fused
multiply-adds. Only the summation order of dot products and distances differs, so a token can
differ only where two scores, or a score and tau, agree to float rounding.
Under TRITON_INTERPRET=1 (set before triton is imported) it runs on CPU tensors.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

# Tiles: the rows x channels of x that an accepted chunk streams at a time, and how many
# elements a ranking step compares at once (keys x the round's keys). With 16 warps, sm_90
# then holds a 1024-token sample in 90 registers a thread, no spills. The interpreter is
# fastest on whole arrays.
ROWS, COLUMNS, COMPARES, WARPS = 64, 32, 8 * 1024, 16
WHOLE_TILES = os.environ.get("TRITON_INTERPRET") == "1"


def bss(
    x: Tensor, xyt: Tensor, first: Tensor, keep: int, *,
    chunk: int, tau: float, lam: float, official: bool, step: float,
) -> Tensor:
    """`vlm_pruner._bss` on the device: x [B, N, C] unit rows, xyt [N, 3] normalized
    coordinates, first [B, P] the pivots, keep < N -> each token's position in the selection
    order, [B, N] (N: not selected)."""
    b, n, dim = x.shape
    dev = x.device
    block_n, block_k = triton.next_power_of_2(n), triton.next_power_of_2(dim)
    chunk = min(chunk, n)
    if WHOLE_TILES:
        rows, columns, keys_at = block_n, block_k, block_n
    else:
        rows, columns, keys_at = ROWS, min(COLUMNS, block_k), max(1, min(block_n, COMPARES // block_n))
    scratch = torch.empty(2, b, n, device=dev)  # max_s M[i, s] and delta_i, a token each
    keys = torch.empty(b, block_n, dtype=torch.int64, device=dev)  # a round's ranking keys
    ranked = torch.empty(b, block_n, dtype=torch.int32, device=dev)  # a round's candidates, best first
    order = torch.empty(b, n, dtype=torch.int32, device=dev)
    taus = torch.full((2,), step, dtype=torch.float64, device=dev)  # a fill kernel, not a copy from the host
    taus[0] = tau
    _bss_kernel[(b,)](
        x.contiguous(), xyt.float().contiguous(), first.contiguous(), taus, scratch[0], scratch[1], keys, ranked,
        order, n, dim, keep, first.shape[1], chunk, lam,
        OFFICIAL=official, BLOCK_N=block_n, BLOCK_T=keys_at,
        BLOCK_C=max(16, triton.next_power_of_2(chunk)), BLOCK_R=max(16, rows), BLOCK_K=max(16, columns),  # tl.dot: >= 16
        num_warps=WARPS, enable_fp_fusion=False,
    )
    return order.long()


@triton.jit
def _bss_kernel(
    x_ptr, xyt_ptr, first_ptr, taus_ptr, max_sim_ptr, min_dist_ptr, key_ptr, ranked_ptr, order_ptr,
    n, dim, keep, n_pivots, chunk, lam,
    OFFICIAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    sample = tl.program_id(0).to(tl.int64)
    x_ptr += sample * n * dim
    first_ptr += sample * n_pivots
    max_sim_ptr += sample * n
    min_dist_ptr += sample * n
    order_ptr += sample * n
    ranked_ptr += sample * BLOCK_N
    key_ptr += sample * BLOCK_N
    lanes = tl.arange(0, BLOCK_N)  # one lane a token
    real = lanes < n
    slots = tl.arange(0, BLOCK_C)  # one slot a chunk member
    tl.store(max_sim_ptr + lanes, tl.full([BLOCK_N], float("-inf"), tl.float32), mask=real)
    tl.store(min_dist_ptr + lanes, tl.full([BLOCK_N], float("inf"), tl.float32), mask=real)
    tl.store(order_ptr + lanes, tl.zeros([BLOCK_N], tl.int32) + n, mask=real)
    tl.debug_barrier()
    for p0 in range(0, n_pivots, BLOCK_C):  # the pivots take positions 0 .. P-1
        position = p0 + slots
        is_pivot = position < n_pivots
        pivots = tl.load(first_ptr + position, mask=is_pivot, other=0).to(tl.int32)
        _accept(x_ptr, xyt_ptr, max_sim_ptr, min_dist_ptr, order_ptr, n, dim, pivots, is_pivot, position,
                BLOCK_C, BLOCK_R, BLOCK_K)
        tl.debug_barrier()

    count = tl.zeros([], tl.int32) + n_pivots
    tau = tl.load(taus_ptr)  # fp64, stepped like the Python float of the torch rounds
    step = tl.load(taus_ptr + 1)
    active = count < keep
    while active:
        # round-start ranking by 1 - max Mb, ties by index: a candidate's rank is how many
        # (score bits, index) keys are smaller than its own, counted a tile of keys at a time
        max_sim = tl.load(max_sim_ptr + lanes, mask=real, other=0.0)
        min_dist = tl.load(min_dist_ptr + lanes, mask=real, other=0.0)
        free = real & (tl.load(order_ptr + lanes, mask=real, other=0) == n)
        bits = ((1 + lam * min_dist) * max_sim + 0.0).to(tl.int32, bitcast=True)  # + 0.0: -0 ties +0
        key = ((bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64) << 32) | lanes.to(tl.int64)
        key = tl.where(free, key, 0x7FFFFFFFFFFFFFFF)
        tl.store(key_ptr + lanes, key)
        tl.debug_barrier()
        rank = tl.zeros([BLOCK_N], tl.int32)
        for j0 in range(0, BLOCK_N, BLOCK_T):
            other = tl.load(key_ptr + j0 + tl.arange(0, BLOCK_T))  # [BLOCK_T]
            rank += tl.sum((other[None, :] < key[:, None]).to(tl.int32), axis=1)
        tl.store(ranked_ptr + rank, lanes, mask=free)
        # M only grows within a round and 1 + lam * delta >= 1: the walk can end after the
        # last candidate whose M is still below max(tau, 0)
        hopeful = free & (max_sim < tl.maximum(tau, 0.0).to(tl.float32))
        end = tl.maximum(tl.max(tl.where(hopeful, rank + 1, 0)), 1)
        candidates = n - count
        below = tau.to(tl.float32)
        tl.debug_barrier()

        start = tl.zeros([], tl.int32)
        added = tl.zeros([], tl.int32)
        walking = count < keep
        while walking & (start < end):
            position = start + slots
            valid = (slots < chunk) & (position < candidates)
            members = tl.load(ranked_ptr + position, mask=valid, other=0)
            grow = 1 + lam * tl.load(min_dist_ptr + members, mask=valid, other=0.0)
            mb = grow * tl.load(max_sim_ptr + members, mask=valid, other=0.0)  # fresh: S grew in this round
            accept = valid & (mb < below)
            taken = tl.sum(accept.to(tl.int32))
            if taken > 0:
                room = keep - count
                if taken > room:  # overflow: the best `room` by the fresh scores, in that order
                    fresh = tl.where(valid, mb, float("inf"))
                    ahead = (fresh[None, :] < fresh[:, None]) | (
                        (fresh[None, :] == fresh[:, None]) & (slots[None, :] < slots[:, None]))
                    place = tl.sum(ahead.to(tl.int32), axis=1)  # [BLOCK_C] place in a stable sort
                    accept = valid & (place < room)
                    order = count + place
                    taken = room
                else:
                    before = accept[None, :] & (slots[None, :] < slots[:, None])
                    order = count + tl.sum(before.to(tl.int32), axis=1)  # accepted members in slot order
                _accept(x_ptr, xyt_ptr, max_sim_ptr, min_dist_ptr, order_ptr, n, dim, members, accept, order,
                        BLOCK_C, BLOCK_R, BLOCK_K)
                tl.debug_barrier()
                count += taken
                added += taken
                walking = count < keep
            else:
                walking = start > 0  # nothing passes in the first chunk: later ones rank lower
            start += chunk
        if OFFICIAL:
            active = (count < keep) & (added > 0)  # reference early stop: fewer than keep tokens
        else:
            active = count < keep
        tau += step


@triton.jit
def _accept(
    x_ptr, xyt_ptr, max_sim_ptr, min_dist_ptr, order_ptr, n, dim, members, accept, position,
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Fold the accepted `members` [BLOCK_C] into every token's max similarity and nearest
    grid distance to the kept set (one pass over the rows of x) and record their positions."""
    mx = tl.load(xyt_ptr + members * 3, mask=accept, other=0.0)
    my = tl.load(xyt_ptr + members * 3 + 1, mask=accept, other=0.0)
    mt = tl.load(xyt_ptr + members * 3 + 2, mask=accept, other=0.0)
    for r0 in range(0, n, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        real = rows < n
        sim = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        for k0 in range(0, dim, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_ptr + rows[:, None] * dim + cols[None, :],
                        mask=real[:, None] & (cols[None, :] < dim), other=0.0)  # [BLOCK_R, BLOCK_K]
            b = tl.load(x_ptr + members[None, :] * dim + cols[:, None],
                        mask=accept[None, :] & (cols[:, None] < dim), other=0.0)  # [BLOCK_K, BLOCK_C]
            sim = tl.dot(a, b, sim, input_precision="ieee")
        best = tl.max(tl.where(accept[None, :], sim, float("-inf")), axis=1)
        tl.store(max_sim_ptr + rows, tl.maximum(tl.load(max_sim_ptr + rows, mask=real, other=0.0), best), mask=real)
        dx = tl.load(xyt_ptr + rows * 3, mask=real, other=0.0)[:, None] - mx[None, :]
        dy = tl.load(xyt_ptr + rows * 3 + 1, mask=real, other=0.0)[:, None] - my[None, :]
        dt = tl.load(xyt_ptr + rows * 3 + 2, mask=real, other=0.0)[:, None] - mt[None, :]
        dist = tl.where(accept[None, :], tl.sqrt_rn(dx * dx + dy * dy + dt * dt), float("inf"))
        nearest = tl.minimum(tl.load(min_dist_ptr + rows, mask=real, other=0.0), tl.min(dist, axis=1))
        tl.store(min_dist_ptr + rows, nearest, mask=real)
    tl.store(order_ptr + members, position, mask=accept)
