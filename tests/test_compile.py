"""Compiled decode (and the compiled prefill of the layers after a selection) against
eager, on tiny random models in float32 on the CPU.

`torch.compile` on two cores takes 10-40 s a graph, so the graphs are few and shared: one
compiled `Decoder` serves a whole model (dynamo keeps its code per segment structure, so
one graph serves unpruned and projector-stage pruning, one every in-LLM method; the
compiled prefill adds one for each stage), and the same compiled code serves every batch
size and prompt length (checked below)."""
from contextlib import contextmanager

import pytest
import torch
from torch._dynamo.utils import counters

import tiny
from pruner import PrunedVLM
from pruner.methods import METHODS
from pruner.runtime import Decoder, batch_bucket, bucket, collate, generate_tokens, prefill

pytestmark = pytest.mark.timeout(900)
SIZES = [(90, 70), (60, 100), (120, 56)]


@pytest.fixture(autouse=True)
def loud_recompile_limit():
    """Past dynamo's recompile limit a compiled function silently runs eager, which would
    make compiled-against-eager comparisons pass for nothing: fail instead."""
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield


@pytest.fixture(scope="module")
def llava():
    return tiny.llava()


@pytest.fixture(scope="module")
def compiled():
    """A compiled decoder on the batch's own shapes (as on a CPU), and one shaped as for
    CUDA graphs: the batch padded to a power of two, capacities and kept prompts rounded by
    `bucket`, and the prefill's layers after a selection compiled too."""
    return Decoder(compiled=True), Decoder(compiled=True, buckets=True, prefill=True)


def pair(model, proc, method: str, decoder: Decoder, **kw) -> tuple[PrunedVLM, PrunedVLM]:
    budget = {} if method == "none" else {"keep": 5}
    eager = PrunedVLM(model, proc, method=method, compile=False, **budget, **kw)
    fast = PrunedVLM(model, proc, method=method, compile=False, **budget, **kw)
    fast.decoder = decoder
    return eager, fast


def items(n: int, video_at: int | None = None) -> tuple[list, list[str]]:
    """n images of mixed sizes (so, for the families that keep the aspect, mixed prompt
    lengths) and questions of mixed lengths; a 4-frame video at `video_at`."""
    visuals = [tiny.image(i, SIZES[i % 3]) for i in range(n)]
    if video_at is not None:
        visuals[video_at] = tiny.video(video_at, 4)
    return visuals, [tiny.QUESTIONS[i % 5] for i in range(n)]


def assert_same(a, b) -> None:
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.kept_indices for o in a] == [o.kept_indices for o in b]
    assert any(len(o.token_ids) > 1 for o in a)  # something was decoded


# ---------------------------------------------------------------- every method, every bucket


@pytest.mark.parametrize("method", list(METHODS))
def test_compiled_equals_eager_for_every_method_and_batch_size(llava, compiled, method):
    """Greedy tokens of compiled decode equal eager's for batches of 1 (run as 2 rows), 3
    and 5 (padded to 4 and 8 rows with buckets), on the batch's exact shapes and bucketed;
    bucketed, the prefill's layers after the selection are compiled too (mixed prompt
    lengths in every batch)."""
    model, proc = llava
    for decoder in compiled:
        eager, fast = pair(model, proc, method, decoder)
        for n in (1, 3, 5):
            visuals, questions = items(n)
            assert_same(eager.generate(visuals, questions, max_new_tokens=7),
                        fast.generate(visuals, questions, max_new_tokens=7))


def test_one_compilation_serves_every_batch_size_and_prompt_length(llava, compiled):
    model, proc = llava
    eager, fast = pair(model, proc, "vlm-pruner", compiled[1])
    fast.generate(*items(2), max_new_tokens=3)  # compiled (or already, by the test above)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1  # it did compile
    for n, new in ((3, 9), (6, 20), (7, 2)):  # 4 and 8 rows; capacities from 2 to 20 steps past the prompt
        visuals, questions = items(n)
        assert_same(eager.generate(visuals, questions, max_new_tokens=new),
                    fast.generate(visuals, questions, max_new_tokens=new))
    assert counters["stats"]["unique_graphs"] == graphs


def test_nearby_kept_lengths_share_one_compiled_prefill_shape(llava, compiled, monkeypatch):
    """The compiled prefill runs the kept prompt padded to its length's bucket: batches whose
    kept prompts differ by a few tokens run one shape (on CUDA, one captured graph), compile
    nothing new, and give eager's logits. The observer still sees each segment."""
    model, proc = llava
    decoder = compiled[1]
    vlm = PrunedVLM(model, proc, method="vlm-pruner", keep=5, compile=False)
    shapes = []
    compiled_prefill = decoder.compiled_prefill

    def spy(adapter, layers, h, pad, positions):
        shapes.append(tuple(h.shape[:2]))  # [R, W]
        return compiled_prefill(adapter, layers, h, pad, positions)

    monkeypatch.setattr(decoder, "compiled_prefill", spy)
    words = [f"w{i}" for i in range(20)]
    questions = [" ".join(words[:k]) for k in (9, 12, 16)]  # 17 to 24 kept tokens: bucket 32
    graphs, widths = None, set()
    for n, question in enumerate(questions, 1):
        samples = vlm.preprocess([tiny.image(i) for i in range(2)], [question, "w1 w2 ?"])
        seen = []

        @contextmanager
        def observer(segment, **info):
            seen.append((segment, info.get("layers")))
            yield

        with torch.inference_mode():
            batch = collate(vlm.adapter, samples, vlm.device)
            want, _ = prefill(vlm.adapter, vlm.plan, batch, room=3)
            got, state = prefill(vlm.adapter, vlm.plan, batch, room=3, observer=observer, decoder=decoder)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert [s for s in seen if s[0] == "layers"] == [("layers", range(0, 2)), ("layers", range(2, 4))]
        widths.add(max(state.prompt_tokens_kept))
        if n == 1:
            graphs = counters["stats"]["unique_graphs"]
    assert len(widths) == 3 and all(17 <= w <= 32 for w in widths)
    assert shapes == [(2, 32)] * 3
    assert counters["stats"]["unique_graphs"] == graphs


def test_seeded_sampling_is_the_same_compiled(llava, compiled):
    model, proc = llava
    eager, fast = pair(model, proc, "fastv", compiled[0])
    visuals, questions = items(3)
    a = eager.generate(visuals, questions, max_new_tokens=6, temperature=1.5, seed=3)
    b = fast.generate(visuals, questions, max_new_tokens=6, temperature=1.5, seed=3)
    assert_same(a, b)
    other = fast.generate(visuals, questions, max_new_tokens=6, temperature=1.5, seed=4)
    assert [o.token_ids for o in other] != [o.token_ids for o in b]


def test_stops_at_eos_and_per_sample_limits_compiled(llava, compiled):
    """Tokens after a sample's EOS are dropped as in eager decode, whichever step notices."""
    model, proc = llava
    eager, fast = pair(model, proc, "dart", compiled[1])
    visuals, questions = items(3)
    free = eager.generate(visuals, questions, max_new_tokens=8)
    eager.eos = fast.eos = {free[1].token_ids[2]}
    limits = [8, 8, 3]
    assert_same(eager.generate(visuals, questions, max_new_tokens=limits),
                fast.generate(visuals, questions, max_new_tokens=limits))
    stopped = fast.generate(visuals, questions, max_new_tokens=limits)
    assert stopped[1].token_ids == free[1].token_ids[:3] and len(stopped[2].token_ids) <= 3


# ---------------------------------------------------------------- every family, images and video


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(tiny.FAMILIES))
def test_compiled_equals_eager_for_every_family(name):
    """Unpruned and VLM-Pruner (the two segment structures), a batch of images of mixed
    sizes and, for the families that take video, a video among them."""
    model, proc = tiny.FAMILIES[name]()
    decoder = Decoder(compiled=True, buckets=True)
    video_at = 1 if name in tiny.VIDEO_FAMILIES else None
    for method in ("none", "vlm-pruner"):
        eager, fast = pair(model, proc, method, decoder)
        visuals, questions = items(3, video_at)
        assert_same(eager.generate(visuals, questions, max_new_tokens=6),
                    fast.generate(visuals, questions, max_new_tokens=6))


# ---------------------------------------------------------------- shapes and arguments (no compiling)


def test_reused_cache_buffers_hold_nothing_of_the_batch_before(llava):
    """As under CUDA graphs: bucketed shapes and cache buffers kept from batch to batch. A
    batch after one with longer prompts (stale keys past its own prompts) and more rows
    answers as eager does, in the same buffers."""
    model, proc = llava
    eager, reused = pair(model, proc, "dart", Decoder(buckets=True, reuse=True))
    long = [tiny.image(i) for i in range(4)], [tiny.QUESTIONS[4], tiny.QUESTIONS[1], tiny.QUESTIONS[4], "left ?"]
    short = [tiny.image(i + 4) for i in range(3)], ["left ?", tiny.QUESTIONS[0], "what ?"]
    assert_same(eager.generate(*long, max_new_tokens=10), reused.generate(*long, max_new_tokens=10))
    before = dict(reused.decoder.buffers)
    assert_same(eager.generate(*short, max_new_tokens=10), reused.generate(*short, max_new_tokens=10))
    kept = [k for k in reused.decoder.buffers if k in before]
    assert kept and all(reused.decoder.buffers[k] is before[k] for k in kept)


def test_buckets():
    assert [bucket(n) for n in (1, 16, 17, 100, 129, 673, 1000, 1025, 5000)] == \
        [16, 16, 32, 112, 144, 704, 1024, 1088, 5120]
    assert all(n <= bucket(n) <= n * 17 / 16 for n in range(256, 5000, 7))
    assert [batch_bucket(b) for b in (1, 2, 3, 5, 8, 9, 32)] == [1, 2, 4, 8, 8, 16, 32]


def test_eos_checked_every_few_steps_drops_the_same_tokens(llava):
    model, proc = llava
    vlm = PrunedVLM(model, proc, method="vlm-pruner", keep=5, compile=False)
    samples = vlm.preprocess(*items(3))
    batch = collate(vlm.adapter, samples, vlm.device)
    with torch.inference_mode():
        free, _ = generate_tokens(vlm.adapter, vlm.plan, batch, [9, 9, 9], set())
        eos = {free[0][1], free[2][4]}
        every, _ = generate_tokens(vlm.adapter, vlm.plan, batch, [9, 9, 4], eos, check_every=1)
        fourth, _ = generate_tokens(vlm.adapter, vlm.plan, batch, [9, 9, 4], eos, check_every=4)
    assert every == fourth and every[0] == free[0][:2] and len(every[2]) <= 4


@pytest.mark.slow
def test_the_caption_job_compiles_once_per_actor_and_reports_it(local_ray, model_dir, tmp_path):
    """--compile on: the model actor compiles in its constructor, the summary says how long,
    and the answers are --compile off's."""
    from pipeline.config import JobConfig
    from pipeline.job import run
    from pipeline.manifest import read_rows

    data = tmp_path / "data.parquet"
    tiny.write_parquet(tiny.good_rows(6), data)
    answers = {}
    for mode in ("off", "on"):
        out = tmp_path / mode
        summary = run(JobConfig(model=model_dir, input=str(data), output=str(out), keep=8, max_new_tokens=5,
                                batch_size=4, compile=mode))
        assert summary["rows"] == 6 and summary["errors"] == 0
        assert (summary["seconds"]["model_compile"] > 1) == (mode == "on")
        answers[mode] = sorted(zip(*read_rows(JobConfig(output=str(out)), ["id", "answer"]).to_pydict().values()))
    assert answers["on"] == answers["off"]


def test_bad_compile_argument_is_a_clear_error(llava, model_dir):
    model, proc = llava
    for bad in ("yes", None, 1):
        with pytest.raises(ValueError, match="compile must be True, False or 'auto', got"):
            PrunedVLM(model, proc, compile=bad)
    with pytest.raises(ValueError, match="compile must be True, False or 'auto', got 'on'"):
        PrunedVLM.from_pretrained(model_dir, compile="on")
    assert not PrunedVLM(model, proc).compiled  # "auto" on a CPU
    from pipeline.config import JobConfig, JobError

    with pytest.raises(JobError, match="--compile must be one of auto, on, off, got 'yes'"):
        JobConfig(model=model_dir, compile="yes")
