"""Tiny random-weight VLMs of every supported family, built from configs in-process."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)
from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor,
                          LlavaNextProcessor)
from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessor,
                          LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor, Qwen2Config, SiglipVisionConfig)
from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                          Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                          Qwen2VLProcessor, Qwen2VLVideoProcessor)

WORDS = ["<unk>", "<pad>", "<s>", "</s>", "<image>", "USER", ":", "ASSISTANT", "what", "is", "the",
         "colour", "shape", "of", "red", "blue", "?", "a", "circle", "square", "left", "right"]
WORDS += [f"w{i}" for i in range(42)]
TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER : "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}"
    "{% endfor %}{% else %}ASSISTANT : {{ m['content'][0]['text'] }} </s> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)


def tokenizer(words: list[str] = WORDS, special: dict | None = None) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", extra_special_tokens=special or {"image_token": "<image>"})


def _text_config(**kw) -> LlamaConfig:
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(WORDS), max_position_embeddings=1024,
                       bos_token_id=2, eos_token_id=3, pad_token_id=1, initializer_range=0.3, **kw)


def llava(seed: int = 0, image_size: int = 84):
    """LLaVA-1.5 layout at small size: 84 px, patch 14 -> 6x6 = 36 image tokens."""
    tok = tokenizer()
    proc = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                           crop_size={"height": image_size, "width": image_size}),
        tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=TEMPLATE)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=image_size, patch_size=14),
        text_config=_text_config(), image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(cfg).eval(), proc


def llava_next(seed: int = 0, tile: int = 56):
    """LLaVA-NeXT (AnyRes) at small size: 56 px tiles, patch 14 -> a 4x4 base tile, then up to
    2x2 high-res tiles (8x8 tokens before unpadding) with one newline token a row. The test
    sizes (90, 70), (60, 100), (120, 56) use 4, 4, 2 high-res tiles: 70, 56, 52 placeholders."""
    tok = tokenizer()
    pinpoints = [[tile, tile], [tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile]]
    proc = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
                                                image_grid_pinpoints=pinpoints),
        tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=TEMPLATE)
    cfg = LlavaNextConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=tile, patch_size=14),
        text_config=_text_config(), image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints, vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    return LlavaNextForConditionalGeneration(cfg).eval(), proc


# ---------------------------------------------------------------- LLaVA-OneVision

OV_WORDS = WORDS + ["<video>"]
OV_TEMPLATE = TEMPLATE.replace("{% else %}{{ c['text'] }}", "{% elif c['type'] == 'video' %}<video> {% else %}{{ c['text'] }}")


def llava_onevision(seed: int = 4, tile: int = 84):
    """LLaVA-OneVision at small size: SigLIP at 84 px, patch 14 -> a 6x6 base tile; up to 2x2
    or 1x3 high-res tiles, shrunk past `anyres_max_2` (e.g. 250x250: 12x12 -> 8x8); video
    frames pooled to 3x3; a Qwen2 LLM. Sizes (90, 70), (60, 100), (200, 90), (250, 250)
    give 90, 106, 126, 108 image placeholders; a T-frame video T * 9 + 1. (Seed 4: at seed 0
    the test prompts' answers, pruned to 5 tokens, start with EOS, leaving nothing to compare.)"""
    tok = tokenizer(OV_WORDS, {"image_token": "<image>", "video_token": "<video>"})
    pinpoints = [[tile, tile], [tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile], [tile, 3 * tile],
                 [3 * tile, tile]]
    proc = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size={"height": tile, "width": tile},
                                                     image_grid_pinpoints=pinpoints),
        video_processor=LlavaOnevisionVideoProcessor(size={"height": tile, "width": tile}),
        tokenizer=tok, num_image_tokens=(tile // 14) ** 2, vision_feature_select_strategy="full",
        chat_template=OV_TEMPLATE, vision_aspect_ratio="anyres_max_2")
    text = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(OV_WORDS), max_position_embeddings=1024,
                       bos_token_id=2, eos_token_id=3, pad_token_id=1, initializer_range=0.3)
    cfg = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=tile, patch_size=14, vision_use_head=False),
        text_config=text, image_token_index=OV_WORDS.index("<image>"), video_token_index=OV_WORDS.index("<video>"),
        image_grid_pinpoints=pinpoints, vision_aspect_ratio="anyres_max_2", vision_feature_layer=-1,
        vision_feature_select_strategy="full")
    torch.manual_seed(seed)
    return LlavaOnevisionForConditionalGeneration(cfg).eval(), proc


# ---------------------------------------------------------------- Qwen2-VL / Qwen2.5-VL

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
QWEN_WORDS = WORDS + QWEN_SPECIAL + ["user", "assistant"]
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|> "
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|> "
    "{% else %}{{ c['text'] }} {% endif %}{% endfor %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
# images are resized to multiples of 28 px within these bounds: 16 to 64 merged tokens,
# so the test sizes (90, 70), (60, 100), (120, 56) give grids 4x5, 6x4, 3x6
QWEN_PIXELS = {"min_pixels": 28 * 28 * 16, "max_pixels": 28 * 28 * 64}


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(QWEN_WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens(QWEN_SPECIAL)  # split out even when glued together, as the processor writes them
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", pad_token="<|endoftext|>", eos_token="<|im_end|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"})


def _qwen_config(config_cls, vision: dict, tok: PreTrainedTokenizerFast):
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    # head_dim 16 -> 8 rotary frequencies, split over (temporal, height, width)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(QWEN_WORDS), max_position_embeddings=1024,
                initializer_range=0.3, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                        "mrope_section": [2, 3, 3]},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    # a wide vision initialisation too: at the default 0.02 all image tokens look alike
    return config_cls(vision_config=dict(depth=2, num_heads=2, patch_size=14, spatial_merge_size=2,
                                         temporal_patch_size=2, initializer_range=0.3, **vision),
                      text_config=text, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                      vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def _qwen_processor(processor_cls, tok: PreTrainedTokenizerFast):
    # video frames within 4 to 16 merged tokens each: (90, 70) frames give a 3x4 grid
    frame_pixels = {"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 16}
    return processor_cls(image_processor=Qwen2VLImageProcessor(**QWEN_PIXELS), tokenizer=tok,
                         video_processor=Qwen2VLVideoProcessor(size=frame_pixels), chat_template=QWEN_TEMPLATE)


def qwen2_vl(seed: int = 0):
    """Qwen2-VL layout at small size: patch 14, 2x2 merge, 16-64 image tokens per image."""
    tok = qwen_tokenizer()
    cfg = _qwen_config(Qwen2VLConfig, dict(embed_dim=32, hidden_size=64, mlp_ratio=2), tok)
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(cfg).eval(), _qwen_processor(Qwen2VLProcessor, tok)


def qwen2_5_vl(seed: int = 0):
    """Qwen2.5-VL at small size: as Qwen2-VL, plus window attention on 2x2-token windows
    (window_size 56 px) in vision block 0 and full attention in block 1; video temporal ids
    spaced by time."""
    tok = qwen_tokenizer()
    # tokens_per_second 24: a video's temporal ids step by 24 * second_per_grid_ts (2 / 24 s a
    # temporal patch at the processor's default 24 fps), not all 0 as at the default 4
    cfg = _qwen_config(Qwen2_5_VLConfig, dict(hidden_size=32, intermediate_size=64, out_hidden_size=64,
                                              window_size=56, fullatt_block_indexes=[1], tokens_per_second=24), tok)
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(cfg).eval(), _qwen_processor(Qwen2_5_VLProcessor, tok)


def image(seed: int, size: tuple[int, int] = (90, 70)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def video(seed: int, frames: int, size: tuple[int, int] = (90, 70)) -> np.ndarray:
    """Random uint8 frames [T, H, W, 3] of size (width, height)."""
    rng = np.random.default_rng(1000 + seed)
    return rng.integers(0, 255, (frames, size[1], size[0], 3), dtype=np.uint8)


def prefilled(vlm, items: list, questions: list[str]):
    """Prefill one batch with `vlm`'s plan: (prepared samples, state, pad [B, L'] of the
    pruned prompt entering the layers after pruning)."""
    from pruner.runtime import collate, prefill

    prepared = vlm.preprocess(items, questions)
    with torch.inference_mode():
        _, state = prefill(vlm.adapter, vlm.plan, collate(vlm.adapter, prepared, vlm.device), room=0)
    return prepared, state, state.segments[-1].pad


# family -> builder of (model, processor); a wide initialisation makes greedy outputs vary
FAMILIES = {"llava": llava, "llava_next": llava_next, "llava_onevision": llava_onevision, "qwen2_vl": qwen2_vl,
            "qwen2_5_vl": qwen2_5_vl}
VIDEO_FAMILIES = ["llava_onevision", "qwen2_vl", "qwen2_5_vl"]

QUESTIONS = ["what is the colour ?", "what is the shape of the red circle ?", "w1 w2 w3 w4 w5 ?",
             "left ?", "what is the colour of the blue square on the left ?"]


# ---------------------------------------------------------------------- tiny datasets


def png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def good_rows(n: int, start: int = 0) -> list[dict]:
    return [{"key": f"r{start + i}", "image": png(image(start + i)), "question": QUESTIONS[i % 5],
             "label": start + i} for i in range(n)]


IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets' Image feature


def image_column(rows: list[dict]) -> pa.Array:
    """Raw bytes when every row has bytes, else datasets-style {bytes, path} structs."""
    if all(isinstance(r["image"], bytes) for r in rows):
        return pa.array([r["image"] for r in rows], pa.binary())
    return pa.array([None if r["image"] is None else {"bytes": None, "path": r["image"]}
                     if isinstance(r["image"], str) else {"bytes": r["image"], "path": None} for r in rows],
                    IMAGE_STRUCT)


def table_of(rows: list[dict]) -> pa.Table:
    return pa.table({"key": [r["key"] for r in rows], "image": image_column(rows),
                     "question": [r["question"] for r in rows], "label": [r["label"] for r in rows]})


def write_parquet(rows: list[dict], path: Path) -> None:
    pq.write_table(table_of(rows), path)


def audio_only() -> bytes:
    """An MP4 with one AAC stream and no video stream."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("aac", rate=8000)
        f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        f.sample_rate = 8000
        c.mux(s.encode(f))
        c.mux(s.encode())
    return buf.getvalue()


# ---------------------------------------------------------------- the job's stages, without Ray
# (imported when called: tests of the pruner alone need not import the pipeline)


def preparer(model_dir: str, base_dir: str | None, preprocessor=None, **job):
    """A Preparer of `table_of`'s columns as the job makes one, from a JobConfig with `job`
    (images up to 1 MP unless given)."""
    from pipeline.config import JobConfig
    from pipeline.stages import Columns, PrepareConfig, Preparer

    cfg = JobConfig(model=model_dir, **{"max_image_pixels": 1_000_000, **job}).resolved()
    cols = Columns(image="image", question="question", id="key")
    return Preparer(PrepareConfig.of(cfg, cols, base_dir), preprocessor)


def answerer(model_dir: str, threads: int | None = None, **job):
    """A model actor as the job makes one, from a JobConfig with `job`."""
    from pipeline.config import JobConfig
    from pipeline.stages import AnswerConfig, Answerer

    return Answerer(AnswerConfig.of(JobConfig(model=model_dir, **job).resolved()), threads)


def caption_config(argv: list[str]):
    """The JobConfig that `jobs/caption.py argv...` runs, for a test that reruns a command-line
    job in this process (its Ray already up) rather than paying a second process's start-up."""
    import argparse

    from pipeline.config import JobConfig, add_job_arguments, job_kwargs

    parser = argparse.ArgumentParser()
    add_job_arguments(parser)
    return JobConfig(**job_kwargs(parser.parse_args(argv)))
