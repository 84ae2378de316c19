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
    # The visual tokens, and the text after the image's last placeholder (LLaVA-NeXT: after its last
    # newline token, which is no visual token); the image's tokens are numbered from its first one.
    image = torch.nonzero(spec.ref.visual_mask(model, inputs["input_ids"], inputs)).flatten()
    start, end = int(image[0]), int(torch.nonzero(ids == model.config.image_token_id).flatten()[-1]) + 1
    # The library's own tensors: layer 1's KV cache (post-RoPE keys) and layer 2's input.
    out = model(**inputs, use_cache=True, output_hidden_states=True)
    keys = out.past_key_values.layers[1].keys[0].transpose(0, 1).flatten(1)  # [L, KV*hd]
    states = model.model.language_model.norm(out.hidden_states[2][0])  # [L, D]
    n = len(image)
    keep = 8
    expected = dart_select(
        keys[image], keys[end:], states[image], states[end:], per_pivot=keep // 8, image_start=start
    )
    spec.module.patch(model, cfg(INTRA_LLM_LAYER_SPECS=f"2:dart_intra_llm:{keep / n}"))
    try:
        model(**inputs)
        assert model.prune_trace[0].kept == image[expected].tolist()
        assert model.prune_trace[0].n_keep == 4 + 8 * (keep // 8)
    finally:
        spec.module.unpatch(model)


@torch.no_grad()
def test_vispruner_reads_the_vits_cls_attention_without_an_eager_pass():
    """Under sdpa, the engine's [CLS] row equals eager attention's ``attentions[-2][:, :, 0, 1:]``."""
    from methods.vispruner import vispruner_select

    spec = FAMILIES["llava"]
    eager = spec.build(seed=8, attn="eager")
    inputs = spec.make_inputs(seed=8, **spec.variants["2img"])
    vision = eager.model.vision_tower(inputs["pixel_values"], output_hidden_states=True, output_attentions=True)
    keep = 6
    expected = []
    image = torch.nonzero(inputs["input_ids"][0] == eager.config.image_token_id).flatten()
    for b in range(2):
        sel = vispruner_select(vision.hidden_states[-2][b, 1:], vision.attentions[-2][b, :, 0, 1:], keep)
        expected += image[16 * b + sel].tolist()
    model = spec.build(seed=8)  # same weights, sdpa
    spec.module.patch(model, cfg(KEEP_RATIO=keep / 16, PRUNE_METHOD_PRE_LLM="vispruner_pre_llm"))
    model(**inputs)
    assert model.prune_trace[0].kept == sorted(expected)
    # The capture hooks are gone after the prefill: the same hooks remain as on an unpatched model
    # (transformers keeps its own output-capturing hooks installed).
    def hooks(m):
        return [(len(l._forward_hooks), len(l.self_attn._forward_pre_hooks)) for l in m.model.vision_tower.encoder.layers]

    assert not model._prune_state.vision_hooks and hooks(model) == hooks(eager)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "internvl"])
def test_cls_methods_are_refused_where_the_vit_has_no_cls(family):
    spec = FAMILIES[family]
    with pytest.raises(ValueError, match="vispruner_pre_llm does not apply to .* supports llava"):
        spec.module.patch(spec.build(), cfg(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="vispruner_pre_llm"))


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_generate_gives_methods_the_grid_and_times_the_vision_pass(family, monkeypatch, tmp_path):
    """transformers 5.x ``generate`` encodes images BEFORE its first forward and drops their
    arguments from it: the engine must still see the image layout, and the prefill time must still
    include the vision encoder."""
    import time

    from families import spy_on
    from utils import TimingSink

    spec = FAMILIES[family]
    model = spec.build(seed=0)
    inputs = spec.make_inputs(seed=0, **spec.variants["trace"])
    seen = spy_on(monkeypatch, "random_pre_llm")
    sink = TimingSink(text_dir=None, jsonl=tmp_path / "r.jsonl", rank=0)
    spec.module.patch(model, cfg(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="random_pre_llm", PREFILL_TIME=1), sink)
    tower = model.model.visual if family == "qwen2_5_vl" else model.model.vision_tower
    tower.register_forward_hook(lambda *a: time.sleep(0.05))
    model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert [ctx.grid for ctx in seen] == list(spec.trace_grids)
    import json

    record = json.loads((tmp_path / "r.jsonl").read_text())
    assert record["prefill_ms"] >= 50, "the prefill time must include the vision encoder"


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_fitprune_reads_the_previous_layers_attention_like_eager(family):
    from methods.fitprune import fitprune_keep

    spec = FAMILIES[family]
    eager = spec.build(seed=9, attn="eager")
    inputs = spec.make_inputs(seed=9, **spec.variants["1img"])
    ids = inputs["input_ids"][0]
    image = torch.nonzero(ids == eager.config.image_token_id).flatten()
    start, end = int(image[0]), int(image[-1]) + 1
    attn = eager(**inputs, output_attentions=True).attentions[1][0]  # layer 1: [H, L, L]
    n = end - start
    keep = n // 4
    expected = fitprune_keep(attn[:, start:end, start:end], attn[:, end:, start:end], n - keep) + start
    model = spec.build(seed=9)  # sdpa
    spec.module.patch(model, cfg(INTRA_LLM_LAYER_SPECS=f"2:fitprune_intra_llm:{keep / n}"))
    model(**inputs)
    assert model.prune_trace[0].kept == expected.tolist()
