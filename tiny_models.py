"""Tiny random-weight models of the three families, built in-process (tests and the demo).

They share the real architectures (transformers classes, configs with a few small numbers), so
every code path of the harness runs on them in milliseconds; their answers are noise.
"""

from __future__ import annotations

import tv_compat

tv_compat.ensure_torchvision()  # before transformers imports torchvision

import torch

# Token ids of the tiny vocabulary (they must lie below VOCAB).
VOCAB = 512
IMAGE_ID, VIDEO_ID, VISION_START_ID, VISION_END_ID = 500, 501, 502, 503


def tiny_qwen_config(layers: int = 4, kv_heads: int = 2, attn: str = "sdpa"):
    from transformers import Qwen2_5_VLConfig

    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=kv_heads,
            max_position_embeddings=4096,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]),
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
        ),
        image_token_id=IMAGE_ID,
        video_token_id=VIDEO_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
    )
    cfg._attn_implementation = attn
    cfg.text_config._attn_implementation = attn
    cfg.vision_config._attn_implementation = attn
    return cfg


def tiny_qwen(seed: int = 0, **kw):
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(tiny_qwen_config(**kw)).eval()


def qwen_inputs(grids=((1, 8, 8),), text=(5, 7), seed: int = 0, between: int = 3) -> dict[str, torch.Tensor]:
    """A prompt ``text[0] tokens, <image>..., text[1] tokens`` with random pixels, as the processor
    would build it. ``grids`` are patch grids ``(t, h, w)`` (merge 2: ``t*h*w/4`` tokens each);
    several images are separated by ``between`` text tokens."""
    g = torch.Generator().manual_seed(seed)
    ids: list[int] = torch.randint(10, 400, (text[0],), generator=g).tolist()
    types: list[int] = [0] * len(ids)
    for n, (t, h, w) in enumerate(grids):
        if n:
            ids += torch.randint(10, 400, (between,), generator=g).tolist()
            types += [0] * between
        k = t * h * w // 4
        ids += [VISION_START_ID] + [IMAGE_ID] * k + [VISION_END_ID]
        types += [0] + [1] * k + [0]
    ids += torch.randint(10, 400, (text[1],), generator=g).tolist()
    types += [0] * text[1]
    patches = sum(t * h * w for t, h, w in grids)
    return {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "pixel_values": torch.randn(patches, 3 * 2 * 14 * 14, generator=g),
        "image_grid_thw": torch.tensor(grids),
        "mm_token_type_ids": torch.tensor([types]),
    }
