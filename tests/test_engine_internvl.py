"""InternVL3 specifics: tiles, one budget per image over all its tiles, and the layout fallbacks.

The engine's exactness tests for InternVL (and the other families) run in
``tests/test_engine.py``, parametrised over ``tests/families.py``.
"""

from __future__ import annotations

import types

import pytest
import torch

import custom_internvl
import methods
from synthetic import tiny_models as tm
from families import cfg, check_pruned_decode, spy_on
from reference import InternVLRef

PER_TILE = tm.INTERNVL_TOKENS_PER_TILE  # 16
FAMILY = custom_internvl.FAMILY


@pytest.fixture(scope="module")
def model():
    return tm.tiny_internvl(seed=0)


@pytest.fixture()
def patched(model):
    custom_internvl.patch(model)
    yield model
    custom_internvl.unpatch(model)


def ids_with_runs(*runs: int) -> torch.Tensor:
    """``[1, L]``: text, then each run of context tokens wrapped in ``<img>``/``</img>`` and
    followed by a text token, as the processor writes images."""
    ids = [7, 8, 9]
    for n in runs:
        ids += [tm.VISION_START_ID] + [tm.IMAGE_ID] * n + [tm.VISION_END_ID, 11]
    return torch.tensor([ids])


def test_layout_one_entry_per_image_with_its_tiles(model):
    inputs = tm.internvl_inputs(tiles=(3, 1, 5))
    layout = FAMILY.image_layout(model, inputs)
    assert layout == [(48, (3, 4, 4)), (16, (1, 4, 4)), (80, (5, 4, 4))]
    assert sum(g[0] for _, g in layout) == inputs["pixel_values"].shape[0]  # every tile accounted for


def test_layout_at_the_real_model_sizes():
    """448-px tiles, patch 14, downsample 0.5: 16 x 16 = 256 tokens a tile (``image_seq_length``)."""
    from transformers import InternVLConfig

    real = types.SimpleNamespace(config=InternVLConfig())  # the InternVL3 defaults, no weights
    assert FAMILY.tile_grid(real, None) == (16, 16) and real.config.image_seq_length == 256
    pixels = torch.empty(7, 3, 448, 448, device="meta")  # 2 crops + thumbnail, 3 crops + thumbnail
    ids = ids_with_runs(3 * 256, 4 * 256)
    ids[ids == tm.IMAGE_ID] = real.config.image_token_id
    layout = FAMILY.image_layout(real, {"input_ids": ids, "pixel_values": pixels})
    assert layout == [(768, (3, 16, 16)), (1024, (4, 16, 16))]


def test_layout_fallbacks(model):
    # A run that is not a whole number of tiles: its grid is unknown.
    assert FAMILY.image_layout(model, {"input_ids": ids_with_runs(20, 32)}) == [(20, None), (32, (2, 4, 4))]
    # No keyword input_ids: unknown (the engine splits runs itself).
    assert FAMILY.image_layout(model, {}) == []


@torch.no_grad()
def test_tiles_of_one_image_share_one_budget(model, patched, monkeypatch):
    """An image keeps ``budget(n_tiles * 16, r)`` over ALL its tiles: a method may take whole
    tiles and leave others (here: the first tokens, so crop 0 whole, half of crop 1, none of the
    thumbnail); per-tile budgets would keep 8 of every tile. The result stays exact."""
    seen = spy_on(monkeypatch, "random_pre_llm")  # keeps each image's first tokens
    inputs = tm.internvl_inputs(tiles=(3, 1), seed=8)
    image = torch.nonzero(inputs["input_ids"][0] == tm.IMAGE_ID).flatten().tolist()
    custom_internvl.patch(model, cfg(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="random_pre_llm"))
    prefill = model(**inputs).logits[0]
    (event,) = model.prune_trace
    assert [(c.n_orig, c.grid, c.n) for c in seen] == [(48, (3, 4, 4), 48), (16, (1, 4, 4), 16)]
    assert event.images == [(48, methods.budget(48, 0.5)), (16, methods.budget(16, 0.5))] == [(48, 24), (16, 8)]
    kept = set(event.kept)
    per_tile = [sum(p in kept for p in image[t * PER_TILE : (t + 1) * PER_TILE]) for t in range(4)]
    assert per_tile == [16, 8, 0, 8]  # image 0: crop, crop, thumbnail (last); image 1: its only tile
    check_pruned_decode(custom_internvl, InternVLRef, model, inputs, prefill)


@torch.no_grad()
def test_thumbnail_only_selection_is_exact(model, patched, monkeypatch):
    """The opposite allocation (the last tokens: the whole thumbnail first) through both stages."""
    last = lambda ctx, keep: torch.arange(ctx.n - keep, ctx.n)  # noqa: E731
    spy_on(monkeypatch, "random_pre_llm", last)
    spy_on(monkeypatch, "random_intra_llm", last)
    inputs = tm.internvl_inputs(tiles=(3,), seed=9)
    image = torch.nonzero(inputs["input_ids"][0] == tm.IMAGE_ID).flatten().tolist()
    custom_internvl.patch(
        model, cfg(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="random_pre_llm", INTRA_LLM_LAYER_SPECS="2:random_intra_llm:0.25")
    )
    prefill = model(**inputs).logits[0]
    pre, intra = model.prune_trace
    assert pre.kept == image[24:] and intra.kept == image[36:]  # crop 1's second half + thumbnail; thumbnail only
    check_pruned_decode(custom_internvl, InternVLRef, model, inputs, prefill)


@torch.no_grad()
def test_positional_input_ids_fall_back_to_runs(model, patched, monkeypatch):
    """``model(input_ids, ...)`` hides ``input_ids`` from the layout: the engine's own run split
    gives the same images and budgets (grid unknown) and the same pruned result."""
    inputs = tm.internvl_inputs(tiles=(3, 1), seed=10)
    custom_internvl.patch(model, cfg(KEEP_RATIO=0.25, PRUNE_METHOD_PRE_LLM="divprune_pre_llm"))
    by_keyword = model(**inputs).logits
    kept = model.prune_trace[0].kept
    seen = spy_on(monkeypatch, "divprune_pre_llm", methods.get_method("divprune_pre_llm").fn)
    rest = {k: v for k, v in inputs.items() if k != "input_ids"}
    positional = model(inputs["input_ids"], **rest).logits
    assert [(c.n_orig, c.grid) for c in seen] == [(48, None), (16, None)]
    assert model.prune_trace[0].kept == kept and model.prune_trace[0].images == [(48, 12), (16, 4)]
    assert torch.equal(positional, by_keyword)
