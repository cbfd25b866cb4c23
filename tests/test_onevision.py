"""LLaVA-OneVision specifics: base tile, unpadded (and shrunk) high-res grid with newlines,
pooled video frames with one newline a clip; newlines never pruned."""
import pytest
import torch
from PIL import Image
from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessor,
                          LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor, Qwen2Config, SiglipVisionConfig)

import tiny
from pruner import PrunedVLM
from pruner.methods import METHODS
from pruner.models import adapter_class
from pruner.models.llava_onevision import LlavaOnevisionAdapter

pytestmark = pytest.mark.timeout(300)
BASE = (6, 6)  # 84 px tile, patch 14
POOLED = 3  # a frame's 6x6 grid pooled to 3x3
# image (width, height) -> high-res grid (rows, cols) the model packs: unpadded, and shrunk
# past anyres_max_2 (ratio sqrt(rows * cols / 72) > 1.1): 250x250 takes 2x2 tiles, 12x12
# tokens, ratio sqrt(2) -> 8x8; 200x90 takes 1x3 tiles, 6x18 unpadded to 6x14 (ratio 1.08:
# kept); 90x70 1x2 tiles, 6x12 -> 6x8; 60x100 2x1 tiles, 12x6 -> 10x6
HIRES = {(90, 70): (6, 8), (60, 100): (10, 6), (200, 90): (6, 14), (250, 250): (8, 8)}
SIZES = list(HIRES)
IMAGE, VIDEO = tiny.OV_WORDS.index("<image>"), tiny.OV_WORDS.index("<video>")


@pytest.fixture(scope="module")
def vlm():
    model, proc = tiny.llava_onevision()
    return PrunedVLM(model, proc, method="vlm-pruner", keep=5)


def newline_columns(input_ids, rows, cols):
    """An image's newlines: the last slot of each high-res row."""
    placeholders = (input_ids == IMAGE).nonzero().squeeze(1)
    return placeholders[BASE[0] * BASE[1] + (cols + 1) * torch.arange(rows) + cols]


def test_the_family_is_registered():
    assert adapter_class("llava_onevision") is LlavaOnevisionAdapter


def test_image_layout_is_base_tile_then_the_packed_high_res_grid(vlm):
    prepared = vlm.preprocess([tiny.image(i, s) for i, s in enumerate(SIZES)], tiny.QUESTIONS[:4])
    for size, p in zip(SIZES, prepared):
        layout = vlm.adapter.layout(p.input_ids, p.vision)
        rows, cols = HIRES[size]
        n = BASE[0] * BASE[1] + rows * cols
        assert layout.grid == [BASE, (rows, cols)] and layout.frames == 0
        assert len(layout.positions) == n
        assert int((p.input_ids == IMAGE).sum()) == n + rows
        assert not torch.isin(newline_columns(p.input_ids, rows, cols), layout.positions).any()
        # the model's own packing: newline features exactly where the layout leaves gaps
        with torch.no_grad():
            features = vlm.adapter.features(vlm.adapter.collate_vision([p]))[IMAGE]
        placeholders = (p.input_ids == IMAGE).nonzero().squeeze(1)
        assert features.shape[0] == len(placeholders)
        slots = newline_columns(p.input_ids, rows, cols) - placeholders[0]
        newline = vlm.model.model.image_newline
        torch.testing.assert_close(features[slots], newline.expand(rows, -1), atol=0, rtol=0)
        assert not (features[layout.positions - placeholders[0]] == newline).all(dim=1).any()


def test_video_layout_is_pooled_frames_then_one_newline(vlm):
    clips = [tiny.video(0, 3), tiny.video(1, 1, (60, 100))]
    prepared = vlm.preprocess(clips, ["what ?"] * 2)
    with torch.no_grad():
        features = vlm.adapter.features(vlm.adapter.collate_vision(prepared))[VIDEO]  # both clips, one tower call
    start = 0
    for clip, p in zip(clips, prepared):
        t = len(clip)
        layout = vlm.adapter.layout(p.input_ids, p.vision)
        placeholders = (p.input_ids == VIDEO).nonzero().squeeze(1)
        assert layout.grid == (t, POOLED, POOLED) and layout.frames == t
        assert len(placeholders) == t * POOLED * POOLED + 1
        assert torch.equal(layout.positions, placeholders[:-1])  # all but the newline
        mine = features[start : start + len(placeholders)]
        start += len(placeholders)
        torch.testing.assert_close(mine[-1], vlm.model.model.image_newline, atol=0, rtol=0)
        with torch.no_grad():  # the model's own features for this clip alone
            ref = vlm.model.model.get_video_features(p.vision["pixel_values_videos"]).pooler_output[0]
        torch.testing.assert_close(mine, ref, atol=1e-5, rtol=0)
    assert start == features.shape[0]


@pytest.mark.parametrize("method", [m for m in METHODS if METHODS[m].stage == "layer"] + ["divprune"])
def test_every_newline_reaches_layer_k(vlm, method):
    vlm = PrunedVLM(vlm.model, vlm.preprocessor.processor, method=method, keep=5)
    items = [tiny.image(0, SIZES[0]), tiny.video(0, 3), tiny.image(1, SIZES[3]), tiny.video(1, 2, (60, 100))]
    samples, state, pad = tiny.prefilled(vlm, items, tiny.QUESTIONS[:4])
    for b, p in enumerate(samples):
        layout = vlm.adapter.layout(p.input_ids, p.vision)
        visual = torch.isin(p.input_ids, torch.tensor([IMAGE, VIDEO]))
        fixed = visual.clone()
        fixed[layout.positions] = False  # the newlines
        assert int(fixed.sum()) == (1 if layout.frames else HIRES[SIZES[0 if b == 0 else 3]][0])
        kept = layout.positions[state.selections[b].indices.cpu()]
        assert len(kept) == 5
        assert int(pad[b].sum()) == int((~visual).sum()) + int(fixed.sum()) + 5
        if method != "divprune":  # 1-D ids here are the unpadded columns (DivPrune renumbers them)
            expected = ~visual | fixed
            expected[kept] = True
            assert torch.equal(state.pruned_positions[0, b][pad[b]].cpu(), expected.nonzero().squeeze(1))


def _real_size_adapter():
    """LLaVA-OneVision's real image and video geometry (384 px SigLIP, 36 pinpoints up to
    2304 px, anyres_max_9) around a tiny random model: only the layout is checked."""
    cfg = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=1, image_size=384, patch_size=14, vision_use_head=False),
        text_config=Qwen2Config(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=1,
                                num_key_value_heads=1, vocab_size=len(tiny.OV_WORDS)),
        image_token_index=IMAGE, video_token_index=VIDEO)
    proc = LlavaOnevisionProcessor(image_processor=LlavaOnevisionImageProcessor(),
                                   video_processor=LlavaOnevisionVideoProcessor(),
                                   tokenizer=tiny.tokenizer(tiny.OV_WORDS, {"image_token": "<image>",
                                                                            "video_token": "<video>"}),
                                   num_image_tokens=729, vision_feature_select_strategy="full")
    assert cfg.image_grid_pinpoints == proc.image_processor.image_grid_pinpoints
    return LlavaOnevisionAdapter(LlavaOnevisionForConditionalGeneration(cfg)), proc


@pytest.mark.parametrize("size, placeholders, hires", [
    ((384, 384), 1485, (27, 27)),  # 729 base + 27 rows of 27 + 1 newline
    ((640, 480), 2929, (40, 54)),  # 2x2 tiles 54x54, unpadded to 40x54, under the anyres_max_9 cap
    ((1920, 1080), 7269, (60, 108)),  # 3x5 tiles 81x135, unpadded to 75x135, shrunk by 1.5
])
def test_real_onevision_geometry(size, placeholders, hires):
    adapter, proc = _real_size_adapter()
    out = proc(images=[Image.new("RGB", size)], text=["<image>"], return_tensors="pt")
    ids = out["input_ids"][0]
    assert int((ids == IMAGE).sum()) == placeholders
    layout = adapter.layout(ids, {"image_sizes": out["image_sizes"]})
    rows, cols = layout.grid[1]
    assert layout.grid[0] == (27, 27) and (rows, cols) == hires
    assert len(layout.positions) + rows == placeholders
    clip = proc(videos=[torch.zeros(32, 3, 48, 64, dtype=torch.uint8)], text=["<video>"], return_tensors="pt")
    ids = clip["input_ids"][0]
    assert int((ids == VIDEO).sum()) == 32 * 196 + 1
    layout = adapter.layout(ids, {"pixel_values_videos": clip["pixel_values_videos"]})
    assert layout.grid == (32, 14, 14) and len(layout.positions) == 6272 and layout.frames == 32


def test_from_pretrained_loads_the_family_and_answers_videos(vlm, tmp_path):
    vlm.model.save_pretrained(tmp_path)
    vlm.preprocessor.processor.save_pretrained(tmp_path)
    loaded = PrunedVLM.from_pretrained(str(tmp_path), method="vlm-pruner", keep=5, device="cpu")
    assert type(loaded.adapter) is LlavaOnevisionAdapter
    items, questions = [tiny.video(0, 3), tiny.image(0, SIZES[3])], tiny.QUESTIONS[:2]
    for a, b in zip(loaded.generate(items, questions, max_new_tokens=4), vlm.generate(items, questions, max_new_tokens=4)):
        assert a.token_ids == b.token_ids and a.kept_indices == b.kept_indices and a.frames == b.frames
