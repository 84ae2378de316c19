"""MustDrop (``methods/mustdrop.py``): the rules on hand-made tensors, the KEEP_RATIO mapping, and
the engine running it (four filters, the key set, the KV-cache trim after the prefill, exactness)."""

from __future__ import annotations

import pytest
import torch

import methods
from families import ATOL, FAMILIES, cfg
from methods.mustdrop import THRESHOLDS, mustdrop_filter, mustdrop_key_set, mustdrop_thresholds, mustdrop_window_merge

ATTN_TEXT = torch.tensor(  # [H=2, T=3, N=5]
    [
        [[0.50, 0.00, 0.10, 0.30, 0.001], [0.20, 0.00, 0.10, 0.30, 0.002], [0.30, 0.00, 0.20, 0.10, 0.001]],
        [[0.30, 0.00, 0.30, 0.10, 0.003], [0.40, 0.01, 0.10, 0.20, 0.002], [0.10, 0.00, 0.40, 0.20, 0.001]],
    ]
)


@pytest.mark.parametrize(
    "g, i, expected",
    # Expected from the original dual_attention_filter (modelling_sparse_llama.py l.336), run on a
    # [1, 2, 9, 9] attention holding ATTN_TEXT at rows 6..8 / columns 1..5 (sys 1, image 5).
    [(0.01, 0.005, [0, 1, 2, 3]), (0.2, 1.0, [0, 2, 3]), (0.001, 0.001, [0, 1, 2, 3, 4])],
)
def test_filter_matches_the_original(g, i, expected):
    assert mustdrop_filter(ATTN_TEXT, g, i).tolist() == expected


def test_key_set_and_union_match_the_original():
    # Original l.256-257 on the (0.01, 0.005) filter with key_set [4]: unique(cat) = [0, 1, 2, 3, 4].
    assert mustdrop_filter(ATTN_TEXT, 0.01, 0.005, torch.tensor([4])).tolist() == [0, 1, 2, 3, 4]
    # custom_forward (idx == 23) with keep_rate 0.3 on 6 patches: ceil(1.8) = 2 -> topk [3, 1].
    cls = torch.tensor([[0.1, 0.3, 0.05, 0.2, 0.15, 0.2], [0.2, 0.1, 0.05, 0.3, 0.25, 0.1]])
    assert mustdrop_key_set(cls, 0.3).tolist() == [3, 1]
    assert mustdrop_key_set(torch.rand(4, 576)).numel() == 47  # ceil(0.08 * 576)


def _window_features() -> torch.Tensor:
    """[37, 4]: CLS + a 6x6 grid; window 1 (top right) nearly constant, window 2 (bottom left) less so."""
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(1, 37, 4, generator=g)
    grid = torch.arange(36).view(2, 3, 2, 3).permute(0, 2, 1, 3).reshape(4, 9)
    feat[0, 1 + grid[1]] = torch.tensor([1.0, 2.0, 3.0, 4.0]) + 0.01 * torch.randn(9, 4, generator=g)
    feat[0, 1 + grid[2]] = torch.tensor([-1.0, 1.0, 0.0, 2.0]) + 0.2 * torch.randn(9, 4, generator=g)
    return feat[0]


def test_window_merge_matches_the_original():
    # Expected from local_merge.py :: conditional_pooling(feat[None], 0.8, (3, 3)) + merge_wavg
    # on these features: windows 1 and 2 reach 0.8 (window 1 more similar): output = CLS, the
    # window-1 mean, the window-2 mean, then the 18 other patches ascending; sizes 9, 9, 1, ...
    x = _window_features()
    out, groups = mustdrop_window_merge(x)
    assert groups[:2] == [[3, 4, 5, 9, 10, 11, 15, 16, 17], [18, 19, 20, 24, 25, 26, 30, 31, 32]]
    rest = [0, 1, 2, 6, 7, 8, 12, 13, 14, 21, 22, 23, 27, 28, 29, 33, 34, 35]
    assert groups[2:] == [[i] for i in rest] and out.shape == (21, 4)
    torch.testing.assert_close(out[0], x[0])
    expected = torch.tensor([[0.99896812, 1.99650002, 3.00193238, 3.99786043], [-0.93449187, 0.98745602, 0.00018808, 1.97885180]])
    torch.testing.assert_close(out[1:3], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[3:], x[1:][rest])
    # Properties: every patch in exactly one group; a merged token is its window's mean (sum kept).
    assert sorted(i for grp in groups for i in grp) == list(range(36))
    torch.testing.assert_close(sum(out[1 + j] * len(grp) for j, grp in enumerate(groups)), x[1:].sum(0), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="square grid"):
        mustdrop_window_merge(torch.randn(1 + 32, 4))


@pytest.mark.parametrize("seed", range(4))
def test_filter_properties(seed):
    g = torch.Generator().manual_seed(seed)
    attn = torch.rand(3, 7, 30, generator=g).softmax(-1)
    key = torch.randperm(30, generator=g)[:4]
    kept = mustdrop_filter(attn, 0.03, 0.05, key)
    assert kept.tolist() == sorted(set(kept.tolist())) and set(key.tolist()) <= set(kept.tolist())
    a = attn.mean(0)
    dropped = sorted(set(range(30)) - set(kept.tolist()))
    assert all(a[:, j].sum() < 0.03 * a.sum() and a[:, j].max() < 0.05 for j in dropped)
    assert mustdrop_filter(attn, 1.0, 0.0).numel() == 30  # the code defaults drop nothing


def test_keep_ratio_selects_the_published_thresholds():
    for retained, pair in THRESHOLDS.items():
        assert mustdrop_thresholds(retained / 576) == pair
        c = cfg(KEEP_RATIO=round(retained / 576, 3), PRUNE_METHOD="mustdrop")
        assert [(s.layer, s.ratio) for s in c.intra] == [(3, None), (7, None), (11, None), (15, None)]
        args = {"global_thr": pair[0], "individual_thr": pair[1]}
        assert {k: c.args_for("mustdrop").get(k, v) for k, v in args.items()} == args
    assert mustdrop_thresholds(0.5) == THRESHOLDS[192] and mustdrop_thresholds(0.05) == THRESHOLDS[64]
    c = cfg(KEEP_RATIO=0.111, PRUNE_METHOD="mustdrop", PRUNE_ARGS="global_thr=0.5")  # PRUNE_ARGS wins
    assert c.args_for("mustdrop") == {"global_thr": 0.5, "individual_thr": 0.01}


@torch.no_grad()
def _reference(ref, model, inputs, ids, drops, final, trim_from, n_prompt) -> torch.Tensor:
    """Logits of the UNPATCHED model without cache on ``ids``: the prompt's visual tokens leave at
    the layers of ``drops`` (as in ``tests/reference.py``); from layer ``trim_from`` on, the
    tokens after the prompt (decoded ones) see only the ``final`` visual tokens (the trimmed cache)."""
    text = model.model.language_model
    hidden = ref.embed(model, inputs, ids)
    pos = ref.positions(model, inputs, ids)
    visual = ref.visual_mask(model, ids)
    alive = torch.arange(ids.shape[1])
    for i, layer in enumerate(text.layers):
        if i in drops:
            keep = set(drops[i])
            sel = torch.tensor([j for j, p in enumerate(alive.tolist()) if not visual[p] or p in keep])
            hidden, alive = hidden[:, sel], alive[sel]
        cos, sin = text.rotary_emb(hidden, pos[..., alive])
        n = hidden.shape[1]
        blocked = torch.ones(n, n, dtype=torch.bool).triu(1)
        if i >= trim_from:
            gone = torch.tensor([bool(visual[p]) and p not in final for p in alive.tolist()])
            blocked |= (alive >= n_prompt)[:, None] & gone[None, :]
        mask = torch.zeros(n, n).masked_fill(blocked, torch.finfo(hidden.dtype).min)[None, None]
        hidden = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=None)
    return model.lm_head(text.norm(hidden))[0]


# The tiny random models attend almost uniformly, so a global threshold of exactly 1/N (N tokens an
# image, the same for every image of the prompt) drops the below-average tokens: at least one, never all.
ENGINE_CASES = {"qwen2_5_vl": ("2img", 1 / 8), "internvl": ("1img", 1 / 48), "llava": ("2img", 1 / 16)}


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_engine_filters_trims_the_cache_and_equals_the_reference(family):
    spec = FAMILIES[family]
    model = spec.build(seed=0)
    variant, g = ENGINE_CASES[family]
    inputs = spec.inputs(variant, seed=1)
    n_prompt = inputs["input_ids"].shape[1]
    spec.module.patch(
        model, cfg(KEEP_RATIO=0.333, PRUNE_METHOD="mustdrop", PRUNE_ARGS=f"layers=0/1/2,global_thr={g},individual_thr=1")
    )
    try:
        out = model(**inputs, use_cache=True)
        trace = model.prune_trace
        prefill = out.logits[0]
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
        assert [(e.stage, e.layer, e.kept) for e in model.prune_trace] == [(e.stage, e.layer, e.kept) for e in trace]
    finally:
        spec.module.unpatch(model)
    *filters, trim = trace
    assert [(e.stage, e.layer) for e in filters] == [("intra_llm", 1), ("intra_llm", 2), ("intra_llm", 3)]
    assert (trim.stage, trim.layer, trim.method) == ("post_prefill", 0, "mustdrop")
    assert filters[-1].n_keep < filters[0].n_in and trim.kept == filters[-1].kept
    for a, b in zip(filters, filters[1:]):
        assert set(b.kept) <= set(a.kept)
    # The cache: every layer from (first event - 1) = 0 on holds the prompt less all dropped tokens.
    n_final = n_prompt - (filters[0].n_in - filters[-1].n_keep)
    assert [out.past_key_values.get_seq_length(i) for i in range(4)] == [n_final] * 4
    if family == "llava":  # the [CLS] key set: ceil(0.08 * 16) = 2 tokens per image always stay
        assert all(k >= 2 for _, k in filters[-1].images)
    drops = {e.layer: e.kept for e in filters}
    ref_prefill = _reference(spec.ref, model, inputs, inputs["input_ids"], drops, set(trim.kept), 0, n_prompt)
    torch.testing.assert_close(prefill, ref_prefill, atol=ATOL, rtol=0)
    seq, steps = gen.sequences, torch.stack(gen.logits, dim=1)[0]
    for s in range(steps.shape[0]):
        logits = _reference(spec.ref, model, inputs, seq[:, : n_prompt + s], drops, set(trim.kept), 0, n_prompt)
        torch.testing.assert_close(steps[s], logits[-1], atol=ATOL, rtol=0)


@torch.no_grad()
def test_cache_trim_starts_below_the_first_filter():
    """Filters at the outputs of layers 1 and 2 (spec layers 2, 3): layer 0 keeps its whole cache,
    layers 1-3 only the final survivors (the original: layers before the first filter untouched)."""
    spec = FAMILIES["llava"]
    model = spec.build(seed=0)
    inputs = spec.inputs("1img", seed=2)
    n_prompt = inputs["input_ids"].shape[1]
    spec.module.patch(
        model, cfg(KEEP_RATIO=0.333, PRUNE_METHOD="mustdrop", PRUNE_ARGS="layers=1/2,global_thr=0.0625,individual_thr=1")
    )
    out = model(**inputs, use_cache=True)
    *filters, trim = model.prune_trace
    spec.module.unpatch(model)
    n_final = n_prompt - (filters[0].n_in - filters[-1].n_keep)
    assert trim.layer == 1 and n_final < n_prompt
    assert [out.past_key_values.get_seq_length(i) for i in range(4)] == [n_prompt] + [n_final] * 3
