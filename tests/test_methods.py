"""Selection methods: known answers by construction, from the definitions in their docstrings."""
import math

import pytest
import torch

from pruner.methods import METHODS, Signals, dart, divprune, fastv, get_method, vlm_pruner
from pruner.methods._common import grid_coords


def unit(*angles_deg: float) -> torch.Tensor:
    a = torch.tensor(angles_deg, dtype=torch.float64).deg2rad()
    return torch.stack([a.cos(), a.sin()], dim=1).float()  # [N, 2]


# ---------------------------------------------------------------- VLM-Pruner: pivots


def test_first_pivot_is_largest_l1_norm_not_l2():
    keys = torch.full((9, 4), 0.01)
    keys[3] = torch.tensor([10.0, 0, 0, 0])  # largest L2 norm (10), L1 10
    keys[7] = torch.tensor([4.0, 4, 4, 0])  # largest L1 norm (12), L2 6.9
    hidden = torch.randn(9, 8, generator=torch.Generator().manual_seed(0))
    idx, _ = vlm_pruner.select(keys, hidden, (3, 3), keep=1)
    assert idx.tolist() == [7]


def test_later_pivots_are_farthest_points():
    # A=(3,0) has the largest L1 norm; B is farthest from A; C is farthest from {A, B}.
    keys = torch.randn(16, 2, generator=torch.Generator().manual_seed(1)) * 0.01
    A, B, C = 5, 11, 2
    keys[A], keys[B], keys[C] = torch.tensor([3.0, 0]), torch.tensor([-2.5, 0]), torch.tensor([0, 2.0])
    hidden = torch.randn(16, 8, generator=torch.Generator().manual_seed(2))
    picked = [set(vlm_pruner.select(keys, hidden, (4, 4), keep=k)[0].tolist()) for k in (1, 2, 3)]
    assert picked == [{A}, {A, B}, {A, B, C}]


# ---------------------------------------------------------------- VLM-Pruner: BSS


def _c1_c2_scene():
    """5x5 grid, one pivot in the centre (token 12). C1 (corner, token 0) and C2 (next to the
    pivot, token 13) have the same cosine similarity 0.5 to it; every other token is a copy
    of the pivot (similarity 1, never a good candidate)."""
    keys = torch.full((25, 3), 0.1)
    keys[12] = 5.0
    hidden = torch.zeros(25, 2)
    hidden[:, 0] = 1.0
    hidden[0] = hidden[13] = unit(60.0)[0]  # cos 60 deg = 0.5
    return keys, hidden


@pytest.mark.parametrize("chunk", [1, 16])
def test_bss_prefers_the_spatially_nearer_of_two_equally_similar_candidates(chunk):
    keys, hidden = _c1_c2_scene()
    idx, _ = vlm_pruner.select(keys, hidden, (5, 5), keep=2, pivots=1, chunk=chunk)
    assert idx.tolist() == [12, 13]  # C2, the near one
    # Without the spatial buffer the two tie and the lower index (C1, far) wins.
    idx, _ = vlm_pruner.select(keys, hidden, (5, 5), keep=2, pivots=1, chunk=chunk, lam=0.0)
    assert idx.tolist() == [0, 12]


@pytest.mark.parametrize("seed", range(12))
def test_default_mode_keeps_exactly_k(seed):
    g = torch.Generator().manual_seed(seed)
    h, w = [(24, 24), (12, 20), (7, 9)][seed % 3]
    n = h * w
    keys, hidden = torch.randn(n, 32, generator=g), torch.randn(n, 300, generator=g)
    if seed % 2:  # large uniform regions: many near-identical tokens
        hidden[: n // 2] = hidden[0] + 1e-3 * torch.randn(n // 2, 300, generator=g)
    for keep in (1, 3, 5, n // 9, n // 3, n - 1):
        idx, merged = vlm_pruner.select(keys, hidden, (h, w), keep, chunk=[1, 16][seed % 2])
        assert len(idx) == keep and merged.shape == (keep, 300)
        assert idx.unique().tolist() == idx.tolist()  # ascending, no repeats
        assert 0 <= idx.min() and idx.max() < n


def test_official_mode_stops_early_on_a_uniform_image():
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(576, 16, generator=g)
    hidden = torch.ones(576, 64)  # every token identical: Mb >= 1 > tau after the pivots
    idx, _ = vlm_pruner.select(keys, hidden, (24, 24), keep=64, official=True)
    assert len(idx) == 4  # the pivots alone
    idx, _ = vlm_pruner.select(keys, hidden, (24, 24), keep=64)
    assert len(idx) == 64
    # keep < pivots: the default takes the first `keep` pivots, the reference all of them
    assert len(vlm_pruner.select(keys, hidden, (24, 24), keep=2)[0]) == 2
    assert len(vlm_pruner.select(keys, hidden, (24, 24), keep=2, official=True)[0]) == 4


def test_official_equals_default_when_the_budget_fills():
    g = torch.Generator().manual_seed(4)
    keys, hidden = torch.randn(144, 16, generator=g), torch.randn(144, 64, generator=g)
    a = vlm_pruner.select(keys, hidden, (12, 12), 40)
    b = vlm_pruner.select(keys, hidden, (12, 12), 40, official=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---------------------------------------------------------------- VLM-Pruner: SWA


def test_swa_by_hand():
    # 2x2 grid. Pivots: token 0 (largest L1 key), then token 3 (farthest key). keep=2.
    keys = torch.tensor([[10.0, 0], [0, 0.1], [0, 0.1], [-9.0, 0]])
    hidden = torch.tensor([[1.0, 0], [1, 1], [2, 0.5], [0, 1]])
    idx, merged = vlm_pruner.select(keys, hidden, (2, 2), keep=2, pivots=2, alpha=0.3)
    assert idx.tolist() == [0, 3]
    # Token 1 is equally similar to 0 and 3 (cos = 1/sqrt 2): the tie goes to token 0,
    # selected first. Token 2: cos to 0 = 2/sqrt(4.25), to 3 = 0.5/sqrt(4.25): also token 0.
    s1, s2 = 1 / math.sqrt(2), 2 / math.sqrt(4.25)
    w1, w2 = s1 / (s1 + s2), s2 / (s1 + s2)  # 0.42159, 0.57841
    pooled = (w1 * 1 + w2 * 2, w1 * 1 + w2 * 0.5)  # (1.57841, 0.71080)
    expected0 = (0.3 * 1 + 0.7 * pooled[0], 0.3 * 0 + 0.7 * pooled[1])  # (1.40489, 0.49756)
    assert merged[0].tolist() == pytest.approx(expected0, abs=1e-5)
    assert merged[0].tolist() == pytest.approx([1.40489, 0.49756], abs=1e-5)
    assert merged[1].tolist() == [0.0, 1.0]  # nothing assigned: unchanged


def test_keep_at_least_n_returns_everything_unmerged():
    g = torch.Generator().manual_seed(5)
    keys, hidden = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    for keep in (16, 100):
        idx, merged = vlm_pruner.select(keys, hidden, (4, 4), keep)
        assert idx.tolist() == list(range(16)) and torch.equal(merged, hidden)
        assert fastv.select(hidden[:, 0], keep).tolist() == list(range(16))
        assert divprune.select(hidden, keep).tolist() == list(range(16))
        assert dart.select(keys, hidden, keys[:3], hidden[:3], keep).tolist() == list(range(16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_selects_like_fp32_of_the_same_values(dtype):
    g = torch.Generator().manual_seed(6)
    keys = torch.randn(144, 32, generator=g).to(dtype)
    hidden = torch.randn(144, 64, generator=g).to(dtype)
    idx, merged = vlm_pruner.select(keys, hidden, (12, 12), 30)
    ref_idx, ref_merged = vlm_pruner.select(keys.float(), hidden.float(), (12, 12), 30)
    assert torch.equal(idx, ref_idx)
    assert merged.dtype == dtype
    torch.testing.assert_close(merged.float(), ref_merged.to(dtype).float())
    assert torch.equal(divprune.select(hidden, 20), divprune.select(hidden.float(), 20))
    assert torch.equal(fastv.select(hidden[:, 0], 20), fastv.select(hidden[:, 0].float(), 20))
    t_keys, t_hidden = keys[:5], hidden[:5]
    assert torch.equal(dart.select(keys, hidden, t_keys, t_hidden, 20),
                       dart.select(keys.float(), hidden.float(), t_keys.float(), t_hidden.float(), 20))


def test_multi_grid_coordinates_share_the_image_frame():
    coords, diag = grid_coords([(2, 2), (4, 4)], 20)
    assert diag == pytest.approx(math.sqrt(32))
    # the 2x2 tile's top-left token covers the 4x4 grid's top-left 2x2 block: its centre
    assert coords[0].tolist() == [0.5, 0.5, 0.0]  # (x, y, t): an image has t = 0
    assert coords[3].tolist() == [2.5, 2.5, 0.0]
    assert coords[4].tolist() == [0.0, 0.0, 0.0] and coords[19].tolist() == [3.0, 3.0, 0.0]


# ---------------------------------------------------------------- VLM-Pruner: video grids


def _two_frame_scene():
    """Two 3x3 frames, one pivot at frame 0's centre (token 4). Token 5 (next to it in space)
    and token 13 (frame 1's centre: next to it in time) have the same cosine similarity 0.5
    to it; every other token is a copy of the pivot."""
    keys = torch.full((18, 3), 0.1)
    keys[4] = 5.0
    hidden = torch.zeros(18, 2)
    hidden[:, 0] = 1.0
    hidden[5] = hidden[13] = unit(60.0)[0]
    return keys, hidden


@pytest.mark.parametrize("chunk", [1, 16])
def test_bss_on_a_clip_takes_the_neighbour_in_time_when_frames_are_close(chunk):
    keys, hidden = _two_frame_scene()
    pick = lambda **kw: vlm_pruner.select(keys, hidden, (2, 3, 3), keep=2, pivots=1, chunk=chunk, **kw)[0].tolist()
    assert pick(temporal_scale=0.5) == [4, 13]  # one frame away is 0.5 tokens: nearer than token 5
    assert pick(temporal_scale=0.0) == [4, 13]  # frames overlaid: token 13 sits on the pivot
    assert pick(temporal_scale=2.0) == [4, 5]  # one frame away is 2 tokens: token 5 is nearer
    assert pick() == [4, 5]  # default s = 1: both one token away, a tie, the lower index wins
    assert pick(temporal_scale=2.0, lam=0.0) == [4, 5]  # no spatial term: a tie, lower index


def test_video_coordinates_and_diagonal():
    coords, diag = grid_coords((2, 3, 4), 24, temporal_scale=0.5)
    assert diag == pytest.approx(math.sqrt(3**2 + 4**2 + 1.0**2))
    assert coords[0].tolist() == [0.0, 0.0, 0.0]
    assert coords[6].tolist() == [2.0, 1.0, 0.0]  # frame 0, row 1, column 2
    assert coords[12 + 6].tolist() == [2.0, 1.0, 0.5]  # the same place one frame later, at depth s
    with pytest.raises(ValueError, match=r"grid \(2, 3, 4\) holds 24 tokens but there are 23"):
        grid_coords((2, 3, 4), 23)


def test_temporal_scale_zero_overlays_frames_like_tiles():
    g = torch.Generator().manual_seed(11)
    keys, hidden = torch.randn(3 * 16, 8, generator=g), torch.randn(3 * 16, 32, generator=g)
    for keep in (3, 10, 30):
        clip = vlm_pruner.select(keys, hidden, (3, 4, 4), keep, temporal_scale=0.0)
        tiles = vlm_pruner.select(keys, hidden, [(4, 4)] * 3, keep)
        assert torch.equal(clip[0], tiles[0]) and torch.equal(clip[1], tiles[1])
        far = vlm_pruner.select(keys, hidden, (3, 4, 4), keep, temporal_scale=1.0)
        assert len(far[0]) == keep  # the budget is the whole clip's


def test_images_ignore_the_temporal_scale():
    g = torch.Generator().manual_seed(12)
    keys, hidden = torch.randn(144, 16, generator=g), torch.randn(144, 64, generator=g)
    a = vlm_pruner.select(keys, hidden, (12, 12), 40, official=True)
    b = vlm_pruner.select(keys, hidden, (12, 12), 40, official=True, temporal_scale=3.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---------------------------------------------------------------- baselines


def test_fastv_keeps_top_attention_ascending_with_ties_to_the_lower_index():
    attn = torch.tensor([0.1, 0.5, 0.05, 0.5, 0.2, 0.9])
    assert fastv.select(attn, 3).tolist() == [1, 3, 5]
    assert fastv.select(attn, 2).tolist() == [1, 5]  # 1 and 3 tie: 1 wins


def test_divprune_takes_one_token_from_each_cluster():
    g = torch.Generator().manual_seed(7)
    centres = unit(0.0, 120.0, 240.0)
    feats = torch.cat([c + 0.01 * torch.randn(10, 2, generator=g) for c in centres])  # [30, 2]
    idx = divprune.select(feats, 3)
    assert sorted(i // 10 for i in idx.tolist()) == [0, 1, 2]


def test_divprune_first_token_is_the_most_isolated():
    # angles 0, 2, 90, 200 deg: 200 is farthest from its nearest neighbour (90, 110 deg away);
    # then 2 deg (162 deg from it); then 90 (88 deg from 2 deg beats 0's 2 deg).
    feats = unit(0.0, 2.0, 90.0, 200.0)
    assert divprune.select(feats, 1).tolist() == [3]
    assert divprune.select(feats, 2).tolist() == [1, 3]
    assert divprune.select(feats, 3).tolist() == [1, 2, 3]


def test_dart_text_pivots_steer_the_selection():
    hidden = torch.tensor([[1.0, 0], [-1, 0], [0, 1], [0, -1], [0.9, 0.1]])
    keys = torch.full((5, 2), 0.1)
    keys[0] = 5.0  # image pivot: token 0
    text_hidden, text_keys = torch.tensor([[0.0, 1.0]]), torch.ones(1, 2)
    # 2 to share over 2 pivots: image pivot takes its opposite (1); text pivot its opposite (3)
    assert dart.select(keys, hidden, text_keys, text_hidden, 3, pivots_img=1, pivots_txt=1).tolist() == [0, 1, 3]
    # no text pivot: the image pivot takes both, 2 and 3 tie at cos 0 and the lower wins
    assert dart.select(keys, hidden, text_keys, text_hidden, 3, pivots_img=1, pivots_txt=0).tolist() == [0, 1, 2]


@pytest.mark.parametrize("seed", range(6))
def test_dart_and_divprune_keep_exactly_k(seed):
    g = torch.Generator().manual_seed(100 + seed)
    n = [576, 100, 37][seed % 3]
    keys, hidden = torch.randn(n, 16, generator=g), torch.randn(n, 24, generator=g)
    t_keys, t_hidden = torch.randn(seed, 16, generator=g), torch.randn(seed, 24, generator=g)
    for keep in (1, 2, 4, 7, n // 3, n - 1):
        for idx in (dart.select(keys, hidden, t_keys, t_hidden, keep), divprune.select(hidden, keep)):
            assert len(idx) == keep and idx.unique().tolist() == idx.tolist()


def test_same_input_same_output():
    g = torch.Generator().manual_seed(8)
    keys, hidden = torch.randn(576, 64, generator=g), torch.randn(576, 512, generator=g)
    a, b = vlm_pruner.select(keys, hidden, (24, 24), 64), vlm_pruner.select(keys, hidden, (24, 24), 64)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(divprune.select(hidden, 64), divprune.select(hidden, 64))
    assert torch.equal(dart.select(keys, hidden, keys[:9], hidden[:9], 64),
                       dart.select(keys, hidden, keys[:9], hidden[:9], 64))


# ---------------------------------------------------------------- registry and errors


def test_registry_declares_stage_and_signals_and_dispatches():
    assert set(METHODS) == {"none", "vlm-pruner", "fastv", "dart", "divprune"}
    assert METHODS["none"].stage == "none"
    assert METHODS["divprune"].stage == "projector" and METHODS["divprune"].needs == {"features"}
    assert METHODS["fastv"].stage == "layer" and METHODS["fastv"].needs == {"attn_last"}
    assert METHODS["vlm-pruner"].needs == {"keys", "hidden"}
    g = torch.Generator().manual_seed(9)
    s = Signals(grid=(6, 6), keys=torch.randn(36, 8, generator=g), hidden=torch.randn(36, 8, generator=g),
                hidden_normed=torch.randn(36, 8, generator=g), attn_last=torch.rand(36, generator=g),
                text_keys=torch.randn(4, 8, generator=g), text_hidden_normed=torch.randn(4, 8, generator=g),
                features=torch.randn(36, 8, generator=g))
    sel = METHODS["vlm-pruner"].run(s, 10, chunk=4)
    idx, merged = vlm_pruner.select(s.keys, s.hidden, s.grid, 10, chunk=4)
    assert torch.equal(sel.indices, idx) and torch.equal(sel.merged, merged)
    assert torch.equal(METHODS["fastv"].run(s, 10).indices, fastv.select(s.attn_last, 10))
    assert METHODS["fastv"].run(s, 10).merged is None
    assert torch.equal(METHODS["divprune"].run(s, 10).indices, divprune.select(s.features, 10))
    assert torch.equal(METHODS["dart"].run(s, 10).indices,
                       dart.select(s.keys, s.hidden_normed, s.text_keys, s.text_hidden_normed, 10))


@pytest.mark.parametrize("call, message", [
    (lambda: vlm_pruner.select(torch.randn(4, 2), torch.randn(4, 2), (2, 2), 0), "keep must be >= 1"),
    (lambda: vlm_pruner.select(torch.randn(4, 2), torch.randn(4, 2), (2, 2), 2.5), "keep must be an int"),
    (lambda: vlm_pruner.select(torch.randn(4, 2), torch.randn(4, 2), (3, 2), 2), "grid (3, 2) holds 6 tokens"),
    (lambda: vlm_pruner.select(torch.randn(5, 2), torch.randn(4, 2), (2, 2), 2), "keys has 5 rows, expected 4"),
    (lambda: vlm_pruner.select(torch.randn(4, 2), torch.randn(4), (2, 2), 2), "hidden must be a 2-D"),
    (lambda: vlm_pruner.select(torch.randn(4, 2), torch.randn(4, 2), (2, 2), 2, chunk=0), "chunk must be"),
    (lambda: vlm_pruner.select(torch.randn(8, 2), torch.randn(8, 2), (2, 2, 2), 2, temporal_scale=-1),
     "temporal_scale must be a number >= 0"),
    (lambda: fastv.select(torch.rand(4, 4), 2), "attn_last must be a non-empty 1-D"),
    (lambda: fastv.select(torch.rand(4), -1), "keep must be >= 1"),
    (lambda: divprune.select(torch.rand(4), 2), "features must be a 2-D"),
    (lambda: dart.select(torch.randn(4, 2), torch.randn(4, 3), torch.randn(2, 5), torch.randn(2, 3), 2),
     "text_keys must be a 2-D tensor [T, 2]"),
    (lambda: dart.select(torch.randn(4, 2), torch.randn(4, 3), torch.randn(2, 2), torch.randn(3, 3), 2),
     "text_keys has 2 rows but text_hidden_normed has 3"),
    (lambda: dart.select(torch.randn(3, 2), torch.randn(4, 3), torch.randn(2, 2), torch.randn(2, 3), 2),
     "keys has 3 rows, expected 4"),
    (lambda: get_method("sparsevlm"), "unknown method 'sparsevlm'; choose one of: none, vlm-pruner"),
    (lambda: METHODS["fastv"].check_params({"chunk": 4}), "method 'fastv' has no parameter(s) chunk"),
])
def test_bad_arguments_name_the_argument(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert message in str(err.value)
