"""The methods' LLaVA-NeXT paths (``docs/llava_next.md``): per-crop budgets and selections on hand-made
tensors, the CLIP captures the engine maps to an image's tokens against the unpatched model (projected
patches, the eager CLIP's [CLS] attention per crop), and the refusals.

The hand examples use the tiny layout of a 30 x 100 px image (``tests/test_engine_llava_next.py``):
32 visual tokens, the base crop's 16 (tokens 0-15) and two 4 x 4 crops cut to their rows 1-2:
crop 1 = tokens 16-19 and 24-27 (patches 4-11), crop 2 = tokens 20-23 and 28-31 (patches 4-11).
"""

from __future__ import annotations

import pytest
import torch

import custom_llava_next
import methods
from families import FAMILIES, cfg, spy_on
from methods import PruneContext, check_selection, get_method
from methods.cdpruner import cdpruner_relevance, cdpruner_select_crops, dpp_greedy
from methods.gprune import gprune_scores
from methods.hiprune import hiprune_select
from reference import LlavaNextRef
from synthetic import tiny_models as tm

F64 = torch.float64
CROPS = custom_llava_next.image_entry((30, 100), tm.LLAVA_NEXT_PINPOINTS, tm.LLAVA_NEXT_CROP_PX, tm.LLAVA_NEXT_SIDE).crops


def ctx_for(x: torch.Tensor, **extras) -> PruneContext:
    n = x.shape[0]
    return PruneContext(features=x, stage="pre_llm", layer=None, positions=torch.arange(n), token_index=torch.arange(n),
                        n_orig=n, extras=extras, family="llava_next", ratio=None, crops=CROPS)


def run(name: str, ctx: PruneContext, keep: int, **hyper):
    m = get_method(name)
    return check_selection(m, m.fn(ctx, keep, **hyper), ctx.n, keep)


def crop_scores() -> torch.Tensor:
    """[32] scores: crop 0 token i -> i / 100; crop 1 tokens 0.50 .. 0.57 in token order; crop 2 0.30 .. 0.37."""
    s = torch.arange(32, dtype=F64) / 100
    s[CROPS.members[1]] = 0.5 + torch.arange(8, dtype=F64) / 100
    s[CROPS.members[2]] = 0.3 + torch.arange(8, dtype=F64) / 100
    return s


def test_fastervlm_keeps_each_crops_share_by_its_own_cls_attention():
    # keep 10 over crops of 16, 8, 8 tokens: crop_budgets -> 5, 3, 2. Crop 0's top 5: 11-15; crop 1's
    # top 3 (0.57, 0.56, 0.55): tokens 27, 26, 25; crop 2's top 2: 31, 30. A top-10 over the image
    # would take all of crop 1 and two of crop 2.
    idx, _ = run("fastervlm_pre_llm", ctx_for(torch.zeros(32, 1), vit_cls_attention=crop_scores().unsqueeze(0)), 10)
    assert idx.tolist() == [11, 12, 13, 14, 15, 25, 26, 27, 30, 31]


def test_vispruner_selects_within_each_crop():
    # important_ratio 1: VisPruner keeps its T_imp = T top-attention tokens, per crop as FasterVLM.
    ctx = ctx_for(torch.zeros(32, 1), vit_features=torch.randn(32, 4, dtype=F64), vit_cls_attention=crop_scores().unsqueeze(0))
    idx, _ = run("vispruner_pre_llm", ctx, 10, important_ratio=1.0)
    assert idx.tolist() == [11, 12, 13, 14, 15, 25, 26, 27, 30, 31]


def test_hiprune_on_a_crop_with_removed_patches():
    # Crop 1 on its 4 x 4 grid: only patches 4-11 (rows 1-2) exist. T = 7, alpha 1.25: round(1.75) = 2
    # anchors by the shallow score among the existing ones: 5 (0.9) and 10 (0.8); patch 0 (1.0) does
    # not exist. Buffers 5: 4, 6, 1, 9; 10: 9, 11, 6, 14 -> the existing ones {4, 5, 6, 9, 10, 11};
    # 1 and 14 do not count. 7 - 6 = 1 register: the best deep score outside the buffers among the
    # existing patches: 7 (0.5; patch 0's 0.99 does not exist).
    valid = torch.zeros(16, dtype=torch.bool)
    valid[4:12] = True
    shallow = torch.full((16,), 0.01, dtype=F64)
    shallow[[0, 5, 10]] = torch.tensor([1.0, 0.9, 0.8], dtype=F64)
    deep = torch.full((16,), 0.01, dtype=F64)
    deep[[0, 7, 8]] = torch.tensor([0.99, 0.5, 0.4], dtype=F64)
    assert hiprune_select(shallow, deep, 7, 4, 1.25, valid).tolist() == [4, 5, 6, 7, 9, 10, 11]
    # Without the mask (the original's full crop): patch 0 is the first anchor.
    assert 0 in hiprune_select(shallow, deep, 7, 4, 1.25).tolist()


def test_hiprune_registered_runs_each_crop_on_its_grid():
    # The crop-1 scores above at crop 1's tokens (patches 4-11 = tokens 16-19, 24-27), times 17 query
    # rows (the crop's 1 + 16) and 2 heads; crops 0 and 2 score 0.01 everywhere. keep 14 over
    # (16, 8, 8): 7, 4, 3 (7.0, 3.5, 3.5: the remainders tie, crop 1 first). Crop 1, T = 4: one anchor
    # (round(4 * 1.25 / 5) = 1), patch 5 (0.9; patch 0 does not exist); buffers 4, 6, 1, 9 -> the
    # existing 4, 5, 6, 9 = T, no register: tokens 16, 17, 18, 25.
    shallow, deep = torch.full((32,), 0.01, dtype=F64), torch.full((32,), 0.01, dtype=F64)
    crop1 = CROPS.members[1]  # patches 4..11 in order
    shallow[crop1[[1, 6]]] = torch.tensor([0.9, 0.8], dtype=F64)  # patches 5, 10
    deep[crop1[[3, 4]]] = torch.tensor([0.5, 0.4], dtype=F64)  # patches 7, 8
    heads = lambda v: torch.stack([v * 17 * 1.5, v * 17 * 0.5])  # noqa: E731 (head mean = v * 17)
    ctx = ctx_for(torch.zeros(32, 1), vit_attention_received={0: heads(shallow), -2: heads(deep)})
    assert methods.crop_budgets([16, 8, 8], 14) == [7, 4, 3]
    idx, _ = run("hiprune_pre_llm", ctx, 14, alpha=1.25, object_layer=1)
    per_crop = [[t for t in idx.tolist() if t in set(m.tolist())] for m in CROPS.members]
    assert per_crop[1] == [16, 17, 18, 25]  # (crops 0 and 2: ties everywhere; alpha 1.25 makes buffers exceed T)


def test_pool_pools_the_base_and_the_high_resolution_grid_apart():
    # Features = the token index. keep 4 -> 2 + 2. Base 4 x 4 into 2 cells (one band of two 4 x 2
    # windows): centres (1, 0) = token 4 and (1, 2) = token 6, means of {0,1,4,5,8,9,12,13} = 6.5 and
    # {2,3,6,7,...,15} = 8.5. The window 2 x 8 (tokens 16-31) into 2 cells: 2 x 4 windows, centres
    # (0, 1) = 17 and (0, 5) = 21, means of {16-19, 24-27} = 21.5 and {20-23, 28-31} = 25.5.
    idx, pooled = run("pool_pre_llm", ctx_for(torch.arange(32, dtype=F64).unsqueeze(1)), 4)
    assert idx.tolist() == [4, 6, 17, 21] and pooled[:, 0].tolist() == [6.5, 8.5, 21.5, 25.5]


def test_gprune_runs_two_graphs_base_and_high_resolution():
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    idx, _ = run("gprune_pre_llm", ctx_for(x), 10)  # 10 over (16, 16): 5 + 5
    base = gprune_scores(x[:16]).topk(5).indices
    high = 16 + gprune_scores(x[16:]).topk(5).indices  # the window's tokens in raster order
    assert idx.tolist() == sorted(base.tolist() + high.tolist())


def test_cdpruner_crops_are_separate_dpps_scaled_together():
    """Each crop's picks are the greedy of its own kernel (its own T), with the relevance min-max
    scaled over all the image's tokens; padding changes nothing."""
    g = torch.Generator().manual_seed(1)
    x, im, tx = torch.randn(32, 6, generator=g), torch.randn(32, 5, generator=g), torch.randn(2, 5, generator=g)
    rows, budgets = list(CROPS.members), [5, 3, 2]
    picks, valid = cdpruner_select_crops(x, im, tx, rows, budgets)
    rel = cdpruner_relevance(im.unsqueeze(0), tx)[0]  # scaled over all 32 tokens (not crop by crop)
    for c, (r, t) in enumerate(zip(rows, budgets)):
        xn = x[r] / x[r].norm(dim=-1, keepdim=True)
        kernel = rel[r].unsqueeze(1) * (xn @ xn.T) * rel[r].unsqueeze(0)
        own, ok = dpp_greedy(kernel.unsqueeze(0), t)
        assert picks[c][valid[c]].tolist() == r[own[0][ok[0]]].tolist()
        assert int(valid[c].sum()) == t


def test_visionzip_every_crop_is_one_llava_image():
    """Per crop: its [CLS] (``vit_cls_feature`` row c, key row c), its patches, its share of keep;
    its [CLS] in the crop's first left-over slot. The result equals LLaVA's VisionZip on each crop."""
    from methods.visionzip import _llava

    g = torch.Generator().manual_seed(2)
    n, c_dim, hd = 32, 4, 3
    feats, patches = torch.randn(n, 4, generator=g, dtype=F64), torch.randn(n, c_dim, generator=g, dtype=F64)
    cls, keys = torch.randn(3, c_dim, generator=g, dtype=F64), torch.randn(3 + n, hd, generator=g, dtype=F64)
    attention = torch.rand(2, n, generator=g, dtype=F64)
    projector = torch.nn.Linear(c_dim, 4).double()
    ctx = ctx_for(feats, vit_cls_feature=cls, vit_features=patches, vit_cls_attention=attention, vit_feature_keys=keys,
                  vit_projector=projector)
    idx, out = run("visionzip_pre_llm", ctx, 16)  # 16 over (16, 8, 8): 8, 4, 4
    expected_idx, expected_out = [], []
    for c, (r, t) in enumerate(zip(CROPS.members, [8, 4, 4])):
        i, f = _llava(feats[r], cls[c], patches[r], attention[:, r], torch.cat([keys[c : c + 1], keys[3 + r]]), t, 10 / 64, projector)
        expected_idx.append(r[i])
        expected_out.append(f)
    order = torch.argsort(torch.cat(expected_idx))
    assert idx.tolist() == torch.cat(expected_idx)[order].tolist()
    torch.testing.assert_close(out, torch.cat(expected_out)[order])
    for r, t in zip(CROPS.members, [8, 4, 4]):  # each crop keeps exactly its share, [CLS] included
        assert sum(int(v) in set(r.tolist()) for v in idx) == t


def test_vscan_stage1_scans_and_merges_within_each_crop():
    # keep 8 over (16, 8, 8): 4, 2, 2. Local scores: crop 0 token i -> i / 100, crop 1 token 24
    # (patch 8) 0.9, crop 2 token 31 (patch 11) 0.9; global: crop 0 token i -> (16 - i) / 100, crop 1
    # token 19 0.8, crop 2 token 20 0.8. One 4 x 4 window a crop (window 6 > 4): crop 0 local
    # int(4 * 0.5) = 2 -> 15, 14; global 2 -> 0, 1. Crop 1: local 1 -> 24, global 1 -> 19; crop 2: 31, 20.
    local, global_ = torch.zeros(32, dtype=F64), torch.zeros(32, dtype=F64)
    local[:16] = torch.arange(16, dtype=F64) / 100
    global_[:16] = (16 - torch.arange(16, dtype=F64)) / 100
    local[[24, 31]], global_[[19, 20]] = 0.9, 0.8
    # Features: crop 0 along e0, the kept tokens of crops 1 and 2 along e1, their dropped tokens along
    # e0: an image-wide merge would send them to crop 0; the per-crop merge keeps them in their crop
    # (cosine 0 to both kept tokens: the first, 19 / 20, takes them).
    x = torch.zeros(32, 2, dtype=F64)
    x[:16, 0] = 1
    x[16:, 0] = 1
    x[[19, 24, 20, 31], 0], x[[19, 24, 20, 31], 1] = 0, 1
    heads = lambda v: v.unsqueeze(0)  # noqa: E731 (one head: the mean is the score)
    ctx = PruneContext(features=x, stage="pre_llm", layer=None, positions=torch.arange(32), token_index=torch.arange(32),
                       n_orig=32, extras={"vit_cls_rows": {0: heads(local), -2: heads(global_)}}, family="llava_next",
                       ratio=0.25, crops=CROPS)
    idx, merged = run("vscan", ctx, 8, local_layer=0)
    assert idx.tolist() == [0, 1, 14, 15, 19, 20, 24, 31]
    row = {t: merged[k] for k, t in enumerate(idx.tolist())}
    torch.testing.assert_close(row[19], torch.tensor([6.0, 1.0], dtype=F64) / 7)  # itself + crop 1's 6 dropped
    torch.testing.assert_close(row[24], torch.tensor([0.0, 1.0], dtype=F64))


# ------------------------------------------------------------------------------ through the engine
@torch.no_grad()
def test_the_mapped_clip_features_project_to_the_images_own_tokens(monkeypatch):
    """The engine's ``vit_features`` of each image (its crops' patches, mapped to its token order)
    through the model's projector are ``ctx.features`` (the image's rows of the model's own packed
    features); the [CLS] rows come one per crop."""
    spec = FAMILIES["llava_next"]
    model = spec.build(seed=0)
    inputs = spec.inputs("2img", seed=3)
    seen = spy_on(monkeypatch, "visionzip_pre_llm")
    spec.module.patch(model, cfg(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="visionzip_pre_llm"))
    try:
        model(**inputs)
    finally:
        spec.module.unpatch(model)
    assert [c.n for c in seen] == [32, 32]
    for ctx in seen:
        torch.testing.assert_close(ctx["vit_projector"](ctx["vit_features"]), ctx.features, atol=1e-6, rtol=0)
        assert ctx["vit_cls_feature"].shape[0] == ctx.crops.n_crops == 3
        assert ctx["vit_feature_keys"].shape[0] == 3 + 32


@torch.no_grad()
def test_fastervlm_keeps_each_crops_eager_cls_topk():
    """Each crop keeps its share of the image's budget, the top of the unpatched eager CLIP's
    ``attentions[-2][crop, :, 0, 1:]`` among its patches that reach the LLM. Which patch is which
    token is found on the model's own packed features (a projected patch equals one visual row)."""
    spec = FAMILIES["llava_next"]
    eager = spec.build(seed=5, attn="eager")
    inputs = spec.inputs("1img", seed=5)
    k = 3  # the base image + 1 x 2 crops
    vision = eager.model.vision_tower(inputs["pixel_values"][0, :k], output_hidden_states=True, output_attentions=True)
    projected = eager.model.multi_modal_projector(vision.hidden_states[-2][:, 1:])  # [3, 16, D]
    packed = LlavaNextRef.features(eager, inputs)
    placeholder = torch.nonzero(inputs["input_ids"][0] == tm.IMAGE_ID).flatten()
    where = {}  # (crop, patch) -> prompt position, by exact equality of the projected rows
    for c in range(k):
        for p in range(16):
            hit = torch.nonzero((packed == projected[c, p]).all(dim=-1)).flatten()
            if hit.numel():
                where[c, p] = int(placeholder[hit[0]])
    assert len(where) == 32
    keep = methods.budget(32, 0.3)  # 10 -> 5, 3, 2
    expected = []
    for c, t in enumerate(methods.crop_budgets([sum(1 for (cc, _) in where if cc == c) for c in range(k)], keep)):
        present = [p for p in range(16) if (c, p) in where]
        scores = vision.attentions[-2][c, :, 0, 1:].mean(0)[present]
        expected += [where[c, present[i]] for i in scores.topk(t).indices.tolist()]
    model = spec.build(seed=5)  # the same weights, sdpa
    spec.module.patch(model, cfg(KEEP_RATIO=0.3, PRUNE_METHOD_PRE_LLM="fastervlm_pre_llm"))
    model(**inputs)
    (event,) = model.prune_trace
    assert event.kept == sorted(expected) and event.images == [(32, keep)]


@pytest.mark.parametrize("method", ["prumerge_pre_llm", "prumerge_plus_pre_llm"])
def test_prumerge_is_refused_with_its_reason(method):
    spec = FAMILIES["llava_next"]
    with pytest.raises(ValueError, match=f"{method} does not apply to llava_next: .*no LLaVA-NeXT path"):
        spec.module.patch(spec.build(), cfg(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM=method))
