"""The sync-free rewrites (issue #12, part 2: ``tests/test_method_syncs.py``) select exactly what the
loops they replaced selected. Each ``_old_*`` below is the replaced code, kept verbatim as the
reference only; the rewrites run on random inputs (ties included where the original has a rule for
them) and must give the same kept indices, and merged values equal up to float rounding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import custom_llava_next
from methods import PruneContext, crop_budgets, crop_rows, get_method
from methods.dart import dart_select
from methods.fitprune import fitprune_keep, fitprune_scores
from methods.hiprune import hiprune_select
from methods.mustdrop import _windows, mustdrop_filter, mustdrop_vit_merge, mustdrop_window_merge, mustdrop_window_similarity
from methods.prumerge import prumerge_merge, prumerge_outlier_count, prumerge_outlier_ratio
from methods.prumerge_plus import prumerge_plus_samples
from methods.sparsevlm import sparsevlm_rater_mask, sparsevlm_relation, sparsevlm_select
from methods.vscan import vscan_merge, vscan_window_topk
from synthetic import tiny_models as tm

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------- DivPrune
def _old_divprune(features: torch.Tensor, keep: int) -> torch.Tensor:
    x = features.float()
    x = x / x.norm(dim=1, keepdim=True)
    dist = 1.0 - x @ x.T
    n = x.shape[0]
    chosen = torch.zeros(n, dtype=torch.bool)
    picks = torch.empty(keep, dtype=torch.long)
    scores = dist.topk(2, dim=0, largest=False).values[1] if n > 1 else dist[0]
    min_dist = None
    for i in range(keep):
        if i > 0:
            row = dist[picks[i - 1]]
            min_dist = row if min_dist is None else torch.minimum(min_dist, row)
            scores = min_dist.masked_fill(chosen, float("-inf"))
        pick = torch.argmax(scores)
        picks[i] = pick
        chosen[pick] = True
    return picks


@pytest.mark.parametrize("seed", range(6))
def test_divprune_same_picks_as_the_loop_it_replaced(seed):
    g = _gen(seed)
    n = int(torch.randint(1, 90, (1,), generator=g))
    x = torch.randn(n, 8, generator=g)
    if seed % 2:  # exact duplicates: the guard's case
        x[n // 2 :] = x[: n - n // 2].clone()
    ctx = PruneContext(features=x, stage="pre_llm", layer=None, positions=torch.arange(n), token_index=torch.arange(n), n_orig=n)
    for keep in {1, max(1, n // 3), n}:
        assert get_method("divprune_pre_llm").fn(ctx, keep).tolist() == _old_divprune(x, keep).tolist()


# ----------------------------------------------------------------------------------------- FitPrune
@pytest.mark.parametrize("seed", range(4))
def test_fitprune_keeps_the_complement_of_the_lowest(seed):
    g = _gen(seed)
    n, t = 40, 7
    visual, text = torch.rand(3, n, n, generator=g), torch.rand(3, t, n, generator=g)
    for n_delete in (0, 1, 17, n - 1):
        keep = torch.ones(n, dtype=torch.bool)
        keep[torch.sort(fitprune_scores(visual, text)).indices[:n_delete]] = False
        assert fitprune_keep(visual, text, n_delete).tolist() == torch.nonzero(keep).flatten().tolist()


# ---------------------------------------------------------------------------------------- SparseVLM
def _old_select(relation, features, keep, recycle_ratio=0.3):
    n = relation.numel()
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.topk(relation, keep).indices] = True
    kept = torch.nonzero(mask).flatten()
    pruned = torch.nonzero(~mask).flatten()
    m = int(pruned.numel() * recycle_ratio) + 1
    top = relation[pruned].topk(min(m, pruned.numel())).indices
    return kept, features[pruned[top]]


@pytest.mark.parametrize("seed", range(6))
def test_sparsevlm_same_raters_relation_kept_and_recycled(seed):
    g = _gen(seed)
    n, t = 50, 9
    visual, text = torch.randn(n, 8, generator=g), torch.randn(t, 8, generator=g)
    if seed == 0:  # every text token the same: no rater above the mean, all rate
        text = text[:1].expand(t, 8).clone()
    attn = torch.rand(4, t, n, generator=g)
    mask = sparsevlm_rater_mask(visual, text)
    m = (visual @ text.T).softmax(dim=-1).mean(dim=0)
    raters = torch.nonzero(m > m.mean()).flatten()
    raters = raters if raters.numel() else torch.arange(t)
    assert torch.nonzero(mask).flatten().tolist() == raters.tolist()
    relation = sparsevlm_relation(attn, mask)
    torch.testing.assert_close(relation, attn.mean(dim=0)[raters].mean(dim=0))
    features = torch.randn(n, 8, generator=g)
    for keep in (1, 20, n - 1):
        kept, _ = sparsevlm_select(relation, features, keep, noise=None)
        old_kept, candidates = _old_select(relation, features, keep)
        assert kept.tolist() == old_kept.tolist()
        pruned = torch.sort(torch.zeros(n, dtype=torch.uint8).index_fill_(0, kept, 1), stable=True).indices[: n - keep]
        assert torch.equal(features[pruned[relation[pruned].topk(candidates.shape[0]).indices]], candidates)


# ----------------------------------------------------------------------------------------- MustDrop
def _old_window_merge(x, threshold=0.8, window=3, r=None):
    cls, feat = x[:1], x[1:]
    grid = _windows(feat.shape[0], window, x.device)
    sim = mustdrop_window_similarity(feat, window)
    if r is None:
        r = int((sim >= threshold).sum())
    top = sim.topk(r).indices
    merged = [grid[j].tolist() for j in top.tolist()]
    rest = torch.ones(grid.shape[0], dtype=torch.bool)
    rest[top] = False
    unmerged = grid[rest].flatten().sort().values.tolist()
    groups = merged + [[i] for i in unmerged]
    out = torch.stack([feat[idx].mean(dim=0) for idx in groups]) if groups else feat[:0]
    return torch.cat([cls, out.to(x.dtype)]), groups


@pytest.mark.parametrize("side, window, threshold", [(6, 3, 0.0), (6, 2, 0.3), (8, 2, -1.0), (4, 2, 2.0)])
def test_mustdrop_window_merge_same_groups_and_means(side, window, threshold):
    g = _gen(side * window)
    base = torch.randn(1, 1 + side * side, 16, generator=g)
    x = torch.cat([base, base + 0.3 * torch.randn(base.shape, generator=g)])  # two images, similar windows
    merged, groups = mustdrop_vit_merge(x, {"merge_threshold": threshold, "window": window})
    sims = [mustdrop_window_similarity(x[b, 1:], window) for b in range(2)]
    r = min(int((s >= threshold).sum()) for s in sims)
    for b in range(2):
        old, old_groups = _old_window_merge(x[b], threshold, window, r=r)
        assert groups[b] == old_groups
        torch.testing.assert_close(merged[b], old)
        one, one_groups = mustdrop_window_merge(x[b], threshold, window)
        assert one_groups == _old_window_merge(x[b], threshold, window)[1]


def test_mustdrop_filter_same_union():
    g = _gen(3)
    attn = torch.rand(2, 6, 40, generator=g) ** 6
    key_set = torch.tensor([39, 0, 5, 5 + 1])
    for key in (None, key_set):
        a = attn.mean(dim=0)
        col = a.sum(dim=0)
        drop = (col < col.sum() * 0.02) & (a.max(dim=0).values < 0.05)
        old = torch.nonzero(~drop).flatten()
        if key is not None:
            old = torch.unique(torch.cat([old, key]))
        assert mustdrop_filter(attn, 0.02, 0.05, key).tolist() == old.tolist()


# --------------------------------------------------------------------------------------------- DART
def _old_dart(image_keys, text_keys, image_states, text_states, *, per_pivot, image_start, n_pivots_image=4, n_pivots_text=4):
    n, t = image_keys.shape[0], text_keys.shape[0]
    image_l1 = image_keys.float().abs().sum(dim=-1)
    text_l1 = text_keys.float().abs().sum(dim=-1)
    image_pivots = (image_l1.topk(min(n_pivots_image, n)).indices + image_start).tolist()
    text_pivots = (text_l1.topk(min(n_pivots_text, t)).indices + image_start + n).tolist()

    def state(i):
        return image_states[i - image_start] if i < image_start + n else text_states[i - image_start - n]

    retained = set(image_pivots + text_pivots)
    pool = set(range(image_start, image_start + n)) - set(image_pivots)
    for pivot in list(retained):
        if not pool:
            break
        candidates = list(pool)
        rows = torch.tensor(candidates) - image_start
        cos = F.cosine_similarity(state(pivot).unsqueeze(0), image_states[rows], dim=-1)
        picked = [candidates[j] for j in (-cos).topk(min(per_pivot, len(candidates))).indices.tolist()]
        retained.update(picked)
        pool.difference_update(picked)
    retained.difference_update(text_pivots)
    return torch.tensor(sorted(retained), dtype=torch.long) - image_start


def test_dart_same_selection_as_the_set_loop():
    g = _gen(0)
    for trial in range(60):
        n, t = int(torch.randint(2, 80, (1,), generator=g)), int(torch.randint(1, 12, (1,), generator=g))
        start, per_pivot = int(torch.randint(0, 300, (1,), generator=g)), int(torch.randint(0, 20, (1,), generator=g))
        keys, text_keys = torch.randn(n, 8, generator=g), torch.randn(t, 8, generator=g)
        states, text_states = torch.randn(n, 6, generator=g), torch.randn(t, 6, generator=g)
        if trial % 5 == 0:  # duplicate states: cosine ties, broken in the candidates' set order
            states[n // 2 :] = states[: n - n // 2].clone()
        old = _old_dart(keys, text_keys, states, text_states, per_pivot=per_pivot, image_start=start)
        new = dart_select(keys, text_keys, states, text_states, per_pivot=per_pivot,
                          image_start=torch.tensor(start) if trial % 2 else start)
        assert new.tolist() == old.tolist(), trial


# ------------------------------------------------------------------------------------- PruMerge(+)
def test_prumerge_outlier_count_equals_numpy_iqr():
    g = _gen(0)
    for trial in range(400):
        n = int(torch.randint(2, 700, (1,), generator=g))
        kind = trial % 3
        if kind == 0:
            a = torch.softmax(torch.randn(n, generator=g) * float(torch.rand(1, generator=g) * 8), 0)
        elif kind == 1:
            a = (torch.randn(n, generator=g) * 100).round() / 7  # many ties
        else:
            a = torch.softmax(torch.randn(n, generator=g) * 3, 0).half().float()
        assert int(prumerge_outlier_count(a)) == round(prumerge_outlier_ratio(a) * n), trial


def test_prumerge_plus_samples_and_extra_as_before():
    g = _gen(1)
    for trial in range(40):
        n = 576
        idx = torch.randperm(n, generator=g)[: int(torch.randint(0, 200, (1,), generator=g))]
        ratio = idx.numel() / n
        stride = max(1, int(int(1 / ratio) / 3)) if ratio > 0 else n
        taken = set(idx.tolist())
        old = [s for s in range(0, n - 1, stride) if s not in taken]
        assert prumerge_plus_samples(idx, ratio, n).tolist() == old
    x, keys, w = torch.randn(50, 8, generator=g), torch.randn(50, 8, generator=g), torch.rand(50, generator=g)
    idx = torch.tensor([7, 3, 41])
    _, extra = prumerge_merge(x, keys, w, idx)
    pruned = torch.ones(50, dtype=torch.bool)
    pruned[idx] = False
    assert torch.equal(extra, (x[pruned] * w[pruned].unsqueeze(-1)).sum(dim=0))


# ------------------------------------------------------------------------------------------ HiPrune
def _old_hiprune(shallow, deep, keep, width, alpha, valid=None):
    n = shallow.shape[0]
    if valid is not None:
        shallow = shallow.masked_fill(~valid, -torch.inf)
        deep = deep.masked_fill(~valid, -torch.inf)
    anchors = shallow.topk(min(n, round(keep * alpha / 5))).indices
    buffers = torch.cat([anchors, anchors - 1, anchors + 1, anchors - width, anchors + width]).clamp(0, n - 1)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[buffers] = True
    if valid is not None:
        mask &= valid
    n_registers = max(keep - int(mask.sum()), 0)
    scores = deep - mask.to(deep.dtype)
    kept = mask.clone()
    kept[scores.topk(min(n, n_registers)).indices] = True
    if valid is not None:
        kept &= valid
    return torch.nonzero(kept).flatten()


def test_hiprune_same_selection_as_before():
    g = _gen(0)
    for trial in range(200):
        side = int(torch.randint(2, 25, (1,), generator=g))
        n = side * side
        shallow = torch.rand(n, generator=g, dtype=F64)
        deep = torch.rand(n, generator=g, dtype=F64) * (1 if trial % 2 else 5)  # 5: registers re-pick buffers
        keep, alpha = int(torch.randint(1, n + 1, (1,), generator=g)), (0.1, 1.25, 3.0)[trial % 3]
        valid = torch.rand(n, generator=g) > 0.3 if trial % 4 == 0 else None
        assert (hiprune_select(shallow, deep, keep, side, alpha, valid).tolist()
                == _old_hiprune(shallow, deep, keep, side, alpha, valid).tolist()), trial


def _old_hiprune_per_crop(ctx, keep, shallow, deep, alpha):
    crops = ctx.crops
    grid = crops.side**2
    patch_of = crops.patch[ctx.token_index]
    rows = crop_rows(ctx)
    kept = []
    for r, t in zip(rows, crop_budgets([int(r.numel()) for r in rows], keep)):
        if t == 0:
            continue
        patches = patch_of[r]
        full = torch.zeros(2, grid, dtype=shallow.dtype)
        full[:, patches] = torch.stack([shallow[r], deep[r]]) / (grid + 1)
        valid = torch.zeros(grid, dtype=torch.bool)
        valid[patches] = True
        row_of = torch.full((grid,), -1, dtype=torch.long)
        row_of[patches] = r
        kept.append(row_of[_old_hiprune(full[0], full[1], t, crops.side, alpha, valid)])
    return torch.cat(kept)


@pytest.mark.parametrize("size", [(30, 100), (480, 640)])
def test_hiprune_per_crop_same_selection(size):
    from methods.hiprune import _per_crop

    crops = custom_llava_next.image_entry(size, tm.LLAVA_NEXT_PINPOINTS, tm.LLAVA_NEXT_CROP_PX, tm.LLAVA_NEXT_SIDE).crops
    n = int(crops.crop.numel())
    g = _gen(n)
    for trial in range(10):
        ctx = PruneContext(features=torch.zeros(n, 1), stage="pre_llm", layer=None, positions=torch.arange(n),
                           token_index=torch.arange(n), n_orig=n, family="llava_next", ratio=0.5, crops=crops)
        shallow, deep = torch.rand(n, generator=g, dtype=F64), torch.rand(n, generator=g, dtype=F64)
        keep, alpha = int(torch.randint(1, n, (1,), generator=g)), (0.1, 1.25)[trial % 2]
        new = _per_crop(ctx, keep, shallow, deep, alpha)
        assert new.tolist() == sorted(_old_hiprune_per_crop(ctx, keep, shallow, deep, alpha).tolist())


# -------------------------------------------------------------------------------- VScan (LLaVA-NeXT)
def _old_vscan_per_crop(ctx, keep, local, global_, window):
    crops = ctx.crops
    grid = crops.side**2
    patch_of = crops.patch[ctx.token_index]
    rows = crop_rows(ctx)
    indices, features = [], []
    for r, t in zip(rows, crop_budgets([int(r.numel()) for r in rows], keep)):
        if t == 0:
            continue
        patches = patch_of[r]
        full = torch.full((2, grid), -torch.inf, dtype=local.dtype)
        full[:, patches] = torch.stack([local[r], global_[r]])
        valid = torch.zeros(grid, dtype=torch.bool)
        valid[patches] = True
        local_idx = vscan_window_topk(full[0], (crops.side, crops.side), int(t * 0.5), window)
        local_idx = local_idx[valid[local_idx]]
        scores = full[1].clone()
        scores[local_idx] = 0
        kept = torch.zeros(grid, dtype=torch.bool)
        kept[local_idx] = True
        kept[scores.topk(t - int(t * 0.5)).indices] = True
        position = torch.full((grid,), -1, dtype=torch.long)
        position[patches] = torch.arange(r.numel())
        mine = position[torch.nonzero(kept & valid).flatten()]
        indices.append(r[mine])
        features.append(vscan_merge(ctx.features[r], mine))
    return torch.cat(indices), torch.cat(features)


@pytest.mark.parametrize("size", [(30, 100), (480, 640), (60, 50)])
def test_vscan_per_crop_same_selection_and_merge(size):
    from methods.vscan import _vit_stage_per_crop

    crops = custom_llava_next.image_entry(size, tm.LLAVA_NEXT_PINPOINTS, tm.LLAVA_NEXT_CROP_PX, tm.LLAVA_NEXT_SIDE).crops
    n = int(crops.crop.numel())
    g = _gen(n)
    for trial in range(8):
        x = torch.randn(n, 6, generator=g, dtype=F64)
        local, global_ = torch.rand(n, generator=g, dtype=F64), torch.rand(n, generator=g, dtype=F64)
        if trial % 2:
            global_ = (global_ * 4).floor() / 4  # ties, and zeros the local picks tie with
        ctx = PruneContext(features=x, stage="pre_llm", layer=None, positions=torch.arange(n), token_index=torch.arange(n),
                           n_orig=n, family="llava_next", ratio=0.5, crops=crops)
        keep = int(torch.randint(1, n, (1,), generator=g))
        window = (2, 6)[trial % 2]
        idx, merged = _vit_stage_per_crop(ctx, keep, local, global_, window)
        old_idx, old_merged = _old_vscan_per_crop(ctx, keep, local, global_, window)
        assert idx.tolist() == old_idx.tolist()
        torch.testing.assert_close(merged, old_merged)


def test_numpy_percentile_is_what_prumerge_reads():  # the reference the device count is checked against
    a = torch.tensor([0.1, 0.2, 0.3, 0.4, 5.0])
    q1, q3 = np.percentile(a.numpy(), 25), np.percentile(a.numpy(), 75)
    assert math.isclose(prumerge_outlier_ratio(a), int((a.numpy() > q3 + 1.5 * (q3 - q1)).sum()) / 5)
    assert int(prumerge_outlier_count(a)) == 1


def test_crop_rows_after_a_cut_as_one_nonzero_a_crop():
    crops = custom_llava_next.image_entry((480, 640), tm.LLAVA_NEXT_PINPOINTS, tm.LLAVA_NEXT_CROP_PX, tm.LLAVA_NEXT_SIDE).crops
    n = int(crops.crop.numel())
    g = _gen(2)
    for k in (1, 7, n - 1):
        alive = torch.randperm(n, generator=g)[:k].sort().values
        ctx = PruneContext(features=torch.zeros(k, 1), stage="intra_llm", layer=2, positions=alive, token_index=alive,
                           n_orig=n, family="llava_next", crops=crops)
        owner = crops.crop[alive]
        old = [torch.nonzero(owner == c).flatten().tolist() for c in range(crops.n_crops)]
        assert [r.tolist() for r in crop_rows(ctx)] == old
