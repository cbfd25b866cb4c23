"""The demo model's training path (pipeline.demo.train) on a tiny random model: every answer is
trained in exactly the state single-question inference sees, background dropping keeps every
object at its original position, existence questions are balanced between yes and no, and the
shape-ordered caption names shape before colour."""
import random

import pytest
import torch

from pipeline.demo import modeling as M
from pipeline.demo import scenes as S
from pipeline.demo import train as T

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    tok = M.build_tokenizer()
    processor = M.build_processor(tok)
    model = M.build_model(tok, vision_width=32, vision_layers=1, llm_width=64, llm_layers=2).eval()
    return model, processor, T.Encoder(processor)


def _scene_with(n: int, seed: int) -> S.Scene:
    rng = random.Random(seed)
    while len((scene := S.sample_scene(rng, n)).objects) != n:
        pass
    return scene


def _batch(enc: T.Encoder, scene: S.Scene, turns: list[tuple[str, str]]) -> dict:
    b = {k: v[None] for k, v in enc.encode(turns).items()}  # [1, L]
    b["pixel_values"] = M.pixel_values([S.render(scene)])
    b["patch_labels"] = T.scene_patch_labels(scene)[None]  # [1, 576, 3]
    return b


def _answer_logits(model, b: dict, img: torch.Tensor) -> list[torch.Tensor]:
    """Training path (per-turn mask, restarted positions): the logits before each turn's first answer token."""
    ids = b["input_ids"]
    emb = model.model.get_input_embeddings()(ids).masked_scatter((ids == model.config.image_token_index)[..., None], img)
    h = model.model.language_model(inputs_embeds=emb, attention_mask=T.turn_mask(b["segment"], emb.dtype),
                                   position_ids=b["position_ids"]).last_hidden_state
    logits = model.lm_head(h)[0]  # [L, V]
    labels, segment = b["labels"][0], b["segment"][0]
    firsts = [t for t in range(1, len(labels)) if labels[t] != -100 and labels[t - 1] == -100]
    assert [int(segment[t]) for t in firsts] == list(range(1, len(firsts) + 1))
    return [logits[t - 1] for t in firsts]


@torch.no_grad()
def test_each_turn_is_trained_as_a_single_question(setup):
    model, processor, enc = setup
    scene = _scene_with(3, 1)
    rng = random.Random(2)
    turns = [S.questions(scene, rng, t) for t in ("exists", "shape", "size", "caption")]
    b = _batch(enc, scene, turns)
    trained = _answer_logits(model, b, M.image_features(model, b["pixel_values"]))
    for (question, _), got in zip(turns, trained, strict=True):
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            add_generation_prompt=True)
        want = model(**processor(images=[S.render(scene)], text=[prompt], return_tensors="pt")).logits[0, -1]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_dropping_background_keeps_every_object_in_place(setup):
    model, _, enc = setup
    scene = _scene_with(5, 3)
    b = _batch(enc, scene, [("list the objects.", S.caption(scene))])
    img = M.image_features(model, b["pixel_values"])  # [1, 576, D]
    obj = (b["patch_labels"][0, :, 0] > 0).nonzero()[:, 0]  # grid indices of object patches
    kept, kept_img = T.drop_background(b, img, 40, enc.image_id, seed=0)
    is_img = kept["input_ids"][0] == enc.image_id
    assert int(is_img.sum()) == 40 and kept_img.shape == (1, 40, img.shape[-1])
    grid = kept["position_ids"][0][is_img] - int(b["position_ids"][0][b["input_ids"][0] == enc.image_id][0])
    assert set(obj.tolist()) <= set(grid.tolist())  # every object patch kept ...
    assert torch.equal(grid, grid.sort().values)  # ... in grid order, at its original position
    torch.testing.assert_close(kept_img[0], img[0, grid])
    text = ~(b["input_ids"][0] == enc.image_id)
    for key in ("input_ids", "labels", "segment", "position_ids"):  # text untouched
        assert torch.equal(kept[key][0][~is_img], b[key][0][text])
    full, full_img = T.drop_background(b, img, 576, enc.image_id, seed=0)
    assert torch.equal(full["input_ids"], b["input_ids"]) and torch.equal(full_img, img)


def test_existence_questions_are_balanced():
    """A scene has few yes-questions and many no-questions; unbalanced, the model learnt "no"."""
    rng = random.Random(0)
    for _ in range(50):
        answers = [a for q, a in T.sample_turns(S.sample_scene(rng), rng, 14) if q.startswith("is there")]
        assert abs(answers.count("yes") - answers.count("no")) <= 1, answers


def test_shape_ordered_caption_names_shape_then_colour():
    objs = [S.Obj("square", "red", "small", 7, 7, 6), S.Obj("circle", "blue", "large", 56, 56, 11),
            S.Obj("square", "green", "large", 112, 112, 11)]
    assert T.by_shape(S.Scene((255, 255, 255), tuple(objs))) == "circle blue, square red, square green"
