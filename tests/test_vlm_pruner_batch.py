"""VLM-Pruner's batched selection: a sample gets the same tokens alone or in a batch, and the
same tokens as the sequential one-sample reading of the paper (tests/vlm_pruner_reference.py)."""
import pytest
import torch
import vlm_pruner_reference as reference

from pruner.methods import Signals, vlm_pruner


def _inputs(seed: int, b: int, n: int, dk: int = 24, d: int = 300, uniform: bool = False):
    g = torch.Generator().manual_seed(seed)
    keys, hidden = torch.randn(b, n, dk, generator=g), torch.randn(b, n, d, generator=g)
    if uniform:  # large near-identical regions: many tokens fail tau, several rounds
        hidden[:, : n // 2] = hidden[:, :1] + 1e-3 * torch.randn(b, n // 2, d, generator=g)
    return keys, hidden


CASES = [  # grid, keep, params
    ((24, 24), 64, {}),
    ((24, 24), 192, {}),
    ((12, 20), 5, {"chunk": 1}),
    ((7, 9), 62, {"chunk": 4, "lam": 0.0}),
    ([(3, 3), (6, 6)], 20, {"pivots": 2, "channels": 64}),
    ((3, 6, 6), 30, {"temporal_scale": 0.5}),
    ((12, 12), 2, {"official": True}),
    ((12, 12), 40, {"official": True, "tau": 0.2}),
]


@pytest.mark.parametrize("grid, keep, params", CASES)
@pytest.mark.parametrize("uniform", [False, True])
def test_batch_equals_each_sample_alone_and_the_sequential_reference(grid, keep, params, uniform):
    n = sum(h * w for h, w in grid) if isinstance(grid, list) else int(torch.tensor(grid).prod())
    keys, hidden = _inputs(len(str(grid)) + keep, 3, n, uniform=uniform)
    batch = vlm_pruner.select_batch(keys, hidden, grid, keep, **params)
    for i, (idx, merged) in enumerate(batch):
        alone = vlm_pruner.select(keys[i], hidden[i], grid, keep, **params)
        assert torch.equal(idx, alone[0])
        torch.testing.assert_close(merged, alone[1], rtol=1e-6, atol=1e-6)  # matmul blocking may differ
        ref = reference.select(keys[i], hidden[i], grid, keep, **params)
        assert torch.equal(idx, ref[0])
        if not uniform:  # near-copies tie in SWA's argmax to the last bit: owners may differ there
            torch.testing.assert_close(merged, ref[1], rtol=1e-5, atol=1e-5)


def test_official_early_stop_in_one_sample_does_not_stop_the_others():
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 144, 16, generator=g)
    hidden = torch.randn(2, 144, 64, generator=g)
    hidden[0] = 1.0  # every token identical: Mb >= 1 > tau after the pivots
    (idx0, m0), (idx1, m1) = vlm_pruner.select_batch(keys, hidden, (12, 12), 40, official=True)
    assert len(idx0) == 4 and m0.shape == (4, 64)  # the pivots alone
    assert len(idx1) == 40 and m1.shape == (40, 64)
    assert torch.equal(idx1, reference.select(keys[1], hidden[1], (12, 12), 40, official=True)[0])


def test_pivots_never_repeat_when_all_keys_coincide():
    keys, hidden = torch.ones(1, 16, 4), torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(0))
    idx, _ = vlm_pruner.select_batch(keys, hidden, (4, 4), 4, tau=-1.0, official=True)[0]
    assert idx.tolist() == [0, 1, 2, 3]  # ties go to the lowest index, each once


def test_run_batch_matches_run_per_sample_and_keeps_the_dtype():
    keys, hidden = _inputs(7, 4, 144)
    signals = [Signals(grid=(12, 12), keys=k, hidden=h.bfloat16()) for k, h in zip(keys, hidden)]
    for got, s in zip(vlm_pruner.run_batch(signals, 30, chunk=8), signals):
        want = vlm_pruner.run(s, 30, chunk=8)
        assert torch.equal(got.indices, want.indices)
        torch.testing.assert_close(got.merged, want.merged)
        assert got.merged.dtype == torch.bfloat16


def test_keep_at_least_n_returns_each_sample_unmerged():
    keys, hidden = _inputs(8, 2, 16)
    for idx, merged in vlm_pruner.select_batch(keys, hidden, (4, 4), 16):
        assert idx.tolist() == list(range(16))
    assert all(torch.equal(m, h) for (_, m), h in zip(vlm_pruner.select_batch(keys, hidden, (4, 4), 99), hidden))


@pytest.mark.parametrize("call, message", [
    (lambda: vlm_pruner.select_batch(torch.randn(4, 8), torch.randn(4, 8), (2, 2), 2), "keys must be a 3-D"),
    (lambda: vlm_pruner.select_batch(torch.randn(2, 4, 8), torch.randn(3, 4, 8), (2, 2), 2), "differ in [B, N]"),
    (lambda: vlm_pruner.select_batch(torch.randn(2, 4, 8), torch.randn(2, 4, 8), (3, 3), 2),
     "grid (3, 3) holds 9 tokens but there are 4"),
    (lambda: vlm_pruner.select_batch(torch.randn(2, 4, 8), torch.randn(2, 4, 8), (2, 2), 0), "keep must be >= 1"),
])
def test_bad_batch_arguments_name_the_argument(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert message in str(err.value)
