"""Methods ported from their original repositories: hand-derived selections, properties, quirks.

Registered methods (their metadata) and the pure selection functions behind them (DART, VisPruner,
PruMerge(+), VisionZip, FitPrune: selection on explicit tensors).
Every hand example's expected indices are written literally, derived from the original code as
the comment next to them explains.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import methods
from methods import PruneContext, check_selection, get_method
from methods.dart import dart_per_pivot, dart_select
from methods.fitprune import (
    fitprune_average_counts,
    fitprune_bisect,
    fitprune_calibration_step,
    fitprune_delete_count,
    fitprune_keep,
    fitprune_reference_masses,
    fitprune_scores,
)
from methods.pool import pool_layout, resolve_hw
from methods.prumerge import prumerge_cls_attention, prumerge_merge, prumerge_outlier_ratio, prumerge_select
from methods.prumerge_plus import prumerge_plus_samples, prumerge_plus_select
from methods.vispruner import vispruner_select
from methods.visionzip import visionzip_select

F64 = torch.float64


def ctx_for(x: torch.Tensor, *, stage: str = "pre_llm", grid=None, **extras) -> PruneContext:
    n = x.shape[0]
    return PruneContext(
        features=x, stage=stage, layer=None if stage == "pre_llm" else 8, positions=torch.arange(n),
        token_index=torch.arange(n), n_orig=n, grid=grid, extras=extras,
    )


def run(name: str, ctx: PruneContext, keep: int, **hyper):
    """Call a registered method and validate its return like the engine does."""
    m = get_method(name)
    return check_selection(m, m.fn(ctx, keep, **hyper), ctx.n, keep)


def unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


# ----------------------------------------------------------------------------------------- registry
def test_registered_names_and_metadata():
    for name, stage in [("gprune_pre_llm", "pre_llm"), ("pool_pre_llm", "pre_llm"), ("pdrop_intra_llm", "intra_llm")]:
        m = get_method(name)
        assert m.stage == stage and m.source and m.paper.startswith("https://arxiv.org/") and m.deviation
    assert get_method("gprune_pre_llm").params == {"similarity": 0.5, "temperature": 0.03, "iterations": 5}
    assert get_method("pool_pre_llm").params == {"mode": "avg"}
    assert get_method("pdrop_intra_llm").needs == ("last_query_attention_self",)
    dart = get_method("dart_intra_llm")
    assert dart.stage == "intra_llm" and not dart.exact_count and dart.params == {"n_pivots_image": 4, "n_pivots_text": 4}
    registered = methods.names()
    vis = get_method("vispruner_pre_llm")
    assert vis.families == ("llava", "llava_next") and vis.params == {"important_ratio": 0.5}
    assert get_method("fitprune_intra_llm").needs == ("prev_attention_visual", "prev_attention_text")
    for name in ("prumerge_pre_llm", "prumerge_plus_pre_llm"):
        m = get_method(name)
        assert name in registered and m.families == ("llava",) and not m.exact_count and m.params == {}
        assert m.needs == ("vit_features", "vit_last_queries", "vit_last_keys", "vit_projector")
    zip_ = get_method("visionzip_pre_llm")
    # Every family (Qwen2.5-VL: the author's adaptation; InternVL: ours), the count is the original's
    # per family (not exact: Qwen's int((r - 0.05) N) + max(int(0.05 N), 1)).
    assert zip_.families == ("llava", "llava_next", "qwen2_5_vl", "internvl") and not zip_.exact_count
    assert zip_.params == {"contextual_ratio": 10 / 64}
    assert zip_.needs_for("llava") == zip_.needs_for("llava_next") == (
        "vit_features", "vit_cls_feature", "vit_cls_attention", "vit_feature_keys", "vit_projector")
    assert zip_.needs_for("qwen2_5_vl") == zip_.needs_for("internvl") == ("vit_attention_received", "vit_unit_keys")


# ------------------------------------------------------------------------------------------ G-Prune
def gprune_reference(x: np.ndarray, keep: int, sim=0.5, temp=0.03, iters=5) -> set[int]:
    """Literal numpy transcription of the original (llava_arch.py l.258-279), float64, element loops."""
    n = x.shape[0]
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    a = xn @ xn.T
    for i in range(n):
        for j in range(n):
            a[i, j] = 0.0 if a[i, j] < sim else a[i, j]
            a[i, j] /= temp
            a[i, j] = -5000.0 if abs(a[i, j]) < 1e-6 else a[i, j]
    a = np.exp(a - a.max(axis=1, keepdims=True))
    a /= a.sum(axis=1, keepdims=True)
    degree = (a > 0).sum(axis=1)
    p = np.linalg.matrix_power(a, iters)
    result = (np.linalg.norm(x, axis=1)[None, :] @ p)[0] / degree
    return set(np.argsort(-result, kind="stable")[:keep].tolist())


def test_gprune_hand_checked():
    # Four orthogonal directions; cos is 1 inside a group and 0 (< 0.5 -> -5000 -> softmax 0) across.
    # Row softmax is uniform over the group, so A is block-uniform, A^5 = A, degree = group size c,
    # score_j = (sum of norms in j's group / c) / c:
    #   {0,1} norms 1,3 -> 4/2/2 = 1.0; {2} 1.5 -> 1.5; {3} 0.5 -> 0.5; {4,5,6} norms 3,3,6 -> 12/3/3 = 1.333.
    # Ranking: 2 > {4,5,6} > {0,1} > 3.
    e = torch.eye(4, dtype=F64)
    x = torch.stack([e[0] * 1, e[0] * 3, e[1] * 1.5, e[2] * 0.5, e[3] * 3, e[3] * 3, e[3] * 6])
    assert run("gprune_pre_llm", ctx_for(x), 1)[0].tolist() == [2]
    assert run("gprune_pre_llm", ctx_for(x), 4)[0].tolist() == [2, 4, 5, 6]
    assert run("gprune_pre_llm", ctx_for(x), 6)[0].tolist() == [0, 1, 2, 4, 5, 6]


def test_gprune_equals_a_literal_transcription_of_the_original():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=g, dtype=F64)
    x = centres[torch.randint(0, 5, (40,), generator=g)] + 0.6 * torch.randn(40, 16, generator=g, dtype=F64)
    for keep in (5, 13, 20):
        got = set(run("gprune_pre_llm", ctx_for(x), keep)[0].tolist())
        assert got == gprune_reference(x.numpy().copy(), keep)
    # Non-default hyper-parameters go through too.
    got = set(run("gprune_pre_llm", ctx_for(x), 10, similarity=0.3, temperature=0.1, iterations=2)[0].tolist())
    assert got == gprune_reference(x.numpy().copy(), 10, sim=0.3, temp=0.1, iters=2)


def test_gprune_keeps_the_top_scores_fp32_and_fp16_input():
    from methods.gprune import gprune_scores

    x = torch.randn(30, 8, generator=torch.Generator().manual_seed(1))
    idx, _ = run("gprune_pre_llm", ctx_for(x), 11)
    scores = gprune_scores(x)
    assert idx.numel() == 11 and scores[idx].min() >= scores[~torch.isin(torch.arange(30), idx)].max()
    idx16, _ = run("gprune_pre_llm", ctx_for(x.half()), 11)  # computed in fp32 internally
    assert gprune_scores(x.half()).dtype == torch.float32 and idx16.numel() == 11


# --------------------------------------------------------------------------------------------- Pool
def test_pool_hand_checked_4x4():
    x = torch.arange(16, dtype=F64).view(16, 1)  # the token's value is its index on a 4x4 grid
    # keep 4: rows = round(sqrt(4*4/4)) = 2 bands of 2 cells: windows rows {0,1}/{2,3} x cols {0,1}/{2,3};
    # centre tokens (r0+r1-1)//2, (c0+c1-1)//2 -> (0,0),(0,2),(2,0),(2,2) = 0, 2, 8, 10.
    # avg: (0+1+4+5)/4 = 2.5, (2+3+6+7)/4 = 4.5, (8+9+12+13)/4 = 10.5, (10+11+14+15)/4 = 12.5; max: 5, 7, 13, 15.
    idx, f = run("pool_pre_llm", ctx_for(x, grid=(1, 4, 4)), 4)
    assert idx.tolist() == [0, 2, 8, 10] and f.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    idx, f = run("pool_pre_llm", ctx_for(x, grid=(1, 4, 4)), 4, mode="max")
    assert idx.tolist() == [0, 2, 8, 10] and f.flatten().tolist() == [5, 7, 13, 15]
    # keep 5: rows = round(sqrt(5)) = 2; 5 = 3 + 2 cells. Band rows {0,1}: 3 adaptive column windows
    # [0,2), [1,3), [2,4) -> centres cols 0, 1, 2 -> tokens 0, 1, 2; values (0+1+4+5)/4 = 2.5,
    # (1+2+5+6)/4 = 3.5, (2+3+6+7)/4 = 4.5. Band rows {2,3}: cols [0,2), [2,4) -> tokens 8, 10; 10.5, 12.5.
    idx, f = run("pool_pre_llm", ctx_for(x, grid=(1, 4, 4)), 5)
    assert idx.tolist() == [0, 1, 2, 8, 10] and f.flatten().tolist() == [2.5, 3.5, 4.5, 10.5, 12.5]


def test_pool_hand_checked_frames():
    # grid (2, 2, 2), keep 3: frames get 2 and 1 cells. Frame 0 (2x2, k=2): rows = round(sqrt(2)) = 1 band,
    # columns [0,1), [1,2): centres (0,0), (0,1) -> tokens 0, 1, values (0+2)/2 = 1, (1+3)/2 = 2.
    # Frame 1 (k=1): the whole frame, centre (0,0) -> token 4, value (4+5+6+7)/4 = 5.5.
    x = torch.arange(8, dtype=F64).view(8, 1)
    idx, f = run("pool_pre_llm", ctx_for(x, grid=(2, 2, 2)), 3)
    assert idx.tolist() == [0, 1, 4] and f.flatten().tolist() == [1.0, 2.0, 5.5]


@pytest.mark.parametrize(
    "h, w, keep, out",
    [(10, 10, 4, (2, 2)), (10, 10, 16, (4, 4)), (10, 10, 25, (5, 5)), (6, 12, 18, (3, 6)), (7, 5, 35, (7, 5))],
)
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_pool_equals_adaptive_pooling_at_rectangular_targets(h, w, keep, out, mode):
    """UniPruneBench's targets (4/16/25 on a square grid) and any r x c layout: exactly adaptive_*_pool2d."""
    x = torch.randn(h * w, 3, generator=torch.Generator().manual_seed(h * w + keep), dtype=F64)
    _, f = run("pool_pre_llm", ctx_for(x, grid=(1, h, w)), keep, mode=mode)
    fmap = x.T.reshape(1, 3, h, w)
    ref = (F.adaptive_avg_pool2d if mode == "avg" else F.adaptive_max_pool2d)(fmap, out)
    torch.testing.assert_close(f, ref.reshape(3, -1).T)


def test_pool_per_tile_equals_unipprunebench_per_tile_pooling():
    # InternVL: UniPruneBench pools each tile to 16; here keep = 16 * tiles gives 16 per tile.
    x = torch.randn(3 * 64, 5, generator=torch.Generator().manual_seed(3), dtype=F64)
    _, f = run("pool_pre_llm", ctx_for(x, grid=(3, 8, 8)), 48)
    ref = F.adaptive_avg_pool2d(x.view(3, 8, 8, 5).permute(0, 3, 1, 2), (4, 4)).permute(0, 2, 3, 1).reshape(48, 5)
    torch.testing.assert_close(f, ref)


@pytest.mark.parametrize("grid", [(1, 4, 4), (1, 5, 7), (1, 1, 9), (2, 3, 5), (4, 2, 2), (1, 24, 24)])
def test_pool_any_budget_exact_count_unique_centres_inside_windows(grid):
    t, h, w = grid
    n = t * h * w
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(n), dtype=F64)
    for keep in sorted({1, 2, 3, t, max(1, n // 3), n // 2 or 1, n - 1 or 1, n, 13 % n + 1}):
        idx, f = run("pool_pre_llm", ctx_for(x, grid=grid), keep)  # check_selection: exact count, unique, range
        assert f.shape == (keep, 2)
    for k in range(1, h * w + 1):
        layout = pool_layout(h, w, k)
        assert len(layout) == k
        for r0, r1, c0, c1 in layout:
            assert 0 <= r0 < r1 <= h and 0 <= c0 < c1 <= w
    # keep == n is the identity: every window is one token.
    idx, f = run("pool_pre_llm", ctx_for(x, grid=grid), n)
    assert idx.tolist() == list(range(n)) and torch.equal(f, x)


def test_pool_preserves_the_mean_when_windows_tile_the_grid():
    x = torch.randn(36, 4, generator=torch.Generator().manual_seed(4), dtype=F64)
    idx, f = run("pool_pre_llm", ctx_for(x, grid=(1, 6, 6)), 9)  # 3x3 windows of 2x2 tokens
    torch.testing.assert_close(f.mean(dim=0), x.mean(dim=0))
    # Every pooled token is the mean of its window, and sits at the window's centre token.
    for i, row in zip(idx.tolist(), f):
        r, c = divmod(i, 6)
        torch.testing.assert_close(row, x.view(6, 6, 4)[r : r + 2, c : c + 2].reshape(4, 4).mean(0))


def test_pool_without_grid_uses_unipprunebench_guess():
    assert resolve_hw(16) == (4, 4) and resolve_hw(12) == (3, 4) and resolve_hw(7) == (1, 7)
    x = torch.arange(12, dtype=F64).view(12, 1)
    # 3x4 guessed grid, keep 2: rows = round(sqrt(2*3/4)) = 1 band, columns [0,2), [2,4) over rows 0..2:
    # centres (1,0), (1,2) -> tokens 4, 6; values mean(0,1,4,5,8,9) = 4.5 and mean(2,3,6,7,10,11) = 6.5.
    idx, f = run("pool_pre_llm", ctx_for(x), 2)
    assert idx.tolist() == [4, 6] and f.flatten().tolist() == [4.5, 6.5]
    with pytest.raises(ValueError, match="mode"):
        run("pool_pre_llm", ctx_for(x), 2, mode="median")


# -------------------------------------------------------------------------------------- PyramidDrop
def test_pdrop_hand_checked_uses_this_layers_attention():
    self_attn = torch.tensor([[0.1, 0.5, 0.2, 0.05, 0.15], [0.3, 0.1, 0.4, 0.1, 0.1]])  # [H=2, N=5]
    # head means 0.2, 0.3, 0.3, 0.075, 0.125 -> top 2 {1, 2}; top 4 {0, 1, 2, 4}.
    prev = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0]] * 2)  # FastV's input: must be ignored
    ctx = ctx_for(
        torch.zeros(5, 3), stage="intra_llm", last_query_attention_self=self_attn, last_query_attention_prev=prev
    )
    assert run("pdrop_intra_llm", ctx, 2)[0].tolist() == [1, 2]
    assert run("pdrop_intra_llm", ctx, 4)[0].tolist() == [0, 1, 2, 4]


def test_pdrop_keeps_the_top_mean_attention():
    attn = torch.rand(4, 50, generator=torch.Generator().manual_seed(5))
    ctx = ctx_for(torch.zeros(50, 2), stage="intra_llm", last_query_attention_self=attn)
    idx, _ = run("pdrop_intra_llm", ctx, 17)
    mean = attn.mean(0)
    assert mean[idx].min() > mean[~torch.isin(torch.arange(50), idx)].max()


def test_pdrop_schedule_string_parses_to_the_original_schedule():
    from methods.pdrop import PDROP_LAYER_SPECS
    from utils import PruneConfig

    cfg = PruneConfig.from_env({"INTRA_LLM_LAYER_SPECS": PDROP_LAYER_SPECS})
    assert [(s.layer, s.method) for s in cfg.intra] == [(layer, "pdrop_intra_llm") for layer in (8, 16, 24)]
    # Fractions of the ORIGINAL N: for N = 576 the harness budget equals the original int(N * ratio).
    assert [methods.budget(576, s.ratio) for s in cfg.intra] == [288, 144, 72]
    assert [int(576 * r) for r in (0.5, 0.25, 0.125)] == [288, 144, 72]


# --------------------------------------------------------------------------------------------- DART
def dart_example():
    # Image tokens 0..5 at sequence indices 2..7 (image_start = 2); text tokens 0..2 at 8..10.
    image_keys = torch.tensor([[1.0], [5.0], [2.0], [0.5], [3.0], [1.5]], dtype=F64)  # L1 top-1: token 1 (seq 3)
    text_keys = torch.tensor([[1.0], [-4.0], [2.0]], dtype=F64)  # L1 top-1: text 1 (seq 9)
    scale = torch.tensor([[1.0], [2.0], [0.5], [3.0], [1.0], [0.7]], dtype=F64)  # cosine ignores norms
    image_states = torch.tensor([unit(0), unit(90), unit(10), unit(165), unit(100), unit(200)], dtype=F64) * scale
    text_states = torch.tensor([unit(30), unit(180), unit(60)], dtype=F64)
    return image_keys, text_keys, image_states, text_states


def test_dart_hand_checked_in_python_set_order():
    # Pivots: image seq 3 and text seq 9. CPython iterates set([3, 9]) as [9, 3] (8-slot table,
    # 9 -> slot 1, 3 -> slot 3), so the text pivot goes first, as in the original.
    assert list(set([3, 9])) == [9, 3]
    # Pivot 9 (180 deg) over the pool {seq 2 (0 deg), 4 (10), 5 (165), 6 (100), 7 (200)}: cosines
    #   -1, -0.985, 0.966, 0.174, 0.940 -> the 2 lowest: seq 2, 4. Pool {5, 6, 7}.
    # Pivot 3 (90 deg): cos to 5 (165) = cos 75 = 0.259, to 6 (100) = 0.985, to 7 (200) = cos 110 = -0.342
    #   -> the 2 lowest: seq 7, 5.
    # Retained {3, 9, 2, 4, 7, 5} minus the text pivot 9 -> seq {2, 3, 4, 5, 7} -> image indices [0, 1, 2, 3, 5].
    # (In the given order [3, 9] the result would be [0, 1, 2, 4, 5]: pivot 3 takes seq 7, 2 first.)
    out = dart_select(*dart_example(), per_pivot=2, image_start=2, n_pivots_image=1, n_pivots_text=1)
    assert out.tolist() == [0, 1, 2, 3, 5]


def test_dart_pivot_order_depends_on_absolute_indices():
    # The same tokens at image_start = 0: pivots seq 1 and 7, CPython order list({1, 7}) = [1, 7]:
    # pivot 1 (image, 90 deg) first over {0 (0), 2 (10), 3 (165), 4 (100), 5 (200)}: cos 0, 0.174, 0.259,
    # 0.985, -0.342 -> takes 5, 0. Then pivot 7 (text, 180) over {2, 3, 4}: -0.985, 0.966, 0.174 -> takes 2, 4.
    # Image pivot 1 stays: [0, 1, 2, 4, 5].
    assert list(set([1, 7])) == [1, 7]
    out = dart_select(*dart_example(), per_pivot=2, image_start=0, n_pivots_image=1, n_pivots_text=1)
    assert out.tolist() == [0, 1, 2, 4, 5]


def test_dart_properties():
    g = torch.Generator().manual_seed(6)
    n, t, d = 40, 7, 12
    ik, tk = torch.randn(n, 8, generator=g), torch.randn(t, 8, generator=g)
    states, text_states = torch.randn(n, d, generator=g), torch.randn(t, d, generator=g)
    out = dart_select(ik, tk, states, text_states, per_pivot=3, image_start=35)
    assert out.numel() == 4 + 8 * 3 and out.unique().numel() == out.numel()
    assert torch.equal(out, out.sort().values) and 0 <= out.min() and out.max() < n
    assert set(ik.abs().sum(-1).topk(4).indices.tolist()) <= set(out.tolist())  # the image pivots stay
    # More than the pool can give: every image token is retained (the original would raise).
    out = dart_select(ik[:10], tk, states[:10], text_states, per_pivot=5, image_start=3)
    assert out.tolist() == list(range(10))


def test_dart_per_pivot_rules():
    assert dart_per_pivot(576) == 16  # ceil(128 // 8): LLaVA defaults, 4 + 8 * 16 = 132 tokens
    assert dart_per_pivot(576, max_num_trunction=None) == 15  # ceil(127.87 // 8)
    assert dart_per_pivot(576, family="qwen") == 15  # int(127.87 / 8)


# ---------------------------------------------------------------------------------------- VisPruner
def test_vispruner_hand_checked_main_path():
    # N = 22, T = 12, important_ratio 1/3 -> T_imp = int(4.0) = 4, T_div = 8. [CLS] attention decreasing
    # with the index, so argsort desc = 0..21: important [0, 1, 2, 3], residual [4..21] (R = 18, even).
    # Round 1: r = min(8, 18 - 8) = 8; a = [4, 6, ..., 20], b = [5, 7, ..., 21]. Every a but 12 copies
    #   the b token after it (max cos 1); 12 is orthogonal to all b (0) -> keep a = [12]; residual
    #   [12, 5, 7, 9, 11, 13, 15, 17, 19, 21].
    # Round 2: r = min(8, 10 - 8) = 2; a = [12, 7, 11, 15, 19], b = [5, 9, 13, 17, 21]. Scores: 12: 0,
    #   7: cos(7, 5) = 0.9, 11: cos(11, 9) = 0.6, 15 and 19: 0 -> drop 7 and 11.
    # Kept: [0..3] + [12, 15, 19] + [5, 9, 13, 17, 21].
    d = 16
    e = torch.eye(d, dtype=F64)
    x = torch.randn(22, d, generator=torch.Generator().manual_seed(7), dtype=F64)
    b_vec = {5: e[0], 7: 0.9 * e[0] + math.sqrt(0.19) * e[1], 9: e[2], 11: 0.6 * e[2] + 0.8 * e[3],
             13: e[4], 15: e[5], 17: e[6], 19: e[7], 21: e[8]}
    for j, v in b_vec.items():
        x[j] = 2.0 * v
    for j in range(4, 21, 2):
        x[j] = e[9] if j == 12 else 0.5 * b_vec[j + 1]
    attn = torch.arange(22, 0, -1, dtype=F64) / 100
    expected = [0, 1, 2, 3, 5, 9, 12, 13, 15, 17, 19, 21]
    assert vispruner_select(x, attn, 12, important_ratio=1 / 3).tolist() == expected
    heads = torch.stack([attn, attn * 3])  # [H, N]: head mean, same order
    assert vispruner_select(x, heads, 12, important_ratio=1 / 3).tolist() == expected


def test_vispruner_odd_residual_is_handled():
    # N = 8, T = 4: T_imp = 2, T_div = 2. argsort desc of attention = [0, 2, 5, 6, 3, 4, 1, 7]:
    # important [0, 2], residual [5, 6, 3, 4, 1, 7].
    # Round 1: r = min(8, 4) = 4 but a = [5, 3, 1] has 3 tokens: all dropped (the original breaks here),
    #   residual = b = [6, 4, 7] (R = 3, odd).
    # Round 2: r = 1; a = [6, 7] (ceil(3/2) tokens), b = [4]; cos(6, 4) = 0.8 > cos(7, 4) = 0.1 -> drop 6;
    #   residual [7, 4]. Kept [0, 2, 4, 7].
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(8), dtype=F64)
    x[4] = torch.tensor([1.0, 0.0, 0.0])
    x[6] = torch.tensor([0.8, 0.6, 0.0])
    x[7] = torch.tensor([0.1, 0.0, math.sqrt(0.99)])
    attn = torch.tensor([0.9, 0.1, 0.8, 0.3, 0.2, 0.7, 0.6, 0.05], dtype=F64)
    assert vispruner_select(x, attn, 4).tolist() == [0, 2, 4, 7]


@pytest.mark.parametrize("n", [576, 101, 64, 9])
def test_vispruner_properties(n):
    g = torch.Generator().manual_seed(n)
    x, attn = torch.randn(n, 16, generator=g), torch.rand(4, n, generator=g)
    for keep in sorted({1, 2, 3, n // 7 or 1, n // 2, n - 1, n}):
        for ratio in (0.0, 0.5, 1.0):
            out = vispruner_select(x, attn, keep, important_ratio=ratio)
            assert out.numel() == keep and out.unique().numel() == keep and 0 <= out.min() and out.max() < n
            assert torch.equal(out, out.sort().values)
            top = attn.mean(0).argsort(descending=True)[: int(keep * ratio)]
            assert set(top.tolist()) <= set(out.tolist())  # the important tokens are kept


# ----------------------------------------------------------------------------------------- PruMerge
def prumerge_example():
    # 10 tokens; [CLS] attention with two outliers (0.5 at token 5, 0.4 at token 1). numpy linear
    # percentiles of the sorted values: Q1 = 0.03 + 0.25 * 0.01 = 0.0325, Q3 = 0.07 + 0.75 * 0.01 = 0.0775,
    # bound = Q3 + 1.5 * 0.045 = 0.145 -> ratio 2/10, int(10 * 0.2) = 2 kept: [5, 1] (descending attention).
    a = torch.tensor([0.05, 0.4, 0.01, 0.07, 0.02, 0.5, 0.03, 0.08, 0.04, 0.06], dtype=F64)
    x = torch.stack([torch.ones(10, dtype=F64), torch.arange(10, dtype=F64)], dim=1)  # x_j = [1, j]
    keys = torch.randn(10, 6, generator=torch.Generator().manual_seed(9), dtype=F64)
    return x, keys, a


def test_prumerge_hand_checked():
    x, keys, a = prumerge_example()
    assert prumerge_outlier_ratio(a) == 0.2
    out = prumerge_select(x, keys, a)
    assert out.indices.tolist() == [5, 1]  # NOT sorted: descending [CLS] attention, as the original outputs
    # N - 1 = 9 < 32 neighbours: every other token merges, weighted by its attention, unnormalised.
    # sum a = 1.26, sum a_j * j = 4.81.
    # new_5 = x_5 + sum_{j != 5} a_j x_j = [1 + (1.26 - 0.5), 5 + (4.81 - 2.5)] = [1.76, 7.31]
    # new_1 = [1 + (1.26 - 0.4), 1 + (4.81 - 0.4)] = [1.86, 5.41]
    # extra = sum over pruned (not 5, 1) = [1.26 - 0.9, 4.81 - 2.5 - 0.4] = [0.36, 1.91]
    torch.testing.assert_close(out.merged, torch.tensor([[1.76, 7.31], [1.86, 5.41]], dtype=F64))
    torch.testing.assert_close(out.extra, torch.tensor([0.36, 1.91], dtype=F64))


def test_prumerge_knn_by_key_cosine():
    # Keys at 0, 10, 90, 180 degrees; kept token 0. knn=1: nearest key is token 1 -> x0 + a1 x1;
    # knn=2: tokens 1 and 2 (cos 0.985, 0) -> x0 + a1 x1 + a2 x2. extra = the pruned tokens 1..3.
    keys = torch.tensor([unit(0), unit(10), unit(90), unit(180)], dtype=F64)
    keys = keys * torch.tensor([[1.0], [5.0], [0.1], [2.0]], dtype=F64)  # norms do not matter
    x = torch.tensor([[1.0], [10.0], [100.0], [1000.0]], dtype=F64)
    a = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=F64)
    m1, extra = prumerge_merge(x, keys, a, torch.tensor([0]), knn=1)
    m2, _ = prumerge_merge(x, keys, a, torch.tensor([0]), knn=2)
    assert m1.item() == pytest.approx(1 + 0.3 * 10) and m2.item() == pytest.approx(1 + 3 + 0.2 * 100)
    assert extra.item() == pytest.approx(3 + 20 + 100)


def test_prumerge_cls_attention_hand_checked():
    # q_cls = [2, 0, 0, 0], keys [CLS] = e0, patch 1 = 2 e0, patch 2 = 0; scale 4^-1/2:
    # logits [1, 2, 0] -> softmax [e, e^2, 1] / (e + e^2 + 1); the patches: [0.665241, 0.090031] (sum < 1).
    q = torch.zeros(3, 4, dtype=F64)
    q[0, 0] = 2.0
    k = torch.zeros(3, 4, dtype=F64)
    k[0, 0], k[1, 0] = 1.0, 2.0
    torch.testing.assert_close(prumerge_cls_attention(q, k), torch.tensor([0.6652409558, 0.0900305732], dtype=F64))


def prumerge_reference(x, keys, a, idx, knn=32):
    """Literal transcription of the original's merge loop (clip_encoder.py l.140-170)."""
    n = x.shape[0]
    compl = torch.tensor([j for j in range(n) if j not in set(idx.tolist())], dtype=torch.long)
    kn = F.normalize(keys, p=2, dim=-1)
    out = []
    for i in range(idx.numel()):
        rest = torch.cat([idx[:i], idx[i + 1 :], compl])
        cos = kn[idx[i]] @ kn[rest].T
        nbr = rest[cos.topk(knn).indices]
        out.append((x[nbr] * a[nbr].unsqueeze(-1)).sum(0) + x[idx[i]])
    return torch.stack(out), (x[compl] * a[compl].unsqueeze(-1)).sum(0)


def spiky_attention(n: int, spikes: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, generator=g, dtype=F64) * 1e-3
    a[torch.randperm(n, generator=g)[:spikes]] += torch.rand(spikes, generator=g, dtype=F64) * 0.05 + 0.01
    return a


@pytest.mark.parametrize("plus", [False, True])
def test_prumerge_matches_the_original_merge_loop(plus):
    n = 144
    g = torch.Generator().manual_seed(10)
    x, keys = torch.randn(n, 8, generator=g, dtype=F64), torch.randn(n, 8, generator=g, dtype=F64)
    a = spiky_attention(n, 7, seed=11)
    out = (prumerge_plus_select if plus else prumerge_select)(x, keys, a)
    assert out.indices.unique().numel() == out.indices.numel() and out.merged.shape == (out.indices.numel(), 8)
    assert out.indices[:7].tolist() == a.topk(7).indices.tolist()  # outliers first, descending
    merged, extra = prumerge_reference(x, keys, a, out.indices)
    torch.testing.assert_close(out.merged, merged)
    torch.testing.assert_close(out.extra, extra)
    # The unnormalised merge: the extra token plus every kept token's own weighted term is the whole
    # weighted sum when nothing is double-counted, i.e. sum_j a_j x_j = sum_kept a_i x_i + extra.
    kept = out.indices
    torch.testing.assert_close((a[kept, None] * x[kept]).sum(0) + out.extra, (a[:, None] * x).sum(0))


def test_prumerge_plus_hand_checked_and_last_token_quirk():
    x, keys, a = prumerge_example()
    # ratio 0.2 -> step_length int(1/0.2) = 5, stride int(5/3) = 1: range(0, N - 1 = 9) minus {5, 1}
    # = [0, 2, 3, 4, 6, 7, 8]; token 9 (the last) is never sampled (the original's hard-coded 575 = N - 1).
    out = prumerge_plus_select(x, keys, a)
    assert out.indices.tolist() == [5, 1, 0, 2, 3, 4, 6, 7, 8]
    # Only token 9 is pruned: extra = a_9 x_9 = 0.06 * [1, 9].
    torch.testing.assert_close(out.extra, torch.tensor([0.06, 0.54], dtype=F64))


def test_prumerge_plus_samples_pinned_quirks():
    none = torch.tensor([], dtype=torch.long)
    # N = 576 (CLIP-L/336): ratio 1/3 -> step 3, stride 1 -> 0..574; 575 is never sampled, as range(0, 575).
    s = prumerge_plus_samples(none, 1 / 3, 576)
    assert s.tolist() == list(range(575))
    # ratio 0.05 -> step 20, stride 6: range(0, 575, 6) minus the outliers.
    s = prumerge_plus_samples(torch.tensor([6, 7, 12]), 0.05, 576)
    assert s.tolist() == [v for v in range(0, 575, 6) if v not in (6, 12)]
    # Other N: the end is N - 1 (the 575 generalised), so index N - 1 is never sampled even on the stride.
    assert prumerge_plus_samples(none, 1 / 3, 10).tolist() == list(range(9))
    # No outliers (the original divides by zero): the limit of an infinite stride, token 0 only.
    assert prumerge_plus_samples(none, 0.0, 576).tolist() == [0]
    # ratio > 1/3 (the original's stride 0 fails): stride clamped to 1.
    assert prumerge_plus_samples(torch.tensor([3]), 0.6, 8).tolist() == [0, 1, 2, 4, 5, 6]


def test_prumerge_without_outliers_keeps_only_the_extra_token():
    x = torch.randn(20, 4, dtype=F64)
    a = torch.full((20,), 0.01, dtype=F64)  # IQR 0: nothing is strictly above Q3
    out = prumerge_select(x, torch.randn(20, 4, dtype=F64), a)
    assert out.indices.numel() == 0 and out.merged.shape == (0, 4)
    torch.testing.assert_close(out.extra, (0.01 * x).sum(0))


def prumerge_ctx():
    """The PruMerge example as engine inputs: one 1-wide head, q_[CLS] = 1 and keys = log weights,
    so softmax(q k^T) = weights / sum: [CLS] weight 0.74 makes the sum 2, i.e. cls_attn = a / 2.
    N = 10 <= 32: every other token is a neighbour whatever the keys. The projector is the identity."""
    x, _, a = prumerge_example()
    keys = torch.cat([torch.tensor([0.74], dtype=F64), a]).log().unsqueeze(-1)  # [1 + N, 1]
    return ctx_for(
        x, vit_features=x, vit_last_queries=torch.ones(11, 1, dtype=F64),
        vit_last_keys=keys, vit_projector=lambda t: t,
    )


def test_prumerge_registered_places_the_extra_token_in_the_last_pruned_slot_and_caps():
    # cls_attn = a / 2 (see prumerge_ctx): outliers [5, 1] as in prumerge_example; merged values halve
    # the weighted sums of test_prumerge_hand_checked: new_5 = [1 + .76 / 2, 5 + 2.31 / 2],
    # new_1 = [1 + .86 / 2, 1 + 4.41 / 2]; extra (pruned: all but 1, 5) = [.36 / 2, 1.91 / 2] in slot 9.
    idx, feats = run("prumerge_pre_llm", prumerge_ctx(), 8)
    assert idx.tolist() == [1, 5, 9]
    torch.testing.assert_close(feats, torch.tensor([[1.43, 3.205], [1.38, 6.155], [0.18, 0.955]], dtype=F64))
    # keep = 2 caps the output at 2 tokens, extra included: the top outlier 5, then the extra token,
    # which now also sums token 1: [(.36 + .4) / 2, (1.91 + .4) / 2].
    idx, feats = run("prumerge_pre_llm", prumerge_ctx(), 2)
    assert idx.tolist() == [5, 9]
    torch.testing.assert_close(feats, torch.tensor([[1.38, 6.155], [0.38, 1.155]], dtype=F64))


def test_prumerge_plus_registered_caps_in_the_originals_output_order():
    # PruMerge+ order [5, 1, 0, 2, 3, 4, 6, 7, 8] (test_prumerge_plus_hand_checked); keep 4 -> the first
    # 3 + extra. new_0 = [1 + 1.21 / 2, 0 + 4.81 / 2]; extra over {2, 3, 4, 6, 7, 8, 9}:
    # sum a = .31, sum a_j j = 1.91 -> [.155, .955], in the last pruned slot 9.
    idx, feats = run("prumerge_plus_pre_llm", prumerge_ctx(), 4)
    assert idx.tolist() == [0, 1, 5, 9]
    expected = [[1.605, 2.405], [1.43, 3.205], [1.38, 6.155], [0.155, 0.955]]
    torch.testing.assert_close(feats, torch.tensor(expected, dtype=F64))


# ---------------------------------------------------------------------------------------- VisionZip
def test_visionzip_hand_checked():
    # 9 patches + [CLS]; dominant 3 ([CLS] + 2 patches), contextual 2.
    # [CLS] attention summed over 2 heads: [.2, .3, .2, .2, .9, .2, .2, .7, .2] -> top 2: patches 4, 7.
    # Remaining (spatial order) [0, 1, 2, 3, 5, 6, 8], R = 7: step max(1, 7 // 2) = 3 -> targets at list
    # positions 0, 3 = patches 0, 3. Keys: 0 at 0 deg, 3 at 90; 1 (10 deg) -> 0, 2 (80) -> 3, 5 (30) -> 0,
    # 6 (100) -> 3, 8 (45: a tie, argmax takes the first target) -> 0.
    # Hidden h_p = p + 1, [CLS] = 100: contextual_0 = 1 + (2 + 6 + 9) / 3 = 6.6667, contextual_3 = 4 + (3 + 7) / 2 = 9.
    cls_attention = torch.tensor(
        [[.1, .1, .1, .1, .5, .1, .1, .3, .1], [.1, .2, .1, .1, .4, .1, .1, .4, .1]], dtype=F64
    )
    hidden = torch.cat([torch.tensor([100.0]), torch.arange(1.0, 10.0)]).to(F64).view(10, 1)
    angles = {0: 0, 1: 10, 2: 80, 3: 90, 4: 50, 5: 30, 6: 100, 7: 20, 8: 45}
    keys = torch.tensor([[0.3, -0.7]] + [unit(angles[p]) for p in range(9)], dtype=F64)
    keys[1], keys[4], keys[9] = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0])  # exact
    out = visionzip_select(hidden, cls_attention, keys, dominant=3, contextual=2)
    assert out.indices.tolist() == [4, 7, 0, 3]
    torch.testing.assert_close(out.features.flatten(), torch.tensor([5.0, 8.0, 1 + 17 / 3, 9.0], dtype=F64))
    assert out.cls_feature.tolist() == [100.0]


def test_visionzip_properties_and_merged_mass():
    n, c = 576, 8
    g = torch.Generator().manual_seed(12)
    hidden = torch.randn(n + 1, c, generator=g, dtype=F64)
    attn = torch.rand(16, n, generator=g, dtype=F64)
    keys = torch.randn(n + 1, 4, generator=g, dtype=F64)
    for dom, ctx_n in [(54, 10), (191, 30), (1, 5), (570, 10)]:
        out = visionzip_select(hidden, attn, keys, dominant=dom, contextual=ctx_n)
        k = dom - 1 + min(ctx_n, n - dom + 1)
        assert out.indices.numel() == k == out.features.shape[0] and out.indices.unique().numel() == k
        assert set(out.indices[: dom - 1].tolist()) == set(attn.sum(0).topk(dom - 1).indices.tolist())
        torch.testing.assert_close(out.features[: dom - 1], hidden[1:][out.indices[: dom - 1]])
    # Defaults are the original function's: 191 dominant ([CLS] included) + 30 contextual.
    out = visionzip_select(hidden, attn, keys)
    assert out.indices.numel() == 190 + 30


def test_visionzip_registered_budget_split_and_cls_slot():
    # test_visionzip_hand_checked's example with keep 5 and contextual_ratio 0.4: contextual
    # round(5 * .4) = 2, dominant 3 ([CLS] + patches 4, 7), targets 0, 3 -> [4, 7, 0, 3]; [CLS] takes
    # the first slot left over, 1. Dominant patches keep ctx.features (here -(p + 1)); contextual and
    # [CLS] go through the projector (identity): 1 + 17 / 3, 9 and 100.
    cls_attention = torch.tensor(
        [[.1, .1, .1, .1, .5, .1, .1, .3, .1], [.1, .2, .1, .1, .4, .1, .1, .4, .1]], dtype=F64
    )
    angles = {0: 0, 1: 10, 2: 80, 3: 90, 4: 50, 5: 30, 6: 100, 7: 20, 8: 45}
    keys = torch.tensor([[0.3, -0.7]] + [unit(angles[p]) for p in range(9)], dtype=F64)
    keys[1], keys[4] = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    patches = torch.arange(1.0, 10.0, dtype=F64).view(9, 1)
    ctx = ctx_for(
        -patches, vit_features=patches, vit_cls_feature=torch.tensor([100.0], dtype=F64),
        vit_cls_attention=cls_attention, vit_feature_keys=keys, vit_projector=lambda t: t,
    )
    idx, feats = run("visionzip_pre_llm", ctx, 5, contextual_ratio=0.4)
    assert idx.tolist() == [0, 1, 3, 4, 7]
    torch.testing.assert_close(feats.flatten(), torch.tensor([1 + 17 / 3, 100.0, 9.0, -5.0, -8.0], dtype=F64))


def test_visionzip_registered_split_follows_the_papers_settings():
    # 64 / 128 / 192 tokens of 576 -> 10 / 20 / 30 contextual: exactly 10 / 20 / 30 + 1 ([CLS]) rows
    # come from the projector (here: the negated ViT features), the dominant rest are ctx.features.
    n = 576
    g = torch.Generator().manual_seed(13)
    vit = torch.randn(n, 4, generator=g, dtype=F64)
    attn = torch.rand(2, n, generator=g, dtype=F64)
    ctx = ctx_for(
        vit + 100, vit_features=vit, vit_cls_feature=torch.zeros(4, dtype=F64), vit_cls_attention=attn,
        vit_feature_keys=torch.randn(n + 1, 4, generator=g, dtype=F64), vit_projector=lambda t: -t,
    )
    for keep, n_ctx in [(64, 10), (128, 20), (192, 30)]:
        idx, feats = run("visionzip_pre_llm", ctx, keep)
        assert set(attn.sum(0).topk(keep - n_ctx - 1).indices.tolist()) <= set(idx.tolist())
        assert int((feats < 50).all(dim=1).sum()) == n_ctx + 1


# ----------------------------------------------------------------------------------------- FitPrune
def fitprune_example():
    # H = 2, Nv = 3, T = 2.
    visual = torch.tensor([[[.2, .1, .3], [.1, .2, .1], [.3, .3, .1]],
                           [[.1, .3, .1], [.2, .1, .2], [.1, .1, .4]]], dtype=F64)
    text = torch.tensor([[[.1, .05, .2], [.3, .1, .1]],
                         [[.2, .1, .1], [.1, .05, .4]]], dtype=F64)
    return visual, text


def test_fitprune_layer_rule_hand_checked():
    visual, text = fitprune_example()
    # Head max of the visual rows [[.2,.3,.3],[.2,.2,.2],[.3,.3,.4]]: column sums .7, .8, .9, / Nv = 3
    # -> self = [.2333, .2667, .3]. Head max of the text rows [[.2,.1,.2],[.3,.1,.4]]: cross = [.5, .2, .6].
    # score = cross * self = [.1167, .0533, .18] -> ascending order 1, 0, 2.
    expected = torch.tensor([0.5 * 0.7 / 3, 0.2 * 0.8 / 3, 0.6 * 0.3], dtype=F64)
    torch.testing.assert_close(fitprune_scores(visual, text), expected)
    assert fitprune_keep(visual, text, 0).tolist() == [0, 1, 2]
    assert fitprune_keep(visual, text, 1).tolist() == [0, 2]  # deletes the lowest (UniPruneBench kept it)
    assert fitprune_keep(visual, text, 2).tolist() == [2]


def test_fitprune_calibration_step_hand_checked():
    visual, text = fitprune_example()
    # W_cross = (.2+.1+.2+.3+.1+.4) / n_text 2 = .65; W_self = (.7+.8+.9) / 3 = .8.
    w_cross, w_self = fitprune_reference_masses(visual, text)
    assert w_cross == pytest.approx(0.65) and w_self == pytest.approx(0.8)
    # cross = column sums / 2 = [.25, .1, .3] (ascending 1, 0, 2); self = [.2333, .2667, .3] (ascending 0, 1, 2).
    # alpha .5: cross keeps >= .325: removing 1 token leaves .55, 2 leave .30 < .325 -> delete 1 -> {1};
    #   self keeps >= .4: 1 token leaves .5667, 2 leave .3 -> delete 1 -> {0}. Intersection: none.
    assert fitprune_calibration_step(visual, text, w_cross, w_self, 0.5).tolist() == []
    # alpha .6: cross keeps >= .26: 2 tokens leave .30, never crossed -> Nv - 1 = 2 -> {1, 0};
    #   self keeps >= .32: 2 leave .3 < .32 -> delete 1 -> {0}. Intersection {0}.
    assert fitprune_calibration_step(visual, text, w_cross, w_self, 0.6).tolist() == [0]
    # alpha .7: both never crossed -> {1, 0} and {0, 1} -> [0, 1].
    assert fitprune_calibration_step(visual, text, w_cross, w_self, 0.7).tolist() == [0, 1]


def test_fitprune_delete_count_rule():
    v = torch.tensor([0.4, 0.1, 0.3, 0.2], dtype=F64)  # total 1.0; ascending 0.1, 0.2, 0.3, 0.4
    assert fitprune_delete_count(v, 1.0, 0.25) == 1  # keep >= .75: remove .1 -> .9, .1+.2 -> .7 < .75 -> i = 2 -> 1
    assert fitprune_delete_count(v, 1.0, 0.65) == 3  # keep >= .35: .9, .7, .4 never below -> Nv - 1 = 3
    assert fitprune_delete_count(v, 2.0, 0.1) == 0  # total already below 2 * .9 at i = 0 -> max(-1, 0) = 0


def test_fitprune_bisection_with_a_stub():
    calls = []

    def fit(alpha):
        calls.append(alpha)
        return alpha >= 0.3, {0: round(alpha * 100)}

    # [0,1] -> .5 reached -> [0,.5] -> .25 no -> [.25,.5] -> .375 yes -> .3125 yes -> .28125 no -> .296875 no
    # -> width .015625 > .01 -> .3046875 yes -> width .0078125: stop. The last mid-point's scheme is returned.
    alpha, scheme = fitprune_bisect(fit)
    assert calls == [0.5, 0.25, 0.375, 0.3125, 0.28125, 0.296875, 0.3046875]
    assert alpha == 0.3046875 and scheme == {0: 30}
    assert fitprune_average_counts({0: 7, 1: 5, 2: 1}, 2) == {0: 3, 1: 2, 2: 0}


# ------------------------------------------------------------------------------- through the engine
@pytest.mark.parametrize(
    "env",
    [
        {"KEEP_RATIO": "0.25", "PRUNE_METHOD_PRE_LLM": "gprune_pre_llm"},
        {"KEEP_RATIO": "0.3", "PRUNE_METHOD_PRE_LLM": "pool_pre_llm"},
        {"INTRA_LLM_LAYER_SPECS": "1:pdrop_intra_llm:0.5;2:pdrop_intra_llm:0.25"},
    ],
    ids=["gprune", "pool", "pdrop"],
)
@torch.no_grad()
def test_registered_methods_run_in_the_engine(env):
    import custom_qwenvl
    from synthetic import tiny_models as tm
    from utils import PruneConfig

    model = custom_qwenvl.patch(tm.tiny_qwen(), PruneConfig.from_env(env))
    try:
        inputs = tm.qwen_inputs()
        model(**inputs)
        n = int((inputs["input_ids"][0] == tm.IMAGE_ID).sum())
        ratios = [float(env["KEEP_RATIO"])] if "KEEP_RATIO" in env else [0.5, 0.25]
        assert [len(e.kept) for e in model.prune_trace] == [methods.budget(n, r) for r in ratios]
    finally:
        custom_qwenvl.unpatch(model)


def test_fitprune_schedules_become_layer_specs_with_the_exact_counts():
    from methods import budget
    from methods.fitprune import LLAVA15_7B_SCHEMES, fitprune_specs
    from utils import PruneConfig

    # Deletions after layer l's attention = a cut at the input of layer l+1 (573/576, then 566/576);
    # after the last layer: none.
    assert fitprune_specs({0: 3, 1: 7, 5: 0, 31: 2}, 576, 32) == "1:fitprune_intra_llm:0.994792;2:fitprune_intra_llm:0.982639"
    for reduction, scheme in LLAVA15_7B_SCHEMES.items():
        cfg = PruneConfig.from_env({"INTRA_LLM_LAYER_SPECS": fitprune_specs(scheme, 576, 32)})
        left = 576
        for spec in cfg.intra:  # every cut keeps exactly the original's survivors
            left -= scheme[spec.layer - 1]
            assert budget(576, spec.ratio) == left
        assert left == 576 - sum(v for k, v in scheme.items() if k < 31), reduction
    with pytest.raises(ValueError, match="deletes all"):
        fitprune_specs({0: 576}, 576, 32)
