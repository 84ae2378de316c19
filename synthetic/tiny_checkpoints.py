"""Tiny random-weight CHECKPOINTS (model + tokenizer + processor on disk) for the demo and tests.

A real checkpoint reaches the harness through ``from_pretrained(path)`` and
``AutoProcessor.from_pretrained(path)``; these tiny ones are saved with ``save_pretrained`` and
loaded through exactly that path. The tokenizer is a byte-level BPE trained in-process (any text
tokenizes; no download), carrying the family's special tokens.
"""

from __future__ import annotations

import logging
from pathlib import Path

from utils import ensure_torchvision

ensure_torchvision()

from synthetic import tiny_models  # noqa: E402

logger = logging.getLogger(__name__)

_CORPUS = [
    "Is there a cat in the image? Please answer yes or no.",
    "What is the colour of the square? Answer with the option's letter from the given choices directly.",
    "How many circles are there? Read the digit in the image. Which option is correct? A B C D",
    "Yes No the a an of in on is are what which how many colour color shape text number",
]

QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]

# Qwen2.5-VL's chat template as the Qwen/Qwen2.5-VL-*-Instruct processors ship it (the default
# system turn "You are a helpful assistant.", vision placeholders for {"type": "image"} items and
# for VLMEvalKit's {"type": "image", "image": ...} items, optional "Picture n:" ids).
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The minimal template the proxy models were trained on (Qwen2.5-VL's ChatML turns, no system turn:
# their word-level tokenizer only knows the suite's words).
QWEN_MINIMAL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2.5-VL's image processor limits (the real preprocessor_config.json): VLMEvalKit resizes
# first (qwen_vl_utils, min_pixels=1280*28*28), and the processor leaves such an image alone.
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 56 * 56, 28 * 28 * 16384


def build_tokenizer(specials: list[str], vocab_size: int = 400):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with ``specials`` as added special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=specials[0], pad_token=specials[0])


def _random_model(model_cls, cfg, tok, seed: int, *, stop, pad: int, **text_ids: int):
    """A random-weight ``model_cls`` over tokenizer ``tok``: the decoder's vocabulary size and special
    ids (``text_ids``: bos/eos/pad_token_id) from it, greedy generation stopping at ``stop``."""
    from transformers import GenerationConfig


    cfg.text_config.vocab_size = len(tok)
    for key, value in text_ids.items():
        setattr(cfg.text_config, key, value)
    model = tiny_models._build(model_cls, cfg, seed)
    model.generation_config = GenerationConfig(eos_token_id=stop, pad_token_id=pad, do_sample=False)
    return model


def save_tiny_qwen(path: str | Path, seed: int = 0) -> Path:
    """Save a tiny Qwen2.5-VL checkpoint with the real processor's chat template and pixel limits
    (a 112-px image gives 8x8 patches, 16 visual tokens; VLMEvalKit's protocol upscales it to at
    least 1280 tokens first)."""
    from transformers import (
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )


    path = Path(path)
    tok = build_tokenizer(QWEN_SPECIALS)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    cfg = tiny_models.tiny_qwen_config()
    cfg.image_token_id, cfg.video_token_id = ids["<|image_pad|>"], ids["<|video_pad|>"]
    cfg.vision_start_token_id, cfg.vision_end_token_id = ids["<|vision_start|>"], ids["<|vision_end|>"]
    model = _random_model(
        Qwen2_5_VLForConditionalGeneration, cfg, tok, seed,
        stop=[ids["<|im_end|>"], ids["<|endoftext|>"]], pad=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|endoftext|>"],
    )
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    logger.info("saved a tiny Qwen2.5-VL checkpoint to %s", path)
    return path


# ----------------------------------------------------------------------------- InternVL3 (HF-native)
INTERNVL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
# The tokenizer attributes InternVLProcessor reads (the real -hf checkpoints declare the same four).
INTERNVL_NAMED_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}

INTERNVL_CKPT_TILE_PX, INTERNVL_CKPT_PATCH = 448, 56  # 8x8 patches, pixel-shuffled to 16 tokens a tile

# Our own minimal template in InternVL3's chat format (ChatML; system prompt omitted). Each image is
# written as one <IMG_CONTEXT>, which InternVLProcessor expands to <img> + context x (tokens a tile x
# tiles) + </img>.
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif c['type'] == 'video' %}<video>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_tiny_internvl(path: str | Path, seed: int = 0, max_tiles: int = 12) -> Path:
    """Save a tiny InternVL3 (HF-native) checkpoint: the real 448-px tiles (56-px patches, so 16
    visual tokens a tile instead of 256).

    The image processor tiles as the real one does (``crop_to_patches``, closest aspect-ratio grid of
    at most ``max_tiles`` crops, plus a thumbnail when there is more than one crop): a 112x112 image
    is one tile (16 tokens), a 224x112 one is 2 crops + thumbnail (48 tokens).
    """
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
        PreTrainedTokenizerFast,
    )


    path = Path(path)
    base = build_tokenizer(INTERNVL_SPECIALS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=INTERNVL_NAMED_TOKENS,
    )
    ids = {t: tok.convert_tokens_to_ids(t) for t in INTERNVL_SPECIALS}
    cfg = tiny_models.tiny_internvl_config(tile_px=INTERNVL_CKPT_TILE_PX, patch=INTERNVL_CKPT_PATCH)
    cfg.image_token_id = ids["<IMG_CONTEXT>"]
    model = _random_model(
        InternVLForConditionalGeneration, cfg, tok, seed,
        stop=[ids["<|im_end|>"], ids["<|endoftext|>"]], pad=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    tile = {"height": INTERNVL_CKPT_TILE_PX, "width": INTERNVL_CKPT_TILE_PX}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(
            size=tile, crop_to_patches=True, min_patches=1, max_patches=max_tiles,
            image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
        ),
        tokenizer=tok,
        video_processor=InternVLVideoProcessor(size=tile),
        image_seq_length=cfg.image_seq_length,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    logger.info("saved a tiny InternVL3 checkpoint to %s", path)
    return path


# ----------------------------------------------------------------------------- LLaVA-1.5
LLAVA_SPECIALS = ["</s>", "<s>", "<unk>", "<image>"]

# Our own minimal template in LLaVA-1.5's chat format ("USER: <image>\n... ASSISTANT:"; the vicuna
# system prompt omitted), images and text in message order. The tokenizer adds <s> itself, as
# LLaMA's does.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %} "
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
# The same with <s> written by the template, for tokenizers that do not add it (the proxy models').
LLAVA_BOS_CHAT_TEMPLATE = "{{ bos_token }}" + LLAVA_CHAT_TEMPLATE


def save_tiny_llava(path: str | Path, seed: int = 0) -> Path:
    """Save a tiny LLaVA-1.5 checkpoint: 56-px CLIP input, 4x4 patches, 16 visual tokens an image.

    The processor is configured as ``llava-hf/llava-1.5-7b-hf``'s (resize the shortest edge, centre
    crop, CLIP normalisation; ``patch_size``, ``vision_feature_select_strategy="default"`` and one
    additional CLS token), at the tiny image size.
    """
    from tokenizers import processors
    from transformers import (
        CLIPImageProcessor,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )


    path = Path(path)
    base = build_tokenizer(LLAVA_SPECIALS)
    backend = base.backend_tokenizer
    # LLaMA's tokenizer puts <s> in front of every encoded text (the original LLaVA's
    # tokenizer_image_token relies on it: it strips the <s> of every chunk but the first).
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    ids = {t: tok.convert_tokens_to_ids(t) for t in LLAVA_SPECIALS}
    cfg = tiny_models.tiny_llava_config()
    cfg.image_token_id = ids["<image>"]
    model = _random_model(
        LlavaForConditionalGeneration, cfg, tok, seed, stop=ids["</s>"], pad=ids["</s>"],
        bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["</s>"],
    )
    px = tiny_models.LLAVA_IMAGE_PX
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": px}, crop_size={"height": px, "width": px}),
        tokenizer=tok,
        patch_size=tiny_models.LLAVA_PATCH,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    logger.info("saved a tiny LLaVA-1.5 checkpoint to %s", path)
    return path


# ----------------------------------------------------------------------------- LLaVA-NeXT (LLaVA-1.6)
# The chat template of llava-hf/llava-v1.6-vicuna-7b-hf (its chat_template.json; the same text as
# llava-hf/llava-1.5-7b-hf's): "USER: " with every image of the turn first ("<image>\n" each), then its
# texts (each followed by a space), "ASSISTANT:" as the generation prompt; no system prompt.
# VLMEvalKit's LLaVA_Next.generate_inner builds its prompt with it (its apply_prompt_template, with
# the Vicuna system prompt, is never called).
LLAVA_NEXT_VICUNA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def save_tiny_llava_next(path: str | Path, seed: int = 0) -> Path:
    """Save a tiny LLaVA-NeXT (Vicuna) checkpoint: 56-px crops (4 x 4 patches, 16 tokens each), anyres
    over 1 x 2, 2 x 1 and 2 x 2 crops (``tiny_models.LLAVA_NEXT_PINPOINTS``); a 112-px square image is
    the base image + 2 x 2 crops: 16 + 64 visual tokens and 8 newline tokens.

    Tokenizer as the tiny LLaVA-1.5's (``<s>`` in front of every text, as LLaMA's); the processor as
    ``llava-hf/llava-v1.6-vicuna-7b-hf``'s (``LlavaNextImageProcessor``: shortest edge to the crop
    size, centre crop of the base image, pad to the best pinpoint; ``patch_size``, the default feature
    strategy, one additional [CLS] token; its chat template :data:`LLAVA_NEXT_VICUNA_CHAT_TEMPLATE`),
    at the tiny sizes."""
    from tokenizers import processors
    from transformers import LlavaNextForConditionalGeneration, LlavaNextImageProcessor, LlavaNextProcessor, PreTrainedTokenizerFast

    path = Path(path)
    backend = build_tokenizer(LLAVA_SPECIALS).backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    ids = {t: tok.convert_tokens_to_ids(t) for t in LLAVA_SPECIALS}
    cfg = tiny_models.tiny_llava_next_config()
    cfg.image_token_id = ids["<image>"]
    model = _random_model(
        LlavaNextForConditionalGeneration, cfg, tok, seed, stop=ids["</s>"], pad=ids["</s>"],
        bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["</s>"],
    )
    px = tiny_models.LLAVA_NEXT_CROP_PX
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(
            size={"shortest_edge": px}, crop_size={"height": px, "width": px},
            image_grid_pinpoints=tiny_models.LLAVA_NEXT_PINPOINTS,
        ),
        tokenizer=tok,
        patch_size=tiny_models.LLAVA_PATCH,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        chat_template=LLAVA_NEXT_VICUNA_CHAT_TEMPLATE,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    logger.info("saved a tiny LLaVA-NeXT checkpoint to %s", path)
    return path
