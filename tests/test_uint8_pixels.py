"""uint8 pixels between processes: a quarter of the bytes, normalised on the model's side to
the processor's own float32 output, and the same answers."""
import numpy as np
import pytest
import torch

import tiny
from pipeline.stages import deserialize, serialize
from pruner import PrunedVLM
from pruner.vlm import Preprocessor

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("name", sorted(tiny.FAMILIES))
def test_uint8_pixels_normalise_to_the_processors_output_and_answer_the_same(name):
    model, proc = tiny.FAMILIES[name]()
    vlm = PrunedVLM(model, proc, method="vlm-pruner", keep=5, compile=False)
    small = Preprocessor(proc, type(vlm.adapter), uint8=True)
    visuals = [tiny.image(0, (90, 70)), tiny.image(1, (120, 56))]
    if name in tiny.VIDEO_FAMILIES:
        visuals.append(tiny.video(2, 4))
    questions = tiny.QUESTIONS[: len(visuals)]
    for visual, question in zip(visuals, questions):
        full, raw = vlm.preprocessor(visual, question), small(visual, question)
        assert torch.equal(full.input_ids, raw.input_ids)
        for key in vlm.adapter.pixel_keys:
            if key in full.vision:
                assert raw.vision[key].dtype == torch.uint8 and full.vision[key].dtype == torch.float32
                assert len(serialize(raw)) < 0.3 * len(serialize(full))
                normalised = vlm.preprocessor.normalize(deserialize(serialize(raw)).vision)[key]
                torch.testing.assert_close(normalised, full.vision[key], atol=2e-6, rtol=0)
    floats = vlm.generate_prepared(vlm.preprocessor.many(visuals, questions), max_new_tokens=6)
    uint8s = vlm.generate_prepared(small.many(visuals, questions), max_new_tokens=6)
    assert [o.token_ids for o in uint8s] == [o.token_ids for o in floats]
    assert [o.kept_indices for o in uint8s] == [o.kept_indices for o in floats]


def test_float_pixels_pass_through_normalize():
    model, proc = tiny.llava()
    pre = Preprocessor(proc, PrunedVLM(model, proc, compile=False).adapter.__class__)
    vision = pre(tiny.image(0), "what ?").vision
    out = pre.normalize(vision)
    assert all(out[k] is vision[k] for k in vision) and np.isfinite(out["pixel_values"].numpy()).all()


def test_the_gpu_layouts_preprocessing_workers_ship_uint8_pixels(model_dir, tmp_path):
    """A Preparer with its own preprocessor (the CPU workers ahead of GPU actors) serialises
    uint8 pixels; the model actor's own (CPU layout) keeps float32."""
    from pipeline.schema import PREPARED

    table = tiny.table_of(tiny.good_rows(2))
    workers = tiny.preparer(model_dir, str(tmp_path))
    in_actor = tiny.preparer(model_dir, str(tmp_path), Preprocessor.from_pretrained(model_dir))
    shipped = [deserialize(b) for b in workers(table).column(PREPARED).to_pylist()]
    local = [deserialize(b) for b in in_actor(table).column(PREPARED).to_pylist()]
    assert all(s.vision["pixel_values"].dtype == torch.uint8 for s in shipped)
    assert all(s.vision["pixel_values"].dtype == torch.float32 for s in local)
