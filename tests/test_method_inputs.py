"""The inputs the engine computes for methods equal the library's own tensors."""

from __future__ import annotations

import pytest
import torch

from families import FAMILIES, cfg
from methods.dart import dart_select


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_dart_reads_the_previous_layers_cached_keys_and_final_normed_states(family):
    spec = FAMILIES[family]
    model = spec.build(seed=7)
    inputs = spec.make_inputs(seed=7, **spec.variants["1img"])
    ids = inputs["input_ids"][0]
    image = torch.nonzero(ids == model.config.image_token_id).flatten()
    start, end = int(image[0]), int(image[-1]) + 1
    # The library's own tensors: layer 1's KV cache (post-RoPE keys) and layer 2's input.
    out = model(**inputs, use_cache=True, output_hidden_states=True)
    keys = out.past_key_values.layers[1].keys[0].transpose(0, 1).flatten(1)  # [L, KV*hd]
    states = model.model.language_model.norm(out.hidden_states[2][0])  # [L, D]
    n = end - start
    keep = 8
    expected = dart_select(
        keys[start:end], keys[end:], states[start:end], states[end:], per_pivot=keep // 8, image_start=start
    )
    spec.module.patch(model, cfg(INTRA_LLM_LAYER_SPECS=f"2:dart_intra_llm:{keep / n}"))
    try:
        model(**inputs)
        assert model.prune_trace[0].kept == (expected + start).tolist()
        assert model.prune_trace[0].n_keep == 4 + 8 * (keep // 8)
    finally:
        spec.module.unpatch(model)
