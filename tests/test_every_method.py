"""Every registered method runs on every family (the registry x the four families): it either runs (the
trace holds a valid cut) or the configuration refuses it with the method's reason for that family."""

from __future__ import annotations

import pytest
import torch

import methods
from families import FAMILIES, cfg

PAIRS = [(m, f) for m in methods.names() for f in FAMILIES]
# Hybrid methods (one name, several events) run their schedule on the 4-layer tiny decoders.
HYBRID_ARGS = {
    "sparsevlm": "layers=0/1/2",
    "mustdrop": "layers=0/1/2,window=2",  # 2x2 windows: the tiny 4x4 CLIP grid
    "vscan": "local_layer=0",  # the tiny 2-layer ViTs have no layer 5 / 7
}
# Methods whose default ViT layers the tiny 2-layer vision towers do not have.
METHOD_ARGS = {"hiprune_pre_llm": "object_layer=1"}
# Methods that read more than the model: CDPruner's CLIP text tower (a tiny CLIP saved for the test).
EXTRA_ARGS = {"cdpruner_pre_llm": "clip_model={clip_dir}"}
QUESTION = "Is there a red cube?\nAnswer the question using a single word or phrase."  # instruction_text


@pytest.fixture(scope="module")
def models():
    return {name: spec.build(seed=0) for name, spec in FAMILIES.items()}


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory, models):
    """Per CLIP family, a tiny CLIP whose vision tower is that tiny model's (CDPruner checks that)."""
    from tiny_clip import save_tiny_clip

    return {f: save_tiny_clip(tmp_path_factory.mktemp(f"clip_{f}"), models[f]) for f in ("llava", "llava_next")}


@pytest.mark.parametrize("method, family", PAIRS, ids=[f"{m}-{f}" for m, f in PAIRS])
@torch.no_grad()
def test_method_runs_on_family(models, clip_dirs, method, family):
    spec, model = FAMILIES[family], models[family]
    m = methods.get_method(method)
    ratio = 0.5
    if m.schedule is not None:
        env = dict(KEEP_RATIO=ratio, PRUNE_METHOD=method, PRUNE_ARGS=HYBRID_ARGS[method])
    elif m.stage == "pre_llm":
        env = dict(KEEP_RATIO=ratio, PRUNE_METHOD_PRE_LLM=method)
        if method in METHOD_ARGS:
            env["PRUNE_ARGS"] = METHOD_ARGS[method]
    else:
        env = dict(INTRA_LLM_LAYER_SPECS=f"2:{method}" + (f":{ratio}" if m.uses_ratio else ""))
    if method in EXTRA_ARGS:
        env["PRUNE_ARGS"] = EXTRA_ARGS[method].format(clip_dir=clip_dirs.get(family, "none"))
    if m.families is not None and family not in m.families:
        reason = m.refusal_for(family)
        assert reason, f"{method} refuses {family} without a reason"
        with pytest.raises(ValueError, match="does not apply") as refused:
            spec.module.patch(model, cfg(**env))
        assert reason in str(refused.value)
        return
    spec.module.patch(model, cfg(**env))
    try:
        inputs = spec.make_inputs(seed=0, **spec.variants["2img"])
        model._prune_state.sample_info = {"text": QUESTION}  # as the VLMEvalKit adapter sets it
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 3
        if m.schedule is not None:  # every event of the schedule, each a valid cut
            config = model._prune_state.config
            events = [e for e in model.prune_trace if e.stage not in ("post_prefill", "vision")]
            if m.vit_merge is not None:  # first, the ViT merge (skipped where the family cannot run it)
                assert model.prune_trace[0].stage == "vision" and model.prune_trace[0].note
            expected = [("intra_llm", s.layer, method) for s in config.intra]
            if m.pre_stage:  # a hybrid with its own pre-LLM event (VScan's ViT stage) runs it first
                expected = [("pre_llm", None, method)] + expected
            assert [(e.stage, e.layer, e.method) for e in events] == expected
            image = set(torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten().tolist())
            for e in model.prune_trace:
                assert set(e.kept) <= image and e.kept == sorted(e.kept)
                assert e.n_keep == len(e.kept) + e.merged == sum(k for _, k in e.images)
                assert all(0 <= k <= n for n, k in e.images)
            return
        trace = model.prune_trace
        if m.vit_merge is not None:  # first the ViT merge (a note says where, or why it was skipped)
            vision, *trace = trace
            assert vision.stage == "vision" and vision.note
            image = set(torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten().tolist())
            assert set(vision.kept) <= image and vision.kept == sorted(vision.kept)
            if not trace:  # the ViT merge reached the budget by itself
                assert [k for _, k in vision.images] == [methods.budget(n, ratio) for n, _ in vision.images]
                return
        (event,) = trace
        assert (event.stage, event.method) == (m.stage, method)
        assert event.layer == (None if m.stage == "pre_llm" else 2)
        image = set(torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten().tolist())
        assert set(event.kept) <= image and event.kept == sorted(event.kept)
        for n_in, n_keep in event.images:  # per image: its own budget
            if not m.uses_ratio:  # decides its own count (VTW: none)
                assert 0 <= n_keep <= n_in
            elif m.exact_count:
                assert n_keep == methods.budget(n_in, ratio)
            else:
                assert 0 <= n_keep <= n_in
        assert event.n_keep == len(event.kept) == sum(k for _, k in event.images)
    finally:
        spec.module.unpatch(model)
