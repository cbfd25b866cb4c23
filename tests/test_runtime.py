"""Pruned, batched generation against independent paths, for every supported family."""
import numpy as np
import pytest
import torch
from transformers import DynamicCache

import tiny
from pruner import PrunedVLM
from pruner.methods import METHODS, get_method
from pruner.runtime import ATTENTION, collate, prefill

pytestmark = pytest.mark.timeout(300)
SIZES = [(90, 70), (60, 100), (120, 56)]
IN_LLM = [m for m in METHODS if METHODS[m].stage == "layer"]


@pytest.fixture(scope="module", params=sorted(tiny.FAMILIES))
def family(request):
    model, proc = tiny.FAMILIES[request.param]()
    return model, proc


def samples(n: int):
    return [tiny.image(i, SIZES[i % 3]) for i in range(n)], tiny.QUESTIONS[:n]


def hf_inputs(vlm: PrunedVLM, image, question: str) -> dict:
    proc = vlm.preprocessor.processor
    return proc(images=[image], text=[vlm.adapter.prompt(proc, question)], return_tensors="pt")


def hf_greedy(model, inputs: dict, n: int, eos: int | None = None) -> list[int]:
    extra = {} if eos is None else {"eos_token_id": eos}
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False, **extra)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def our_prefill(vlm: PrunedVLM, image, question: str):
    batch = collate(vlm.adapter, vlm.preprocess([image], [question]), vlm.device)
    with torch.inference_mode():
        return prefill(vlm.adapter, vlm.plan, batch, room=0)


# ---------------------------------------------------------------- 1. equals the family's generate


@pytest.mark.parametrize("method", list(METHODS))
def test_unpruned_equals_the_familys_own_generate(family, method):
    model, proc = family
    vlm = PrunedVLM(model, proc, method=method, keep=None if method == "none" else 100_000)
    images, questions = samples(2)
    outs = vlm.generate(images, questions, max_new_tokens=6)
    for image, question, out in zip(images, questions, outs):
        inputs = hf_inputs(vlm, image, question)
        assert out.token_ids == hf_greedy(model, inputs, 6)
        assert out.image_tokens_kept == out.image_tokens and out.prompt_tokens_kept == out.prompt_tokens
        with torch.no_grad():
            ref = model(**inputs).logits[0, -1]
        ours, _ = our_prefill(vlm, image, question)
        torch.testing.assert_close(ours[0], ref, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- 2. a batch equals its samples alone


@pytest.mark.parametrize("method", list(METHODS))
def test_batch_equals_each_sample_alone(family, method):
    model, proc = family
    vlm = PrunedVLM(model, proc, method=method, keep=None if method == "none" else 5)
    images, questions = samples(3)
    together = vlm.generate(images, questions, max_new_tokens=5)
    for i in range(3):
        alone = vlm.generate(images[i : i + 1], questions[i : i + 1], max_new_tokens=5)[0]
        assert together[i].token_ids == alone.token_ids
        assert together[i].kept_indices == alone.kept_indices
        assert together[i].prompt_tokens_kept == alone.prompt_tokens_kept


def test_rate_applies_per_sample(family):
    model, proc = family
    vlm = PrunedVLM(model, proc, method="vlm-pruner", rate=0.75)
    for out in vlm.generate(*samples(3), max_new_tokens=1):
        assert out.image_tokens_kept == round(out.image_tokens * 0.25)
    nothing = PrunedVLM(model, proc, method="vlm-pruner", rate=0.0).generate(*samples(2), max_new_tokens=1)
    assert all(o.image_tokens_kept == o.image_tokens for o in nothing)


# ---------------------------------------------------------------- 3. an independent slow path


def slow_pruned_greedy(vlm: PrunedVLM, image, question: str, keep: int, steps: int) -> tuple[list[int], torch.Tensor]:
    """No KV cache, batch 1, transformers' own causal attention: prune once from the prompt's
    layer K-1 signals, then for every new token recompute the whole pruned forward."""
    model, adapter, k = vlm.model, vlm.adapter, vlm.prune_layer
    inputs = hf_inputs(vlm, image, question)
    ids = inputs["input_ids"][0]
    prepared = vlm.preprocess([image], [question])[0]
    layout = adapter.layout(prepared.input_ids, prepared.vision)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)[None]
        feats = torch.cat(adapter.image_features(prepared.vision))
        embeds[0, ids == adapter.image_token_id] = feats
        positions = adapter.positions(ids[None], torch.ones_like(ids[None], dtype=torch.bool), prepared.vision)
        text_cols = (ids != adapter.image_token_id).nonzero().squeeze(1)
        selection, tokens, first_logits = None, [], None
        for _ in range(steps):
            new = model.get_input_embeddings()(torch.tensor(tokens, dtype=torch.long))[None]
            h = torch.cat([embeds, new], dim=1)
            n_gen = len(tokens)
            last = positions.amax() + 1
            pos = torch.cat([positions, (last + torch.arange(n_gen)).expand(positions.shape[0], 1, n_gen)], dim=2)
            rope = adapter.rope(h, pos)
            cache = DynamicCache(config=model.config.text_config)
            for i in range(k):
                h = adapter.layers[i](h, attention_mask=None, position_embeddings=rope, cache=cache)
            if selection is None:  # from the prompt alone: pruning happens once, at prefill
                keys = cache.layers[k - 1].keys[0]  # [kv, L, hd]
                cols = layout.positions
                sig = {"keys": keys[:, cols].transpose(0, 1).flatten(1), "hidden": h[0, cols],
                       "hidden_normed": adapter.norm(h[0, cols]),
                       "text_keys": keys[:, text_cols].transpose(0, 1).flatten(1),
                       "text_hidden_normed": adapter.norm(h[0, text_cols])}
                from pruner.methods import Signals
                method = vlm.method
                selection = method.run(Signals(grid=layout.grid, **{n: sig[n] for n in method.needs}), keep)
            kept_cols = layout.positions[selection.indices]
            if selection.merged is not None:
                h[0, kept_cols] = selection.merged
            keep_mask = torch.ones(h.shape[1], dtype=torch.bool)
            keep_mask[layout.positions] = False
            keep_mask[kept_cols] = True
            h, pos = h[:, keep_mask], pos[:, :, keep_mask]
            rope = adapter.rope(h, pos)
            for i in range(k, len(adapter.layers)):
                h = adapter.layers[i](h, attention_mask=None, position_embeddings=rope, cache=None)
            logits = adapter.lm_head(adapter.norm(h[0, -1]))  # [V]
            first_logits = logits if first_logits is None else first_logits
            tokens.append(int(logits.argmax()))
    return tokens, first_logits


@pytest.mark.parametrize("method", ["vlm-pruner", "dart"])
def test_cached_batched_path_equals_the_slow_path(family, method):
    model, proc = family
    vlm = PrunedVLM(model, proc, method=method, keep=5)
    images, questions = samples(3)
    outs = vlm.generate(images, questions, max_new_tokens=6)
    for i in (0, 2):
        tokens, first_logits = slow_pruned_greedy(vlm, images[i], questions[i], 5, 6)
        assert outs[i].token_ids == tokens
        prefill_logits, _ = our_prefill(vlm, images[i], questions[i])
        torch.testing.assert_close(prefill_logits[0], first_logits, atol=1e-4, rtol=0)


def test_fastv_attention_row_matches_eager_attention_weights(family):
    """FastV's row, computed by the runtime under SDPA, equals the head-averaged last row of
    transformers' eager attention weights at layer K-1."""
    model, proc = family
    vlm = PrunedVLM(model, proc, method="fastv", keep=5)
    image, question = samples(1)[0][0], samples(1)[1][0]
    inputs = hf_inputs(vlm, image, question)
    captured = {}

    def keep_weights(module, args, out):
        captured["w"] = out[1]  # [B, H, L, L]

    hook = vlm.adapter.layers[vlm.prune_layer - 1].self_attn.register_forward_hook(keep_weights)
    try:
        model.set_attn_implementation({"text_config": "eager"})
        with torch.no_grad():
            model(**inputs)
    finally:
        model.set_attn_implementation({"text_config": ATTENTION["sdpa"]})  # as PrunedVLM set it
        hook.remove()
    row = captured["w"][0, :, -1].mean(0)  # [L]
    layout = vlm.adapter.layout(inputs["input_ids"][0], vlm.preprocess([image], [question])[0].vision)
    expected = row[layout.positions].topk(5).indices.sort().values.tolist()
    assert vlm.generate([image], [question], max_new_tokens=1)[0].kept_indices == expected


# ---------------------------------------------------------------- 4. what layer K sees


@pytest.mark.parametrize("method", IN_LLM + ["divprune"])
def test_layer_k_input_holds_text_and_exactly_k_image_tokens(family, method):
    model, proc = family
    vlm = PrunedVLM(model, proc, method=method, keep=5)
    images, questions = samples(3)
    prepared = vlm.preprocess(images, questions)
    batch = collate(vlm.adapter, prepared, vlm.device)
    with torch.inference_mode():
        _, state = prefill(vlm.adapter, vlm.plan, batch, room=4)
    width = batch.input_ids.shape[1]
    pruned = state.segments[-1].pad  # [B, L']
    start = state.segments[-1].layers[0]
    assert start == (vlm.prune_layer if method != "divprune" else 0)
    for b, p in enumerate(prepared):
        layout = vlm.adapter.layout(p.input_ids, p.vision)
        n, length = len(layout.positions), len(p.input_ids)
        kept = torch.tensor(state.selections[b].indices.tolist())
        assert len(kept) == 5 and state.prompt_tokens_kept[b] == length - n + 5
        assert int(pruned[b].sum()) == length - n + 5
        keep = torch.ones(length, dtype=torch.bool)
        keep[layout.positions] = False
        keep[layout.positions[kept]] = True
        full = vlm.adapter.positions(p.input_ids[None], torch.ones(1, length, dtype=torch.bool), p.vision)[:, 0]
        expected = full[:, keep]  # original ids of text + kept image tokens, in order
        if method == "divprune":
            expected = vlm.adapter.projector_positions(expected[:, None], torch.ones(1, int(keep.sum()), dtype=torch.bool))[:, 0]
        got = state.pruned_positions[:, b][:, pruned[b]]
        assert torch.equal(got.cpu(), expected)
    for i in range(len(vlm.adapter.layers)):
        below = i < start
        assert state.cache.lengths[i] == (width if below else pruned.shape[1])


# ---------------------------------------------------------------- decoding details


def test_stops_per_sample_on_eos_and_honours_max_new_tokens(family):
    model, proc = family
    vlm = PrunedVLM(model, proc, method="vlm-pruner", keep=5)
    images, questions = samples(3)
    free = vlm.generate(images, questions, max_new_tokens=6)
    stop = free[0].token_ids[2]
    vlm.eos = {stop}
    stopped = vlm.generate(images, questions, max_new_tokens=[6, 6, 3])
    first = free[0].token_ids.index(stop)
    assert stopped[0].token_ids == free[0].token_ids[: first + 1]
    for i in (1, 2):
        ref = free[i].token_ids[: [6, 6, 3][i]]
        if stop in ref:
            ref = ref[: ref.index(stop) + 1]
        assert stopped[i].token_ids == ref and stopped[i].generated_tokens == len(ref)


def test_sampling_is_seeded_and_a_tiny_top_p_is_greedy(family):
    model, proc = family
    vlm = PrunedVLM(model, proc, method="fastv", keep=5)
    images, questions = samples(2)
    greedy = [o.token_ids for o in vlm.generate(images, questions, max_new_tokens=5)]
    a = [o.token_ids for o in vlm.generate(images, questions, max_new_tokens=5, temperature=1.5, seed=3)]
    b = [o.token_ids for o in vlm.generate(images, questions, max_new_tokens=5, temperature=1.5, seed=3)]
    nucleus = vlm.generate(images, questions, max_new_tokens=5, temperature=1.5, top_p=1e-6, seed=4)
    assert a == b
    assert [o.token_ids for o in nucleus] == greedy


# ---------------------------------------------------------------- 5. bad input


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "sparsevlm"}, "unknown method 'sparsevlm'"),
    ({"keep": 0}, "keep must be an int >= 1"),
    ({"keep": 4, "rate": 0.5}, "give keep or rate, not both"),
    ({"rate": 1.0}, "rate must be in [0, 1)"),
    ({"prune_layer": 0}, "prune_layer must be an int in [1, 3]"),
    ({"prune_layer": 4}, "prune_layer must be an int in [1, 3]"),
    ({"method": "fastv", "chunk": 4}, "method 'fastv' has no parameter(s) chunk"),
])
def test_bad_arguments_fail_at_construction(family, kwargs, message):
    model, proc = family
    with pytest.raises(ValueError) as err:
        PrunedVLM(model, proc, **kwargs)
    assert message in str(err.value)


def test_bad_batches_are_clear_errors(family):
    model, proc = family
    vlm = PrunedVLM(model, proc, keep=5)
    image = tiny.image(0)
    for images, questions, message in [
        ([None], ["what ?"], "each question needs a PIL image or a video"),
        ([np.zeros((2, 8, 8, 3))], ["what ?"], "uint8 array [T, H, W, 3]), got array float64 (2, 8, 8, 3)"),
        ([], [], "empty batch"),
        ([image, image], ["what ?"], "got 2 images but 1 questions"),
        ([image], [3], "each question must be a string"),
    ]:
        with pytest.raises(ValueError) as err:
            vlm.generate(images, questions)
        assert message in str(err.value)


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    from transformers import LlamaConfig
    LlamaConfig(num_hidden_layers=1, hidden_size=8, intermediate_size=8, num_attention_heads=1).save_pretrained(tmp_path)
    with pytest.raises(ValueError) as err:
        PrunedVLM.from_pretrained(str(tmp_path))
    assert "unsupported model architecture 'llama'; supported: llava" in str(err.value)
    assert get_method("none").stage == "none"
