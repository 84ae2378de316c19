"""Exactness of the shared pruning engine, on a tiny random model of every family (fp32, CPU).

Every test runs once per entry of ``tests/families.py`` (Qwen2.5-VL, InternVL3, LLaVA-1.5); the
family-specific tests (layouts, grids, tiles) are in ``tests/test_engine_<family>.py``.
"""

from __future__ import annotations

import pytest
import torch

import methods
import prune_engine
from families import ATOL, FAMILIES, FamilySpec, cfg, check_against_reference, greedy, spy_on
from reference import drops_from_trace, reference_logits
from utils import ConfigError


@pytest.fixture(scope="module", params=list(FAMILIES), ids=list(FAMILIES))
def fam(request) -> FamilySpec:
    spec = FAMILIES[request.param]
    assert spec.module.FAMILY.name == spec.name
    return spec


@pytest.fixture(scope="module")
def model(fam):
    return fam.build(seed=0)


@pytest.fixture()
def patched(fam, model):
    fam.module.patch(model)
    yield model
    fam.module.unpatch(model)


def image_positions(fam: FamilySpec, model, inputs) -> list[int]:
    return torch.nonzero(fam.ref.visual_mask(model, inputs["input_ids"], inputs)).flatten().tolist()


@torch.no_grad()
def test_patch_without_config_is_the_library(fam, model):
    inputs = fam.inputs()
    ref_logits = model(**inputs).logits
    ref_seq, ref_steps = greedy(model, inputs)
    text = model.model.language_model
    fam.module.patch(model)
    fam.module.patch(model)  # idempotent
    assert len(model._forward_pre_hooks) == 1 and len(model._forward_hooks) == 1
    try:
        assert torch.equal(model(**inputs).logits, ref_logits)
        seq, steps = greedy(model, inputs)
        assert torch.equal(seq, ref_seq) and torch.equal(steps, ref_steps)
    finally:
        fam.module.unpatch(model)
    assert "forward" not in text.__dict__ and not hasattr(model, "_prune_state")
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert torch.equal(model(**inputs).logits, ref_logits)


@torch.no_grad()
def test_engine_loop_without_cuts_matches_library(fam, model, patched):
    """KEEP_RATIO=1 runs the engine's own decoder loop (masks, positions, cache) but cuts nothing."""
    inputs = fam.inputs()
    fam.module.unpatch(model)
    ref_logits = model(**inputs).logits
    ref_seq, ref_steps = greedy(model, inputs)
    fam.module.patch(model, cfg(KEEP_RATIO=1, PRUNE_METHOD_PRE_LLM="random_pre_llm"))
    assert model._prune_state.config.active
    torch.testing.assert_close(model(**inputs).logits, ref_logits, atol=1e-5, rtol=0)
    seq, steps = greedy(model, inputs)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(steps, ref_steps, atol=1e-5, rtol=0)
    assert model.prune_trace == []


CONFIGS = {
    "pre-random": dict(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="random_pre_llm"),
    "pre-divprune": dict(KEEP_RATIO=0.25, PRUNE_METHOD_PRE_LLM="divprune_pre_llm"),
    "intra-fastv-L2": dict(KEEP_RATIO=0.5, PRUNE_METHOD_INTRA_LLM="fastv_intra_llm"),
    "intra-random-L2": dict(KEEP_RATIO=0.333, PRUNE_METHOD="random_intra_llm"),
    "intra-multi": dict(INTRA_LLM_LAYER_SPECS="1:fastv_intra_llm:0.5;3:random_intra_llm:0.2"),
    "combined": dict(
        KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="divprune_pre_llm", INTRA_LLM_LAYER_SPECS="2:fastv_intra_llm:0.25"
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("variant", ["1img", "2img"])
@torch.no_grad()
def test_pruned_prefill_and_decode_equal_reference(fam, model, patched, name, variant):
    inputs = fam.inputs(variant, seed=1)
    fam.module.patch(model, cfg(**CONFIGS[name]))
    prefill_logits = model(**inputs).logits[0]
    drops = drops_from_trace(model.prune_trace)
    seq, steps = greedy(model, inputs)
    randomized = "random" in str(CONFIGS[name])
    if not randomized:  # a random method draws anew for every prompt
        assert drops_from_trace(model.prune_trace) == drops
    drops = drops_from_trace(model.prune_trace)
    assert drops, "the configuration pruned nothing"

    # Prefill: every surviving position's logits (a random method's greedy run drew its own
    # selection: its first step stands in); then every decode step.
    fam.module.unpatch(model)
    try:
        check_against_reference(fam.ref, model, inputs, seq, steps, drops, None if randomized else prefill_logits)
    finally:
        fam.module.patch(model)


@torch.no_grad()
def test_pre_llm_equals_library_forward_on_the_pruned_sequence(fam, model, patched):
    """The plainest reference: transformers' own forward on the pruned embeddings and positions."""
    inputs = fam.inputs(seed=2)
    fam.module.patch(model, cfg(KEEP_RATIO=0.25, PRUNE_METHOD_PRE_LLM="divprune_pre_llm"))
    logits = model(**inputs).logits
    kept = set(model.prune_trace[0].kept)
    fam.module.unpatch(model)
    try:
        ids = inputs["input_ids"]
        visual = fam.ref.visual_mask(model, ids, inputs)
        sel = torch.tensor([i for i in range(ids.shape[1]) if not visual[i] or i in kept])
        embeds = fam.ref.embed(model, inputs, ids)[:, sel]
        position_ids = fam.library_position_ids(fam.ref.positions(model, inputs, ids), sel)
        # An explicit mask: increasing but non-contiguous positions would otherwise read as packed sequences.
        out = model(inputs_embeds=embeds, position_ids=position_ids, attention_mask=torch.ones(1, len(sel)))
        torch.testing.assert_close(logits, out.logits, atol=ATOL, rtol=0)
    finally:
        fam.module.patch(model)


@torch.no_grad()
def test_eager_attention_is_exact_too(fam):
    model = fam.build(seed=3, attn="eager")
    inputs = fam.inputs(seed=3)
    fam.module.patch(model, cfg(INTRA_LLM_LAYER_SPECS="2:fastv_intra_llm:0.4"))
    seq, steps = greedy(model, inputs)
    drops = drops_from_trace(model.prune_trace)
    fam.module.unpatch(model)
    check_against_reference(fam.ref, model, inputs, seq, steps, drops)  # every step, the first included


@torch.no_grad()
def test_fastv_keeps_the_top_tokens_of_eager_attention(fam):
    """The sdpa-side score (layer K-1's q/k) selects what eager attention probabilities would."""
    model = fam.build(seed=4, attn="eager")
    inputs = fam.inputs(seed=4)
    out = model(**inputs, output_attentions=True)
    attn = out.attentions[1][0]  # layer K-1 = 1: [H, L, L]
    image = torch.tensor(image_positions(fam, model, inputs))
    scores = attn[:, -1, image].mean(0)
    keep = 6
    expected = sorted(image[scores.topk(keep).indices].tolist())
    fam.module.patch(model, cfg(INTRA_LLM_LAYER_SPECS=f"2:fastv_intra_llm:{keep / len(image)}"))
    model(**inputs)
    assert model.prune_trace[0].kept == expected
    assert model.prune_trace[0].n_keep == keep


@torch.no_grad()
def test_trace_and_cache_lengths(fam, model, patched):
    inputs = fam.inputs("trace", seed=5)
    n_prompt = inputs["input_ids"].shape[1]
    image = image_positions(fam, model, inputs)
    fam.module.patch(
        model,
        cfg(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="random_pre_llm", INTRA_LLM_LAYER_SPECS="2:fastv_intra_llm:0.25"),
    )
    records = []
    model._prune_state.on_sample = records.append
    try:
        out = model(**inputs, use_cache=True)
    finally:
        model._prune_state.on_sample = None
    pre, intra = model.prune_trace
    assert (pre.stage, pre.layer, pre.method) == ("pre_llm", None, "random_pre_llm")
    assert (intra.stage, intra.layer, intra.method) == ("intra_llm", 2, "fastv_intra_llm")
    assert pre.ms is None and intra.ms is None  # METHOD_TIME not set
    # Per image: N -> budget(N, 0.5) -> budget(N, 0.25), the budgets of the ORIGINAL count.
    expect = fam.trace_images
    assert all(methods.budget(n, 0.5) == a and methods.budget(n, 0.25) == b for n, a, b in expect)
    assert pre.images == [(n, a) for n, a, _ in expect] and intra.images == [(a, b) for _, a, b in expect]
    n_vis, n_pre, n_intra = (sum(e[i] for e in expect) for i in range(3))
    assert (pre.n_in, pre.n_keep, intra.n_in, intra.n_keep) == (n_vis, n_pre, n_pre, n_intra)
    assert len(image) == n_vis
    assert set(intra.kept) <= set(pre.kept) <= set(image)
    assert pre.kept == sorted(pre.kept) and len(pre.kept) == n_pre and len(intra.kept) == n_intra
    # The cache: layers 0-1 hold the prompt less the pre-LLM cut, layers 2-3 less both cuts.
    cache = out.past_key_values
    assert [cache.get_seq_length(i) for i in range(4)] == [n_prompt - (n_vis - n_pre)] * 2 + [
        n_prompt - (n_vis - n_intra)
    ] * 2
    # The sample's record (what a TimingSink receives).
    (record,) = records
    assert (record["n_prompt"], record["n_visual"], record["n_visual_final"]) == (n_prompt, n_vis, n_intra)
    assert record["prefill_ms"] is None and [e["kept"] for e in record["events"]] == [pre.kept, intra.kept]


@torch.no_grad()
def test_methods_see_each_image_alone_on_its_grid(fam, model, patched, monkeypatch):
    """A method gets one image at a time: its ``N_i`` tokens (pre-LLM: the projector's output
    rows), its grid and original token order, and keeps ``budget(N_i, r)`` of THAT image's
    original count; intra-LLM it sees the survivors with their original token indices."""
    pre_seen = spy_on(monkeypatch, "random_pre_llm")  # keeps each image's first tokens
    intra_seen = spy_on(monkeypatch, "random_intra_llm", lambda ctx, keep: torch.arange(ctx.n - keep, ctx.n))
    inputs = fam.inputs("trace", seed=7)
    fam.module.patch(
        model,
        cfg(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="random_pre_llm", INTRA_LLM_LAYER_SPECS="2:random_intra_llm:0.25"),
    )
    model(**inputs)
    embeds = fam.ref.embed(model, inputs, inputs["input_ids"])[0]  # [L, D]
    image = image_positions(fam, model, inputs)
    n_images = len(fam.trace_images)
    assert len(pre_seen) == len(intra_seen) == n_images
    start, pre_kept, intra_kept = 0, [], []
    for i, (pre, intra, (n, k_pre, k_intra), grid) in enumerate(
        zip(pre_seen, intra_seen, fam.trace_images, fam.trace_grids)
    ):
        own = image[start : start + n]
        start += n
        assert (pre.stage, pre.layer, pre.image_index, pre.n_orig, pre.grid) == ("pre_llm", None, i, n, grid)
        assert grid is None or grid[0] * grid[1] * grid[2] == n
        assert pre.positions.tolist() == own and torch.equal(pre.token_index, torch.arange(n))
        torch.testing.assert_close(pre.features, embeds[own], atol=1e-6, rtol=0)
        assert (intra.stage, intra.layer, intra.image_index, intra.n_orig, intra.grid) == ("intra_llm", 2, i, n, grid)
        assert torch.equal(intra.token_index, torch.arange(k_pre)) and intra.positions.tolist() == own[:k_pre]
        pre_kept += own[:k_pre]
        intra_kept += own[k_pre - k_intra : k_pre]
    assert model.prune_trace[0].kept == pre_kept and model.prune_trace[1].kept == intra_kept


def test_batch_larger_than_one_is_refused(fam, model, patched):
    inputs = fam.inputs()
    batch = {k: torch.cat([v, v]) for k, v in inputs.items()}  # every tensor has the batch (or images) first
    fam.module.patch(model, cfg(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="random_pre_llm"))
    with pytest.raises(ValueError, match="batch size 1"):
        model(**batch)


def test_layer_out_of_range_is_refused(fam, model, patched):
    with pytest.raises(ConfigError, match="out of range .* 4-layer"):
        fam.module.patch(model, cfg(INTRA_LLM_LAYER_SPECS="7:fastv_intra_llm:0.5"))
    with pytest.raises(ConfigError, match="layer >= 1"):
        fam.module.patch(model, cfg(INTRA_LLM_LAYER_SPECS="0:fastv_intra_llm:0.5"))


@torch.no_grad()
def test_pruning_context_restores_previous_config(fam, model, patched):
    inputs = fam.inputs()
    n = len(image_positions(fam, model, inputs))
    base = model(**inputs).logits
    with prune_engine.pruning(model, cfg(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="divprune_pre_llm")):
        assert model(**inputs).logits.shape[1] == base.shape[1] - (n - methods.budget(n, 0.5))
    assert torch.equal(model(**inputs).logits, base)


@torch.no_grad()
def test_random_is_seeded(fam, model, patched):
    inputs = fam.inputs()
    kept = []
    for seed in (0, 0, 1):
        fam.module.patch(model, cfg(KEEP_RATIO=0.25, PRUNE_METHOD_PRE_LLM="random_pre_llm", PRUNE_SEED=seed))
        model(**inputs)
        kept.append(model.prune_trace[0].kept)
    assert kept[0] == kept[1] != kept[2]


@torch.no_grad()
def test_saved_and_reloaded_checkpoint_is_identical(fam, model, tmp_path):
    """``save_pretrained`` + ``from_pretrained`` (the path real checkpoints take) gives the same
    model: the same weights and config, the same logits unpatched and patched, the same
    selections and greedy tokens.

    Logits are compared at 1e-6, not bitwise: ``from_pretrained`` memory-maps the safetensors
    file, so a weight can start at an address that is not 64-byte aligned (LLaVA's do here), and
    the CPU BLAS then takes another kernel path for some matrix-vector products (ulp-level
    differences, e.g. 1e-7 in the lm_head of a decode step); a cloned (aligned) copy of the same
    weight gives bitwise-equal results.
    """
    inputs = fam.inputs("2img", seed=6)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert loaded.dtype == torch.float32
    assert loaded.config.text_config._attn_implementation == model.config.text_config._attn_implementation
    assert loaded.config.image_token_id == model.config.image_token_id
    reloaded = loaded.state_dict()
    assert all(torch.equal(v, reloaded[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=1e-6, rtol=0)
    config = cfg(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="divprune_pre_llm", INTRA_LLM_LAYER_SPECS="2:fastv_intra_llm:0.25")
    results = []
    for m in (model, loaded):
        fam.module.patch(m, config)
        try:
            logits = m(**inputs).logits
            kept = [e.kept for e in m.prune_trace]
            results.append((logits, kept, *greedy(m, inputs), [e.kept for e in m.prune_trace]))
        finally:
            fam.module.unpatch(m)
    (a_logits, a_kept, a_seq, a_steps, a_kept2), (b_logits, b_kept, b_seq, b_steps, b_kept2) = results
    assert len(a_kept) == 2 and a_kept == b_kept == a_kept2 == b_kept2
    assert torch.equal(a_seq, b_seq)
    torch.testing.assert_close(b_logits, a_logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(b_steps, a_steps, atol=1e-6, rtol=0)


@torch.no_grad()
def test_a_multi_token_forward_over_a_pruned_cache_equals_the_reference(fam, model, patched):
    """After a pruned prefill the caches differ per layer (layers 0-1 hold the pre-LLM survivors,
    layers 2-3 fewer): a 2-token continuation (a chat turn, speculative decoding) must mask each
    layer by its own cache length, every new token seeing the whole cache and the new tokens before
    it. Greedy decoding feeds one token at a time and never builds such a mask."""
    inputs = fam.inputs(seed=8)
    fam.module.patch(model, cfg(**CONFIGS["combined"]))
    out = model(**inputs, use_cache=True)
    cache = out.past_key_values
    assert len({cache.get_seq_length(i) for i in range(4)}) == 2  # two cache lengths
    drops = drops_from_trace(model.prune_trace)
    nxt = torch.tensor([[5, 9]])  # two ordinary text tokens
    logits = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits[0]  # [2, V]
    ids = torch.cat([inputs["input_ids"], nxt], dim=1)
    fam.module.unpatch(model)
    try:
        ref, _ = reference_logits(fam.ref, model, inputs, ids, drops)  # the unpatched model, no cache
        torch.testing.assert_close(logits, ref[-2:], atol=ATOL, rtol=0)
    finally:
        fam.module.patch(model)


@torch.no_grad()
def test_the_method_timer_includes_the_scores_computed_for_the_method(fam, model, patched, monkeypatch):
    """FastV's input (the previous layer's last-query attention) is computed by the engine for it
    alone: its cost is the method's, so the method's ms must contain it (here a 60 ms stand-in)."""
    import time

    original = prune_engine.last_query_attention

    def slow(*args, **kwargs):
        time.sleep(0.06)
        return original(*args, **kwargs)

    monkeypatch.setattr(prune_engine, "last_query_attention", slow)
    fam.module.patch(model, cfg(INTRA_LLM_LAYER_SPECS="2:fastv_intra_llm:0.5", METHOD_TIME=1))
    model(**fam.inputs())
    (event,) = model.prune_trace
    assert event.method == "fastv_intra_llm" and event.ms >= 60
