"""What is special to Qwen2-VL / Qwen2.5-VL: the merged grid, 3-D M-RoPE ids, kept tokens
keeping their ids after pruning, and decode positions from the rope offset."""
import pytest
import torch

import tiny
from pruner import PrunedVLM
from pruner.runtime import collate, generate_tokens

pytestmark = pytest.mark.timeout(300)
# image size (w, h) -> image_grid_thw the processor makes, and the merged grid the LLM sees
KNOWN = {(90, 70): ((1, 8, 10), (4, 5)), (60, 100): ((1, 12, 8), (6, 4)), (120, 56): ((1, 6, 12), (3, 6))}
SIZES = list(KNOWN)


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def family(request):
    return tiny.FAMILIES[request.param]()


def samples(n: int):
    return [tiny.image(i, SIZES[i % 3]) for i in range(n)], tiny.QUESTIONS[:n]


def hf_inputs(vlm: PrunedVLM, images, questions) -> dict:
    """The processor's own batch, left-padded as for batched generation."""
    proc = vlm.preprocessor.processor
    return proc(images=images, text=[vlm.adapter.prompt(proc, q) for q in questions], return_tensors="pt",
                padding=True, padding_side="left")


def expected_ids(length: int, start: int, grid: tuple[int, int]) -> torch.Tensor:
    """M-RoPE ids [3, length] of one prompt: text, an image of `grid` tokens at `start`, text."""
    h, w = grid
    text_before = torch.arange(start).expand(3, -1)
    rows, cols = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
    image = torch.stack([torch.zeros(h * w, dtype=torch.long), rows, cols]) + start
    after = length - start - h * w
    text_after = (start + max(h, w) + torch.arange(after)).expand(3, -1)
    return torch.cat([text_before, image, text_after], dim=1)


def test_layout_is_the_merged_grid(family):
    model, proc = family
    vlm = PrunedVLM(model, proc, method="none")
    images, questions = samples(3)
    for image, size, p in zip(images, SIZES, vlm.preprocess(images, questions)):
        thw, grid = KNOWN[size]
        assert p.vision["image_grid_thw"].tolist() == [list(thw)]
        layout = vlm.adapter.layout(p.input_ids, p.vision)
        assert layout.grid == grid == (thw[1] // 2, thw[2] // 2)
        n = grid[0] * grid[1]
        assert len(layout.positions) == n
        start = int(layout.positions[0])
        assert layout.positions.tolist() == list(range(start, start + n))
        assert (p.input_ids[layout.positions] == model.config.image_token_id).all()
        assert vlm.adapter.image_features(vlm.adapter.collate_vision([p]))[0].shape[0] == n


def test_positions_are_transformers_rope_index(family):
    model, proc = family
    vlm = PrunedVLM(model, proc, method="none")
    images, questions = samples(3)
    prepared = vlm.preprocess(images, questions)
    batch = collate(vlm.adapter, prepared, vlm.device)  # left-padded
    width = batch.input_ids.shape[1]
    for b, (image, question, p) in enumerate(zip(images, questions, prepared)):
        inputs = hf_inputs(vlm, [image], [question])  # one sample, no padding
        ref, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                            image_grid_thw=inputs["image_grid_thw"])
        ours = vlm.adapter.positions(p.input_ids[None], torch.ones(1, len(p.input_ids), dtype=torch.bool), p.vision)
        assert torch.equal(ours, ref)
        layout = vlm.adapter.layout(p.input_ids, p.vision)
        assert torch.equal(ours[:, 0], expected_ids(len(p.input_ids), int(layout.positions[0]), layout.grid))
        # in the padded batch each sample keeps its own ids; padding holds 0
        offset = width - len(p.input_ids)
        assert torch.equal(batch.positions[:, b, offset:], ours[:, 0])
        assert not batch.positions[:, b, :offset].any()


@pytest.mark.parametrize("method", ["vlm-pruner", "fastv", "dart", "divprune"])
def test_kept_image_tokens_keep_their_3d_ids(family, method):
    model, proc = family
    vlm = PrunedVLM(model, proc, method=method, keep=5)
    prepared, state, pruned = tiny.prefilled(vlm, *samples(3))
    for b, p in enumerate(prepared):
        layout = vlm.adapter.layout(p.input_ids, p.vision)
        start, (h, w) = int(layout.positions[0]), layout.grid
        full = expected_ids(len(p.input_ids), start, layout.grid)
        kept = state.selections[b].indices
        assert len(kept) == 5
        got = state.pruned_positions[:, b][:, pruned[b]]  # [3, L - N + 5]
        # text before, the 5 kept image tokens at their (row, col), text after unshifted
        assert torch.equal(got[:, :start], full[:, :start])
        rows, cols = kept // w, kept % w
        assert torch.equal(got[:, start : start + 5], torch.stack([torch.zeros_like(rows), rows, cols]) + start)
        assert torch.equal(got[:, start + 5 :], full[:, start + h * w :])
        # decoding continues after the unpruned prompt's largest id
        assert int(state.next_position[b]) == int(full.max()) + 1


@pytest.mark.parametrize("method", ["none", "vlm-pruner"])
def test_decode_positions_are_transformers_rope_delta_rule(family, method):
    """Per decode step, our M-RoPE ids equal those transformers' generate uses on the same
    left-padded batch (text position + rope_delta), pruned or not."""
    model, proc = family
    images, questions = samples(3)
    steps = 3
    vlm = PrunedVLM(model, proc, method="none")
    inputs = hf_inputs(vlm, images, questions)
    theirs = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: theirs.append(kwargs["position_ids"][-3:]), with_kwargs=True)
    try:
        model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    finally:
        hook.remove()
    real = inputs["attention_mask"].bool()
    lengths = real.sum(dim=1)
    deltas = model.model.rope_deltas[:, 0]

    vlm = PrunedVLM(model, proc, method=method, keep=None if method == "none" else 5)
    batch = collate(vlm.adapter, vlm.preprocess(images, questions), vlm.device)
    assert torch.equal(batch.pad.cpu(), real)  # same left padding as the processor's
    assert torch.equal(batch.positions[:, real], theirs[0].expand(3, -1, -1)[:, real])
    ours, rope = [], vlm.adapter.rope
    vlm.adapter.rope = lambda x, positions: (ours.append(positions), rope(x, positions))[1]
    try:
        with torch.inference_mode():
            generate_tokens(vlm.adapter, vlm.plan, batch, [steps] * 3, eos=set())
    finally:
        del vlm.adapter.rope
    decode = [p for p in ours if p.shape[2] == 1]
    assert len(decode) == len(theirs) - 1 == steps - 1
    for step, (mine, ref) in enumerate(zip(decode, theirs[1:])):
        assert torch.equal(mine, ref.expand(3, -1, -1))
        assert torch.equal(mine[0, :, 0], lengths + step + deltas)  # rope_delta = max(ids) + 1 - length


def test_video_positions_are_transformers_rope_index(family):
    """A batch mixing clips (4 and 6 frames: 2 and 3 temporal patches) with an image: each
    sample's 3-D ids in the padded batch equal `get_rope_index` on the processor's own
    inputs for it alone (Qwen2.5-VL: with its second_per_grid_ts), and a clip's ids are
    (start + time, start + row, start + col) on the merged (t, h, w) grid."""
    model, proc = family
    vlm = PrunedVLM(model, proc, method="none")
    items = [tiny.video(0, 4), tiny.image(1, SIZES[1]), tiny.video(2, 6, (60, 100))]
    questions = tiny.QUESTIONS[:3]
    prepared = vlm.preprocess(items, questions)
    batch = collate(vlm.adapter, prepared, vlm.device)
    width = batch.input_ids.shape[1]
    for b, (item, question, p) in enumerate(zip(items, questions, prepared)):
        video = b != 1
        media = {"videos": [item], "do_sample_frames": False} if video else {"images": [item]}
        inputs = proc(text=[vlm.adapter.prompt(proc, question, "video" if video else "image")], return_tensors="pt",
                      **media)
        grids = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in inputs}
        ref, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], **grids)
        offset = width - len(p.input_ids)
        assert torch.equal(batch.positions[:, b, offset:], ref[:, 0])
        if not video:
            continue
        layout = vlm.adapter.layout(p.input_ids, p.vision)
        t, h, w = layout.grid
        assert (t, layout.frames) == (len(item) // 2, len(item))
        ids = ref[:, 0, layout.positions] - ref[0, 0, layout.positions[0]]  # [3, t*h*w] from the clip's start
        times = ids[0].view(t, h * w)
        assert (times == times[:, :1]).all() and (times[1:, 0] > times[:-1, 0]).all()
        assert torch.equal(ids[1], torch.arange(h).repeat_interleave(w).repeat(t))
        assert torch.equal(ids[2], torch.arange(w).repeat(h * t))
