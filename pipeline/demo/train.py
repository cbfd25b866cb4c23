"""Training of the demo model (`pipeline.demo.modeling`) from scratch on generated scenes, on CPU.

Why it is built this way:
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
  it learns neither to read the question's words nor to find the objects (trained on all 576
  from the start it plateaus far below the committed model; the learning curves are in
  docs/performance.md).
- RoPE base 1e6, balanced yes/no existence questions, a training-only caption in shape
  order (`by_shape`), a curriculum over the number of objects, lr warm-up then cosine.

`run` trains with a `TrainConfig` (the flags of ``jobs/train_demo_model.py``): the state is
saved every ``save_every`` steps so that ``resume`` continues exactly (the batches are
step-determined); a ``resume`` with different ``steps`` rescales the remaining cosine
schedule. Whenever the eval accuracy improves the model is written to ``out`` (atomically);
the learning curve goes to ``<state>_curve.jsonl`` next to the state directory.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast

from ..compare.answers import normalize_answer
from . import EVAL_PARQUET, MODEL_DIR
from . import scenes as S
from .modeling import N_IMAGE_TOKENS, build_model, build_processor, build_tokenizer, image_features, pixel_values

# Training question mix (caption at most once per image, it is long).
TYPE_WEIGHTS = {"exists": 4, "color": 4, "shape": 1, "size": 1}


class PatchHeads(torch.nn.Module):
    """Training-only per-patch classifiers on the projected image tokens (not saved with the model).

    The class vectors are the LLM's own (tied) embeddings of the words "red", "circle", "small",
    ..., compared by cosine: an object's image token is pushed towards the sum of the embeddings
    of its colour, shape and size words, with equal weight. Why: the LLM answers by matching the
    question's words against image tokens, so the tokens should carry every attribute in the
    question's own terms (measured: object tokens end at cosine 0.6 / 0.5 / 0.4 with their
    colour / shape / size words).
    """

    ATTRIBUTES = (("color", S.COLOR_NAMES), ("shape", S.SHAPE_NAMES), ("size", S.SIZES))

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
        separate term. Averaged over all patches, the object patches' gradient is too
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


def scene_patch_labels(scene: S.Scene) -> torch.Tensor:
    """[576, 3] colour/shape/size class per patch, 0 = background."""
    idx = S.patch_labels(scene).reshape(-1)  # [576]
    table = np.zeros((len(scene.objects) + 1, 3), dtype=np.int64)  # row 0: background
    for i, o in enumerate(scene.objects):
        table[i + 1] = (S.COLOR_NAMES.index(o.color) + 1, S.SHAPE_NAMES.index(o.shape) + 1, S.SIZES.index(o.size) + 1)
    return torch.from_numpy(table[idx + 1])


BY_SHAPE = "list the objects by shape."


def by_shape(scene: S.Scene) -> str:
    """Training-only caption in shape order, shape before colour: "circle red, square blue".

    Why: the caption ("red circle, blue square") teaches the LLM to find an object by the
    colour word just before it, but not by a shape word: trained on captions alone, it
    answers "is there a red circle?" from whether red is present, and "what color is the
    circle?" at chance. Listing by shape puts the shape word right before the colour to be
    looked up, as captions do for colour.
    """
    objs = sorted(scene.objects, key=lambda o: (S.SHAPE_NAMES.index(o.shape), S.COLOR_NAMES.index(o.color)))
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


# ----------------------------------------------------------------------------- losses


def drop_background(b: dict, img: torch.Tensor, n_keep: int, image_id: int, seed: int) -> tuple[dict, torch.Tensor]:
    """Keep every object patch and a random sample of background patches, ``n_keep`` image
    tokens a sample, at their original positions.

    Why: at 576 image tokens an untrained LLM's attention spreads over ~560 identical
    background tokens, so the gradient that would teach it to find the 1-20 object tokens is
    diluted ~50x. Training first on short image prefixes and growing them to the full 576
    (``keep_start``/``keep_ramp``) lets it learn the search where the signal is strong.
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
def answer(model: LlavaForConditionalGeneration, processor: LlavaProcessor, rows: list[dict],
           batch: int = 16) -> list[str]:
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
        ok = normalize_answer(p) == normalize_answer(r["answer_gt"])
        hits[r["question_type"]].append(ok)
        hits["overall"].append(ok)
    return {k: round(float(np.mean(v)), 4) for k, v in sorted(hits.items())}


# ----------------------------------------------------------------------------- state


def _swap_in(tmp: Path, target: Path, old: Path) -> None:
    """Replace ``target`` by the finished directory ``tmp``, the previous one moved to ``old`` and
    deleted: at every moment ``target`` is a whole directory (or, between two renames, absent)."""
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def save_model_dir(model, processor, target: Path) -> None:
    """Write to a temp dir next to the target, then swap it in: readers never see half a model."""
    target = Path(target)
    tmp = Path(tempfile.mkdtemp(prefix=".model-", dir=target.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    tmp.chmod(0o755)  # mkdtemp makes it private
    for f in tmp.iterdir():
        f.chmod(0o644)
    _swap_in(tmp, target, target.with_name(".model-old"))


def _named_parameters(model, heads) -> list[tuple[str, torch.nn.Parameter]]:
    """The model's parameters by name, then the patch heads' as "heads.<name>"."""
    return list(model.named_parameters()) + [(f"heads.{n}", p) for n, p in heads.named_parameters()]


def save_state(state_dir: Path, model, heads, opt, meta: dict) -> None:
    """Weights, AdamW moments and counters as safetensors + json (no pickle)."""
    tmp = Path(tempfile.mkdtemp(prefix=".state-", dir=state_dir.parent))
    weights = {f"model.{k}": v.detach().contiguous() for k, v in model.named_parameters()}  # tied: once
    weights |= {f"heads.{k}": v for k, v in heads.state_dict().items()}
    save_file(weights, tmp / "weights.safetensors")
    names = {id(p): n for n, p in _named_parameters(model, heads)}
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
    _swap_in(tmp, state_dir, state_dir.with_name(state_dir.name + ".old"))


def load_state(state_dir: Path, model, heads, opt) -> dict:
    w = load_file(state_dir / "weights.safetensors")
    model.load_state_dict({k[6:]: v for k, v in w.items() if k.startswith("model.")}, strict=False)
    heads.load_state_dict({k[6:]: v for k, v in w.items() if k.startswith("heads.")})
    meta = json.loads((state_dir / "state.json").read_text())
    moments = load_file(state_dir / "optimizer.safetensors")
    for name, p in _named_parameters(model, heads):
        if name in meta["adam_steps"]:
            opt.state[p] = {
                "step": torch.tensor(meta["adam_steps"][name]),
                "exp_avg": moments[f"{name}.exp_avg"],
                "exp_avg_sq": moments[f"{name}.exp_avg_sq"],
            }
    return meta


# ----------------------------------------------------------------------------- schedule and loop


@dataclass
class TrainConfig:
    """Everything a training run is set by; ``jobs/train_demo_model.py`` has a flag for each
    field, with these defaults (the help there says what each does)."""

    seed: int = 0
    steps: int = 2100  # total, warm-up included: sets the lr schedule
    warmup_steps: int = 300  # vision-only patch-label steps
    curriculum: int = 100  # QA steps per extra object
    batch: int = 16
    warmup_batch: int = 32
    turns: int = 14
    lr: float = 2e-3
    patch_loss: float = 1.0  # weight of the patch loss in the QA stage
    extra_images: int = 0  # images per QA step for the patch loss only
    keep_start: float = 0.0  # fraction of the 576 image tokens the QA stage starts with
    keep_hold: int = 400  # QA steps at keep_start
    keep_ramp: int = 700  # QA steps over which that grows to all 576
    vision_from: Path | None = None  # fresh LLM, vision tower and projector from a saved model dir
    freeze_vision: bool = True  # QA stage: train only projector and LLM
    vision_width: int = 128
    vision_layers: int = 3
    llm_width: int = 256
    llm_layers: int = 4
    rope_theta: float = 1e6
    eval_every: int = 100  # steps between evals on eval_rows rows
    eval_rows: int = 100
    save_every: int = 50  # steps between resumable state saves
    threads: int = 2
    fp32: bool = False  # no bf16 autocast
    state: Path = Path("runs/demo_train")
    out: Path = MODEL_DIR
    resume: bool = False  # continue from state
    init_from: Path | None = None  # start from a saved model dir (fresh optimizer and schedule)
    eval_only: bool = False  # evaluate out on the full eval split and exit


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Warm-up stage: constant. QA stage: linear warm-up then cosine to 5 %."""
    if step < cfg.warmup_steps:
        return cfg.lr
    t = step - cfg.warmup_steps
    if t < 100:
        return cfg.lr * (t + 1) / 100
    frac = min(1.0, (t - 100) / max(1, cfg.steps - cfg.warmup_steps - 100))
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


def keep_at(step: int, cfg: TrainConfig) -> int:
    """Image tokens kept a sample: ``keep_start`` of 576 for the first ``keep_hold`` QA steps,
    then growing linearly to all 576 over ``keep_ramp`` steps."""
    t = max(0, step - cfg.warmup_steps - cfg.keep_hold)
    frac = cfg.keep_start + (1 - cfg.keep_start) * min(1.0, t / max(1, cfg.keep_ramp))
    return N_IMAGE_TOKENS if frac >= 1 else max(32, round(frac * N_IMAGE_TOKENS))


def max_objects_at(step: int, cfg: TrainConfig) -> int:
    """Curriculum: 2 objects at first, one more every ``curriculum`` QA steps, up to 5."""
    if step < cfg.warmup_steps:
        return 5
    return min(5, 2 + (step - cfg.warmup_steps) // cfg.curriculum)


def run(cfg: TrainConfig) -> None:
    """Train as ``cfg`` says (or, with ``eval_only``, evaluate ``cfg.out`` on the whole eval split)."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if cfg.eval_only:
        model = LlavaForConditionalGeneration.from_pretrained(cfg.out, dtype=torch.float32)
        processor = LlavaProcessor.from_pretrained(cfg.out)
        t0 = time.time()
        print(json.dumps(evaluate(model, processor, load_eval())), f"({time.time() - t0:.0f} s)")
        return

    tok = build_tokenizer()
    processor = build_processor(tok)
    if cfg.init_from:
        model = LlavaForConditionalGeneration.from_pretrained(cfg.init_from, dtype=torch.float32)
    else:
        model = build_model(tok, cfg.vision_width, cfg.vision_layers, cfg.llm_width, cfg.llm_layers, cfg.rope_theta)
    if cfg.vision_from:
        donor = LlavaForConditionalGeneration.from_pretrained(cfg.vision_from, dtype=torch.float32).model
        model.model.vision_tower.load_state_dict(donor.vision_tower.state_dict())
        model.model.multi_modal_projector.load_state_dict(donor.multi_modal_projector.state_dict())
    heads = PatchHeads(model.config.text_config.hidden_size, tok)
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.01)
    meta = {"step": 0, "minutes": 0.0, "best": -1.0}
    if cfg.resume:
        meta = load_state(cfg.state, model, heads, opt)
        print(f"resumed at step {meta['step']} ({meta['minutes']:.1f} min, best {meta['best']})")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters; {asdict(cfg)}")

    enc = Encoder(processor)
    eval_rows = load_eval(cfg.eval_rows)
    cfg.state.parent.mkdir(parents=True, exist_ok=True)
    curve = cfg.state.parent / f"{cfg.state.name}_curve.jsonl"
    step, minutes = meta["step"], meta["minutes"]
    bar = tqdm(total=cfg.steps, initial=step, mininterval=20, dynamic_ncols=False, ncols=110)
    t_last, ema = time.time(), {}
    while step < cfg.steps:
        if step % 10 == 0:  # under contention one thread beats two spinning at barriers
            load = os.getloadavg()[0]
            if load > cfg.threads + 1.5:
                torch.set_num_threads(1)
            elif load < 1.5:
                torch.set_num_threads(cfg.threads)
        model.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        vision_only = step < cfg.warmup_steps
        model.model.vision_tower.requires_grad_(vision_only or not cfg.freeze_vision)
        b = make_batch(enc, cfg.seed, step, cfg.warmup_batch if vision_only else cfg.batch, cfg.turns,
                       max_objects_at(step, cfg), 0 if vision_only else cfg.extra_images)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not cfg.fp32):
            img = image_features(model, b["pixel_values"])  # [B, 576, D]
            patch_loss, patch_acc = heads.loss(img, b["patch_labels"], model.get_input_embeddings().weight)
            if vision_only:
                loss, qa = patch_loss, torch.tensor(float("nan"))  # LLM untouched
            else:
                n_keep = keep_at(step, cfg)
                qb, qimg = b, img
                if n_keep < N_IMAGE_TOKENS:
                    qb, qimg = drop_background(b, img, n_keep, enc.image_id, cfg.seed * 1_000_003 + step)
                qa = qa_loss(model, qb, qimg)
                loss = qa + cfg.patch_loss * patch_loss
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
        postfix = {k: f"{v:.3f}" for k, v in ema.items()} | {"keep": keep_at(step, cfg), "min": f"{minutes:.0f}"}
        bar.set_postfix(postfix, refresh=False)

        stage_end = step == cfg.warmup_steps
        if (not vision_only and step % cfg.eval_every == 0) or step == cfg.steps:
            acc = evaluate(model, processor, eval_rows)
            tqdm.write(f"step {step} min {minutes:.1f} eval {json.dumps(acc)}")
            with curve.open("a") as f:
                f.write(json.dumps({"step": step, "minutes": round(minutes, 1), "loss": ema, **acc}) + "\n")
            if acc["overall"] > meta["best"]:
                meta["best"] = acc["overall"]
                save_model_dir(model, processor, cfg.out)
                tqdm.write(f"  new best {acc['overall']:.3f}: saved {cfg.out}")
            t_last = time.time()  # eval time does not count as training minutes
        if step % cfg.save_every == 0 or step == cfg.steps or stage_end:
            meta.update(step=step, minutes=round(minutes, 2))
            save_state(cfg.state, model, heads, opt, {**meta, "args": {k: str(v) for k, v in asdict(cfg).items()}})
            t_last = time.time()
    bar.close()
