"""Tiny random-weight models of the three families, built in-process (tests and the demo).

They share the real architectures (transformers classes, configs with a few small numbers), so
every code path of the harness runs on them in milliseconds; their answers are noise.
"""

from __future__ import annotations

from utils import ensure_torchvision

ensure_torchvision()  # before transformers imports torchvision

import torch

# Token ids of the tiny vocabulary (they must lie below VOCAB).
VOCAB = 512
IMAGE_ID, VIDEO_ID, VISION_START_ID, VISION_END_ID = 500, 501, 502, 503


def _with_attn(cfg, attn: str):
    """Set the attention implementation of a composite config and its text/vision parts."""
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = attn
    return cfg


def _tiny_text(layers: int, kv_heads: int, **extra) -> dict:
    """The decoder part shared by the three tiny families: hidden 64, 4 heads (GQA with ``kv_heads``)."""
    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0),
    )
    return {**base, **extra}


def _build(model_cls, cfg, seed: int):
    torch.manual_seed(seed)
    return model_cls(cfg).eval()


def tiny_qwen_config(layers: int = 4, kv_heads: int = 2, attn: str = "sdpa"):
    from transformers import Qwen2_5_VLConfig

    cfg = Qwen2_5_VLConfig(
        text_config=_tiny_text(
            layers, kv_heads, rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])
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
    return _with_attn(cfg, attn)


def tiny_qwen(seed: int = 0, **kw):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return _build(Qwen2_5_VLForConditionalGeneration, tiny_qwen_config(**kw), seed)


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


# ----------------------------------------------------------------------------- InternVL3 (HF-native)
# The tiny InternVL reuses the special ids above: IMAGE_ID is the image context token
# (``<IMG_CONTEXT>``), VISION_START_ID / VISION_END_ID stand for ``<img>`` / ``</img>``.
INTERNVL_TILE_PX = 112  # the real model's tiles are 448 px
INTERNVL_PATCH = 14
INTERNVL_DOWNSAMPLE = 0.5
INTERNVL_SIDE = int(INTERNVL_TILE_PX // INTERNVL_PATCH * INTERNVL_DOWNSAMPLE)  # 4 tokens a side
INTERNVL_TOKENS_PER_TILE = INTERNVL_SIDE**2  # 16 (the real model: 256)


def tiny_internvl_config(
    layers: int = 4, kv_heads: int = 2, attn: str = "sdpa", tile_px: int = INTERNVL_TILE_PX, patch: int = INTERNVL_PATCH
):
    """An ``InternVLConfig`` with a Qwen2 decoder (hidden 64, GQA) and a 2-layer InternViT on
    112-px tiles (8x8 patches, pixel-shuffled to 4x4 = 16 tokens a tile). The saved checkpoint
    takes the real 448-px tiles with 56-px patches (the same 16 tokens a tile), because VLMEvalKit's
    ``load_image`` always cuts 448-px tiles."""
    from transformers import InternVLConfig

    cfg = InternVLConfig(
        text_config=_tiny_text(layers, kv_heads, model_type="qwen2", tie_word_embeddings=True),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=tile_px,
            patch_size=patch,
        ),
        image_token_id=IMAGE_ID,
        image_seq_length=int(tile_px // patch * INTERNVL_DOWNSAMPLE) ** 2,
        downsample_ratio=INTERNVL_DOWNSAMPLE,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    return _with_attn(cfg, attn)


def tiny_internvl(seed: int = 0, **kw):
    from transformers import InternVLForConditionalGeneration

    return _build(InternVLForConditionalGeneration, tiny_internvl_config(**kw), seed)


def internvl_inputs(tiles=(3,), text=(5, 7), seed: int = 0, between: int = 3) -> dict[str, torch.Tensor]:
    """A prompt ``text[0] tokens, <img><IMG_CONTEXT>...</img>, text[1] tokens`` with random pixels,
    as ``InternVLProcessor`` builds it. ``tiles[i]`` is image ``i``'s tile count (the real
    processor gives 1, or ``n >= 2`` crops plus a thumbnail, the last tile); each tile has
    :data:`INTERNVL_TOKENS_PER_TILE` context tokens, all tiles of an image in one run. Several
    images are separated by ``between`` text tokens. ``pixel_values``: ``[sum(tiles), 3, 112, 112]``."""
    g = torch.Generator().manual_seed(seed)
    ids: list[int] = torch.randint(10, 400, (text[0],), generator=g).tolist()
    for n, t in enumerate(tiles):
        if n:
            ids += torch.randint(10, 400, (between,), generator=g).tolist()
        ids += [VISION_START_ID] + [IMAGE_ID] * (t * INTERNVL_TOKENS_PER_TILE) + [VISION_END_ID]
    ids += torch.randint(10, 400, (text[1],), generator=g).tolist()
    return {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "pixel_values": torch.randn(sum(tiles), 3, INTERNVL_TILE_PX, INTERNVL_TILE_PX, generator=g),
    }


# ----------------------------------------------------------------------------- LLaVA-1.5
LLAVA_IMAGE_PX = 56  # the real model: 336
LLAVA_PATCH = 14
LLAVA_SIDE = LLAVA_IMAGE_PX // LLAVA_PATCH  # 4 (the real model: 24)
LLAVA_TOKENS = LLAVA_SIDE**2  # 16 visual tokens an image (CLS dropped; the real model: 576)


def tiny_llava_config(layers: int = 4, kv_heads: int = 2, attn: str = "sdpa", select_strategy: str = "default"):
    """A ``LlavaConfig`` with a LLaMA decoder (hidden 64, GQA) and a 2-layer CLIP ViT on 56-px
    images (4x4 patches + CLS; features of the penultimate layer, CLS dropped: 16 tokens;
    ``select_strategy="full"`` keeps CLS: 17)."""
    from transformers import LlavaConfig

    cfg = LlavaConfig(
        text_config=_tiny_text(layers, kv_heads, model_type="llama", pad_token_id=0),
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=LLAVA_IMAGE_PX,
            patch_size=LLAVA_PATCH,
            projection_dim=32,
        ),
        image_token_index=IMAGE_ID,
        image_seq_length=LLAVA_TOKENS,
        vision_feature_layer=-2,
        vision_feature_select_strategy=select_strategy,
    )
    return _with_attn(cfg, attn)


def tiny_llava(seed: int = 0, **kw):
    from transformers import LlavaForConditionalGeneration

    return _build(LlavaForConditionalGeneration, tiny_llava_config(**kw), seed)


def llava_inputs(
    images: int = 1, text=(5, 7), seed: int = 0, between: int = 3, tokens: int = LLAVA_TOKENS
) -> dict[str, torch.Tensor]:
    """A prompt ``text[0] tokens, <image> x tokens, text[1] tokens`` with random pixels, as
    ``LlavaProcessor`` expands it (``tokens``: 16, or 17 for ``vision_feature_select_strategy=
    "full"``, which keeps CLS); several images are separated by ``between`` text tokens.
    ``pixel_values``: ``[images, 3, 56, 56]``."""
    g = torch.Generator().manual_seed(seed)
    ids: list[int] = torch.randint(10, 400, (text[0],), generator=g).tolist()
    for n in range(images):
        if n:
            ids += torch.randint(10, 400, (between,), generator=g).tolist()
        ids += [IMAGE_ID] * tokens
    ids += torch.randint(10, 400, (text[1],), generator=g).tolist()
    return {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "pixel_values": torch.randn(images, 3, LLAVA_IMAGE_PX, LLAVA_IMAGE_PX, generator=g),
    }


# ----------------------------------------------------------------------------- LLaVA-NeXT (LLaVA-1.6)
LLAVA_NEXT_CROP_PX = 56  # the vision tower's input (the real model: 336)
LLAVA_NEXT_SIDE = LLAVA_NEXT_CROP_PX // LLAVA_PATCH  # 4 tokens a crop side (the real model: 24)
# The real model's pinpoints are 336 x {1, 2, 3} combinations (up to 672 x 672 = 2 x 2 crops); the tiny
# one: 1 x 2, 2 x 1 and 2 x 2 crops of 56 px.
LLAVA_NEXT_PINPOINTS = [[56, 112], [112, 56], [112, 112]]


def tiny_llava_next_config(layers: int = 4, kv_heads: int = 2, attn: str = "sdpa", decoder: str = "llama",
                           sliding_window: int | None = None):
    """A ``LlavaNextConfig`` with a LLaMA (Vicuna) or Mistral decoder (hidden 64, GQA) and a 2-layer
    CLIP ViT on 56-px crops (4 x 4 patches + CLS; penultimate layer, CLS dropped: 16 tokens a crop),
    anyres over :data:`LLAVA_NEXT_PINPOINTS`. ``sliding_window``: the Mistral decoder's (None, as
    llava-hf's Mistral checkpoint)."""
    from transformers import LlavaNextConfig

    text = _tiny_text(layers, kv_heads, model_type=decoder, pad_token_id=0)
    if decoder == "mistral":
        text["sliding_window"] = sliding_window
    cfg = LlavaNextConfig(
        text_config=text,
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=LLAVA_NEXT_CROP_PX,
            patch_size=LLAVA_PATCH,
            projection_dim=32,
        ),
        image_token_index=IMAGE_ID,
        image_seq_length=LLAVA_NEXT_SIDE**2,
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    return _with_attn(cfg, attn)


def tiny_llava_next(seed: int = 0, **kw):
    from transformers import LlavaNextForConditionalGeneration

    return _build(LlavaNextForConditionalGeneration, tiny_llava_next_config(**kw), seed)


def llava_next_placeholders(size: tuple[int, int]) -> int:
    """``<image>`` placeholders the LLaVA-NeXT processor writes for an image of ``size`` (height,
    width) on the tiny model: ``LlavaNextProcessor``'s own count (transformers 5.23.0,
    ``_get_number_of_features`` with ``patch_size`` 14 and one [CLS], minus the [CLS] of the default
    strategy), run on a stand-in holding the tiny pinpoints."""
    import types

    from transformers import LlavaNextProcessor

    stand_in = types.SimpleNamespace(
        image_processor=types.SimpleNamespace(image_grid_pinpoints=LLAVA_NEXT_PINPOINTS),
        patch_size=LLAVA_PATCH,
        num_additional_image_tokens=1,
    )
    stand_in._get_unpadded_features = lambda *a: LlavaNextProcessor._get_unpadded_features(stand_in, *a)
    h, w = size
    return LlavaNextProcessor._get_number_of_features(stand_in, h, w, LLAVA_NEXT_CROP_PX, LLAVA_NEXT_CROP_PX) - 1


def llava_next_inputs(sizes=((30, 100),), text=(5, 7), seed: int = 0, between: int = 3) -> dict[str, torch.Tensor]:
    """A prompt ``text[0] tokens, <image> x placeholders, text[1] tokens`` with random pixels, as
    ``LlavaNextProcessor`` builds it: ``sizes`` are the images' (height, width) in pixels (the
    ``image_sizes``), each expanded to :func:`llava_next_placeholders` tokens; ``pixel_values``
    ``[images, 1 + max crops, 3, 56, 56]`` (the base image, then the crops, zero-padded to the most
    crops as the processor pads); several images are separated by ``between`` text tokens."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    g = torch.Generator().manual_seed(seed)
    ids: list[int] = torch.randint(10, 400, (text[0],), generator=g).tolist()
    items = [image_size_to_num_patches(list(s), LLAVA_NEXT_PINPOINTS, LLAVA_NEXT_CROP_PX) for s in sizes]
    pixels = torch.zeros(len(sizes), max(items), 3, LLAVA_NEXT_CROP_PX, LLAVA_NEXT_CROP_PX)
    for n, (size, k) in enumerate(zip(sizes, items)):
        if n:
            ids += torch.randint(10, 400, (between,), generator=g).tolist()
        ids += [IMAGE_ID] * llava_next_placeholders(size)
        pixels[n, :k] = torch.randn(k, 3, LLAVA_NEXT_CROP_PX, LLAVA_NEXT_CROP_PX, generator=g)
    ids += torch.randint(10, 400, (text[1],), generator=g).tolist()
    return {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "pixel_values": pixels,
        "image_sizes": torch.tensor(sizes),
    }
