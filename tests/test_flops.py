"""Per-sample FLOPs (`pruner.flops`) against torch's FlopCounterMode on the same forward, and
the paper convention for LLaVA-1.5-7B derived by hand."""
from collections import Counter

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import (CLIPVisionConfig, DynamicCache, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                          LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaOnevisionConfig,
                          LlavaOnevisionForConditionalGeneration, PhiConfig, PhiForCausalLM, Qwen2Config,
                          Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                          Qwen2VLForConditionalGeneration, SiglipVisionConfig)

import tiny
from pruner import PrunedVLM, runtime
from pruner import vlm as vlm_module
from pruner.flops import Flops, LLMShape, llava_1_5_7b_config, main, sample_flops, vision_flops

pytestmark = pytest.mark.timeout(300)
SIZES = [(90, 70), (60, 100), (120, 56)]
# (method, budget): unpruned, an in-LLM method at two budgets, a projector-stage method
CASES = [("none", {}), ("vlm-pruner", {"rate": 0.5}), ("vlm-pruner", {"rate": 0.75}), ("divprune", {"rate": 0.75})]


def count(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.fixture(scope="module", params=sorted(tiny.FAMILIES))
def family(request):
    model, proc = tiny.FAMILIES[request.param]()
    model.set_attn_implementation("eager")  # the counter does not see CPU SDPA (vision tower too)
    return model, proc


@pytest.fixture
def phases(monkeypatch):
    """FLOPs counted per phase of `generate`: the vision inputs (collate: tower + projector),
    prefill, decode, and the selection's own arithmetic (select and FastV's attention row),
    which happens inside prefill and is not part of the model's FLOPs."""
    counts = Counter()

    def counted(name, fn):
        def run(*args, **kwargs):
            with FlopCounterMode(display=False) as counter:
                out = fn(*args, **kwargs)
            counts[name] += counter.get_total_flops()
            return out
        return run

    for name in ("prefill", "decode_step", "select", "last_row_attention"):
        monkeypatch.setattr(runtime, name, counted(name, getattr(runtime, name)))
    monkeypatch.setattr(vlm_module, "collate", counted("collate", vlm_module.collate))
    return counts


# ---------------------------------------------------------------- 1. against the FLOP counter


@pytest.mark.parametrize("method,budget", CASES, ids=[f"{m}-{b}" for m, b in CASES])
def test_analytic_flops_match_the_flop_counter(family, phases, method, budget):
    model, proc = family
    vlm = PrunedVLM(model, proc, method=method, attention="eager", **budget)
    vlm.eos = {-1}  # never stop early: always 1 prefill + 4 decode forwards
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = vlm.generate([tiny.image(1, SIZES[1])], [tiny.QUESTIONS[1]], max_new_tokens=5)[0]
    f = out.flops
    assert out.generated_tokens == 5
    assert (out.prompt_tokens_kept < out.prompt_tokens) == (method != "none")
    selection = phases["select"] + phases["last_row_attention"]
    assert counter.get_total_flops() == phases["collate"] + phases["prefill"] + phases["decode_step"]
    assert f.flops_vision == pytest.approx(phases["collate"], rel=0.02)
    assert f.flops_prefill == pytest.approx(phases["prefill"] - selection, rel=0.02)
    assert f.flops_decode == pytest.approx(phases["decode_step"], rel=0.02)
    assert f.flops_total == pytest.approx(counter.get_total_flops() - selection, rel=0.02)
    assert f.flops_total == f.flops_vision + f.flops_prefill + f.flops_decode


@pytest.fixture(scope="module", params=tiny.VIDEO_FAMILIES)
def video_family(request):
    model, proc = tiny.FAMILIES[request.param]()
    model.set_attn_implementation("eager")
    return model, proc


@pytest.mark.parametrize("method,budget", CASES, ids=[f"{m}-{b}" for m, b in CASES])
def test_video_flops_match_the_flop_counter(video_family, phases, method, budget):
    """A 4-frame clip (3 for Qwen: padded to 4, two temporal patches): the tower on every
    frame, OneVision's projector on every frame's unpooled tokens, the LLM on the clip."""
    model, proc = video_family
    vlm = PrunedVLM(model, proc, method=method, attention="eager", **budget)
    vlm.eos = {-1}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = vlm.generate([tiny.video(1, 3)], [tiny.QUESTIONS[1]], max_new_tokens=3)[0]
    f = out.flops
    assert out.frames >= 3 and out.generated_tokens == 3
    selection = phases["select"] + phases["last_row_attention"]
    assert f.flops_vision == pytest.approx(phases["collate"], rel=0.02)
    assert f.flops_prefill == pytest.approx(phases["prefill"] - selection, rel=0.02)
    assert f.flops_decode == pytest.approx(phases["decode_step"], rel=0.02)
    assert f.flops_total == pytest.approx(counter.get_total_flops() - selection, rel=0.02)


def test_text_models_gqa_bias_and_plain_mlp_match_the_counter():
    """Prefill and one decode step of bare text models: Qwen2-VL's (GQA, q/k/v biases, gated
    MLP) and Phi's (plain fc1/fc2 MLP, partial rotary); LM head on the last position only."""
    qwen = Qwen2VLForConditionalGeneration(_qwen2_vl_config()).eval()
    phi = PhiForCausalLM(PhiConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100, partial_rotary_factor=0.5)).eval()
    for model, config in [(qwen, qwen.config.text_config), (phi, phi.config)]:
        model.set_attn_implementation("eager")
        shape, n = LLMShape.of(config), 23
        ids = torch.randint(0, 100, (1, n))
        cache = DynamicCache(config=config)
        prefill = count(lambda: model(input_ids=ids, cache=cache, logits_to_keep=1))
        assert prefill == shape.prefill(shape.layers, n, n)
        step = torch.randint(0, 100, (1, 1))
        decode = count(lambda: model(input_ids=step, cache=cache, logits_to_keep=1))
        assert decode == shape.decode(shape.layers, n, n, 1)  # attends over n + 1 keys
    assert (LLMShape.of(qwen.config.text_config).mlp_matrices, LLMShape.of(phi.config).mlp_matrices) == (3, 2)


# ---------------------------------------------------------------- 2. vision towers, from configs

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=100, bos_token_id=0, eos_token_id=1, pad_token_id=0)
MROPE = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}


def _qwen2_vl_config():
    return Qwen2VLConfig(vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2,
                                            patch_size=2, temporal_patch_size=2, spatial_merge_size=2),
                         text_config=dict(TEXT, rope_parameters=MROPE))


def _qwen_inputs(grids):
    grid = torch.tensor(grids)
    return {"pixel_values": torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 2 * 2), "image_grid_thw": grid}


def _qwen2_vl():
    model = Qwen2VLForConditionalGeneration(_qwen2_vl_config())
    return model, lambda v: model.model.get_image_features(v["pixel_values"], v["image_grid_thw"]), [
        _qwen_inputs([[1, 6, 10]]), _qwen_inputs([[1, 6, 10], [2, 4, 4]])]


def _qwen2_5_vl():
    """Window 16 px / patch 2 / merge 2: windows of 4 x 4 merged tokens; blocks 1 and 3 full."""
    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=4, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=2, patch_size=2,
                           temporal_patch_size=2, spatial_merge_size=2, window_size=16, fullatt_block_indexes=[1, 3]),
        text_config=dict(TEXT, rope_parameters=MROPE))
    model = Qwen2_5_VLForConditionalGeneration(config)
    return model, lambda v: model.model.get_image_features(v["pixel_values"], v["image_grid_thw"]), [
        _qwen_inputs([[1, 12, 20]]), _qwen_inputs([[1, 16, 8]]), _qwen_inputs([[1, 6, 10], [1, 8, 8]])]


def _clip(**kw):
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=28, patch_size=14, **kw)


def _llava_next():
    """AnyRes tiles: a 30 x 60 image takes 3 tiles of 28 px; the batch pads it to 5."""
    config = LlavaNextConfig(vision_config=_clip(), text_config=LlamaConfig(**TEXT), vision_feature_layer=-2,
                             image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]])
    model = LlavaNextForConditionalGeneration(config)
    inputs = {"pixel_values": torch.randn(1, 5, 3, 28, 28), "image_sizes": torch.tensor([[30, 60]])}
    return model, lambda v: model.model.get_image_features(v["pixel_values"], v["image_sizes"], vision_feature_layer=-2,
                                                           vision_feature_select_strategy="default"), [inputs]


def _siglip(head: bool):
    config = LlavaConfig(vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                          num_attention_heads=2, image_size=28, patch_size=14,
                                                          vision_use_head=head),
                         text_config=LlamaConfig(**TEXT), vision_feature_layer=-1,
                         vision_feature_select_strategy="full")
    model = LlavaForConditionalGeneration(config)
    return model, lambda v: model.model.get_image_features(
        v["pixel_values"], vision_feature_layer=-1, vision_feature_select_strategy="full"), [
        {"pixel_values": torch.randn(1, 3, 28, 28)}]


def _clip_layer_list():
    """Two feature layers concatenated into the projector; CLS kept ("full")."""
    config = LlavaConfig(vision_config=_clip(), text_config=LlamaConfig(**TEXT), vision_feature_layer=[-3, -2],
                         vision_feature_select_strategy="full")
    model = LlavaForConditionalGeneration(config)
    return model, lambda v: model.model.get_image_features(
        v["pixel_values"], vision_feature_layer=[-3, -2], vision_feature_select_strategy="full"), [
        {"pixel_values": torch.randn(1, 3, 28, 28)}]


def _onevision():
    """SigLIP without head, anyres_max_1 (the 2x2 tiles' 4x4 grid is shrunk to 2x2), and a
    3-frame clip pooled to 1x1 a frame: the tower runs on every tile and every frame."""
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=28, patch_size=14, vision_use_head=False),
        text_config=Qwen2Config(**TEXT), image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]],
        vision_aspect_ratio="anyres_max_1")
    model = LlavaOnevisionForConditionalGeneration(config)

    def features(v):
        if "pixel_values_videos" in v:
            return model.model.get_video_features(v["pixel_values_videos"])
        return model.model.get_image_features(v["pixel_values"], v["image_sizes"])

    image = {"pixel_values": torch.randn(1, 5, 3, 28, 28), "image_sizes": torch.tensor([[60, 60]])}
    return model, features, [image, {"pixel_values_videos": torch.randn(1, 3, 3, 28, 28)}]


def _qwen_video(config_fn):
    """Qwen towers on video: attention within each temporal patch, then the merger."""
    model, _, _ = config_fn()
    inputs = {"pixel_values_videos": torch.randn(3 * 6 * 10, 3 * 2 * 2 * 2), "video_grid_thw": torch.tensor([[3, 6, 10]])}
    return model, lambda v: model.model.get_video_features(v["pixel_values_videos"], v["video_grid_thw"]), [inputs]


TOWERS = {"qwen2-vl": _qwen2_vl, "onevision-tiles-and-frames": _onevision,
          "qwen2-vl-video": lambda: _qwen_video(_qwen2_vl), "qwen2.5-vl-video": lambda: _qwen_video(_qwen2_5_vl), "qwen2.5-vl-windows": _qwen2_5_vl, "llava-next-tiles": _llava_next,
          "siglip-head": lambda: _siglip(True), "siglip-no-head": lambda: _siglip(False),
          "clip-two-feature-layers": _clip_layer_list}


@pytest.mark.parametrize("tower", list(TOWERS))
def test_vision_tower_and_projector_match_the_counter(tower):
    torch.manual_seed(0)
    model, features, inputs = TOWERS[tower]()
    model.eval().set_attn_implementation("eager")
    for vision in inputs:
        assert vision_flops(model.config, vision) == count(lambda: features(vision))


# ---------------------------------------------------------------- 3. pruned vs unpruned, batches


def test_pruned_costs_less_and_unpruned_costs_the_same(family):
    """At each pruning stage: k < N costs less than the same sample unpruned, which is what
    `none` costs (counted above); k >= N costs the same."""
    model, proc = family
    image, question = [tiny.image(0, SIZES[0])], tiny.QUESTIONS[:1]

    def run(method: str, **budget):
        vlm = PrunedVLM(model, proc, method=method, **budget)
        vlm.eos = {-1}  # equal generated lengths: 1 prefill + 1 decode forward
        return vlm.generate(image, question, max_new_tokens=2)[0]

    unpruned = run("none")
    assert unpruned.flops.flops_total == unpruned.flops.flops_total_unpruned
    assert unpruned.flops.paper_prefill_reduction == 0
    for method in ("vlm-pruner", "divprune"):  # in the LLM, before it
        out = run(method, keep=3)
        f = out.flops
        assert out.image_tokens_kept == 3 < out.image_tokens
        assert f.flops_total_unpruned == unpruned.flops.flops_total
        assert f.flops_vision == unpruned.flops.flops_vision
        assert f.flops_prefill < unpruned.flops.flops_prefill and f.flops_decode < unpruned.flops.flops_decode
        assert f.flops_total < f.flops_total_unpruned and 0 < f.paper_prefill_reduction < 1
        assert run(method, keep=100_000).flops == unpruned.flops


def test_a_padded_batch_costs_each_sample_what_it_costs_alone(family):
    model, proc = family
    vlm = PrunedVLM(model, proc, method="vlm-pruner", keep=4)
    images, questions = [tiny.image(i, SIZES[i]) for i in (1, 2)], tiny.QUESTIONS[3:5]
    together = vlm.generate(images, questions, max_new_tokens=3)
    assert len({o.prompt_tokens for o in together}) > 1  # the batch is padded
    for i in range(2):
        alone = vlm.generate(images[i : i + 1], questions[i : i + 1], max_new_tokens=3)[0]
        assert together[i].flops == alone.flops


def test_decode_attends_over_each_layers_own_cache_length():
    """Layers < K attend over the full prompt, layers >= K over the pruned one; the LM head
    once per forward; G generated tokens are 1 prefill + G - 1 decode forwards."""
    cfg = llava_1_5_7b_config()
    s = LLMShape.of(cfg.text_config)
    f = sample_flops(cfg, 0, prompt_tokens=100, prompt_tokens_kept=40, generated_tokens=3, prune_layer=5)
    assert f.flops_decode == sum(5 * s.layer(1, 100 + j) + 27 * s.layer(1, 40 + j) + s.lm_head() for j in (1, 2))
    assert f.flops_prefill == 5 * s.layer(100, 100) + 27 * s.layer(40, 40) + s.lm_head()
    one = sample_flops(cfg, 0, prompt_tokens=100, prompt_tokens_kept=40, generated_tokens=1)
    none = sample_flops(cfg, 0, prompt_tokens=100, prompt_tokens_kept=40, generated_tokens=0)
    assert one.flops_decode == none.flops_decode == 0 and one.flops_prefill == none.flops_prefill
    projector = sample_flops(cfg, 0, prompt_tokens=100, prompt_tokens_kept=40, generated_tokens=1, stage="projector")
    assert projector.flops_prefill == 32 * s.layer(40, 40) + s.lm_head()


# ---------------------------------------------------------------- 4. LLaVA-1.5-7B by hand


def test_llava_1_5_7b_by_hand():
    """d = 4096, m = 11008, 32 layers, K = 2; prompt 646 = 10 template + 576 image + 60
    question; keep 64 leaves 134 tokens from layer 2 on.

    Paper convention, F(n) = 4 n d^2 + 2 n^2 d + 2 n d m:
      F(646) = 43,352,326,144 + 3,418,652,672 + 58,254,688,256 = 105,025,667,072
      F(134) =  8,992,587,776 +   147,095,552 + 12,083,789,824 =  21,223,473,152
      unpruned = 32 F(646)             = 3,360,821,346,304
      pruned   = 2 F(646) + 30 F(134)  =   846,755,528,704
      reduction = 1 - 846,755,528,704 / 3,360,821,346,304 = 74.805 %
    """
    cfg = llava_1_5_7b_config()
    assert 4 * 646 * 4096**2 == 43_352_326_144 and 2 * 646**2 * 4096 == 3_418_652_672
    assert 2 * 646 * 4096 * 11008 == 58_254_688_256
    f646, f134 = 105_025_667_072, 21_223_473_152
    assert 43_352_326_144 + 3_418_652_672 + 58_254_688_256 == f646
    assert 8_992_587_776 + 147_095_552 + 12_083_789_824 == f134
    f = sample_flops(cfg, {"pixel_values": torch.empty(1, 3, 336, 336, device="meta")}, prompt_tokens=646,
                     prompt_tokens_kept=134, generated_tokens=32, prune_layer=2)
    assert f.paper_prefill_reduction == pytest.approx(1 - (2 * f646 + 30 * f134) / (32 * f646), rel=1e-12)
    assert f.paper_prefill_reduction == pytest.approx(0.74805, abs=1e-5)

    # Measured-style vision: CLIP ViT-L/14-336 runs all 24 layers on 577 tokens (576 + CLS),
    # although LLaVA reads layer -2; the projector runs on the 576 patch tokens.
    patch_embedding = 2 * 576 * (3 * 14 * 14) * 1024  # 693,633,024
    q_k_v_o, attention, mlp = 2 * 4 * 577 * 1024**2, 2 * 2 * 577**2 * 1024, 2 * 2 * 577 * 1024 * 4096
    assert (q_k_v_o, attention, mlp) == (4_840_226_816, 1_363_677_184, 9_680_453_632)
    layer = 4_840_226_816 + 1_363_677_184 + 9_680_453_632  # 15,884,357,632
    projector = 2 * 576 * (1024 * 4096 + 4096 * 4096)  # 24,159,191,040
    # 693,633,024 + 24 * 15,884,357,632 + 24,159,191,040 = 406,077,407,232
    assert f.flops_vision == patch_embedding + 24 * layer + projector == 406_077_407_232


def test_flops_fields_and_cli(capsys):
    assert [f for f in Flops.__dataclass_fields__] == [
        "flops_vision", "flops_prefill", "flops_decode", "flops_total", "flops_total_unpruned",
        "paper_prefill", "paper_prefill_unpruned"]
    main(["--shape", "llava-1.5-7b", "--question-tokens", "60", "--generated", "32"])
    out = capsys.readouterr().out
    assert "keep 64" in out and "74.81%" in out and "paper" in out


def test_llava_video_7b_shape_matches_the_checkpoint_and_a_clip_is_t_196_plus_1_tokens():
    """LLaVA-Video-7B-Qwen2: transformers' LlavaOnevision defaults for the tower and the
    packing (SigLIP-so400m at 384 px, 26 layers kept, anyres_max_9), Qwen2-7B's widths; a
    32-frame clip is 32 * 196 + 1 tokens, of which 32 * 196 prunable (`SHAPES`' N)."""
    from transformers import LlavaOnevisionConfig

    from pruner.flops import SHAPES
    from pruner.models.llava_onevision import LlavaOnevisionAdapter
    from pipeline.bench.profiling import random_clips, shape_processor

    build, vision, n = SHAPES["llava-video-7b"]
    cfg, default = build(), LlavaOnevisionConfig()
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                "patch_size", "vision_use_head"):
        assert getattr(cfg.vision_config, key) == getattr(default.vision_config, key), key
    for key in ("vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio",
                "image_grid_pinpoints", "image_token_id", "video_token_id"):
        assert getattr(cfg, key) == getattr(default, key), key
    assert LLMShape.of(cfg.text_config) == LLMShape(layers=28, hidden=3584, q_dim=3584, kv_dim=512,
                                                    intermediate=18944, mlp_matrices=3, vocab=152064)
    assert n == 32 * 196
    processor = shape_processor("llava-video-7b")
    sample = LlavaOnevisionAdapter.prepare(processor, random_clips(1, 32, size=32)[0], "what is the color ?")
    assert int((sample.input_ids == processor.tokenizer.convert_tokens_to_ids("<video>")).sum()) == 32 * 196 + 1
    assert tuple(sample.vision["pixel_values_videos"].shape) == tuple(vision()["pixel_values_videos"].shape)
    # the tower on 32 frames of 27 x 27 = 729 patches, 26 layers, then the projector on every patch
    h, m, d = 1152, 4304, 3584
    frame = (2 * 729 * 3 * 14 * 14 * h + 26 * (2 * 4 * 729 * h * h + 2 * 2 * 729**2 * h + 2 * 2 * 729 * h * m)
             + 2 * 729 * (h * d + d * d))
    assert vision_flops(cfg, vision()) == 32 * frame
