"""The demo model's definition: a LLaVA-1.5-shaped model (336 px, patch 14, 576 image tokens
on a 24x24 grid) at small widths, its word-level tokenizer, processor and chat template, and
the two pieces of its forward pass that training runs directly (pixel values, image tokens).

Everything that is saved with the model and loaded by ``from_pretrained`` is built here;
`pipeline.demo.train` trains it.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from . import scenes as S

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


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over exactly the generator's words plus the chat template's.

    Decoding joins words with spaces and then removes the space before punctuation, so a
    caption decodes as "red circle, blue square" (the dataset's own text), not "red circle ,
    blue square". The tokenizers library's WordPiece decoder does exactly that (``cleanup``:
    " ," " ." " ?" " !" lose their space; its English contractions never occur in this
    vocabulary, and no word carries its "##" continuation prefix).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    words = SPECIALS + ["user", "assistant", ":"] + S.vocabulary() + ["by"]  # "by": train.BY_SHAPE
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", words.index("<s>"))]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
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


def pixel_values(images: list[Image.Image]) -> torch.Tensor:
    """Same numbers as the CLIPImageProcessor for 336x336 inputs, without its per-image PIL work,
    [B, 3, H, W] (tests/test_train_demo.py checks the training path against the processor's)."""
    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images])) / 255.0  # [B, H, W, 3]
    x = (x - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    return x.permute(0, 3, 1, 2).contiguous()


def image_features(model: LlavaForConditionalGeneration, pixels: torch.Tensor) -> torch.Tensor:
    """Projected image tokens, [B, 576, D_llm]."""
    out = model.model.vision_tower(pixels, output_hidden_states=True)
    feats = out.hidden_states[model.config.vision_feature_layer][:, 1:]  # [B, 576, D_vis], CLS dropped
    return model.model.multi_modal_projector(feats)
