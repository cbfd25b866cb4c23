"""jobs/benchmark.py on tiny models: the runtime report has every column and sane values, KV
bytes read from the runtime's cache equal the formula, the roofline's arithmetic gives known
answers, the meters (`pipeline.bench.profiling`, the
prefill meter through prefill's observer) and the random-weight builder work. The real
measurements run in the job, not here."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny
from pruner import PrunedVLM
from pipeline.bench import roofline
from pipeline.bench.runtime import parse_methods, roofline_caps
from pruner.flops import LLMShape, full_layers
from pruner.methods import METHODS
from pipeline.bench.profiling import (PeakMemory, PrefillMeter, decode_weight_bytes, kv_bytes, layer_weight_bytes,
                                      random_weights, vision_weight_bytes)
from pruner.runtime import collate, prefill

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(300)

TIME_COLUMNS = ["method", "keep", "batch", "prefill s", "speedup", "FLOPs", "meas./FLOPs", "end-to-end s"]
ROOFLINE_COLUMNS = ["vision ms", "prefill < K ms", "prefill >= K ms", "decode ms", "end-to-end speedup", "roofline",
                    "meas./roofline", "prefill speedup"]
MEMORY_COLUMNS = ["selection ms", "% of prefill", "GFLOP/s full / kept layers", "peak MiB prefill",
                  "peak MiB generate", "KV MiB/sample", "KV ratio", "formula"]
ROW_KEYS = {"method", "keep", "rate", "batch", "prompt_tokens", "prompt_tokens_kept", "image_tokens",
            "image_tokens_kept", "prefill_s", "prefill_spread_s", "prefill_speedup", "prefill_speedup_flops",
            "prefill_vs_flops", "e2e_s", "e2e_spread_s", "e2e_speedup", "e2e_speedup_flops", "e2e_vs_flops",
            "selection_ms", "selection_frac", "peak_prefill_bytes", "peak_generate_bytes", "kv_bytes",
            "kv_bytes_formula", "kv_ratio", "kv_ratio_formula", "layers_full_gflops_per_s",
            "layers_kept_gflops_per_s", "prefill_runs_s", "selection_runs_s", "e2e_runs_s", "compiled", "decode_ms",
            "decode_spread_ms", "decode_floor_ms", "decode_vs_floor", "decode_speedup_compiled", "e2e_speedup_compiled",
            "warm_up_s", "decode_runs_s", "roofline_ms", "roofline_bound", "prefill_speedup_roofline",
            "prefill_vs_roofline", "e2e_speedup_roofline", "e2e_vs_roofline"}


def benchmark(*args: str) -> str:
    """Run jobs/benchmark.py with `args`; its stdout."""
    proc = subprocess.run([sys.executable, "jobs/benchmark.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=250)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def report(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    benchmark("--model", model_dir, "--methods", "vlm-pruner,fastv,dart,divprune", "--keeps", "6",
              "--batches", "1,2", "--repeats", "2", "--warmup", "1", "--new-tokens", "2",
              "--question-tokens", "6", "--target-keep", "6", "--selection-repeats", "2", "--quiet",
              "--out", str(out))
    return json.loads((out / "runtime.json").read_text()), (out / "runtime.md").read_text()


def test_report_has_every_row_and_column(report):
    data, text = report
    rows = data["rows"]
    settings = [("none", None)] + [(m, k) for m in ("vlm-pruner", "fastv", "dart", "divprune") for k in (6,)]
    assert [(r["method"], r["keep"], r["batch"]) for r in rows] == [(m, k, b) for b in (1, 2) for m, k in settings]
    for r in rows:
        assert set(r) == ROW_KEYS
        assert len(r["prefill_runs_s"]) == len(r["e2e_runs_s"]) == 2
    for column in TIME_COLUMNS + MEMORY_COLUMNS + ROOFLINE_COLUMNS:
        assert f"| {column} |" in text
    assert "| keep | chunk 16 | chunk 1 |" in text
    assert [(c["keep"], c["chunk"]) for c in data["chunks"]] == [(6, 16), (6, 1)]
    assert {t["target"].split(":")[0] for t in data["targets"]} >= {"vlm-pruner keep 6, batch 1"}
    assert len(data["targets"]) == 8  # speed limit, selection at 1 and 2, throughput x 2, roofline at 1 and 2, KV
    assert data["meta"]["matmul_rate"] > 0 and data["meta"]["bandwidth"] > 0


@pytest.mark.slow
def test_compiled_decode_side_by_side(model_dir):
    """--compile on: every setting also with the compiled step, in the same rounds, with its
    decode ms a step, its speedup over eager and its warm-up (compile) seconds."""
    text = benchmark("--model", model_dir, "--methods", "vlm-pruner", "--keeps", "6", "--batches", "2",
                     "--repeats", "1", "--new-tokens", "4", "--question-tokens", "6", "--chunks", "", "--compile", "on",
                     "--quiet")
    table = text[text.index("Decode, ms a step"):].split("\n\n")[1]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()
            if line.startswith("| ") and "---" not in line][1:]
    assert [r[0] for r in rows] == ["none", "vlm-pruner", "none compiled", "vlm-pruner compiled"]
    for method, keep, batch, ms, floor, of_floor, step, e2e, warm_up in rows:
        assert float(ms.split(" ± ")[0]) > 0 and float(floor) > 0 and float(of_floor) > 0
        if method.endswith("compiled"):  # a later setting may reuse a graph: its warm-up can round to 0.00
            assert float(step) > 0 and float(e2e) > 0 and float(warm_up) >= 0
        else:
            assert step == e2e == warm_up == "-"
    assert float(rows[2][-1]) > 0  # the first compiled setting pays the compile


def test_values_are_consistent(report):
    data, _ = report
    for r in data["rows"]:
        assert set(r["roofline_ms"]) == set(roofline.PHASES) and r["roofline_ms"]["decode"] > 0
        assert r["e2e_vs_roofline"] == pytest.approx(r["e2e_speedup"] / r["e2e_speedup_roofline"])
        assert 0 <= r["selection_frac"] < 1
        assert r["prefill_s"] > 0 and r["e2e_s"] > 0
        assert r["peak_prefill_bytes"] > 0 and r["peak_generate_bytes"] > 0
        assert r["kv_bytes"] == r["kv_bytes_formula"]  # equal-length prompts: no padding in the cache
        assert r["kv_ratio"] == pytest.approx(r["kv_ratio_formula"])
        stage = METHODS[r["method"]].stage
        assert (r["layers_full_gflops_per_s"] is None) == (stage == "projector")  # every layer sees the kept prompt
        assert (r["layers_kept_gflops_per_s"] is None) == (stage == "none")
        if r["method"] == "none":
            assert r["prefill_speedup"] == r["prefill_speedup_flops"] == r["e2e_speedup_roofline"] == 1
            assert r["selection_ms"] == 0 and r["kv_ratio"] == 1
        else:
            assert r["selection_ms"] > 0
            assert r["image_tokens_kept"] == r["keep"]
            assert r["e2e_speedup_roofline"] > 1  # fewer FLOPs and KV bytes in every phase, the same weights
            assert r["prefill_speedup_flops"] > 1 and r["kv_ratio"] < 1
    kv = {r["method"]: r["kv_ratio_formula"] for r in data["rows"] if r["batch"] == 1}
    assert kv["divprune"] < kv["vlm-pruner"] == kv["fastv"] == kv["dart"] < 1  # divprune prunes before layer 0


# a small LLM whose numbers are easy by hand: layer(n, ctx) = 1152 n + 32 n ctx FLOPs
# (q, o 2n*8*8 each, k, v 2n*8*4 each, attention 4 n ctx 8, MLP 6 n 8 16), LM head 2*8*32 = 512;
# KV 2 * 4 * 2 = 16 bytes a token and layer in 2-byte floats
SMALL = LLMShape(layers=4, hidden=8, q_dim=8, kv_dim=4, intermediate=16, mlp_matrices=3, vocab=32)
WEIGHTS = roofline.Weights(vision=1000, layer=2000, head=600)


def test_roofline_phases_bound_by_bytes_or_by_flops():
    """Batch 1, prompt 100, kept 20 after layer K = 2, 2 decode steps, at 1000 FLOP/s and 100
    B/s. Vision 5000 FLOPs, 1000 B: 10 s, bytes. Layers < K: 2 * layer(100, 100) = 870400
    FLOPs against 2 * (2000 + 100 * 16) B: 870.4 s, FLOPs. Layers >= K and the head:
    2 * layer(20, 20) + 512 = 72192 FLOPs, 2 * (2000 + 20 * 16) + 600 = 5240 B: 72.192 s, FLOPs.
    Decode step j reads 4 * 2000 + 600 B of weights and 16 * (2 (100 + j) + 2 (20 + j)) of KV:
    125.04 + 125.68 s, bytes (12928 and 13056 FLOPs: 13 s each)."""
    roof = roofline.Roof(matmul=1000, bandwidth=100)
    pruned = roofline.predict(roof, roofline.phases(SMALL, WEIGHTS, batch=1, n=100, kept=20, full=2, steps=2,
                                                    itemsize=2, vision_flops=5000))
    assert {p: bound for p, (_, bound) in pruned.items()} == {
        "vision": "bytes", "prefill_full": "flops", "prefill_kept": "flops", "decode": "bytes"}
    seconds = {p: t for p, (t, _) in pruned.items()}
    assert seconds == pytest.approx({"vision": 10, "prefill_full": 870.4, "prefill_kept": 72.192,
                                     "decode": 125.04 + 125.68})
    # unpruned: every layer on 100 tokens (1740.8 s, FLOPs), the head alone (600 B: 6 s, bytes),
    # decode 8600 + 16 * 4 * (100 + j) B: 150.64 + 151.28 s
    unpruned = roofline.predict(roof, roofline.phases(SMALL, WEIGHTS, batch=1, n=100, kept=100, full=4, steps=2,
                                                      itemsize=2, vision_flops=5000))
    assert [unpruned[p][0] for p in roofline.PHASES] == pytest.approx([10, 1740.8, 6, 150.64 + 151.28])
    assert roofline.total(unpruned) / roofline.total(pruned) == pytest.approx(2058.72 / 1203.312)
    assert (roofline.total(unpruned, roofline.PREFILL) / roofline.total(pruned, roofline.PREFILL)
            == pytest.approx(1746.8 / 942.592))
    # a batch of 8 at a fast matmul: decode stays bound by bytes, its weights read once for all rows
    big = roofline.phases(SMALL, WEIGHTS, batch=8, n=100, kept=20, full=2, steps=2, itemsize=2, vision_flops=5000)
    assert big["decode"][0][1] == 8600 + 8 * 16 * (2 * 101 + 2 * 21)
    # the phases' FLOPs are pruner.flops': prefill and decode split, not recounted
    work = roofline.phases(SMALL, WEIGHTS, batch=3, n=100, kept=20, full=2, steps=5, itemsize=2, vision_flops=0)
    assert work["vision"] == []
    assert sum(f for p in roofline.PREFILL for f, _ in work[p]) == 3 * SMALL.prefill(2, 100, 20)
    assert sum(f for f, _ in work["decode"]) == 3 * SMALL.decode(2, 100, 20, 5)


def test_roofline_weights_split_the_model():
    """Vision side, every decoder layer, norm and LM head, and the embedding table: each
    weight counted once."""
    model, _ = tiny.llava()
    layers = model.config.text_config.num_hidden_layers
    embed = model.model.language_model.embed_tokens.weight.nbytes
    head = decode_weight_bytes(model) - layers * layer_weight_bytes(model)
    assert head == model.lm_head.weight.nbytes + model.model.language_model.norm.weight.nbytes
    total = sum(p.nbytes for p in model.parameters())
    assert vision_weight_bytes(model) + layers * layer_weight_bytes(model) + head + embed == total
    assert vision_weight_bytes(model) == sum(p.nbytes for m in (model.model.vision_tower,
                                                                 model.model.multi_modal_projector)
                                             for p in m.parameters())


def test_the_report_says_where_the_roofline_caps_the_gain():
    row = {"method": "vlm-pruner", "keep": 64, "rate": None, "batch": 1, "e2e_runs_s": [1.0],
           "e2e_speedup_flops": 3.36, "e2e_speedup_roofline": 1.1}
    line = roofline_caps([row, {**row, "batch": 32, "e2e_speedup_roofline": 3.0}], 16)
    assert line.startswith("The roofline caps the end-to-end gain with 16 new tokens")
    assert "vlm-pruner 64 at batch 1: 1.10x (FLOPs: 3.36x)." in line and "batch 32" not in line
    assert roofline_caps([{**row, "e2e_speedup_roofline": 3.0}], 16) is None


def test_kv_bytes_from_the_cache_equal_the_formula():
    model, proc = tiny.llava()
    text = model.config.text_config
    for method, keep in (("none", None), ("vlm-pruner", 5), ("fastv", 9), ("divprune", 5)):
        vlm = PrunedVLM(model, proc, method=method, **({} if keep is None else {"keep": keep}))
        for size in (1, 3):  # one sample; three of the same length
            samples = vlm.preprocess([tiny.image(i) for i in range(size)], ["what is the colour ?"] * size)
            with torch.inference_mode():
                _, state = prefill(vlm.adapter, vlm.plan, collate(vlm.adapter, samples, vlm.device), room=4)
            n, kept = state.prompt_tokens[0], state.prompt_tokens_kept[0]
            assert kept == n - 36 + (keep or 36)
            full = full_layers(vlm.method.stage, vlm.prune_layer, text.num_hidden_layers, pruned=kept < n)
            formula = LLMShape.of(text).kv_bytes(full, n, kept, itemsize=4)
            assert kv_bytes(state.cache) == size * formula


def test_peak_memory_sees_a_temporary_tensor():
    with PeakMemory(torch.device("cpu")) as mem:
        x = torch.ones(16, 2**20)  # 64 MiB
        x.sum()  # in use a little longer, as a real computation would be
        del x
    assert 60 * 2**20 <= mem.peak <= 200 * 2**20


def test_random_weights_match_a_normally_built_model():
    reference, _ = tiny.llava()
    model = random_weights(reference.config, torch.float32, torch.device("cpu"))
    for (name, a), (_, b) in zip(reference.named_buffers(), model.named_buffers()):
        torch.testing.assert_close(a, b, msg=name)
    params = dict(model.named_parameters())
    assert set(params) == set(dict(reference.named_parameters()))
    assert all(torch.isfinite(p).all() for p in params.values())
    assert (params["model.language_model.norm.weight"] == 1).all()
    assert float(params["lm_head.weight"].detach().std()) == pytest.approx(reference.config.text_config.initializer_range, rel=0.1)
    vlm = PrunedVLM(model, tiny.llava()[1], method="vlm-pruner", keep=5)
    out = vlm.generate([tiny.image(0)], ["what is the colour ?"], max_new_tokens=2)[0]
    assert out.image_tokens_kept == 5


def test_methods_flag_parses_parameters():
    assert parse_methods("vlm-pruner, fastv,vlm-pruner:chunk=1") == [
        ("vlm-pruner", ()), ("fastv", ()), ("vlm-pruner", (("chunk", 1),))]
    with pytest.raises(SystemExit):
        parse_methods("nope")
    with pytest.raises(ValueError):
        parse_methods("fastv:chunk=1")


def test_selection_subcommand_still_runs():
    out = benchmark("selection", "--n", "16", "--dim", "8", "--keeps", "4", "--repeats", "1")
    assert "| vlm-pruner chunk=1 |" in out and "| divprune |" in out


def test_prefill_meter_sees_each_segment_through_the_observer():
    """Layers before K on the whole prompt, the selection, layers from K on the kept prompt;
    unpruned: one segment of every layer and no selection. Nothing is rebound in the runtime."""
    model, proc = tiny.llava()
    layers = model.config.text_config.num_hidden_layers
    for method, keep in (("none", None), ("fastv", 5), ("divprune", 5)):
        vlm = PrunedVLM(model, proc, method=method, **({} if keep is None else {"keep": keep}))
        samples = vlm.preprocess([tiny.image(i) for i in range(2)], ["what is the colour ?"] * 2)
        meter = PrefillMeter(vlm.device)
        with torch.inference_mode():
            _, state = prefill(vlm.adapter, vlm.plan, collate(vlm.adapter, samples, vlm.device), room=0,
                               observer=meter)
        n, kept = state.prompt_tokens[0], state.prompt_tokens_kept[0]
        expected = {"none": [(layers, 2, n)], "divprune": [(layers, 2, kept)],
                    "fastv": [(vlm.prune_layer, 2, n), (layers - vlm.prune_layer, 2, kept)]}[method]
        assert [s[:3] for s in meter.segments] == expected
        assert all(s[3] > 0 for s in meter.segments)
        assert (meter.selection > 0) == (method != "none")


def test_video_workload_at_a_rate_with_random_features(onevision_dir, tmp_path):
    """The LLaVA-Video path of the runtime benchmark on a tiny OneVision: 3-frame clips pooled
    to 3 x 3 (3 * 9 + 1 video tokens, the newline never pruned), a rate budget, random
    features in place of the tower, prefill only; the targets are checked at the rate."""
    benchmark("--model", onevision_dir, "--frames", "3", "--random-features", "--methods", "vlm-pruner",
              "--rates", "0.7", "--batches", "1", "--repeats", "1", "--new-tokens", "0", "--question-tokens", "4",
              "--chunks", "16", "--selection-repeats", "1", "--quiet", "--out", str(tmp_path))
    data = json.loads((tmp_path / "runtime.json").read_text())
    meta, (none, pruned) = data["meta"], data["rows"]
    assert (meta["frames"], meta["image_tokens"], meta["prunable_tokens"], meta["vision_tower"]) == (3, 28, 27, False)
    assert pruned["rate"] == 0.7 and pruned["keep"] is None
    assert none["image_tokens"] == pruned["image_tokens"] == 3 * 9
    assert pruned["image_tokens_kept"] == round(27 * 0.3) == 8
    assert none["prompt_tokens_kept"] == none["prompt_tokens"] == meta["prompt_tokens"]
    assert pruned["prompt_tokens"] - pruned["prompt_tokens_kept"] == 27 - 8
    assert pruned["selection_ms"] > 0 and len(pruned["selection_runs_s"]) == 1 and pruned["e2e_runs_s"] == []
    assert pruned["prefill_speedup_flops"] > 1 and pruned["kv_bytes"] == pruned["kv_bytes_formula"]
    assert [(c["keep"], c["chunk"]) for c in data["chunks"]] == [(8, 16)]
    budgets = {t["target"].split(":")[0] for t in data["targets"]}
    assert budgets == {"vlm-pruner rate 0.7, batch 1", "vlm-pruner rate 0.7"}
    assert "8 (rate 0.7)" in (tmp_path / "runtime.md").read_text()


def test_a_pipeline_round_compares_the_job_with_the_mean_of_the_loops_around_it():
    """A loop run at 50 s before the job and 70 s after it: the machine slowed down, and the
    job (66.7 s of pipeline time) is compared with 60 s, not with either neighbour alone."""
    from pipeline.bench.job import bracketed

    job = {"wall": 80.0, "summary": {"rows_per_second": 15.0, "wall_seconds": 66.67, "seconds": {}, "bound_by": ""}}
    r = bracketed(1000, {"seconds": 50.0, "wall": 52.0}, {"seconds": 70.0, "wall": 72.0}, job)
    assert r["loop_seconds"] == [50.0, 70.0]
    assert r["loop_rows_per_second"] == round(1000 / 60, 3)
    assert r["rows_per_second_ratio"] == 0.9  # 15 rows/s against 1000 / 60
    assert r["wall_ratio"] == 0.775  # 62 s against 80 s
