"""Video questions on every family that takes video (LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL):
equal to the family's own generate, batches of mixed images and clips of different lengths
equal to their samples alone, exact budgets over the whole clip, positions kept."""
import numpy as np
import pytest
import torch
from PIL import Image

import tiny
from pruner import PrunedVLM
from pruner.methods import METHODS
from pruner.runtime import _layer_signals, collate

pytestmark = pytest.mark.timeout(300)
# a mixed batch: clips of 4 and 2 frames between images of two sizes
ITEMS = [("video", 4, (90, 70)), ("image", 0, (90, 70)), ("video", 2, (60, 100)), ("image", 0, (60, 100))]
QUESTIONS = tiny.QUESTIONS[:4]


def visual(kind: str, frames: int, size: tuple[int, int], seed: int):
    return tiny.video(seed, frames, size) if kind == "video" else tiny.image(seed, size)


def batch_items():
    return [visual(kind, t, size, i) for i, (kind, t, size) in enumerate(ITEMS)]


def hf_inputs(vlm: PrunedVLM, item, question: str) -> dict:
    """The processor's own inputs for one sample, every frame kept."""
    proc, video = vlm.preprocessor.processor, isinstance(item, np.ndarray)
    media = {"videos": [item], "do_sample_frames": False} if video else {"images": [item]}
    return proc(text=[vlm.adapter.prompt(proc, question, "video" if video else "image")], return_tensors="pt", **media)


@pytest.fixture(scope="module", params=tiny.VIDEO_FAMILIES)
def family(request):
    """(model, processor, HF's greedy 6 tokens for each item of the batch, alone)."""
    model, proc = tiny.FAMILIES[request.param]()
    vlm = PrunedVLM(model, proc, method="none")
    refs = []
    for item, question in zip(batch_items(), QUESTIONS):
        inputs = hf_inputs(vlm, item, question)
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        refs.append(out[0, inputs["input_ids"].shape[1]:].tolist())
    return model, proc, refs


@pytest.mark.parametrize("method", list(METHODS))
def test_unpruned_equals_the_familys_own_generate_for_a_mixed_batch(family, method):
    model, proc, refs = family
    vlm = PrunedVLM(model, proc, method=method, keep=None if method == "none" else 100_000)
    outs = vlm.generate(batch_items(), QUESTIONS, max_new_tokens=6)
    for (kind, frames, _), out, ref in zip(ITEMS, outs, refs):
        assert out.token_ids == ref
        assert out.image_tokens_kept == out.image_tokens > 0
        assert out.frames == (frames if kind == "video" else 0)


@pytest.mark.parametrize("method", list(METHODS))
def test_a_mixed_batch_equals_each_sample_alone(family, method):
    model, proc, _ = family
    vlm = PrunedVLM(model, proc, method=method, keep=None if method == "none" else 5)
    items = batch_items()
    together = vlm.generate(items, QUESTIONS, max_new_tokens=5)
    for i in range(len(items)):
        alone = vlm.generate(items[i : i + 1], QUESTIONS[i : i + 1], max_new_tokens=5)[0]
        assert together[i].token_ids == alone.token_ids
        assert together[i].kept_indices == alone.kept_indices
        assert together[i].prompt_tokens_kept == alone.prompt_tokens_kept
        assert together[i].flops == alone.flops


@pytest.mark.parametrize("method", [m for m in METHODS if m != "none"])
def test_every_method_keeps_exactly_its_budget_over_the_whole_clip(family, method):
    model, proc, _ = family
    for budget, expected in [({"keep": 7}, lambda n: 7), ({"rate": 0.75}, lambda n: round(n * 0.25))]:
        vlm = PrunedVLM(model, proc, method=method, **budget)
        for out in vlm.generate(batch_items(), QUESTIONS, max_new_tokens=1):
            assert len(out.kept_indices) == out.image_tokens_kept == expected(out.image_tokens)
            assert sorted(set(out.kept_indices)) == out.kept_indices
            assert out.prompt_tokens - out.prompt_tokens_kept == out.image_tokens - out.image_tokens_kept


@pytest.mark.parametrize("method", [m for m in METHODS if m != "none"])
def test_layer_k_sees_text_unprunable_visual_tokens_and_the_kept_ones_at_their_positions(family, method):
    """After pruning, each sample holds its text, every visual placeholder that is not
    prunable (OneVision's newlines), and exactly the kept tokens, with their original
    position ids (3-D for Qwen; DivPrune on 1-D positions renumbers, as its reference)."""
    model, proc, _ = family
    vlm = PrunedVLM(model, proc, method=method, keep=5)
    prepared, state, pad = tiny.prefilled(vlm, batch_items(), QUESTIONS)
    for b, p in enumerate(prepared):
        layout = vlm.adapter.layout(p.input_ids, p.vision)
        keep = torch.ones(len(p.input_ids), dtype=torch.bool)
        keep[layout.positions] = False
        keep[layout.positions[state.selections[b].indices.cpu()]] = True
        full = vlm.adapter.positions(p.input_ids[None], torch.ones(1, len(p.input_ids), dtype=torch.bool), p.vision)
        expected = full[:, 0][:, keep]
        if method == "divprune":
            expected = vlm.adapter.projector_positions(expected[:, None], torch.ones(1, int(keep.sum()),
                                                                                    dtype=torch.bool))[:, 0]
        assert torch.equal(state.pruned_positions[:, b][:, pad[b]].cpu(), expected)
        assert int(pad[b].sum()) == len(p.input_ids) - len(layout.positions) + 5


def test_video_placeholders_are_never_text(family):
    """DART's text signals hold exactly the text tokens: no image or video placeholder (nor
    OneVision's newlines, which carry the placeholder ids), whatever the sample's kind."""
    model, proc, _ = family
    vlm = PrunedVLM(model, proc, method="dart", keep=5)
    prepared = vlm.preprocess(batch_items(), QUESTIONS)
    batch = collate(vlm.adapter, prepared, vlm.device)
    b, width, d = batch.embeds.shape
    keys = torch.arange(b * width, dtype=torch.float).view(b, 1, width, 1)  # key = column id
    signals = _layer_signals(vlm.adapter, batch, batch.embeds, keys, [])
    placeholder_ids = torch.tensor([model.config.image_token_id, model.config.video_token_id])
    for i, p in enumerate(prepared):
        text = ~torch.isin(p.input_ids, placeholder_ids)
        columns = text.nonzero().squeeze(1) + width - len(p.input_ids) + i * width
        assert torch.equal(signals["text_keys"](i, None)[:, 0], columns.float())


def test_a_video_is_a_list_of_frames_or_a_uint8_array(family):
    model, proc, _ = family
    vlm = PrunedVLM(model, proc, method="vlm-pruner", keep=5)
    clip = tiny.video(0, 4)
    frames = [Image.fromarray(f) for f in clip]
    a, b = vlm.preprocess([clip, frames], ["what ?"] * 2)
    assert torch.equal(a.input_ids, b.input_ids)
    assert a.vision.keys() == b.vision.keys() and all(torch.equal(a.vision[k], b.vision[k]) for k in a.vision)
    with pytest.raises(ValueError, match="a video's frames must share one size"):
        vlm.preprocess([[frames[0], frames[1].resize((60, 60))]], ["what ?"])


@pytest.mark.parametrize("name", ["llava", "llava_next"])
def test_image_only_families_name_themselves_when_given_a_video(name):
    model, proc = tiny.FAMILIES[name]()
    vlm = PrunedVLM(model, proc, method="none")
    with pytest.raises(ValueError, match=f"the {name} family takes images only, not video"):
        vlm.generate([tiny.video(0, 2)], ["what ?"])
