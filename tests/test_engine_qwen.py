"""Qwen2.5-VL specifics. The engine's exactness tests for Qwen2.5-VL (and the other families)
run in ``tests/test_engine.py``, parametrised over ``tests/families.py``; this file keeps only
what is particular to Qwen2.5-VL: the per-image layout from ``image_grid_thw``."""

from __future__ import annotations

import pytest
import torch

import custom_qwenvl
from synthetic import tiny_models as tm


@pytest.fixture(scope="module")
def model():
    return tm.tiny_qwen(seed=0)


def test_layout_comes_from_image_grid_thw(model):
    """Image ``i`` has ``t*h*w/4`` tokens on a ``(t, h/2, w/2)`` grid (spatial merge 2)."""
    inputs = tm.qwen_inputs(grids=((1, 8, 8), (1, 4, 6), (2, 4, 4)))
    layout = custom_qwenvl.FAMILY.image_layout(model, inputs)
    assert layout == [(16, (1, 4, 4)), (6, (1, 2, 3)), (8, (2, 2, 2))]
    assert sum(n for n, _ in layout) == int((inputs["input_ids"] == tm.IMAGE_ID).sum())
    # Without image_grid_thw the layout is unknown: the engine splits the runs of image tokens.
    assert custom_qwenvl.FAMILY.image_layout(model, {"input_ids": inputs["input_ids"]}) == []


def test_positions_take_four_rows_as_generate_prepares_them(model):
    """``generate`` passes ``[4, B, L]`` (a text row, then t/h/w): the rotary embedding gets the
    last three rows, the layers the text row (as ``Qwen2_5_VLTextModel.forward``)."""
    text = model.model.language_model
    embeds = torch.zeros(1, 5, 64)
    four = torch.arange(20).view(4, 1, 5)
    rope, layer = custom_qwenvl.FAMILY.positions(text, four, embeds, past_len=0)
    assert torch.equal(rope, four[1:]) and torch.equal(layer, four[0])
    rope, layer = custom_qwenvl.FAMILY.positions(text, None, embeds, past_len=7)
    assert torch.equal(rope, (torch.arange(5) + 7).view(1, 1, 5).expand(3, 1, 5)) and layer is None
