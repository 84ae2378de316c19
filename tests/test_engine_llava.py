"""LLaVA-1.5 specifics: the per-image layout from ``pixel_values`` and the "full" feature strategy.

The engine's exactness tests for LLaVA (and the other families) run in ``tests/test_engine.py``,
parametrised over ``tests/families.py``.
"""

from __future__ import annotations

import types

import torch

import custom_llava
import methods
from synthetic import tiny_models as tm
from families import cfg, check_pruned_decode, spy_on
from reference import LlavaRef

FAMILY = custom_llava.FAMILY


def test_layout_one_grid_per_image():
    model = types.SimpleNamespace(config=tm.tiny_llava_config())  # the layout reads the config only
    inputs = tm.llava_inputs(images=2)
    assert FAMILY.image_layout(model, inputs) == [(16, (1, 4, 4))] * 2
    # The "full" strategy (as a forward argument or in the config) keeps CLS first: no grid.
    assert FAMILY.image_layout(model, {**inputs, "vision_feature_select_strategy": "full"}) == [(17, None)] * 2
    # Without pixel_values (e.g. features passed as mm_encoder_outputs): unknown, runs split by the engine.
    assert FAMILY.image_layout(model, {"input_ids": inputs["input_ids"]}) == []


def test_layout_at_the_real_model_sizes():
    """CLIP ViT-L/14 at 336 px, penultimate layer, CLS dropped: 24 x 24 = 576 tokens."""
    from transformers import LlavaConfig

    real = types.SimpleNamespace(config=LlavaConfig())  # the llava-1.5-7b defaults, no weights
    assert real.config.vision_feature_layer == -2 and real.config.image_seq_length == 576
    pixels = torch.empty(1, 3, 336, 336, device="meta")
    assert FAMILY.image_layout(real, {"pixel_values": pixels}) == [(576, (1, 24, 24))]


@torch.no_grad()
def test_full_strategy_keeps_cls_and_is_exact(monkeypatch):
    """``vision_feature_select_strategy="full"``: 17 tokens an image (CLS first), pruned as one
    image without a grid; prefill and decode still equal the reference."""
    model = tm.tiny_llava(seed=11, select_strategy="full")
    inputs = tm.llava_inputs(images=2, seed=11, tokens=17)
    seen = spy_on(monkeypatch, "divprune_pre_llm", methods.get_method("divprune_pre_llm").fn)
    custom_llava.patch(
        model, cfg(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="divprune_pre_llm", INTRA_LLM_LAYER_SPECS="2:fastv_intra_llm:0.25")
    )
    prefill = model(**inputs).logits[0]
    pre, intra = model.prune_trace
    assert [(c.n_orig, c.grid) for c in seen] == [(17, None), (17, None)]
    assert pre.images == [(17, 9), (17, 9)] and intra.images == [(9, 4), (9, 4)]
    check_pruned_decode(custom_llava, LlavaRef, model, inputs, prefill)
