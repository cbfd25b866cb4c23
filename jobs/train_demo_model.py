"""Train the demo LLaVA-1.5-shaped model from scratch on generated scenes, on CPU.

Why it is built this way (issue #6 has the failed attempts it learns from):
- Warm-up: the vision tower and projector first learn, from the generator's per-patch labels,
  what colour/shape/size of object lies under each patch (`PatchHeads`; the class vectors are
  the LLM's own word embeddings, so an object's token comes to look like its words). Without
  it the LLM never starts using the image. Objects sit on the patch grid
  (`pipeline.demo.scenes`); per-patch shape reaches 95 % in 300 steps.
- Then question answering with the vision tower frozen. Many questions per image amortise
  the image tokens: the token sequence is the chat template's multi-turn rendering, but each
  turn attends only to the image prefix and itself, with positions restarting after it, so
  every answer is trained in exactly the state single-question inference sees.
- Background dropping (`drop_background`): the QA stage starts with 32 image tokens (every
  object patch plus random background, at their original positions) and grows to all 576.
  At 576 an untrained LLM's attention is spread over ~560 identical background tokens, and
  it learnt neither to read the question's words nor to find the objects: the previous
  recipe (all 576 from the start) reached at best 59 % on eval rows 0-99 in 73 minutes; this
  one 74 % in 7 minutes and 89 % in 42.
- RoPE base 1e6, balanced yes/no existence questions, a training-only caption in shape
  order (`by_shape`), a curriculum over the number of objects, lr warm-up then cosine.

The committed model: vision tower and projector from the previous checkpoint (300 vision-only
steps and 1,050 QA steps of the old recipe), then a fresh LLM trained with
``--vision-from <that model> --warmup-steps 0 --steps 1800``, resumed at step 1100 with
``--steps 1500`` (the defaults otherwise). The defaults do both stages from scratch in one run
(not yet run end to end: its vision stage gets 300 steps, where the committed tower had 1,350).
``--resume`` with a different ``--steps`` rescales the remaining cosine schedule.

    python jobs/train_demo_model.py                 # fresh run, state in runs/demo_train/
    python jobs/train_demo_model.py --resume        # continue from runs/demo_train/
    python jobs/train_demo_model.py --vision-from pipeline/demo/model --warmup-steps 0 --steps 1800
    python jobs/train_demo_model.py --eval-only     # full eval split, per question type

Whenever the eval accuracy improves the model is written to pipeline/demo/model/ (atomically);
the learning curve goes to runs/demo_train_curve.jsonl.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from pipeline.demo import EVAL_PARQUET, MODEL_DIR
from pipeline.demo import scenes as S

SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", "<image>"]
N_IMAGE_TOKENS = S.GRID * S.GRID  # 576
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# llava-1.5 style; whitespace is irrelevant to the word-level tokenizer.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %} "
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Training question mix (caption at most once per image, it is long).
TYPE_WEIGHTS = {"exists": 4, "color": 4, "shape": 1, "size": 1}


# ----------------------------------------------------------------------------- model building


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over exactly the generator's words plus the chat template's."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    words = SPECIALS + ["user", "assistant", ":"] + S.vocabulary() + ["by"]  # "by": BY_SHAPE
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", words.index("<s>"))]
    )
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",  # batched generation
        model_max_length=2048,
    )


def build_processor(tok: PreTrainedTokenizerFast) -> LlavaProcessor:
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": S.IMAGE_SIZE},
        crop_size={"height": S.IMAGE_SIZE, "width": S.IMAGE_SIZE},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=S.PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )


def build_model(tok: PreTrainedTokenizerFast, vision_width: int, vision_layers: int, llm_width: int,
                llm_layers: int, rope_theta: float = 1e6) -> LlavaForConditionalGeneration:
    """LLaVA-1.5 token layout (336 px, patch 14, 576 image tokens) at small widths.

    RoPE base 1e6 (Qwen2's) rather than Llama-2's 1e4: with 64-dim heads and base 1e4 only ~14
    of a head's dims turn by less than half a radian across the 576 image positions, so few
    dims can match a question word against an object wherever it lies in the image.
    """
    vision = CLIPVisionConfig(
        image_size=S.IMAGE_SIZE, patch_size=S.PATCH, hidden_size=vision_width, intermediate_size=4 * vision_width,
        num_hidden_layers=vision_layers, num_attention_heads=vision_width // 32, projection_dim=vision_width,
    )
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=llm_width, intermediate_size=3 * llm_width, num_hidden_layers=llm_layers,
        num_attention_heads=llm_width // 64, num_key_value_heads=llm_width // 64, max_position_embeddings=1024,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=N_IMAGE_TOKENS, vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.max_new_tokens = 24
    model.generation_config.do_sample = False
    _sincos_init(model)
    return model


def _sincos_init(model: LlavaForConditionalGeneration) -> None:
    """2-D sin-cos vision position embeddings: patches know where they are from step 0."""
    emb = model.model.vision_tower.embeddings.position_embedding.weight  # [1 + 576, D]
    d = emb.shape[1] // 4
    freqs = 1.0 / (100.0 ** (torch.arange(d) / d))  # [d]
    ys, xs = torch.meshgrid(torch.arange(S.GRID), torch.arange(S.GRID), indexing="ij")
    ay, ax = ys.reshape(-1, 1) * freqs, xs.reshape(-1, 1) * freqs  # [576, d]
    with torch.no_grad():
        emb[1:] = 0.5 * torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=1)
        emb[0] = 0


class PatchHeads(torch.nn.Module):
    """Training-only per-patch classifiers on the projected image tokens (not saved with the model).

    The class vectors are the LLM's own (tied) embeddings of the words "red", "circle", "small",
    ..., compared by cosine: an object's image token is pushed towards the sum of the embeddings
    of its colour, shape and size words, with equal weight. Why: the LLM answers by matching the
    question's words against image tokens, so the tokens should carry every attribute in the
    question's own terms (measured: object tokens end at cosine 0.6 / 0.5 / 0.4 with their
    colour / shape / size words).
    """

    ATTRIBUTES = (("color", S.COLOR_NAMES), ("shape", S.SHAPES), ("size", S.SIZES))

    def __init__(self, dim: int, tok: PreTrainedTokenizerFast):
        super().__init__()
        for name, words in self.ATTRIBUTES:
            self.register_buffer(f"{name}_ids", torch.tensor(tok.convert_tokens_to_ids(list(words))), persistent=False)
        self.background = torch.nn.Parameter(torch.randn(len(self.ATTRIBUTES), dim) * 0.02)  # class 0, per attribute
        self.scale = torch.nn.Parameter(torch.tensor(10.0))

    def loss(self, feats: torch.Tensor, labels: torch.Tensor,
             embed: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """feats: [B, 576, D]; labels: [B, 576, 3] (colour, shape, size; 0 = background);
        embed: the LLM's input embedding matrix [V, D].

        Objects cover ~2 % of the patches, so every loss is averaged over object patches;
        colour (which also says "object or not") adds the background patches' mean as a
        separate term. Averaged over all patches, the object patches' gradient was too
        diluted to learn from.
        """
        obj = labels[..., 0] > 0  # [B, 576]
        f = F.normalize(feats.float(), dim=-1)
        total, acc = 0.0, {}
        for i, (name, _) in enumerate(self.ATTRIBUTES):
            classes = torch.cat([self.background[i:i + 1], embed[getattr(self, f"{name}_ids")]]).float()  # [C, D]
            logits = self.scale * f @ F.normalize(classes, dim=-1).T  # [B, 576, C]
            total = total + F.cross_entropy(logits[obj], labels[..., i][obj])
            if i == 0:
                total = total + F.cross_entropy(logits[~obj], labels[..., 0][~obj])
            acc[name] = (logits.argmax(-1) == labels[..., i])[obj].float().mean().item()
        return total, acc


# ----------------------------------------------------------------------------- data


def pixel_values(images: list[Image.Image]) -> torch.Tensor:
    """Same numbers as the CLIPImageProcessor for 336x336 inputs (checked in --check), [B, 3, H, W]."""
    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images])) / 255.0  # [B, H, W, 3]
    x = (x - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    return x.permute(0, 3, 1, 2).contiguous()


def scene_patch_labels(scene: S.Scene) -> torch.Tensor:
    """[576, 3] colour/shape/size class per patch, 0 = background."""
    idx = S.patch_labels(scene).reshape(-1)  # [576]
    table = np.zeros((len(scene.objects) + 1, 3), dtype=np.int64)  # row 0: background
    for i, o in enumerate(scene.objects):
        table[i + 1] = (S.COLOR_NAMES.index(o.color) + 1, S.SHAPES.index(o.shape) + 1, S.SIZES.index(o.size) + 1)
    return torch.from_numpy(table[idx + 1])


BY_SHAPE = "list the objects by shape."


def by_shape(scene: S.Scene) -> str:
    """Training-only caption in shape order, shape before colour: "circle red, square blue".

    Why: the caption ("red circle, blue square") teaches the LLM to find an object by the
    colour word just before, and it did; but it never learnt to find one by a shape word:
    "is there a red circle?" was answered from whether red was present (P(yes) 0.52 whether
    or not a circle was), and "what color is the circle?" stayed at chance. Listing by shape
    puts the shape word right before the colour to be looked up, as captions do for colour.
    With it (and a longer run; its own share is not isolated) existence reached 95 % and
    colour 49 % on the eval split.
    """
    objs = sorted(scene.objects, key=lambda o: (S.SHAPES.index(o.shape), S.COLOR_NAMES.index(o.color)))
    return ", ".join(f"{o.shape} {o.color}" for o in objs)


def sample_turns(scene: S.Scene, rng: random.Random, n_turns: int) -> list[tuple[str, str]]:
    """Up to n_turns distinct (question, answer) pairs about one scene, caption at most once."""
    types = list(TYPE_WEIGHTS)
    weights = [TYPE_WEIGHTS[t] for t in types]
    turns: dict[str, str] = {}
    if rng.random() < 0.6:
        q, a = S.questions(scene, rng, "caption")
        turns[q] = a
    if rng.random() < 0.6:
        turns[BY_SHAPE] = by_shape(scene)
    exists = {"yes": 0, "no": 0}
    for _ in range(4 * n_turns):
        if len(turns) >= n_turns:
            break
        qtype = rng.choices(types, weights)[0]
        qa = S.questions(scene, rng, qtype)
        if qa is None or qa[0] in turns:
            continue
        if qtype == "exists":  # as many yes as no: a scene has few yes-questions, many no-questions
            if exists[qa[1]] > exists["yes" if qa[1] == "no" else "no"]:
                continue
            exists[qa[1]] += 1
        turns[qa[0]] = qa[1]
    items = list(turns.items())
    rng.shuffle(items)
    return items


class Encoder:
    """Chat-template text -> token ids, with the segment ids and positions for per-turn masking."""

    def __init__(self, processor: LlavaProcessor):
        self.processor = processor
        tok = processor.tokenizer
        self.tok = tok
        self.image_id = tok.convert_tokens_to_ids("<image>")
        self.eos_id = tok.eos_token_id
        self.assistant_id = tok.convert_tokens_to_ids("assistant")
        self.colon_id = tok.convert_tokens_to_ids(":")

    def conversation(self, turns: list[tuple[str, str]]) -> list[dict]:
        msgs = []
        for i, (q, a) in enumerate(turns):
            content = ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": q}]
            msgs.append({"role": "user", "content": content})
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
        return msgs

    def encode(self, turns: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
        text = self.processor.apply_chat_template(self.conversation(turns), tokenize=False)
        ids = self.tok(text)["input_ids"]
        k = ids.index(self.image_id)
        ids = ids[:k] + [self.image_id] * N_IMAGE_TOKENS + ids[k + 1:]
        prefix = k + N_IMAGE_TOKENS  # bos user : <image>*576
        labels, segment, positions = [-100] * len(ids), [0] * len(ids), list(range(len(ids)))
        seg, pos, in_answer = 0, prefix, False
        for t in range(prefix, len(ids)):
            # a turn's block starts at the prefix end and after each "</s> user :"
            if t == prefix or ids[t - 3] == self.eos_id:
                seg, pos = seg + 1, prefix
            segment[t], positions[t] = seg, pos
            pos += 1
            if in_answer:
                labels[t] = ids[t]
                in_answer = ids[t] != self.eos_id
            elif ids[t] == self.colon_id and ids[t - 1] == self.assistant_id:
                in_answer = True
        return {
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "segment": torch.tensor(segment),
            "position_ids": torch.tensor(positions),
        }


def make_batch(enc: Encoder, seed: int, step: int, batch: int, n_turns: int, max_objects: int,
               extra_images: int = 0) -> dict:
    """Step-determined batch: resuming at step k reproduces exactly the data a full run sees.

    ``extra_images`` more scenes (up to 5 objects) only feed the patch loss: cheap vision signal.
    """
    rng = random.Random(seed * 1_000_003 + step)
    scenes = [S.sample_scene(rng, max_objects) for _ in range(batch)]
    seqs = [enc.encode(sample_turns(sc, rng, n_turns)) for sc in scenes]
    scenes += [S.sample_scene(rng, 5) for _ in range(extra_images)]
    length = max(len(s["input_ids"]) for s in seqs)

    def pad(key, value):
        return torch.stack([F.pad(s[key], (0, length - len(s[key])), value=value) for s in seqs])

    return {
        "pixel_values": pixel_values([S.render(sc) for sc in scenes]),  # [B + extra, 3, 336, 336]
        "patch_labels": torch.stack([scene_patch_labels(sc) for sc in scenes]),  # [B + extra, 576, 3]
        "input_ids": pad("input_ids", enc.tok.pad_token_id),  # [B, L]
        "labels": pad("labels", -100),  # [B, L]
        "segment": pad("segment", -1),  # [B, L], -1 = padding
        "position_ids": pad("position_ids", 0),  # [B, L]
    }


def turn_mask(segment: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Causal, and each turn sees only the image prefix (segment 0) and itself, [B, 1, L, L].

    Additive float mask: SDPA on CPU is noticeably slower with a boolean one.
    """
    L = segment.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool).tril()  # [L, L]
    q, k = segment[:, :, None], segment[:, None, :]  # [B, L, 1], [B, 1, L]
    allowed = causal & (k >= 0) & ((k == 0) | (k == q))
    allowed |= torch.eye(L, dtype=torch.bool)  # padding rows attend to themselves: no NaN
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, float("-inf"))[:, None]


# ----------------------------------------------------------------------------- forward passes


def image_features(model: LlavaForConditionalGeneration, pixels: torch.Tensor) -> torch.Tensor:
    """Projected image tokens, [B, 576, D_llm]."""
    out = model.model.vision_tower(pixels, output_hidden_states=True)
    feats = out.hidden_states[model.config.vision_feature_layer][:, 1:]  # [B, 576, D_vis], CLS dropped
    return model.model.multi_modal_projector(feats)


def drop_background(b: dict, img: torch.Tensor, n_keep: int, image_id: int, seed: int) -> tuple[dict, torch.Tensor]:
    """Keep every object patch and a random sample of background patches, ``n_keep`` image
    tokens a sample, at their original positions.

    Why: at 576 image tokens an untrained LLM's attention spreads over ~560 identical
    background tokens, so the gradient that would teach it to find the 1-20 object tokens is
    diluted ~50x. Training first on short image prefixes and growing them to the full 576
    (``--keep-start``/``--keep-ramp``) lets it learn the search where the signal is strong.
    """
    ids = b["input_ids"]  # [B, L]
    B = len(ids)
    is_img = ids == image_id  # [B, L], N_IMAGE_TOKENS a row
    obj = b["patch_labels"][:B, :, 0] > 0  # [B, 576]
    gen = torch.Generator().manual_seed(seed)
    score = torch.rand(B, N_IMAGE_TOKENS, generator=gen) + 2.0 * obj  # objects first
    keep_img = torch.zeros(B, N_IMAGE_TOKENS, dtype=torch.bool)
    keep_img.scatter_(1, score.topk(n_keep, dim=1).indices, True)  # [B, 576]
    keep = ~is_img
    keep[is_img] = keep_img.reshape(-1)  # image tokens are in grid order
    n = int(keep[0].sum())
    per_token = ("input_ids", "labels", "segment", "position_ids")
    out = {k: (v[keep].view(B, n) if k in per_token else v) for k, v in b.items()}  # [B, n]
    return out, img[:B][keep_img].view(B, n_keep, -1)  # [B, n_keep, D]


def qa_loss(model: LlavaForConditionalGeneration, b: dict, img: torch.Tensor) -> torch.Tensor:
    ids = b["input_ids"]  # [B, L]
    emb = model.model.get_input_embeddings()(ids)  # [B, L, D]
    is_img = (ids == model.config.image_token_index)[..., None]  # [B, L, 1]
    emb = emb.masked_scatter(is_img, img[: len(ids)].to(emb.dtype))  # extra images: patch loss only
    mask_dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else emb.dtype
    h = model.model.language_model(
        inputs_embeds=emb, attention_mask=turn_mask(b["segment"], mask_dtype), position_ids=b["position_ids"]
    ).last_hidden_state  # [B, L, D]
    labels = b["labels"][:, 1:]  # [B, L-1]
    keep = labels != -100
    logits = model.lm_head(h[:, :-1][keep])  # [T, V]
    return F.cross_entropy(logits.float(), labels[keep])


# ----------------------------------------------------------------------------- evaluation


def load_eval(n: int | None = None) -> list[dict]:
    rows = pq.read_table(EVAL_PARQUET).to_pylist()
    return rows if n is None else rows[:n]


@torch.no_grad()
def answer(model: LlavaForConditionalGeneration, processor: LlavaProcessor, rows: list[dict], batch: int = 16) -> list[str]:
    """Greedy answers through the public path: chat template, processor, generate."""
    outs = []
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        prompts = [
            processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["question"]}]}],
                add_generation_prompt=True,
            )
            for r in chunk
        ]
        images = [Image.open(io.BytesIO(r["image"])).convert("RGB") for r in chunk]
        inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
        gen = model.generate(**inputs, max_new_tokens=24, do_sample=False)
        outs += processor.batch_decode(gen[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return outs


def evaluate(model, processor, rows: list[dict]) -> dict[str, float]:
    """Exact-match accuracy per question type, plus "overall"."""
    model.eval()
    preds = answer(model, processor, rows)
    hits = defaultdict(list)
    for r, p in zip(rows, preds):
        ok = S.normalize_answer(p) == S.normalize_answer(r["answer_gt"])
        hits[r["question_type"]].append(ok)
        hits["overall"].append(ok)
    return {k: round(float(np.mean(v)), 4) for k, v in sorted(hits.items())}


# ----------------------------------------------------------------------------- state


def save_model_dir(model, processor, target: Path) -> None:
    """Write to a temp dir next to the target, then swap it in: readers never see half a model."""
    target = Path(target)
    tmp = Path(tempfile.mkdtemp(prefix=".model-", dir=target.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    tmp.chmod(0o755)  # mkdtemp makes it private
    for f in tmp.iterdir():
        f.chmod(0o644)
    old = target.with_name(".model-old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def save_state(state_dir: Path, model, heads, opt, meta: dict) -> None:
    """Weights, AdamW moments and counters as safetensors + json (no pickle)."""
    tmp = Path(tempfile.mkdtemp(prefix=".state-", dir=state_dir.parent))
    weights = {f"model.{k}": v.detach().contiguous() for k, v in model.named_parameters()}  # tied: once
    weights |= {f"heads.{k}": v for k, v in heads.state_dict().items()}
    save_file(weights, tmp / "weights.safetensors")
    names = {id(p): n for n, p in list(model.named_parameters()) + [(f"heads.{n}", p) for n, p in heads.named_parameters()]}
    moments, steps = {}, {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if st:
                moments[f"{names[id(p)]}.exp_avg"] = st["exp_avg"]
                moments[f"{names[id(p)]}.exp_avg_sq"] = st["exp_avg_sq"]
                steps[names[id(p)]] = float(st["step"])
    save_file(moments, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps({**meta, "adam_steps": steps}, indent=1))
    old = state_dir.with_name(state_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if state_dir.exists():
        state_dir.rename(old)
    tmp.rename(state_dir)
    shutil.rmtree(old, ignore_errors=True)


def load_state(state_dir: Path, model, heads, opt) -> dict:
    w = load_file(state_dir / "weights.safetensors")
    model.load_state_dict({k[6:]: v for k, v in w.items() if k.startswith("model.")}, strict=False)
    heads.load_state_dict({k[6:]: v for k, v in w.items() if k.startswith("heads.")})
    meta = json.loads((state_dir / "state.json").read_text())
    moments = load_file(state_dir / "optimizer.safetensors")
    named = list(model.named_parameters()) + [(f"heads.{n}", p) for n, p in heads.named_parameters()]
    for name, p in named:
        if name in meta["adam_steps"]:
            opt.state[p] = {
                "step": torch.tensor(meta["adam_steps"][name]),
                "exp_avg": moments[f"{name}.exp_avg"],
                "exp_avg_sq": moments[f"{name}.exp_avg_sq"],
            }
    return meta


# ----------------------------------------------------------------------------- main


def lr_at(step: int, a) -> float:
    """Warm-up stage: constant. QA stage: linear warm-up then cosine to 5 %."""
    if step < a.warmup_steps:
        return a.lr
    t = step - a.warmup_steps
    if t < 100:
        return a.lr * (t + 1) / 100
    frac = min(1.0, (t - 100) / max(1, a.steps - a.warmup_steps - 100))
    return a.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


def keep_at(step: int, a) -> int:
    """Image tokens kept a sample: ``--keep-start`` of 576 for the first ``--keep-hold`` QA steps,
    then growing linearly to all 576 over ``--keep-ramp`` steps."""
    t = max(0, step - a.warmup_steps - a.keep_hold)
    frac = a.keep_start + (1 - a.keep_start) * min(1.0, t / max(1, a.keep_ramp))
    return N_IMAGE_TOKENS if frac >= 1 else max(32, round(frac * N_IMAGE_TOKENS))


def max_objects_at(step: int, a) -> int:
    """Curriculum: 2 objects at first, one more every ``curriculum`` QA steps, up to 5."""
    if step < a.warmup_steps:
        return 5
    return min(5, 2 + (step - a.warmup_steps) // a.curriculum)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=2100, help="total steps incl. warm-up (sets the lr schedule)")
    p.add_argument("--warmup-steps", type=int, default=300, help="vision-only patch-label steps")
    p.add_argument("--curriculum", type=int, default=100, help="QA steps per extra object")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--warmup-batch", type=int, default=32)
    p.add_argument("--turns", type=int, default=14)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--patch-loss", type=float, default=1.0, help="weight of the patch loss in the QA stage")
    p.add_argument("--extra-images", type=int, default=0, help="images per QA step for the patch loss only")
    p.add_argument("--keep-start", type=float, default=0.0,
                   help="fraction of the 576 image tokens the QA stage starts with (objects always kept)")
    p.add_argument("--keep-hold", type=int, default=400, help="QA steps at --keep-start")
    p.add_argument("--keep-ramp", type=int, default=700, help="QA steps over which that then grows to all 576")
    p.add_argument("--vision-from", type=Path, help="fresh LLM, vision tower and projector from a saved model dir")
    p.add_argument("--freeze-vision", action=argparse.BooleanOptionalAction, default=True,
                   help="QA stage: train only projector and LLM (default: %(default)s)")
    p.add_argument("--vision-width", type=int, default=128)
    p.add_argument("--vision-layers", type=int, default=3)
    p.add_argument("--llm-width", type=int, default=256)
    p.add_argument("--llm-layers", type=int, default=4)
    p.add_argument("--rope-theta", type=float, default=1e6)
    p.add_argument("--eval-every", type=int, default=100, help="steps between evals on --eval-rows rows")
    p.add_argument("--eval-rows", type=int, default=100)
    p.add_argument("--save-every", type=int, default=50, help="steps between resumable state saves")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast (bf16 is ~4x faster on AVX512-BF16 CPUs)")
    p.add_argument("--state", type=Path, default=Path("runs/demo_train"))
    p.add_argument("--out", type=Path, default=MODEL_DIR)
    p.add_argument("--resume", action="store_true", help="continue from --state")
    p.add_argument("--init-from", type=Path, help="start from a saved model dir (fresh optimizer and schedule)")
    p.add_argument("--eval-only", action="store_true", help="evaluate --out on the full eval split and exit")
    return p.parse_args()


def main() -> None:
    a = parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    if a.eval_only:
        model = LlavaForConditionalGeneration.from_pretrained(a.out, dtype=torch.float32)
        processor = LlavaProcessor.from_pretrained(a.out)
        t0 = time.time()
        print(json.dumps(evaluate(model, processor, load_eval())), f"({time.time() - t0:.0f} s)")
        return

    tok = build_tokenizer()
    processor = build_processor(tok)
    if a.init_from:
        model = LlavaForConditionalGeneration.from_pretrained(a.init_from, dtype=torch.float32)
    else:
        model = build_model(tok, a.vision_width, a.vision_layers, a.llm_width, a.llm_layers, a.rope_theta)
    if a.vision_from:
        donor = LlavaForConditionalGeneration.from_pretrained(a.vision_from, dtype=torch.float32).model
        model.model.vision_tower.load_state_dict(donor.vision_tower.state_dict())
        model.model.multi_modal_projector.load_state_dict(donor.multi_modal_projector.state_dict())
    heads = PatchHeads(model.config.text_config.hidden_size, tok)
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.98), weight_decay=0.01)
    meta = {"step": 0, "minutes": 0.0, "best": -1.0}
    if a.resume:
        meta = load_state(a.state, model, heads, opt)
        print(f"resumed at step {meta['step']} ({meta['minutes']:.1f} min, best {meta['best']})")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters; {vars(a)}")

    enc = Encoder(processor)
    eval_rows = load_eval(a.eval_rows)
    a.state.parent.mkdir(parents=True, exist_ok=True)
    curve = a.state.parent / f"{a.state.name}_curve.jsonl"
    step, minutes = meta["step"], meta["minutes"]
    bar = tqdm(total=a.steps, initial=step, mininterval=20, dynamic_ncols=False, ncols=110)
    t_last, ema = time.time(), {}
    while step < a.steps:
        if step % 10 == 0:  # under contention one thread beats two spinning at barriers
            load = os.getloadavg()[0]
            if load > a.threads + 1.5:
                torch.set_num_threads(1)
            elif load < 1.5:
                torch.set_num_threads(a.threads)
        model.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a)
        vision_only = step < a.warmup_steps
        model.model.vision_tower.requires_grad_(vision_only or not a.freeze_vision)
        b = make_batch(enc, a.seed, step, a.warmup_batch if vision_only else a.batch, a.turns, max_objects_at(step, a),
                       0 if vision_only else a.extra_images)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not a.fp32):
            img = image_features(model, b["pixel_values"])  # [B, 576, D]
            patch_loss, patch_acc = heads.loss(img, b["patch_labels"], model.get_input_embeddings().weight)
            if vision_only:
                loss, qa = patch_loss, torch.tensor(float("nan"))  # LLM untouched
            else:
                n_keep = keep_at(step, a)
                qb, qimg = b, img
                if n_keep < N_IMAGE_TOKENS:
                    qb, qimg = drop_background(b, img, n_keep, enc.image_id, a.seed * 1_000_003 + step)
                qa = qa_loss(model, qb, qimg)
                loss = qa + a.patch_loss * patch_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        now = time.time()
        minutes += (now - t_last) / 60
        t_last = now
        for k, v in {"patch": patch_loss.item(), **patch_acc, "qa": qa.item()}.items():
            ema[k] = v if k not in ema or math.isnan(ema[k]) else 0.9 * ema[k] + 0.1 * v
        bar.update(1)
        postfix = {k: f"{v:.3f}" for k, v in ema.items()} | {"keep": keep_at(step, a), "min": f"{minutes:.0f}"}
        bar.set_postfix(postfix, refresh=False)

        stage_end = step == a.warmup_steps
        if (not vision_only and step % a.eval_every == 0) or step == a.steps:
            acc = evaluate(model, processor, eval_rows)
            tqdm.write(f"step {step} min {minutes:.1f} eval {json.dumps(acc)}")
            with curve.open("a") as f:
                f.write(json.dumps({"step": step, "minutes": round(minutes, 1), "loss": ema, **acc}) + "\n")
            if acc["overall"] > meta["best"]:
                meta["best"] = acc["overall"]
                save_model_dir(model, processor, a.out)
                tqdm.write(f"  new best {acc['overall']:.3f}: saved {a.out}")
            t_last = time.time()  # eval time does not count as training minutes
        if step % a.save_every == 0 or step == a.steps or stage_end:
            meta.update(step=step, minutes=round(minutes, 2))
            save_state(a.state, model, heads, opt, {**meta, "args": {k: str(v) for k, v in vars(a).items()}})
            t_last = time.time()
    bar.close()


if __name__ == "__main__":
    main()
