"""SparseVLM (``methods/sparsevlm.py``): the rules on hand-made tensors, their properties, the
KEEP_RATIO schedule, and the engine running it (events, recycled tokens, exactness)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import methods
from families import ATOL, FAMILIES, cfg
from methods.sparsevlm import (
    BUDGETS,
    cluster_and_merge,
    dpc_knn_assign,
    sparsevlm_fractions,
    sparsevlm_raters,
    sparsevlm_relation,
    sparsevlm_select,
)
from utils import ConfigError


# ----------------------------------------------------------------------------- the rules on tensors
def test_raters_match_the_original():
    # Expected from the original's lines (modelling_sparse_llama.py l.204-208, run on these
    # tensors): m = softmax(V T^T, dim=text).mean(visual) = [0.4414, 0.0893, 0.4414, 0.0280],
    # mean 0.25, so raters = where(m > mean) = [0, 2].
    visual = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    text = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 2.0], [-1.0, -1.0]])
    assert sparsevlm_raters(visual, text).tolist() == [0, 2]


ATTN_TEXT = torch.tensor(  # [H=2, T=4, N=6]
    [
        [[1, 5, 2, 0, 7, 3], [9, 9, 9, 9, 9, 9], [4, 1, 6, 2, 0, 5], [9, 0, 0, 0, 0, 9]],
        [[3, 1, 4, 1, 5, 9], [0, 0, 0, 0, 0, 0], [2, 6, 5, 3, 5, 8], [0, 9, 9, 9, 9, 0]],
    ],
    dtype=torch.float,
) / 10


def test_relation_and_kept_match_the_original():
    # Expected from score.py :: attn_postprocess_topk on a [1, 2, 11, 11] attention holding
    # ATTN_TEXT at text rows 7..10 / visual columns 1..6, raters [0, 2], budget 3:
    # relation = [0.250, 0.325, 0.425, 0.150, 0.425, 0.625], mask -> kept [2, 4, 5].
    relation = sparsevlm_relation(ATTN_TEXT, torch.tensor([0, 2]))
    torch.testing.assert_close(relation, torch.tensor([0.250, 0.325, 0.425, 0.150, 0.425, 0.625]))
    kept, added = sparsevlm_select(relation, torch.zeros(6, 2), 3, recycle=False)
    assert kept.tolist() == [2, 4, 5] and added is None


def test_cluster_and_merge_matches_the_original():
    # Expected from utils.py :: cluster_and_merge(X[None], 2) with torch.rand patched to zeros:
    # both DPC centres fall in the upper group; cluster 0 = rows {0, 1, 2, 3, 4}, cluster 1 = {5}.
    x = torch.tensor([[0, 0], [5, 5], [0.1, 0], [5.2, 5], [0, 0.2], [5, 5.1]])
    assert dpc_knn_assign(x, 2).tolist() == [0, 0, 0, 0, 0, 1]
    merged = cluster_and_merge(x, 2)
    torch.testing.assert_close(merged, torch.tensor([[2.06, 2.04], [5.0, 5.1]]), atol=1e-5, rtol=0)


def test_recycling_matches_the_original():
    # Expected from the original's recycling lines (l.280-301) on relation `rel`, budget 4:
    # kept [2, 6, 10, 11]; pruned [0, 1, 3, 4, 5, 7, 8, 9], int(8 * 0.3) + 1 = 3 candidates in
    # topk order: tokens 4, 8, 0; int(3 / 10) + 1 = 1 cluster = their mean / (1 + 1e-6 / 3).
    rel = torch.tensor([5, 1, 9, 3, 7, 2, 8, 0, 6, 4, 11, 10], dtype=torch.float)
    feats = torch.arange(24, dtype=torch.float).view(12, 2)
    kept, added = sparsevlm_select(rel, feats, 4)
    assert kept.tolist() == [2, 6, 10, 11]
    torch.testing.assert_close(added, torch.tensor([[8.0, 9.0]]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", range(5))
def test_properties_on_random_tensors(seed):
    g = torch.Generator().manual_seed(seed)
    n, keep = 40, 11
    rel, feats = torch.rand(n, generator=g), torch.randn(n, 8, generator=g)
    kept, added = sparsevlm_select(rel, feats, keep, noise=torch.rand(9, generator=g) * 1e-6)
    assert kept.numel() == keep and kept.tolist() == sorted(set(kept.tolist()))
    assert set(kept.tolist()) == set(rel.topk(keep).indices.tolist())  # the top relations
    m = int((n - keep) * 0.3) + 1  # 9 candidates -> int(9 / 10) + 1 = 1 cluster
    assert added.shape == (int(m / 10) + 1, 8)
    # Every merged token is the mean of its cluster (the sum over clusters is kept).
    x = torch.randn(25, 4, generator=g)
    assign = dpc_knn_assign(x, 3)
    merged = cluster_and_merge(x, 3)
    assert sorted(set(assign.tolist())) == [0, 1, 2]
    for c in range(3):
        torch.testing.assert_close(merged[c], x[assign == c].mean(0), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- KEEP_RATIO -> schedule
@pytest.mark.parametrize("retained", [192, 128, 64])
def test_published_budgets_at_the_published_ratios(retained):
    for ratio in (retained / 576, round(retained / 576, 3)):
        c = cfg(KEEP_RATIO=ratio, PRUNE_METHOD="sparsevlm")
        assert [s.layer for s in c.intra] == [3, 7, 16]  # outputs of the original's layers 2, 6, 15
        assert [methods.budget(576, s.ratio) for s in c.intra] == list(BUDGETS[retained])


def test_schedule_between_and_beyond_the_published_ratios():
    mid = sparsevlm_fractions(160 / 576)  # halfway between 128 and 192
    assert all(math.isclose(f * 576, (a + b) / 2) for f, a, b in zip(mid, BUDGETS[128], BUDGETS[192]))
    assert [round(f * 576) for f in sparsevlm_fractions(32 / 576)] == [33, 15, 8]  # half of the 64 list (rounded)
    c = cfg(KEEP_RATIO=0.75, PRUNE_METHOD="sparsevlm")  # 300/576 * 2.25 >= 1: the first stage is skipped
    assert [s.layer for s in c.intra] == [7, 16]
    c = cfg(KEEP_RATIO=0.5, PRUNE_METHOD="sparsevlm", PRUNE_ARGS="retained_tokens=128,layers=0/1/2")
    assert [(s.layer, methods.budget(576, s.ratio)) for s in c.intra] == [(1, 303), (2, 110), (3, 36)]
    c = cfg(KEEP_RATIO=0.5, PRUNE_METHOD="sparsevlm", PRUNE_ARGS="budgets=100/50/10")
    assert [methods.budget(576, s.ratio) for s in c.intra] == [100, 50, 10]
    with pytest.raises(ConfigError, match="retained_tokens=100"):
        cfg(KEEP_RATIO=0.5, PRUNE_METHOD="sparsevlm", PRUNE_ARGS="retained_tokens=100")
    with pytest.raises(ConfigError, match="needs a ratio"):
        cfg(PRUNE_METHOD="sparsevlm")


# ----------------------------------------------------------------------------- in the engine
def _record_selections(monkeypatch) -> list:
    """Replace the registered sparsevlm by a wrapper recording ``(layer, image, kept, added)``."""
    seen: list = []
    original = methods.get_method("sparsevlm")

    def spy(ctx, keep, **kw):
        out = original.fn(ctx, keep, **kw)
        seen.append((ctx.layer, ctx.image_index, sorted(out.indices.tolist()), out.added))
        return out

    monkeypatch.setitem(methods._REGISTRY, "sparsevlm", dataclasses.replace(original, fn=spy))
    return seen


@torch.no_grad()
def _reference(ref, model, inputs, ids, ops) -> torch.Tensor:
    """Logits ``[L', V]`` of the UNPATCHED model without cache on ``ids`` ``[1, L]``, applying at
    the input of each layer the recorded selections ``ops[layer][image] = (kept, added)``: the
    image's current visual tokens (sequence order) not in ``kept`` leave, ``added`` rows enter
    right after its last kept token with the position of the image's last original token."""
    text = model.model.language_model
    hidden = ref.embed(model, inputs, ids)
    pos = ref.positions(model, inputs, ids)
    visual = ref.visual_mask(model, ids, inputs).tolist()
    placeholder = (ids[0] == model.config.image_token_id).tolist()[: inputs["input_ids"].shape[1]]
    owner, image = [], -1
    for j, v in enumerate(visual):  # image index of every visual token (runs of image placeholders)
        p = j < len(placeholder) and placeholder[j]
        image += p and (j == 0 or not placeholder[j - 1])
        owner.append(image if v and p else -1)
    last = {img: max(j for j, o in enumerate(owner) if o == img) for img in set(owner) - {-1}}
    src = list(range(ids.shape[1]))  # the position each current token uses
    for i, layer in enumerate(text.layers):
        for img, (kept, added) in sorted(ops.get(i, {}).items()):
            cur = [j for j, o in enumerate(owner) if o == img]
            keep = {cur[k] for k in kept}
            rows, new_src, new_owner, parts = [], [], [], []
            for j in range(len(src)):
                if owner[j] == img and j not in keep:
                    continue
                rows.append(j)
                new_src.append(src[j]), new_owner.append(owner[j])
                if j == max(keep) and added is not None:
                    parts.append((len(rows), added))
                    new_src += [last[img]] * len(added)
                    new_owner += [img] * len(added)
            pieces, start = [], 0
            for at, feats in parts:
                pieces += [hidden[:, rows[start:at]], feats[None].to(hidden.dtype)]
                start = at
            pieces.append(hidden[:, rows[start:]])
            hidden, src, owner = torch.cat(pieces, dim=1), new_src, new_owner
        cos, sin = text.rotary_emb(hidden, pos[..., src])
        mask = None
        if text.config._attn_implementation == "eager":
            n = hidden.shape[1]
            mask = torch.full((n, n), torch.finfo(hidden.dtype).min).triu(1)[None, None]
        hidden = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=None)
    return model.lm_head(text.norm(hidden))[0]


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_engine_equals_the_reference_with_recycled_tokens(family, monkeypatch):
    """Three SparseVLM events (two images, recycled tokens re-ranked at later layers): prefill
    logits and every decode step equal the unpatched model without cache on the same sequence,
    cut and extended at the same layers; the trace and the record count the recycled tokens."""
    spec = FAMILIES[family]
    model = spec.build(seed=0)
    inputs = spec.inputs("2img", seed=1)
    seen = _record_selections(monkeypatch)
    spec.module.patch(model, cfg(KEEP_RATIO=0.333, PRUNE_METHOD="sparsevlm", PRUNE_ARGS="layers=0/1/2"))
    records: list = []
    model._prune_state.on_sample = records.append
    try:
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
        trace = model.prune_trace
    finally:
        spec.module.unpatch(model)
    seq, steps = out.sequences, torch.stack(out.logits, dim=1)[0]
    assert [(e.stage, e.layer, e.method) for e in trace] == [("intra_llm", layer, "sparsevlm") for layer in (1, 2, 3)]
    assert all(e.merged > 0 and e.n_keep == len(e.kept) + e.merged for e in trace)
    for e in trace:  # per image: min(budget, n - 1) kept + its recycled clusters
        assert e.n_keep == sum(k for _, k in e.images) and all(k < n for n, k in e.images)
    ops: dict = {}
    for layer, img, kept, added in seen:
        ops.setdefault(layer, {})[img] = (kept, added)
    assert sorted(ops) == [1, 2, 3] and all(len(v) == 2 for v in ops.values())
    (record,) = records
    per_layer = record["visual_per_layer"]
    assert per_layer[0] == trace[0].n_in and per_layer[1:] == [e.n_keep for e in trace]
    assert record["avg_visual"] == sum(per_layer) / 4 and record["n_visual_final"] == trace[-1].n_keep
    n_prompt = inputs["input_ids"].shape[1]
    for s in range(steps.shape[0]):
        logits = _reference(spec.ref, model, inputs, seq[:, : n_prompt + s], ops)
        torch.testing.assert_close(steps[s], logits[-1], atol=ATOL, rtol=0)


def test_default_layers_need_a_deep_enough_decoder():
    spec = FAMILIES["llava"]
    model = spec.build(seed=0)
    with pytest.raises(ConfigError, match="out of range"):
        spec.module.patch(model, cfg(KEEP_RATIO=0.333, PRUNE_METHOD="sparsevlm"))
