"""Tiny random-weight CHECKPOINTS (model + tokenizer + processor on disk) for the demo and tests.

A real checkpoint reaches the harness through ``from_pretrained(path)`` and
``AutoProcessor.from_pretrained(path)``; these tiny ones are saved with ``save_pretrained`` and
loaded through exactly that path. The tokenizer is a byte-level BPE trained in-process (any text
tokenizes; no download), carrying the family's special tokens.
"""

from __future__ import annotations

import logging
from pathlib import Path

import tv_compat

tv_compat.ensure_torchvision()

import torch  # noqa: E402

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

# Our own minimal template in Qwen2.5-VL's chat format (system prompt omitted).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


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


def save_tiny_qwen(path: str | Path, seed: int = 0, image_pixels: int = 112 * 112) -> Path:
    """Save a tiny Qwen2.5-VL checkpoint (a 112-px image gives 8x8 patches, 16 visual tokens)."""
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    import tiny_models

    path = Path(path)
    tok = build_tokenizer(QWEN_SPECIALS)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    cfg = tiny_models.tiny_qwen_config()
    cfg.image_token_id, cfg.video_token_id = ids["<|image_pad|>"], ids["<|video_pad|>"]
    cfg.vision_start_token_id, cfg.vision_end_token_id = ids["<|vision_start|>"], ids["<|vision_end|>"]
    cfg.text_config.vocab_size = len(tok)
    cfg.text_config.bos_token_id = cfg.text_config.eos_token_id = ids["<|endoftext|>"]
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], pad_token_id=ids["<|endoftext|>"], do_sample=False
    )
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=image_pixels, max_pixels=image_pixels),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    logger.info("saved a tiny Qwen2.5-VL checkpoint to %s", path)
    return path
