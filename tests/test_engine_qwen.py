"""Exactness of the patch engine on a tiny random Qwen2.5-VL (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

import custom_qwenvl
import prune_engine
import tiny_models as tm
from reference import QwenRef, drops_from_trace, reference_logits
from utils import ConfigError, PruneConfig

ATOL = 1e-4
NEW_TOKENS = 4


@pytest.fixture(scope="module")
def model():
    return tm.tiny_qwen(seed=0)


@pytest.fixture()
def patched(model):
    custom_qwenvl.patch(model)
    yield model
    custom_qwenvl.unpatch(model)


def cfg(**env) -> PruneConfig:
    return PruneConfig.from_env({k: str(v) for k, v in env.items()})


@torch.no_grad()
def greedy(model, inputs, n=NEW_TOKENS):
    out = model.generate(
        **inputs, max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    return out.sequences, torch.stack(out.logits, dim=1)[0]  # [1, L+n], [n, V]


@torch.no_grad()
def test_patch_without_config_is_the_library(model):
    inputs = tm.qwen_inputs()
    ref_logits = model(**inputs).logits
    ref_seq, ref_steps = greedy(model, inputs)
    text = model.model.language_model
    custom_qwenvl.patch(model)
    custom_qwenvl.patch(model)  # idempotent
    assert len(model._forward_pre_hooks) == 1 and len(model._forward_hooks) == 1
    try:
        assert torch.equal(model(**inputs).logits, ref_logits)
        seq, steps = greedy(model, inputs)
        assert torch.equal(seq, ref_seq) and torch.equal(steps, ref_steps)
    finally:
        custom_qwenvl.unpatch(model)
    assert "forward" not in text.__dict__ and not hasattr(model, "_prune_state")
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert torch.equal(model(**inputs).logits, ref_logits)


@torch.no_grad()
def test_engine_loop_without_cuts_matches_library(model, patched):
    """KEEP_RATIO=1 runs the engine's own decoder loop (masks, positions, cache) but cuts nothing."""
    inputs = tm.qwen_inputs()
    custom_qwenvl.unpatch(model)
    ref_logits = model(**inputs).logits
    ref_seq, ref_steps = greedy(model, inputs)
    custom_qwenvl.patch(model, cfg(KEEP_RATIO=1, PRUNE_METHOD_PRE_LLM="random_pre_llm"))
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
@pytest.mark.parametrize("grids", [((1, 8, 8),), ((1, 8, 4), (1, 4, 8))], ids=["1img", "2img"])
@torch.no_grad()
def test_pruned_prefill_and_decode_equal_reference(model, patched, name, grids):
    inputs = tm.qwen_inputs(grids=grids, seed=1)
    custom_qwenvl.patch(model, cfg(**CONFIGS[name]))
    prefill_logits = model(**inputs).logits[0]
    drops = drops_from_trace(model.prune_trace)
    seq, steps = greedy(model, inputs)
    randomized = "random" in str(CONFIGS[name])
    if not randomized:  # a random method draws anew for every prompt
        assert drops_from_trace(model.prune_trace) == drops
    drops = drops_from_trace(model.prune_trace)
    assert drops, "the configuration pruned nothing"

    # Prefill: every surviving position's logits.
    custom_qwenvl.unpatch(model)
    try:
        n_prompt = inputs["input_ids"].shape[1]
        ref, alive = reference_logits(QwenRef, model, inputs, seq[:, :n_prompt], drops)
        if randomized:  # the greedy run's selection: compare its first step instead
            torch.testing.assert_close(steps[0], ref[-1], atol=ATOL, rtol=0)
        else:
            torch.testing.assert_close(prefill_logits, ref, atol=ATOL, rtol=0)
        # Every decode step: the unpatched model without cache on the whole sequence so far.
        for s in range(1, NEW_TOKENS):
            ref, _ = reference_logits(QwenRef, model, inputs, seq[:, : n_prompt + s], drops)
            torch.testing.assert_close(steps[s], ref[-1], atol=ATOL, rtol=0)
    finally:
        custom_qwenvl.patch(model)


@torch.no_grad()
def test_pre_llm_equals_library_forward_on_the_pruned_sequence(model, patched):
    """The plainest reference: transformers' own forward on the pruned embeddings and positions."""
    inputs = tm.qwen_inputs(seed=2)
    custom_qwenvl.patch(model, cfg(KEEP_RATIO=0.25, PRUNE_METHOD_PRE_LLM="divprune_pre_llm"))
    logits = model(**inputs).logits
    kept = set(model.prune_trace[0].kept)
    custom_qwenvl.unpatch(model)
    try:
        ids = inputs["input_ids"]
        visual = QwenRef.visual_mask(model, ids)
        sel = torch.tensor([i for i in range(ids.shape[1]) if not visual[i] or i in kept])
        embeds = QwenRef.embed(model, inputs, ids)[:, sel]
        pos3 = QwenRef.positions(model, inputs, ids)[..., sel]
        text_row = sel.view(1, 1, -1)  # any increasing text row; an explicit mask avoids "packed" detection
        out = model(inputs_embeds=embeds, position_ids=torch.cat([text_row, pos3]), attention_mask=torch.ones(1, len(sel)))
        torch.testing.assert_close(logits, out.logits, atol=ATOL, rtol=0)
    finally:
        custom_qwenvl.patch(model)


@torch.no_grad()
def test_eager_attention_is_exact_too():
    model = tm.tiny_qwen(seed=3, attn="eager")
    inputs = tm.qwen_inputs(seed=3)
    custom_qwenvl.patch(model, cfg(INTRA_LLM_LAYER_SPECS="2:fastv_intra_llm:0.4"))
    seq, steps = greedy(model, inputs)
    drops = drops_from_trace(model.prune_trace)
    custom_qwenvl.unpatch(model)
    n_prompt = inputs["input_ids"].shape[1]
    for s in range(NEW_TOKENS):
        ref, _ = reference_logits(QwenRef, model, inputs, seq[:, : n_prompt + s], drops)
        torch.testing.assert_close(steps[s], ref[-1], atol=ATOL, rtol=0)


@torch.no_grad()
def test_fastv_keeps_the_top_tokens_of_eager_attention():
    """The sdpa-side score (layer K-1's q/k) selects what eager attention probabilities would."""
    model = tm.tiny_qwen(seed=4, attn="eager")
    inputs = tm.qwen_inputs(seed=4)
    out = model(**inputs, output_attentions=True)
    attn = out.attentions[1][0]  # layer K-1 = 1: [H, L, L]
    image = torch.nonzero(inputs["input_ids"][0] == tm.IMAGE_ID).flatten()
    scores = attn[:, -1, image].mean(0)
    keep = 6
    expected = sorted(image[scores.topk(keep).indices].tolist())
    custom_qwenvl.patch(model, cfg(INTRA_LLM_LAYER_SPECS=f"2:fastv_intra_llm:{keep / 16}"))
    model(**inputs)
    assert model.prune_trace[0].kept == expected
    assert model.prune_trace[0].n_keep == keep


@torch.no_grad()
def test_trace_and_cache_lengths(model, patched):
    inputs = tm.qwen_inputs(grids=((1, 8, 8), (1, 4, 4)), seed=5)
    n_prompt = inputs["input_ids"].shape[1]
    image = torch.nonzero(inputs["input_ids"][0] == tm.IMAGE_ID).flatten().tolist()
    custom_qwenvl.patch(
        model,
        cfg(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="random_pre_llm", INTRA_LLM_LAYER_SPECS="2:fastv_intra_llm:0.25"),
    )
    out = model(**inputs, use_cache=True)
    pre, intra = model.prune_trace
    assert (pre.stage, pre.layer, pre.method) == ("pre_llm", None, "random_pre_llm")
    assert (intra.stage, intra.layer, intra.method) == ("intra_llm", 2, "fastv_intra_llm")
    # Per image: 16 -> 8 -> 4 and 4 -> 2 -> 1 (budget max(1, round(N * r)) of the ORIGINAL count).
    assert pre.images == [(16, 8), (4, 2)] and intra.images == [(8, 4), (2, 1)]
    assert (pre.n_in, pre.n_keep, intra.n_in, intra.n_keep) == (20, 10, 10, 5)
    assert set(intra.kept) <= set(pre.kept) <= set(image)
    assert pre.kept == sorted(pre.kept) and len(pre.kept) == 10
    # The cache: layers 0-1 hold the prompt less the pre-LLM cut, layers 2-3 less both cuts.
    cache = out.past_key_values
    assert [cache.get_seq_length(i) for i in range(4)] == [n_prompt - 10] * 2 + [n_prompt - 15] * 2


def test_batch_larger_than_one_is_refused(model, patched):
    inputs = tm.qwen_inputs()
    batch = {k: torch.cat([v, v]) if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v for k, v in inputs.items()}
    batch["pixel_values"] = torch.cat([inputs["pixel_values"]] * 2)
    batch["image_grid_thw"] = torch.cat([inputs["image_grid_thw"]] * 2)
    custom_qwenvl.patch(model, cfg(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="random_pre_llm"))
    with pytest.raises(ValueError, match="batch size 1"):
        model(**batch)


def test_layer_out_of_range_is_refused(model, patched):
    with pytest.raises(ConfigError, match="out of range .* 4-layer"):
        custom_qwenvl.patch(model, cfg(INTRA_LLM_LAYER_SPECS="7:fastv_intra_llm:0.5"))
    with pytest.raises(ConfigError, match="layer >= 1"):
        custom_qwenvl.patch(model, cfg(INTRA_LLM_LAYER_SPECS="0:fastv_intra_llm:0.5"))


@torch.no_grad()
def test_pruning_context_restores_previous_config(model, patched):
    inputs = tm.qwen_inputs()
    base = model(**inputs).logits
    with prune_engine.pruning(model, cfg(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="divprune_pre_llm")):
        assert model(**inputs).logits.shape[1] == base.shape[1] - 8
    assert torch.equal(model(**inputs).logits, base)


@torch.no_grad()
def test_random_is_seeded(model, patched):
    inputs = tm.qwen_inputs()
    kept = []
    for seed in (0, 0, 1):
        custom_qwenvl.patch(model, cfg(KEEP_RATIO=0.25, PRUNE_METHOD_PRE_LLM="random_pre_llm", PRUNE_SEED=seed))
        model(**inputs)
        kept.append(model.prune_trace[0].kept)
    assert kept[0] == kept[1] != kept[2]
