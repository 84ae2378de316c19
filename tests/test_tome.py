"""ToMe (``methods/tome.py``): the matching on hand-made tensors, the KEEP_RATIO -> r schedule, the
CLIP merge on LLaVA against the unpatched CLIP merged by hand (layer by layer, loops), the
adaptation after the projector on Qwen2.5-VL / InternVL3, and exactness against the no-cache
reference on the merged sequence."""

from __future__ import annotations

import math

import pytest
import torch

import methods
from families import FAMILIES, cfg, check_against_reference, greedy
from methods.tome import tome_match, tome_merge_mean, tome_merge_tokens, tome_schedule
from reference import LlavaRef, drops_from_trace


def _unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_matching_on_hand_made_tokens():
    # 7 tokens, [CLS] first. A = even positions {0, 2, 4, 6}, B = odd {1, 3, 5}. Metric directions:
    # B: t1 at 0 deg, t3 at 90, t5 at 180. A: t2 at 5 (best B: t1, cos 5 = .996), t4 at 60 (best
    # t3, cos 30 = .866 > cos 60), t6 at 170 (best t5, cos 10 = .985); [CLS] scores -inf.
    # Edges by score: t2, t6, t4, [CLS]; r = 2 merges t2 -> t1 and t6 -> t5; the unmerged A tokens
    # ascending ([CLS], t4) come first, then B (t1, t3, t5): dest = [0, 2, 2, 3, 1, 4, 4].
    metric = torch.tensor([[_unit(a) for a in (0, 0, 5, 90, 60, 180, 170)]])
    dest, r = tome_match(metric, 2, class_token=True)
    assert r == 2 and dest.tolist() == [[0, 2, 2, 3, 1, 4, 4]]
    x = torch.arange(7.0).view(1, 7, 1) * torch.tensor([1.0, 10.0])  # features (t, 10t)
    out = tome_merge_mean(x, dest, 5)
    # merge_wavg with size=None: each B token the plain mean of itself and what merged into it.
    expected = torch.tensor([[0, 0], [4, 40], [1.5, 15], [3, 30], [5.5, 55]])
    torch.testing.assert_close(out[0], expected)
    # The cap: at most (T - 1) // 2 = 3 with [CLS]; the third edge (t4 -> t3) joins.
    dest, r = tome_match(metric, 10, class_token=True)
    assert r == 3 and dest.tolist() == [[0, 1, 1, 2, 2, 3, 3]]
    # No [CLS] (the adaptation): the cap is T // 2 = 3, t0 (0 deg, cos 1 to t1) is the best edge;
    # unmerged A tokens stay in edge order as ToMe leaves them: r = 2 merges t0, t2 into t1.
    dest, r = tome_match(metric, 2, class_token=False)
    assert r == 2 and dest.tolist() == [[2, 2, 2, 3, 1, 4, 0]]


def test_merge_tokens_after_the_projector():
    # 6 tokens to 2: round 1 (r = min(4, 3) = 3): A = t0, t2, t4, B = t1, t3, t5; each A token's
    # twin is the next B token (distinct directions per pair), all three merge: 3 tokens (t1, t3, t5
    # groups). Round 2 (r = min(1, 1) = 1): A = {g1, g5}, B = {g3}: g5 (direction 95 deg) is closer to
    # g3 (90) than g1 (0): g5 merges into g3. Slots: the last member of each group: g1 -> 1, g3+g5 -> 5.
    dirs = [0, 1, 90, 91, 95, 96]
    feats = torch.tensor([_unit(a) for a in dirs])
    slots, merged = tome_merge_tokens(feats, 2)
    assert sorted(slots.tolist()) == [1, 5]
    by_slot = dict(zip(slots.tolist(), merged))
    torch.testing.assert_close(by_slot[1], feats[:2].mean(0))
    # Round 2's mean of the two round-1 means (size=None: each counts once, not by its size).
    torch.testing.assert_close(by_slot[5], (feats[2:4].mean(0) + feats[4:6].mean(0)) / 2)


@pytest.mark.parametrize(
    "n, layers, ratio, expected",
    [
        # CLIP-L (576 patches, layers 0..22): 576 - 64 = 512 = 23 x 22 + 6: the first 6 layers 23.
        (576, 23, 64 / 576, (23,) * 6 + (22,) * 17),
        (576, 23, 192 / 576, (17,) * 16 + (16,) * 7),
        # The tiny test CLIP (16 patches, one merging layer): the cap (17 - 1) // 2 = 8 binds.
        (16, 1, 0.25, (8,)),
        # Three layers, 12 to remove: 4 each fits the caps 8, 6, 4.
        (16, 3, 0.25, (4, 4, 4)),
        # 14 to remove in 3 layers: after an even 5, the caps of the next two layers (5, then 3)
        # leave 9 > 8; each token more now costs capacity later, so only the full cap 8 works:
        # 8 (t 17 -> 9), 4 (cap 4, -> 5), 2 (cap 2, -> 3 = [CLS] + 2).
        (16, 3, 0.125, (8, 4, 2)),
    ],
)
def test_schedule_reaches_the_budget(n, layers, ratio, expected):
    r = tome_schedule(n, layers, ratio, {"r": 0})
    assert r == expected
    t = n + 1
    for k in r:
        assert k <= (t - 1) // 2
        t -= k
    if n == 576:
        assert t - 1 == methods.budget(n, ratio)


def test_schedule_with_lightcompress_r_and_every_budget_on_clip_l():
    assert tome_schedule(576, 23, 0.5, {"r": 16}) == (16,) * 23  # 576 - 368 = 208 tokens reach the LLM
    assert tome_schedule(16, 3, None, {"r": 6}) == (6, 5, 2)  # capped as bipartite_soft_matching caps r
    for keep in range(1, 577):
        assert sum(tome_schedule(576, 23, keep / 576, {"r": 0})) == 576 - methods.budget(576, keep / 576)


# ----------------------------------------------------------------------------- CLIP merge on LLaVA
def tiny_llava_deep(seed: int, attn: str = "sdpa", clip_layers: int = 4):
    """The tiny LLaVA with a 4-layer CLIP: features from hidden_states[-2] = layer 2's output, so
    ToMe merges in layers 0, 1 and 2 (the 2-layer tiny CLIP merges in layer 0 only)."""
    from transformers import LlavaForConditionalGeneration

    from synthetic import tiny_models as tm

    config = tm.tiny_llava_config(attn=attn)
    config.vision_config.num_hidden_layers = clip_layers
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


def _hand_match(metric: torch.Tensor, x: torch.Tensor, r: int) -> tuple[torch.Tensor, list[list[int]]]:
    """LightCompress's bipartite_soft_matching + merge_wavg(size=None) for ONE image, written with
    loops: ``metric`` ``[T, c]``, ``x`` ``[T, C]`` -> (merged ``[T - r, C]``, sources: the input
    tokens behind each output token)."""
    t = metric.shape[0]
    r = min(r, (t - 1) // 2)
    u = torch.nn.functional.normalize(metric.double(), dim=-1)
    a_tokens, b_tokens = list(range(0, t, 2)), list(range(1, t, 2))
    best = {}
    for a in a_tokens:
        sims = [float(u[a] @ u[b]) for b in b_tokens]
        j = max(range(len(b_tokens)), key=lambda k: (sims[k], -k))  # first maximum
        best[a] = (-math.inf if a == 0 else sims[j], b_tokens[j])
    order = sorted(a_tokens, key=lambda a: -best[a][0])
    src, unm = order[:r], sorted(order[r:])
    into = {b: [b] + [a for a in src if best[a][1] == b] for b in b_tokens}
    sources = [[a] for a in unm] + [into[b] for b in b_tokens]
    return torch.stack([x[s].mean(0) for s in sources]), sources


@torch.no_grad()
def _hand_clip(model, pixel_values: torch.Tensor, schedule: tuple[int, ...]):
    """The UNPATCHED CLIP run by hand up to the feature layer, each layer computed from its own
    modules with the merge between attention and MLP (metric: k_proj of the normed input, heads
    averaged). Returns (feature-layer patches per image [N', C], each original patch's group)."""
    tower = model.model.vision_tower
    layers = tower.encoder.layers
    h = tower.pre_layrnorm(tower.embeddings(pixel_values))  # [B, 1+N, C]
    feats, groups = [], []
    for b in range(h.shape[0]):
        x = h[b : b + 1]
        members = [[]] + [[p] for p in range(x.shape[1] - 1)]  # [CLS], then each patch
        for layer, r in zip(layers, schedule):
            normed = layer.layer_norm1(x)
            attn, _ = layer.self_attn(hidden_states=normed, attention_mask=None)
            x = x + attn
            heads = layer.self_attn.num_heads
            metric = layer.self_attn.k_proj(normed)[0].view(x.shape[1], heads, -1).mean(1)
            merged, sources = _hand_match(metric, x[0], r)
            members = [sum((members[s] for s in src), []) for src in sources]
            x = merged.to(x.dtype)[None]
            x = x + layer.mlp(layer.layer_norm2(x))
        feats.append(x[0, 1:])
        groups.append([sorted(m) for m in members[1:]])
    return feats, groups


@pytest.mark.parametrize("ratio, schedule", [(0.25, (4, 4, 4)), (0.125, (8, 4, 2))])
@torch.no_grad()
def test_clip_merge_equals_the_unpatched_clip_merged_by_hand_and_the_reference(ratio, schedule):
    spec = FAMILIES["llava"]
    eager = tiny_llava_deep(seed=3, attn="eager")
    inputs = spec.inputs("2img", seed=3)
    feats, groups = _hand_clip(eager, inputs["pixel_values"], schedule)
    keep = methods.budget(16, ratio)
    assert [len(g) for g in groups] == [keep, keep]

    model = tiny_llava_deep(seed=3)  # the same weights, sdpa
    got = {}
    hook = model.model.multi_modal_projector.register_forward_pre_hook(lambda m, a: got.__setitem__("clip", a[0]))
    spec.module.patch(model, cfg(KEEP_RATIO=ratio, PRUNE_METHOD_PRE_LLM="tome_pre_llm"))
    try:
        prefill = model(**inputs).logits[0]
        (vision,) = model.prune_trace  # the budget is reached inside CLIP: no pre-LLM event
        seq, steps = greedy(model, inputs)
        assert [(e.stage, e.kept) for e in model.prune_trace] == [("vision", vision.kept)]
    finally:
        spec.module.unpatch(model)
        hook.remove()
    # The features the projector received: the hand-merged CLIP's, in ToMe's output order.
    torch.testing.assert_close(got["clip"], torch.stack(feats), atol=1e-5, rtol=0)
    assert vision.note == f"merged in ViT layers 0..2 (tokens removed per layer: {', '.join(map(str, schedule))})"
    image = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
    slots = [[max(g) for g in groups[b]] for b in range(2)]  # a group's slot: its last patch
    assert vision.images == [(16, keep), (16, keep)]
    assert vision.kept == sorted(image[16 * b + s].item() for b in range(2) for s in slots[b])
    projected = [eager.model.multi_modal_projector(f) for f in feats]

    class MergedRef(LlavaRef):
        @staticmethod
        def embed(model, inputs, ids):
            emb = LlavaRef.embed(model, inputs, ids).clone()
            for b in range(2):
                for j, s in enumerate(slots[b]):
                    emb[0, image[16 * b + s]] = projected[b][j]
            return emb

    check_against_reference(MergedRef, model, inputs, seq, steps, drops_from_trace([vision]), prefill)


@torch.no_grad()
def test_lightcompress_r_and_a_shallow_clip():
    spec = FAMILIES["llava"]
    inputs = spec.inputs("2img", seed=1)
    # PRUNE_ARGS r: LightCompress's constant r per layer: 16 - 3 x 2 = 10 tokens, whatever KEEP_RATIO.
    model = tiny_llava_deep(seed=1)
    spec.module.patch(model, cfg(KEEP_RATIO=0.25, PRUNE_METHOD_PRE_LLM="tome_pre_llm", PRUNE_ARGS="r=2"))
    model(**inputs)
    vision, pre = model.prune_trace
    assert vision.images == [(16, 10), (16, 10)] and pre.images == [(10, 10), (10, 10)] and pre.kept == vision.kept
    # The 2-layer tiny CLIP merges in layer 0 only, capped at 8 of 16: the rest (8 -> 4) is merged
    # after the projector by the same matching (a pre-LLM event).
    model = FAMILIES["llava"].build(seed=1)
    spec.module.patch(model, cfg(KEEP_RATIO=0.25, PRUNE_METHOD_PRE_LLM="tome_pre_llm"))
    model(**inputs)
    vision, pre = model.prune_trace
    assert vision.images == [(16, 8), (16, 8)] and pre.images == [(8, 4), (8, 4)]
    assert set(pre.kept) <= set(vision.kept)


# ----------------------------------------------------------------------------- Qwen2.5-VL / InternVL3
@pytest.mark.parametrize("family", ["qwen2_5_vl", "internvl"])
@torch.no_grad()
def test_adaptation_after_the_merger_equals_the_reference(family):
    spec = FAMILIES[family]
    model = spec.build(seed=4)
    inputs = spec.inputs("2img", seed=4)
    ratio = 0.25
    # The unpatched model's projector / merger output per image, merged by the pure function.
    inner = model.model
    if family == "qwen2_5_vl":
        per_image = inner.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    else:
        tiles = inner.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output  # [tiles, 16, D]
        per_image = [tiles[:4].flatten(0, 1), tiles[4:].flatten(0, 1)]  # the "2img" prompt: 4 + 3 tiles
    image = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
    replaced, kept, start = {}, [], 0
    for feats in per_image:
        slots, merged = tome_merge_tokens(feats, methods.budget(feats.shape[0], ratio))
        for s, f in zip(slots.tolist(), merged):
            replaced[int(image[start + s])] = f
        kept += [int(image[start + s]) for s in slots.tolist()]
        start += feats.shape[0]

    spec.module.patch(model, cfg(KEEP_RATIO=ratio, PRUNE_METHOD_PRE_LLM="tome_pre_llm"))
    prefill = model(**inputs).logits[0]
    vision, pre = model.prune_trace
    assert vision.note.startswith("ViT merge skipped") and vision.n_keep == vision.n_in
    assert pre.stage == "pre_llm" and pre.kept == sorted(kept)
    assert [k for _, k in pre.images] == [methods.budget(n, ratio) for n, _ in pre.images]
    seq, steps = greedy(model, inputs)
    spec.module.unpatch(model)
    base = spec.ref

    class MergedRef(base):
        @staticmethod
        def embed(model, inputs, ids):
            emb = base.embed(model, inputs, ids).clone()
            for pos, f in replaced.items():
                emb[0, pos] = f
            return emb

    check_against_reference(MergedRef, model, inputs, seq, steps, drops_from_trace([pre]), prefill)
    with pytest.raises(ValueError, match="r .* applies to the CLIP merge"):
        spec.module.patch(model, cfg(KEEP_RATIO=ratio, PRUNE_METHOD_PRE_LLM="tome_pre_llm", PRUNE_ARGS="r=2"))
        model(**inputs)
    spec.module.unpatch(model)


def test_no_host_sync_in_the_matching():
    from scripts.op_count import OpCounter

    g = torch.Generator().manual_seed(0)
    metric, x = torch.randn(2, 33, 8, generator=g), torch.randn(2, 33, 16, generator=g)
    with OpCounter() as ops:
        dest, r = tome_match(metric, 10)
        tome_merge_mean(x, dest, 33 - r)
    assert ops.syncs == []

