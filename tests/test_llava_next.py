"""LLaVA-NeXT specifics: base tile + unpadded high-res grid, newline tokens never pruned."""
import pytest
import torch

import tiny
from pruner import PrunedVLM
from pruner.methods._common import grid_coords
from pruner.models import adapter_class
from pruner.models.llava_next import LlavaNextAdapter
from pruner.runtime import collate, prefill

pytestmark = pytest.mark.timeout(300)
BASE = (4, 4)  # 56 px tile, patch 14
# image (width, height) -> high-res token grid (rows, cols) after transformers' unpadding.
# E.g. 60x100: best resolution 112x112 -> 2x2 tiles, 8x8 tokens; the image's width there is
# int(60 * 8 / 100) = 4 tokens (transformers truncates 4.8), so 2 columns of padding go each side.
HIRES = {(90, 70): (6, 8), (60, 100): (8, 4), (120, 56): (4, 8), (100, 100): (8, 8)}
SIZES = list(HIRES)
IMAGE = tiny.WORDS.index("<image>")


@pytest.fixture(scope="module")
def vlm():
    model, proc = tiny.llava_next()
    return PrunedVLM(model, proc, method="vlm-pruner", keep=5)


def prepared(vlm, sizes):
    return vlm.preprocess([tiny.image(i, s) for i, s in enumerate(sizes)], tiny.QUESTIONS[: len(sizes)])


def newline_columns(input_ids, rows, cols):
    """Columns of the newline tokens: the last slot of each high-res row."""
    placeholders = (input_ids == IMAGE).nonzero().squeeze(1)
    base = BASE[0] * BASE[1]
    return placeholders[base + (cols + 1) * torch.arange(rows) + cols]


def test_the_family_is_registered():
    assert adapter_class("llava_next") is LlavaNextAdapter


@pytest.mark.parametrize("size", SIZES)
def test_layout_is_base_tile_then_unpadded_high_res_grid_without_newlines(vlm, size):
    p = prepared(vlm, [size])[0]
    layout = vlm.adapter.layout(p.input_ids, p.vision)
    rows, cols = HIRES[size]
    base = BASE[0] * BASE[1]
    n = base + rows * cols
    assert layout.grid == [BASE, (rows, cols)]
    assert len(layout.positions) == n
    assert int((p.input_ids == vlm.adapter.image_token_id).sum()) == n + rows  # one newline a row
    coords, _ = grid_coords(layout.grid, n)  # the grids hold exactly the N prunable tokens
    assert coords.shape == (n, 3)
    newlines = newline_columns(p.input_ids, rows, cols)
    assert not torch.isin(newlines, layout.positions).any()
    assert torch.equal(layout.positions.sort().values, layout.positions)


def test_newline_features_are_the_models_image_newline(vlm):
    for size in SIZES:
        p = prepared(vlm, [size])[0]
        with torch.no_grad():
            (features,) = vlm.adapter.image_features(p.vision)
        placeholders = (p.input_ids == vlm.adapter.image_token_id).nonzero().squeeze(1)
        assert features.shape[0] == len(placeholders)
        rows, cols = HIRES[size]
        slots = newline_columns(p.input_ids, rows, cols) - placeholders[0]
        newline = vlm.model.model.image_newline
        torch.testing.assert_close(features[slots], newline.expand(rows, -1), atol=0, rtol=0)
        prunable = vlm.adapter.layout(p.input_ids, p.vision).positions - placeholders[0]
        assert not (features[prunable] == newline).all(dim=1).any()


def test_collate_pads_tiles_like_the_processor_and_keeps_per_sample_features(vlm):
    samples = prepared(vlm, SIZES[:3])
    assert [s.vision["pixel_values"].shape[1] for s in samples] == [5, 5, 3]  # base + high-res tiles
    vision = vlm.adapter.collate_vision(samples)
    proc = vlm.preprocessor.processor
    images = [tiny.image(i, s) for i, s in enumerate(SIZES[:3])]
    prompts = [vlm.adapter.prompt(proc, q) for q in tiny.QUESTIONS[:3]]
    ref = proc(images=images, text=prompts, return_tensors="pt", padding=True)
    assert torch.equal(vision["pixel_values"], ref["pixel_values"])
    assert torch.equal(vision["image_sizes"], ref["image_sizes"])
    with torch.no_grad():
        together = vlm.adapter.image_features(vision)
        for s, feats in zip(samples, together):
            torch.testing.assert_close(feats, vlm.adapter.image_features(s.vision)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["vlm-pruner", "fastv", "dart"])
def test_every_newline_reaches_layer_k(vlm, method):
    vlm = PrunedVLM(vlm.model, vlm.preprocessor.processor, method=method, keep=5)
    samples = prepared(vlm, SIZES)
    batch = collate(vlm.adapter, samples, vlm.device)
    with torch.inference_mode():
        _, state = prefill(vlm.adapter, vlm.plan, batch, room=0)
    pad = state.segments[-1].pad
    for b, (p, size) in enumerate(zip(samples, SIZES)):
        rows, cols = HIRES[size]
        layout = vlm.adapter.layout(p.input_ids, p.vision)
        kept = layout.positions[state.selections[b].indices.cpu()]
        entering = state.pruned_positions[0, b][pad[b]].cpu()  # original ids = unpadded columns
        text = (p.input_ids != vlm.adapter.image_token_id).nonzero().squeeze(1)
        expected = torch.cat([text, newline_columns(p.input_ids, rows, cols), kept]).sort().values
        assert torch.equal(entering, expected)
        assert state.image_tokens[b] == BASE[0] * BASE[1] + rows * cols


def test_layout_needs_the_image_size_that_made_the_prompt(vlm):
    p, other = prepared(vlm, [(90, 70), (60, 100)])
    with pytest.raises(ValueError, match="depends on the image's size"):
        vlm.adapter.layout(p.input_ids, {})
    with pytest.raises(ValueError, match="the prompt holds 70 image tokens but llava_next packs 16 base"):
        vlm.adapter.layout(p.input_ids, other.vision)
