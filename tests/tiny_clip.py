"""A tiny random CLIP checkpoint whose vision tower IS a tiny LLaVA's, saved to disk, for
CDPruner's tests: the method loads it through the same path as ``openai/clip-vit-large-patch14-336``
(``PRUNE_ARGS clip_model=<dir>``: ``AutoTokenizer``, ``CLIPTextModelWithProjection``,
``CLIPVisionModelWithProjection``)."""

from __future__ import annotations

from pathlib import Path

import torch

CHUNK = 8  # the tiny text tower's max_position_embeddings (the real one: 77)


def _byte_chars() -> list[str]:
    """GPT-2 / CLIP's printable stand-ins of the 256 bytes (``bytes_to_unicode``'s values, in its order)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


def save_tiny_clip(path: Path, llava_model, seed: int = 0, projection_dim: int = 16) -> str:
    """Save a CLIP (tokenizer + model) to ``path``: a byte-level vocabulary without merges (each
    byte, alone and word-final; BOS/EOS the two highest ids as in CLIP), a 2-layer random text
    tower of :data:`CHUNK` positions with the legacy ``eos_token_id=2`` of the openai configs
    (pooling at the highest id), random projections, and ``llava_model``'s own vision tower
    weights (so the method's tower check passes). Returns ``str(path)``."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    vision = llava_model.config.vision_config.to_dict()
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=CHUNK,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
            projection_dim=projection_dim,
        ),
        vision_config={**vision, "projection_dim": projection_dim},
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    clip = CLIPModel(config).eval()
    clip.vision_model.load_state_dict(llava_model.model.vision_tower.state_dict())
    clip.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
