"""Batched DivPrune and DART: one call for a group of samples selects exactly what one call per sample does."""
import pytest
import torch

from pruner.methods import Signals, dart, divprune
from pruner.methods._common import unit_rows

DART_PARAMS = [{}, {"pivots_img": 2, "pivots_txt": 3}, {"pivots_img": 0, "pivots_txt": 2},
               {"pivots_img": 5, "pivots_txt": 0}]


def unit(*angles_deg: float) -> torch.Tensor:
    a = torch.tensor(angles_deg, dtype=torch.float64).deg2rad()
    return torch.stack([a.cos(), a.sin()], dim=1).float()  # [N, 2]


def make_signals(seed: int, b: int, n: int, ties: bool = False, text_lengths=(0, 2, 7)) -> list[Signals]:
    """B samples with N image tokens; text lengths cycle through text_lengths (0, fewer and more than
    the pivots). ties: duplicate rows and keys with equal L1 norms."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(b):
        t = text_lengths[(seed + i) % len(text_lengths)]
        keys = torch.randn(n, 8, generator=g)
        hidden, features = torch.randn(n, 24, generator=g), torch.randn(n, 24, generator=g)
        if ties:
            hidden[::3] = hidden[1]  # a third of the tokens are copies of one
            features[n // 2 :] = features[: n - n // 2].clone()  # every token of the second half has a twin
            keys[::2] = keys[::2].sign()  # L1 norm 8 for half the tokens
        text_keys, text_hidden = torch.randn(t, 8, generator=g), torch.randn(t, 24, generator=g)
        out.append(Signals(grid=(1, n), keys=keys, hidden_normed=hidden, features=features,
                           text_keys=text_keys, text_hidden_normed=text_hidden))
    return out


def assert_same(batched, single):
    assert len(batched) == len(single)
    for got, want in zip(batched, single):
        assert torch.equal(got.indices, want.indices)
        assert got.indices.dtype == want.indices.dtype == torch.long and got.indices.device == want.indices.device
        assert got.merged is None and want.merged is None


# ---------------------------------------------------------------- equal to one call per sample


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("n", [16, 37])
@pytest.mark.parametrize("ties", [False, True])
def test_divprune_batch_equals_per_sample(seed, b, n, ties):
    signals = make_signals(seed, b, n, ties)
    for keep in (1, 5, n - 1, n, n + 3):
        assert_same(divprune.run_batch(signals, keep), [divprune.run(s, keep) for s in signals])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("n", [16, 37])
@pytest.mark.parametrize("ties", [False, True])
def test_dart_batch_equals_per_sample(seed, b, n, ties):
    lengths = (0, 2, 7) if seed % 2 else (3, 1, 9)  # pivots_img=0 needs text in every sample
    signals = make_signals(seed, b, n, ties, lengths)
    for params in DART_PARAMS:
        if params.get("pivots_img") == 0 and seed % 2:
            continue
        for keep in (1, 5, n - 1, n, n + 3):
            assert_same(dart.run_batch(signals, keep, **params), [dart.run(s, keep, **params) for s in signals])


def plain_divprune(features: torch.Tensor, keep: int) -> list[int]:
    """The greedy written out one token at a time (DivPrune as it was before batching)."""
    x = unit_rows(features)
    dist = 1 - x @ x.T
    dist.fill_diagonal_(torch.inf)
    chosen = [int(dist.min(dim=1).values.argmax())]
    to_chosen = 1 - x @ x[chosen[0]]
    for _ in range(min(keep, len(x)) - 1):
        to_chosen[chosen[-1]] = -torch.inf
        chosen.append(int(to_chosen.argmax()))
        to_chosen = torch.minimum(to_chosen, 1 - x @ x[chosen[-1]])
    return sorted(chosen)


def plain_dart(s: Signals, keep: int, pivots_img: int = 4, pivots_txt: int = 4) -> list[int]:
    """DART one pivot at a time (as it was before batching)."""
    def top(keys: torch.Tensor, count: int) -> torch.Tensor:  # largest L1 norms, ties to the lower index
        return keys.float().abs().sum(dim=1).sort(descending=True, stable=True).indices[:count]

    x, img = unit_rows(s.hidden_normed), top(s.keys, min(pivots_img, keep))
    vecs = torch.cat([x[img], unit_rows(s.text_hidden_normed)[top(s.text_keys, pivots_txt)]])
    taken = torch.zeros(len(x), dtype=torch.bool)
    taken[img] = True
    share, extra = divmod(keep - len(img), len(vecs))
    for p, vec in enumerate(vecs):
        taken[(x @ vec).masked_fill(taken, torch.inf).sort(stable=True).indices[: share + (p < extra)]] = True
    return taken.nonzero().squeeze(1).tolist()


@pytest.mark.parametrize("seed", range(3))
def test_batch_follows_the_plain_per_sample_definition(seed):
    signals = make_signals(seed, 3, 37, text_lengths=(0, 2, 7))  # no exact ties: rounding cannot decide
    for keep in (1, 5, 20, 36):
        got = [s.indices.tolist() for s in divprune.run_batch(signals, keep)]
        assert got == [plain_divprune(s.features, keep) for s in signals]
        for params in DART_PARAMS[:2] + DART_PARAMS[3:]:  # not pivots_img=0: a sample has no text
            got = [s.indices.tolist() for s in dart.run_batch(signals, keep, **params)]
            assert got == [plain_dart(s, keep, **params) for s in signals]


def cast(signals: list[Signals], dtype: torch.dtype) -> list[Signals]:
    names = ("keys", "hidden_normed", "features", "text_keys", "text_hidden_normed")
    return [Signals(grid=s.grid, **{k: getattr(s, k).to(dtype) for k in names}) for s in signals]


def test_half_precision_inputs_select_like_their_fp32_values():
    for dtype in (torch.float16, torch.bfloat16):
        half = cast(make_signals(7, 3, 37), dtype)
        as_fp32 = cast(half, torch.float32)
        assert_same(divprune.run_batch(half, 9), [divprune.run(s, 9) for s in as_fp32])
        assert_same(dart.run_batch(half, 9), [dart.run(s, 9) for s in as_fp32])


def test_divprune_memory_groups_do_not_change_the_answer(monkeypatch):
    signals = make_signals(8, 3, 37, ties=True)
    whole = divprune.run_batch(signals, 10)
    monkeypatch.setattr(divprune, "_DIST_BYTES", 1)  # one sample's distances at a time
    assert_same(divprune.run_batch(signals, 10), whole)


def test_an_empty_batch_selects_nothing():
    assert divprune.run_batch([], 5) == [] and dart.run_batch([], 5) == []


# ---------------------------------------------------------------- known answers


def test_divprune_takes_one_token_from_each_cluster_in_every_sample():
    g = torch.Generator().manual_seed(9)
    signals, clusters = [], []
    for shift in (0.0, 40.0, 75.0):  # each sample's three clusters sit elsewhere on the circle
        centres = unit(shift, shift + 120, shift + 240)
        feats = torch.cat([c + 0.01 * torch.randn(10, 2, generator=g) for c in centres])  # [30, 2]
        order = torch.randperm(30, generator=g)  # and its tokens come in another order
        signals.append(Signals(grid=(5, 6), features=feats[order]))
        clusters.append(order // 10)  # [30] the cluster of each token
    for cluster, sel in zip(clusters, divprune.run_batch(signals, 3)):
        assert sorted(cluster[sel.indices].tolist()) == [0, 1, 2]


def test_divprune_first_tokens_are_the_most_isolated_in_every_sample():
    # angles 0, 2, 90, 200: 200 is the most isolated, then 2, then 90 (see test_methods); mirrored
    # order in the second sample, so its answer is the mirror image.
    a, b = unit(0.0, 2.0, 90.0, 200.0), unit(200.0, 90.0, 2.0, 0.0)
    signals = [Signals(grid=(2, 2), features=a), Signals(grid=(2, 2), features=b)]
    assert [s.indices.tolist() for s in divprune.run_batch(signals, 1)] == [[3], [0]]
    assert [s.indices.tolist() for s in divprune.run_batch(signals, 3)] == [[1, 2, 3], [0, 1, 2]]


def test_dart_splits_the_budget_by_each_samples_own_pivots():
    # The scene of test_methods: image pivot token 0; a text pivot along +y takes token 3.
    hidden = torch.tensor([[1.0, 0], [-1, 0], [0, 1], [0, -1], [0.9, 0.1]])
    keys = torch.full((5, 2), 0.1)
    keys[0] = 5.0
    with_text = Signals(grid=(1, 5), keys=keys, hidden_normed=hidden,
                        text_keys=torch.ones(1, 2), text_hidden_normed=torch.tensor([[0.0, 1.0]]))
    no_text = Signals(grid=(1, 5), keys=keys, hidden_normed=hidden,
                      text_keys=torch.zeros(0, 2), text_hidden_normed=torch.zeros(0, 2))
    got = dart.run_batch([with_text, no_text, with_text], 3, pivots_img=1, pivots_txt=1)
    # two pivots share 2: (1, 1); one pivot takes both: token 1, then 2 and 3 tie at cos 0 and 2 wins
    assert [s.indices.tolist() for s in got] == [[0, 1, 3], [0, 1, 2], [0, 1, 3]]


# ---------------------------------------------------------------- bad input


def message(call) -> str:
    with pytest.raises(ValueError) as err:
        call()
    return str(err.value)


def test_bad_input_raises_what_select_raises():
    good = make_signals(10, 2, 16)
    bad = Signals(grid=(4, 4), features=torch.rand(16), keys=good[0].keys, hidden_normed=good[0].hidden_normed,
                  text_keys=torch.randn(2, 5), text_hidden_normed=torch.randn(2, 24))
    want = message(lambda: divprune.select(bad.features, 4))
    assert "features must be a 2-D" in want and message(lambda: divprune.run_batch([good[0], bad], 4)) == want
    want = message(lambda: dart.run(bad, 4))
    assert "text_keys must be a 2-D tensor [T, 8]" in want
    assert message(lambda: dart.run_batch([good[0], bad], 4)) == want
    assert message(lambda: divprune.run_batch(good, 0)) == message(lambda: divprune.run(good[0], 0))
    want = message(lambda: dart.run(good[0], 2, pivots_img=-1))
    assert "pivots_img must be an int >= 0" in want and message(lambda: dart.run_batch(good, 2, pivots_img=-1)) == want


def test_a_batch_needs_one_n_and_some_pivot():
    a, b = make_signals(11, 1, 16)[0], make_signals(11, 1, 20)[0]
    assert "same number of image tokens in every sample, got [16, 20]" in message(lambda: divprune.run_batch([a, b], 4))
    assert "same number of image tokens in every sample, got [16, 20]" in message(lambda: dart.run_batch([a, b], 4))
    no_text = make_signals(12, 1, 16, text_lengths=(0,))
    assert "no pivot" in message(lambda: dart.run(no_text[0], 4, pivots_img=0, pivots_txt=2))
    assert "no pivot" in message(lambda: dart.run_batch(make_signals(12, 3, 16), 4, pivots_img=0, pivots_txt=2))
