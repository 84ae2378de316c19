"""PruMerge, PruMerge+ and VisionZip through the engine on LLaVA (VisionZip's Qwen2.5-VL / InternVL
path: ``tests/test_methods_vit.py``): the ViT inputs the engine captures
equal the unpatched model's own tensors, and a run with merged (and extra) tokens equals the
unpatched model without cache on the same merged sequence."""

from __future__ import annotations

import pytest
import torch

import methods
from families import FAMILIES, cfg, check_against_reference, greedy, spy_on
from methods.prumerge import prumerge_cls_attention, prumerge_select
from methods.prumerge_plus import prumerge_plus_select
from methods.visionzip import visionzip_select
from reference import LlavaRef, drops_from_trace

N = 16  # tokens per image of the tiny LLaVA (4 x 4 patches)
SEED = 0  # both images have one [CLS]-attention outlier (IQR) at this seed: PruMerge keeps 1 + extra


@torch.no_grad()
def unpatched_vit(model, pixel_values):
    """The unpatched (eager) model's own ViT tensors, read as the originals read them: forward hooks
    on the last layer's q_proj / k_proj (PruMerge) and on the feature layer's k_proj (VisionZip's
    metric: heads split, averaged), ``hidden_states[-2]`` and ``attentions[-2]``."""
    layers = model.model.vision_tower.encoder.layers  # 2 layers: the feature layer is layers[-2]
    got = {}
    hooks = [
        layers[-1].self_attn.q_proj.register_forward_hook(lambda m, a, o: got.__setitem__("q", o)),
        layers[-1].self_attn.k_proj.register_forward_hook(lambda m, a, o: got.__setitem__("k", o)),
        layers[-2].self_attn.k_proj.register_forward_hook(lambda m, a, o: got.__setitem__("fk", o)),
    ]
    out = model.model.vision_tower(pixel_values, output_hidden_states=True, output_attentions=True)
    for h in hooks:
        h.remove()
    b, n1, _ = got["fk"].shape
    heads = model.config.vision_config.num_attention_heads
    return dict(
        hidden=out.hidden_states[-2],  # [B, 1+N, C]
        cls_attention=out.attentions[-2][:, :, 0, 1:],  # [B, H, N]
        feature_keys=got["fk"].view(b, n1, heads, -1).mean(dim=2),  # [B, 1+N, hd]
        q_last=got["q"],
        k_last=got["k"],
    )


def expected_image(method: str, vit: dict, b: int, keep: int, projector) -> tuple[list[int], dict[int, torch.Tensor]]:
    """``(kept slots, {slot: LLM-space feature that replaces the projected patch})`` for image ``b``,
    from the pure functions on the unpatched tensors; the slot rules written out independently:
    PruMerge's extra token in the last left-over slot, VisionZip's [CLS] in the first."""
    hidden = vit["hidden"][b]
    if method == "visionzip_pre_llm":
        n_ctx = round(keep * 10 / 64 + 1e-9)
        out = visionzip_select(hidden, vit["cls_attention"][b], vit["feature_keys"][b], dominant=keep - n_ctx, contextual=n_ctx)
        n_dom = keep - n_ctx - 1
        slot = min(set(range(N)) - set(out.indices.tolist()))
        merged = {int(i): projector(f) for i, f in zip(out.indices[n_dom:], out.features[n_dom:])}
        merged[slot] = projector(out.cls_feature)
        return sorted(out.indices.tolist() + [slot]), merged
    select = prumerge_plus_select if method == "prumerge_plus_pre_llm" else prumerge_select
    q, k = vit["q_last"][b], vit["k_last"][b]
    out = select(hidden[1:], k[1:], prumerge_cls_attention(q, k), limit=keep - 1)
    slot = max(set(range(N)) - set(out.indices.tolist()))
    merged = {int(i): projector(f) for i, f in zip(out.indices, out.merged)}
    merged[slot] = projector(out.extra)
    return sorted(out.indices.tolist() + [slot]), merged


# (method, KEEP_RATIO, tokens per image, image 0's slots). At SEED the IQR outlier of image 0 is
# token 2 (of image 1: token 1), ratio 1/16. PruMerge: [2] + the extra token in the last left-over
# slot, 15. PruMerge+: step int(16) = 16, stride int(16 / 3) = 5 -> samples range(0, 15, 5) =
# [0, 5, 10], + extra in 15; capped at budget(16, 0.125) = 2: the outlier + extra. VisionZip at
# budget 8: contextual round(8 * 10/64) = 1, dominant 7 = [CLS] + the 6 patches with the highest
# head-summed [CLS] attention (image 0: 2, 14, 5, 15, 9, 13); the 10 left, [0, 1, 3, 4, 6, 7, 8, 10,
# 11, 12], have one target at list position 0 (token 0); [CLS] takes the first left-over slot, 1.
CASES = [
    ("prumerge_pre_llm", 0.5, 2, [2, 15]),
    ("prumerge_plus_pre_llm", 0.5, 5, [0, 2, 5, 10, 15]),
    ("prumerge_plus_pre_llm", 0.125, 2, [2, 15]),
    ("visionzip_pre_llm", 0.5, 8, [0, 1, 2, 5, 9, 13, 14, 15]),
]


@pytest.mark.parametrize("method, ratio, per_image, slots0", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
@torch.no_grad()
def test_captured_vit_inputs_selection_and_merged_run_equal_the_unpatched_model(
    monkeypatch, method, ratio, per_image, slots0
):
    spec = FAMILIES["llava"]
    eager = spec.build(seed=SEED, attn="eager")
    inputs = spec.make_inputs(seed=SEED, **spec.variants["2img"])
    vit = unpatched_vit(eager, inputs["pixel_values"])
    projector = eager.model.multi_modal_projector
    keep = methods.budget(N, ratio)
    image = torch.nonzero(inputs["input_ids"][0] == eager.config.image_token_id).flatten()
    kept, replaced = [], {}
    for b in range(2):
        slots, merged = expected_image(method, vit, b, keep, projector)
        if b == 0:
            assert slots == slots0  # the pure functions on the unpatched tensors, as derived above
        kept += image[N * b + torch.tensor(slots)].tolist()
        replaced.update({int(image[N * b + s]): f for s, f in merged.items()})

    model = spec.build(seed=SEED)  # the same weights, sdpa
    seen = spy_on(monkeypatch, method, select=methods.get_method(method).fn)  # the real method, recorded
    spec.module.patch(model, cfg(KEEP_RATIO=ratio, PRUNE_METHOD_PRE_LLM=method))
    prefill_logits = model(**inputs).logits[0]  # [L', V]
    (event,) = model.prune_trace
    assert event.kept == kept and event.n_keep == len(kept)
    assert [k for _, k in event.images] == [per_image] * 2

    # The captured inputs are the unpatched model's tensors (image b = the b-th context).
    assert len(seen) == 2
    for b, ctx in enumerate(seen):
        assert ctx["vit_projector"] is model.model.multi_modal_projector
        close = torch.testing.assert_close
        close(ctx["vit_features"], vit["hidden"][b, 1:])
        if method == "visionzip_pre_llm":
            close(ctx["vit_cls_feature"], vit["hidden"][b, 0])
            close(ctx["vit_cls_attention"], vit["cls_attention"][b])
            close(ctx["vit_feature_keys"], vit["feature_keys"][b])
        else:
            close(ctx["vit_last_queries"], vit["q_last"][b])
            close(ctx["vit_last_keys"], vit["k_last"][b])

    # Prefill and decode equal the unpatched model without cache on the merged sequence: the
    # projected patches, with the merged / extra / [CLS] features written into their slots.
    class MergedRef(LlavaRef):
        @staticmethod
        def embed(model, inputs, ids):
            emb = LlavaRef.embed(model, inputs, ids).clone()
            for pos, feature in replaced.items():
                emb[0, pos] = feature
            return emb

    seq, steps = greedy(model, inputs)
    assert model.prune_trace[0].kept == kept
    spec.module.unpatch(model)
    check_against_reference(MergedRef, model, inputs, seq, steps, drops_from_trace([event]), prefill_logits)


@pytest.mark.parametrize("method", ["prumerge_pre_llm", "prumerge_plus_pre_llm"])  # VisionZip: tests/test_methods_vit.py
@pytest.mark.parametrize("family", ["qwen2_5_vl", "internvl"])
def test_cls_merge_methods_are_refused_where_the_vit_has_no_cls(family, method):
    spec = FAMILIES[family]
    with pytest.raises(ValueError, match=f"{method} does not apply to .* supports llava"):
        spec.module.patch(spec.build(), cfg(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM=method))
