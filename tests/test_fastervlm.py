"""FasterVLM (``methods/fastervlm.py``): the rule on hand-made attention, the captured [CLS]
attention against the unpatched eager CLIP, exactness against the no-cache reference, refusals."""

from __future__ import annotations

import pytest
import torch

from families import FAMILIES, cfg, check_pruned_decode
from methods.fastervlm import fastervlm_select


def test_selection_on_hand_made_attention():
    # 2 heads over 6 patches; the original ranks by the head MEAN: [0.2, 0.35, 0.05, 0.3, 0.05, 0.05]
    # (head 0 alone would rank 3 first, head 1 alone 1 first). T = 3 -> patches 1, 3, 0; T = 1 -> 1.
    attn = torch.tensor([[0.1, 0.3, 0.0, 0.5, 0.05, 0.05], [0.3, 0.4, 0.1, 0.1, 0.05, 0.05]])
    assert fastervlm_select(attn, 3).tolist() == [1, 3, 0]
    assert fastervlm_select(attn, 1).tolist() == [1]
    assert fastervlm_select(attn.mean(0), 2).tolist() == [1, 3]  # already averaged: the same
    with pytest.raises(ValueError, match="keep must be"):
        fastervlm_select(attn, 7)


@torch.no_grad()
def test_engine_keeps_the_eager_cls_topk_and_equals_the_reference():
    """Under sdpa the engine's [CLS] row equals the unpatched eager CLIP's ``attentions[-2][:, :, 0, 1:]``:
    the kept tokens are its head-mean top-T of each image; logits equal the reference."""
    spec = FAMILIES["llava"]
    eager = spec.build(seed=5, attn="eager")
    inputs = spec.inputs("2img", seed=5)
    vision = eager.model.vision_tower(inputs["pixel_values"], output_attentions=True)
    keep = 5  # budget(16, 0.3) = round(4.8)
    image = torch.nonzero(inputs["input_ids"][0] == eager.config.image_token_id).flatten()
    expected = []
    for b in range(2):
        top = vision.attentions[-2][b, :, 0, 1:].mean(0).topk(keep).indices
        expected += image[16 * b + top].tolist()
    model = spec.build(seed=5)  # the same weights, sdpa
    spec.module.patch(model, cfg(KEEP_RATIO=0.3, PRUNE_METHOD_PRE_LLM="fastervlm_pre_llm"))
    prefill = model(**inputs).logits[0]
    (event,) = model.prune_trace
    assert event.kept == sorted(expected) and event.images == [(16, keep), (16, keep)]
    check_pruned_decode(spec.module, spec.ref, model, inputs, prefill)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "internvl"])
def test_refused_where_the_vit_has_no_cls(family):
    spec = FAMILIES[family]
    with pytest.raises(ValueError, match="fastervlm_pre_llm does not apply to .* supports llava.*no \\[CLS\\] token"):
        spec.module.patch(spec.build(), cfg(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="fastervlm_pre_llm"))
