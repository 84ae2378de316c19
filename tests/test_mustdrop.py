"""MustDrop (``methods/mustdrop.py``): the rules on hand-made tensors, the KEEP_RATIO mapping, and
the engine running it (four filters, the key set, the KV-cache trim after the prefill, exactness)."""

from __future__ import annotations

import pytest
import torch

import methods
from families import ATOL, FAMILIES, cfg
from reference import reference_logits
from methods.mustdrop import (
    THRESHOLDS,
    mustdrop_filter,
    mustdrop_key_set,
    mustdrop_thresholds,
    mustdrop_vit_merge,
    mustdrop_window_merge,
)

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


def _reference(ref, model, inputs, ids, drops, final, trim_from, n_prompt) -> torch.Tensor:
    """Logits of the UNPATCHED model without cache on ``ids``: the prompt's visual tokens leave at
    the layers of ``drops``; from layer ``trim_from`` on, the tokens after the prompt (decoded ones)
    see only the ``final`` visual tokens (the trimmed cache)."""
    return reference_logits(ref, model, inputs, ids, drops, trim=(trim_from, final, n_prompt))[0]


# The tiny random models attend almost uniformly, so a global threshold of exactly 1/N (N tokens an
# image, the same for every image of the prompt) drops the below-average tokens: at least one, never all.
ENGINE_CASES = {"qwen2_5_vl": ("2img", 1 / 8), "internvl": ("1img", 1 / 48), "llava": ("2img", 1 / 16), "llava_next": ("2img", 1 / 32)}


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
    vision, *filters, trim = trace
    # No window merge: Qwen / InternVL / LLaVA-NeXT skip it; the tiny LLaVA's 4x4 grid is no grid of 3x3 windows.
    assert (vision.stage, vision.layer, vision.n_in, vision.n_keep) == ("vision", None, filters[0].n_in, filters[0].n_in)
    assert vision.note.startswith("ViT merge skipped")
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
    if family == "llava_next":  # the key set over each image's crops: ceil(0.08 * 32) = 3 tokens
        assert all(k >= 3 for _, k in filters[-1].images)
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
    _, *filters, trim = model.prune_trace  # the first: the (skipped) vision merge
    spec.module.unpatch(model)
    n_final = n_prompt - (filters[0].n_in - filters[-1].n_keep)
    assert trim.layer == 1 and n_final < n_prompt
    assert [out.past_key_values.get_seq_length(i) for i in range(4)] == [n_prompt] + [n_final] * 3


# ----------------------------------------------------------------------------- the ViT window merge (LLaVA)
def _hand_merge(x: torch.Tensor, threshold: float, window: int) -> tuple[torch.Tensor, list]:
    """MustDrop's merge written out with loops, for ``x`` ``[B, 1 + s*s, C]`` (conditional_pooling +
    merge_wavg): window similarity = mean off-diagonal cosine; r = the batch minimum of #windows at
    >= threshold; per image [CLS], the top-r windows' means (descending similarity), the rest ascending."""
    b_, n1, _ = x.shape
    side = int(round((n1 - 1) ** 0.5))
    wins = [[(wr * window + i) * side + wc * window + j for i in range(window) for j in range(window)]
            for wr in range(side // window) for wc in range(side // window)]
    sims = []
    for b in range(b_):
        u = torch.nn.functional.normalize(x[b, 1:], dim=-1)
        sims.append([float(sum(u[p] @ u[q] for p in w for q in w if p != q)) / (len(w) * (len(w) - 1)) for w in wins])
    r = min(sum(v >= threshold for v in row) for row in sims)
    outs, groups = [], []
    for b in range(b_):
        top = sorted(range(len(wins)), key=lambda j: -sims[b][j])[:r]
        merged = [wins[j] for j in top]
        rest = sorted(p for j, w in enumerate(wins) if j not in top for p in w)
        g = merged + [[p] for p in rest]
        outs.append(torch.stack([x[b, 0]] + [x[b, 1:][m].mean(0) for m in g]))
        groups.append(g)
    return torch.stack(outs), groups


@torch.no_grad()
def _hand_vit(eager, pixel_values, threshold, window):
    """The UNPATCHED eager CLIP with the merge applied to layer 0's output by a forward hook:
    (hidden_states[-2] [B, 1+N', C], last layer's [CLS] attention [B, H, N'], groups)."""
    layers = eager.model.vision_tower.encoder.layers
    got = {}

    def hook(module, args, output):
        got["merged"], got["groups"] = _hand_merge(output, threshold, window)
        return got["merged"]

    h = layers[0].register_forward_hook(hook, prepend=True)
    out = eager.model.vision_tower(pixel_values, output_hidden_states=True, output_attentions=True)
    h.remove()
    return out.hidden_states[-2], out.attentions[-1][:, :, 0, 1:], got["groups"]


# merge_threshold 0 on the tiny LLaVA at seed 0 (2 images, 2x2 windows of the 4x4 grid; windows
# 0 = patches 0,1,4,5, 1 = 2,3,6,7, 2 = 8,9,12,13, 3 = 10,11,14,15): window similarities image 0
# (0.160, 0.094, -0.013, 0.013) -> 3 windows >= 0, image 1 (0.042, -0.068, 0.034, -0.047) -> 2;
# r = min = 2. Image 0 merges windows 0, 1 (slots: their last patches 5, 7), image 1 windows 0, 2
# (slots 5, 13); N' = 16 - 2 * 3 = 10 tokens an image; the key set ceil(0.08 * 10) = 1 token.
MERGE_SLOTS = ([5, 7, 8, 9, 10, 11, 12, 13, 14, 15], [2, 3, 5, 6, 7, 10, 11, 13, 14, 15])


@torch.no_grad()
def test_vit_window_merge_on_llava_equals_the_unpatched_clip_and_the_reference(monkeypatch):
    from reference import LlavaRef

    import dataclasses

    spec = FAMILIES["llava"]
    eager = spec.build(seed=0, attn="eager")
    inputs = spec.inputs("2img", seed=0)
    hidden, cls_attn, groups = _hand_vit(eager, inputs["pixel_values"], 0.0, 2)
    assert [[max(g) for g in grp] for grp in groups] == [[5, 7] + list(range(8, 16)), [5, 13, 2, 3, 6, 7, 10, 11, 14, 15]]

    model = spec.build(seed=0)  # the same weights, sdpa
    real, seen = methods.get_method("mustdrop"), []

    def spy(ctx, keep, **args):  # the real method, its contexts recorded
        seen.append(ctx)
        return real.fn(ctx, keep, **args)

    monkeypatch.setitem(methods._REGISTRY, "mustdrop", dataclasses.replace(real, fn=spy))
    got = {}
    projector_hook = model.model.multi_modal_projector.register_forward_pre_hook(lambda m, a: got.__setitem__("clip", a[0]))
    text = model.model.language_model
    layer0_hook = text.layers[0].register_forward_pre_hook(lambda m, a: None if "llm_in" in got else got.__setitem__("llm_in", a[0]))
    spec.module.patch(model, cfg(KEEP_RATIO=0.333, PRUNE_METHOD="mustdrop",
                                 PRUNE_ARGS="layers=0/1/2,global_thr=0.1,individual_thr=1,merge_threshold=0,window=2"))
    n_prompt = inputs["input_ids"].shape[1]
    try:
        out = model(**inputs, use_cache=True)
        trace = model.prune_trace
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
        assert [(e.stage, e.kept) for e in model.prune_trace] == [(e.stage, e.kept) for e in trace]
    finally:
        spec.module.unpatch(model)
        projector_hook.remove()
        layer0_hook.remove()

    # The CLIP features the projector receives: the unpatched CLIP merged after layer 0 (layer 1,
    # the last, then ran on the merged sequence: its [CLS] attention is the key set's input).
    torch.testing.assert_close(got["clip"], hidden[:, 1:], atol=1e-5, rtol=0)
    image = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
    vision, *filters, trim = trace
    assert (vision.stage, vision.layer, vision.method) == ("vision", None, "mustdrop")
    assert vision.images == [(16, 10), (16, 10)] and vision.note == "merged at the output of ViT layer 0"
    slots = [image[16 * b + torch.tensor(s)].tolist() for b, s in enumerate(MERGE_SLOTS)]
    assert vision.kept == slots[0] + slots[1] and vision.n_keep == 20
    # The LLM's input: the projected merged tokens at their slots, in slot order.
    order = [sorted(range(10), key=lambda j: max(groups[b][j])) for b in range(2)]
    expected = torch.cat([eager.model.multi_modal_projector(hidden[b, 1:][order[b]]) for b in range(2)])
    llm_rows = torch.isin(torch.tensor([p for p in range(n_prompt) if p not in set(image.tolist()) or p in set(vision.kept)]),
                          torch.tensor(vision.kept))
    torch.testing.assert_close(got["llm_in"][0, llm_rows], expected, atol=1e-5, rtol=0)
    # The key set's input: the last CLIP layer's [CLS] attention over the merged tokens (slot order).
    assert [(e.stage, e.layer) for e in filters] == [("intra_llm", 1), ("intra_llm", 2), ("intra_llm", 3)]
    for b in range(2):
        torch.testing.assert_close(seen[b]["vit_last_cls_attention"], cls_attn[b][:, order[b]], atol=1e-5, rtol=0)
        assert seen[b]["n_vit_tokens"] == 10
        key = int(cls_attn[b].mean(0)[order[b]].argmax())  # ceil(0.08 * 10) = 1 key token
        assert slots[b][key] in filters[-1].kept
    assert filters[0].n_in == 20 and filters[-1].n_keep < 20 and trim.kept == filters[-1].kept

    # Prefill and decode: the unpatched model without cache on the merged sequence.
    class MergedRef(LlavaRef):
        @staticmethod
        def embed(model, inputs, ids):
            emb = LlavaRef.embed(model, inputs, ids).clone()
            emb[0, torch.tensor(vision.kept)] = expected
            return emb

    drops = {0: vision.kept, **{e.layer: e.kept for e in filters}}
    torch.testing.assert_close(out.logits[0], _reference(MergedRef, model, inputs, inputs["input_ids"], drops, set(trim.kept), trim.layer, n_prompt), atol=ATOL, rtol=0)
    seq, steps = gen.sequences, torch.stack(gen.logits, dim=1)[0]
    for s in range(steps.shape[0]):
        logits = _reference(MergedRef, model, inputs, seq[:, : n_prompt + s], drops, set(trim.kept), trim.layer, n_prompt)
        torch.testing.assert_close(steps[s], logits[-1], atol=ATOL, rtol=0)


def test_vit_merge_function_uses_the_batch_minimum():
    x = torch.stack([_window_features(), _window_features()])
    x[1, 19:] = torch.randn(18, 4, generator=torch.Generator().manual_seed(3))  # image 1: only window 1 merges
    out, groups = mustdrop_vit_merge(x, {"merge_threshold": 0.8, "window": 3})
    assert out.shape == (2, 1 + 36 - 8, 4) and [len(g) for g in groups] == [28, 28]
    assert groups[0][0] == groups[1][0] == [3, 4, 5, 9, 10, 11, 15, 16, 17] and len(groups[0][1]) == 1
    with pytest.raises(methods.ViTMergeSkipped, match="4x4 windows"):
        mustdrop_vit_merge(x, {"merge_threshold": 0.8, "window": 4})
