"""What the engine itself costs a pruned prefill in host syncs and dispatched operators.

On a GPU every host sync (``.item()``, ``int(t)``, ``.tolist()``, ``nonzero``, boolean-mask indexing)
drains the queue (docs/internals.md, "Host syncs"). For each family, a pre-LLM and an intra-LLM
pruned prefill on the tiny model, at two visual-token counts: the syncs the engine adds (the
pruned prefill's, less the unpatched prefill's on the same input, less those of the method call
itself, counted around it) are at most :data:`MAX_ENGINE_SYNCS` and the same at both sizes, and so
is the number of operators it adds: nothing in the engine runs once per token.
"""

from __future__ import annotations

import collections
import dataclasses

import pytest
import torch

import methods
from families import FAMILIES, cfg
from scripts.op_count import OpCounter
from synthetic import tiny_models as tm

MAX_ENGINE_SYNCS = 16

CONFIGS = {
    "pre_llm": dict(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="random_pre_llm"),
    "intra_llm": dict(KEEP_RATIO=0.5, PRUNE_METHOD_INTRA_LLM="fastv_intra_llm"),
}


def _llava_model(px: int):
    """The tiny LLaVA-1.5 with ``px``-pixel images (its token count is fixed by the vision config)."""
    from transformers import LlavaForConditionalGeneration

    config = tm.tiny_llava_config()
    config.vision_config.image_size = px
    config.image_seq_length = (px // tm.LLAVA_PATCH) ** 2
    return tm._build(LlavaForConditionalGeneration, config, seed=0)


def _llava_inputs(px: int) -> dict[str, torch.Tensor]:
    inputs = tm.llava_inputs(tokens=(px // tm.LLAVA_PATCH) ** 2, seed=1)
    inputs["pixel_values"] = torch.randn(1, 3, px, px, generator=torch.Generator().manual_seed(1))
    return inputs


# Per family, two (model builder or None for the family's tiny model, inputs) of one image each.
SIZES = {
    "qwen2_5_vl": [(None, lambda: tm.qwen_inputs(grids=((1, 8, 8),), seed=1)),  # 16 tokens
                   (None, lambda: tm.qwen_inputs(grids=((1, 8, 16),), seed=1))],  # 32
    "internvl": [(None, lambda: tm.internvl_inputs(tiles=(1,), seed=1)),  # 16
                 (None, lambda: tm.internvl_inputs(tiles=(3,), seed=1))],  # 48
    "llava": [(None, lambda: _llava_inputs(56)),  # 16
              (lambda: _llava_model(84), lambda: _llava_inputs(84))],  # 36
    "llava_next": [(None, lambda: tm.llava_next_inputs(sizes=((30, 100),), seed=1)),  # 32 (+ 2 newlines)
                   (None, lambda: tm.llava_next_inputs(sizes=((480, 640),), seed=1))],  # 64 (+ 6)
}


@pytest.fixture(scope="module", params=list(FAMILIES), ids=list(FAMILIES))
def runs(request):
    """Per size: ``(model, inputs, n_visual, vanilla OpCounter)`` of the family (unpatched)."""
    spec = FAMILIES[request.param]
    base = spec.build(seed=0)
    out = []
    for build, make in SIZES[spec.name]:
        model, inputs = build() if build else base, make()
        with torch.no_grad(), OpCounter() as vanilla:
            model(**inputs)
        out.append((model, inputs, int(spec.ref.visual_mask(model, inputs["input_ids"], inputs).sum()), vanilla))
    return spec, out


def engine_cost(monkeypatch, spec, model, inputs, vanilla: OpCounter, stage: str) -> tuple[int, int, list[str]]:
    """``(syncs, operators, {sync name: count})`` the engine adds to a pruned prefill of ``inputs``."""
    config = CONFIGS[stage]
    name = config["PRUNE_METHOD_PRE_LLM" if stage == "pre_llm" else "PRUNE_METHOD_INTRA_LLM"]
    original, calls = methods.get_method(name), []

    def counted(ctx, keep, **args):
        with OpCounter() as own:
            out = original.fn(ctx, keep, **args)
        calls.append(own)
        return out

    monkeypatch.setitem(methods._REGISTRY, name, dataclasses.replace(original, fn=counted))
    spec.module.patch(model, cfg(**config))
    try:
        with torch.no_grad(), OpCounter() as pruned:
            model(**inputs)
        trace = model.prune_trace
    finally:
        spec.module.unpatch(model)
    assert [e.stage for e in trace] == [stage] and trace[0].n_keep < trace[0].n_in and calls
    syncs = pruned.n_syncs - vanilla.n_syncs - sum(c.n_syncs for c in calls)
    ops = pruned.n_ops - vanilla.n_ops - sum(c.n_ops for c in calls)
    names = collections.Counter(pruned.syncs) - collections.Counter(vanilla.syncs)
    for c in calls:
        names -= collections.Counter(c.syncs)
    return syncs, ops, dict(names)


@pytest.mark.parametrize("stage", list(CONFIGS))
def test_engine_syncs_are_few_and_do_not_grow_with_the_tokens(runs, stage, monkeypatch):
    spec, sizes = runs
    (small, small_in, n_small, small_vanilla), (large, large_in, n_large, large_vanilla) = sizes
    assert n_small < n_large
    syncs_small, ops_small, names = engine_cost(monkeypatch, spec, small, small_in, small_vanilla, stage)
    syncs_large, ops_large, names_large = engine_cost(monkeypatch, spec, large, large_in, large_vanilla, stage)
    assert syncs_small <= MAX_ENGINE_SYNCS, f"{spec.name} {stage}: the engine adds {syncs_small} host syncs: {names}"
    assert syncs_large == syncs_small, (
        f"{spec.name} {stage}: the engine adds {syncs_small} host syncs at {n_small} visual tokens, {syncs_large} at "
        f"{n_large} (a sync per token?): {names} vs {names_large}"
    )
    assert ops_large == ops_small, (
        f"{spec.name} {stage}: the engine adds {ops_small} operators at {n_small} visual tokens, {ops_large} at {n_large}"
    )


def main() -> None:
    """Print the engine's added syncs and operators per family and stage at both sizes (the table in
    docs/internals.md): ``PYTHONPATH=. python tests/test_host_syncs.py``."""
    for family in FAMILIES:
        spec = FAMILIES[family]
        base = spec.build(seed=0)
        for stage in CONFIGS:
            cells = []
            for build, make in SIZES[family]:
                model, inputs = build() if build else base, make()
                with torch.no_grad(), OpCounter() as vanilla:
                    model(**inputs)
                with pytest.MonkeyPatch.context() as mp:
                    syncs, ops, _ = engine_cost(mp, spec, model, inputs, vanilla, stage)
                n = int(spec.ref.visual_mask(model, inputs["input_ids"], inputs).sum())
                cells.append(f"N={n}: {syncs} syncs, {ops} ops")
            print(f"{family:11s} {stage:9s} " + " | ".join(cells))


if __name__ == "__main__":
    main()
