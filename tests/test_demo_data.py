"""The built-in demo: the scene generator, the committed eval split and the committed model."""

from __future__ import annotations

import io
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.compare.answers import normalize_answer
from pipeline.demo import EVAL_PARQUET, MODEL_DIR
from pipeline.demo import scenes as S

COLUMNS = ["id", "image", "question", "answer_gt", "question_type"]
# Unpruned exact match of the committed model on the last 50 eval rows (rows 0-99 pick the
# checkpoint during training): the bar the committed model was trained to clear.
MIN_MODEL_ACCURACY = 0.80


def test_same_seed_same_bytes():
    a, b = S.generate(7, 12), S.generate(7, 12)
    assert a == b
    assert [r["image"] for r in a] != [r["image"] for r in S.generate(8, 12)]
    assert set(a[0]) == set(COLUMNS)


def _answer_from_scene(scene: S.Scene, question: str) -> str:
    """An independent reading of each question template against the scene description."""
    objs = scene.objects
    if m := re.fullmatch(r"is there a (\w+) (\w+)\?", question):
        return "yes" if any((o.color, o.shape) == m.groups() for o in objs) else "no"
    if m := re.fullmatch(r"what color is the (\w+)\?", question):
        (o,) = [o for o in objs if o.shape == m[1]]
        return o.color
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        (o,) = [o for o in objs if o.color == m[1]]
        return o.shape
    if m := re.fullmatch(r"what size is the (\w+) (\w+)\?", question):
        (o,) = [o for o in objs if (o.color, o.shape) == m.groups()]
        return o.size
    assert question == "list the objects."
    order = {c: i for i, c in enumerate(S.COLORS)}
    return ", ".join(f"{o.color} {o.shape}" for o in sorted(objs, key=lambda o: order[o.color]))


def test_answers_match_scenes():
    samples = list(S.samples(3, 200))
    assert {t for _, t, _, _ in samples} == set(S.QUESTION_TYPES)
    assert {a for _, t, _, a in samples if t == "exists"} == {"yes", "no"}
    for scene, _, q, a in samples:
        assert _answer_from_scene(scene, q) == a, (scene, q, a)


def test_images_match_scenes():
    """Object centres carry the object's colour; small objects sit near an edge."""
    for scene, *_ in S.samples(4, 30):
        px = np.asarray(S.render(scene))
        assert len({o.color for o in scene.objects}) == len(scene.objects)
        for o in scene.objects:
            assert tuple(px[o.cy, o.cx]) == S.COLORS[o.color]
            if o.size == "small":
                assert min(o.cx, o.cy, S.IMAGE_SIZE - o.cx, S.IMAGE_SIZE - o.cy) <= S.EDGE_BAND
        labels = S.patch_labels(scene)  # [24, 24]
        assert labels.shape == (S.GRID, S.GRID)
        for i, o in enumerate(scene.objects):
            assert labels[o.cy // S.PATCH, o.cx // S.PATCH] == i


def test_objects_sit_on_the_patch_grid():
    """A small object fills one patch, a large one a 2x2 block, and no patch holds two objects:
    every patch an object touches shows a distinctive piece of its outline."""
    for scene, *_ in S.samples(6, 60):
        labels = S.patch_labels(scene)  # [24, 24]
        for i, o in enumerate(scene.objects):
            rows, cols = np.nonzero(labels == i)
            if o.size == "small":
                assert len(rows) == 1 and (rows[0], cols[0]) == (o.cy // S.PATCH, o.cx // S.PATCH)
            else:
                assert len(rows) == 4 and np.ptp(rows) == 1 and np.ptp(cols) == 1, (o, rows, cols)
        pixels = np.asarray(S.render(scene))  # every object's colour appears: none is hidden
        assert all((pixels == S.COLORS[o.color]).all(-1).sum() >= 40 for o in scene.objects)


def test_committed_eval_split_is_the_generator_output():
    table = pq.read_table(EVAL_PARQUET)
    assert table.column_names == COLUMNS
    assert 900 <= table.num_rows <= 1100
    rows = table.slice(0, 40).to_pylist()
    for r, g in zip(rows, S.generate(1, 40)):
        assert {k: r[k] for k in COLUMNS if k != "image"} == {k: g[k] for k in COLUMNS if k != "image"}
        # Compare pixels, not bytes: PNG compression may differ between zlib versions.
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(r["image"]))), np.asarray(Image.open(io.BytesIO(g["image"]))))


def test_write_hf_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = S.generate(5, 4)
    S.write(rows, tmp_path / "ds", "hf")
    ds = datasets.load_from_disk(str(tmp_path / "ds"))
    assert ds.column_names == COLUMNS
    assert isinstance(ds[0]["image"], Image.Image)
    assert np.array_equal(np.asarray(ds[2]["image"]), np.asarray(Image.open(io.BytesIO(rows[2]["image"]))))
    S.write(rows, tmp_path / "x.parquet")
    assert pq.read_table(tmp_path / "x.parquet").to_pylist() == rows


def test_tokenizer_decodes_text_as_written():
    """Decoding gives the dataset's own text ("orange square, yellow cross"), with the token ids
    the committed model was trained on; a freshly built tokenizer decodes the same way."""
    from transformers import AutoProcessor

    from pipeline.demo.modeling import build_tokenizer

    tok = AutoProcessor.from_pretrained(MODEL_DIR).tokenizer
    caption = "orange square, yellow cross, blue cross, purple triangle"
    ids = tok(caption, add_special_tokens=False)["input_ids"]
    assert ids == [20, 26, 35, 31, 12, 35, 9, 12, 35, 21, 29]
    assert tok.decode(ids) == caption
    assert build_tokenizer().decode(ids) == caption
    question = tok("Is there a red circle?")["input_ids"]
    assert tok.decode(question, skip_special_tokens=True) == "is there a red circle?"
    answers = pq.read_table(EVAL_PARQUET, columns=["answer_gt"]).column(0).to_pylist()
    decoded = tok.batch_decode(tok(answers, add_special_tokens=False)["input_ids"])
    assert decoded == answers


def test_normalize_answer():
    assert normalize_answer(" Red circle, Blue  square.") == "red circle blue square"


@pytest.mark.slow
def test_committed_model_answers_eval_slice():
    """Loads like any llava-hf checkpoint; answers through PrunedVLM, unpruned."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from pruner import PrunedVLM

    assert sum(f.stat().st_size for f in MODEL_DIR.iterdir()) <= 30 * 2**20
    LlavaForConditionalGeneration.from_pretrained(MODEL_DIR, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(MODEL_DIR)
    rows = pq.read_table(EVAL_PARQUET).to_pylist()[-50:]
    images = [Image.open(io.BytesIO(r["image"])).convert("RGB") for r in rows]
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": rows[0]["question"]}]}],
        add_generation_prompt=True)
    inputs = processor(images=images[:1], text=[prompt], return_tensors="pt")
    assert (inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum() == 576  # 24x24

    vlm = PrunedVLM.from_pretrained(str(MODEL_DIR), method="none")
    preds = []
    for i in range(0, len(rows), 25):
        preds += [g.text for g in vlm.generate(images[i:i + 25], [r["question"] for r in rows[i:i + 25]],
                                               max_new_tokens=24)]
    hits = [normalize_answer(p) == normalize_answer(r["answer_gt"]) for p, r in zip(preds, rows)]
    assert np.mean(hits) >= MIN_MODEL_ACCURACY, list(zip(preds, [r["answer_gt"] for r in rows]))
