"""LLaVA-NeXT specifics: the layout (base image, unpadded crops, newline tokens), the CLIP mapping,
the newline tokens' treatment, and the Mistral decoder.

The engine's exactness tests for LLaVA-NeXT (and the other families) run in ``tests/test_engine.py``,
parametrised over ``tests/families.py``; every expected value below is derived by hand (the comment
says how) or read from transformers' own processor and model.
"""

from __future__ import annotations

import types

import pytest
import torch

import custom_llava_next
import methods
from synthetic import tiny_models as tm
from families import cfg, check_pruned_decode, spy_on
from reference import LlavaNextRef, drops_from_trace

FAMILY = custom_llava_next.FAMILY
SIZES = ((30, 100), (100, 30), (60, 50), (100, 100), (480, 640), (112, 112), (56, 57))


@pytest.fixture(scope="module")
def model():
    return tm.tiny_llava_next(seed=0)


@pytest.fixture()
def patched(model):
    custom_llava_next.patch(model)
    yield model
    custom_llava_next.unpatch(model)


def test_layout_by_hand():
    """30 x 100 px on the tiny model (crops of 56 px, 4 x 4 tokens): the best pinpoint is 56 x 112,
    so 1 x 2 crops, stitched 4 x 8 tokens; the image is wider (100/30) than the grid (8/4): it keeps
    int(round(30 * 8 / 100)) = 2 rows, (4 - 2) // 2 = 1 row of padding cut at each end: rows 1-2.
    Tokens: the 16 base patches, then rows 1 and 2 of the stitched grid, 8 tokens and a newline each."""
    (entry,) = FAMILY.image_layout(types.SimpleNamespace(config=tm.tiny_llava_next_config()), tm.llava_next_inputs(sizes=((30, 100),)))
    assert (entry.n, entry.span, entry.grid) == (32, 34, None)
    assert entry.visual.tolist() == list(range(16)) + list(range(16, 24)) + list(range(25, 33))  # 24, 33: newlines
    crops = entry.crops
    assert (crops.side, crops.grid, crops.window, crops.sizes) == (4, (1, 2), (1, 3, 0, 8), (16, 8, 8))
    # Row 1 of the stitched grid is patch row 1 of crops 1 (columns 0-3) and 2 (columns 4-7); row 2 likewise.
    assert crops.crop.tolist() == [0] * 16 + [1] * 4 + [2] * 4 + [1] * 4 + [2] * 4
    assert crops.patch.tolist() == list(range(16)) + [4, 5, 6, 7] * 2 + [8, 9, 10, 11] * 2
    assert [m.tolist() for m in crops.members] == [list(range(16)), [16, 17, 18, 19, 24, 25, 26, 27], [20, 21, 22, 23, 28, 29, 30, 31]]
    # A taller image (100 x 30): 2 x 1 crops, columns 1-2 kept, each window row 2 tokens + a newline.
    (tall,) = FAMILY.image_layout(types.SimpleNamespace(config=tm.tiny_llava_next_config()), tm.llava_next_inputs(sizes=((100, 30),)))
    assert (tall.n, tall.span, tall.crops.grid, tall.crops.window) == (32, 40, (2, 1), (0, 8, 1, 3))


@pytest.mark.parametrize("size", SIZES)
@torch.no_grad()
def test_layout_equals_the_processor_and_the_models_own_packing(model, size):
    """Placeholders = ``LlavaNextProcessor``'s count; visual tokens = the rows of the model's own packed
    features (``pack_image_features``) that are not its ``image_newline`` vector; the crops cover them."""
    inputs = tm.llava_next_inputs(sizes=(size,))
    (entry,) = FAMILY.image_layout(model, inputs)
    assert entry.span == tm.llava_next_placeholders(size) == int((inputs["input_ids"] == tm.IMAGE_ID).sum())
    newline = (LlavaNextRef.features(model, inputs) == model.model.image_newline).all(dim=-1)
    assert torch.equal(torch.nonzero(~newline).flatten(), entry.visual)
    assert sum(entry.crops.sizes) == entry.n and torch.equal(torch.cat(entry.crops.members).sort().values, torch.arange(entry.n))


def test_layout_at_the_real_model_sizes():
    """CLIP-L/14 at 336 px, pinpoints up to 672 x 672. 640 x 480 px: 2 x 2 crops, stitched 48 x 48;
    wider than the grid: int(round(480 * 48 / 640)) = 36 rows kept, 6 cut at each end. N = 576 +
    36 x 48 = 2304 visual tokens, 36 newlines: 2340 placeholders (DivPrune's "2340x4096" example).
    The crops: the base's 576, then four crops of 18 kept rows x 24 = 432 each."""
    from transformers import LlavaNextConfig

    real = types.SimpleNamespace(config=LlavaNextConfig())
    assert real.config.vision_feature_layer == -2 and real.config.image_grid_pinpoints[2] == [672, 672]
    (entry,) = FAMILY.image_layout(real, {"image_sizes": torch.tensor([[480, 640]])})
    assert (entry.n, entry.span) == (2304, 2340)
    assert (entry.crops.grid, entry.crops.window, entry.crops.sizes) == ((2, 2), (6, 42, 0, 48), (576, 432, 432, 432, 432))
    assert custom_llava_next.tokens_of((480, 640), real.config) == (2304, 2340)
    # A square image fills the grid: 576 + 48 x 48 = 2880 visual tokens (the 5 x 576 of the papers), 48 newlines.
    assert custom_llava_next.tokens_of((672, 672), real.config) == (2880, 2928)


def test_layout_refusals(model):
    inputs = tm.llava_next_inputs()
    with pytest.raises(ValueError, match="image_sizes"):
        FAMILY.image_layout(model, {"input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"]})
    with pytest.raises(ValueError, match="vision_feature_select_strategy='default'"):
        FAMILY.image_layout(model, {**inputs, "vision_feature_select_strategy": "full"})


def test_clip_mapping_by_hand():
    """The CLIP captures of an image's crops (items ``[crops, ..., 16, ...]``, item ``c`` patch ``p``
    holding ``100 c + p``) read in its token order: the base's patches 0-15, then row 1 of the
    stitched grid (crop 1 patches 4-7, crop 2 patches 4-7), row 2 (8-11 of crop 1, then of crop 2).
    A second image's items come after the first's three."""
    config = types.SimpleNamespace(config=tm.tiny_llava_next_config())
    layout = FAMILY.image_layout(config, tm.llava_next_inputs(sizes=((60, 50), (30, 100))))
    segments = [types.SimpleNamespace(crops=e.crops) for e in layout]
    expected = list(range(16)) + [104, 105, 106, 107, 204, 205, 206, 207, 108, 109, 110, 111, 208, 209, 210, 211]
    values = torch.tensor([[100 * c + p for p in range(16)] for c in range(6)])  # [items, P]: image 0 has 3, image 1 has 3
    own = values[3:]
    items_hp = torch.stack([values, -values], dim=1)  # [items, H=2, P]
    assert FAMILY.vit_image(items_hp, 1, segments, -1).tolist() == [[v + 300 for v in expected], [-(v + 300) for v in expected]]
    items_pc = values.unsqueeze(-1).expand(6, 16, 3)  # [items, P, C]
    assert FAMILY.vit_image(items_pc, 1, segments, 0)[:, 0].tolist() == [v + 300 for v in expected]
    with_cls = torch.cat([torch.full((6, 1), -1) - torch.arange(6).unsqueeze(1), values], dim=1).unsqueeze(-1)  # [items, 1+P, 1]
    cls, patches = FAMILY.vit_split_cls(with_cls, 1, segments)
    assert cls[:, 0].tolist() == [-4, -5, -6] and patches[:, 0].tolist() == [v + 300 for v in expected]
    assert FAMILY.vit_cls(torch.arange(6).unsqueeze(1), 1, segments)[:, 0].tolist() == [3, 4, 5]
    assert own.flatten()[layout[1].crops.vit_index].tolist() == [v + 300 for v in expected]


@torch.no_grad()
def test_newline_tokens_are_never_pruned_and_never_budgeted(model, patched):
    """Two images (32 + 32 visual tokens, 2 + 4 newlines) at KEEP_RATIO 0.25 before the LLM and 0.125
    from layer 2: 8 and 4 visual tokens an image, every newline kept in every layer's cache; the
    record counts the visual tokens and names the markers."""
    inputs = tm.llava_next_inputs(sizes=((30, 100), (60, 50)), seed=3)
    n_prompt = inputs["input_ids"].shape[1]
    custom_llava_next.patch(model, cfg(KEEP_RATIO=0.25, PRUNE_METHOD_PRE_LLM="divprune_pre_llm", INTRA_LLM_LAYER_SPECS="2:fastv_intra_llm:0.125"))
    records = []
    model._prune_state.on_sample = records.append
    out = model(**inputs, use_cache=True)
    pre, intra = model.prune_trace
    assert pre.images == [(32, 8), (32, 8)] and intra.images == [(8, 4), (8, 4)]
    visual = LlavaNextRef.visual_mask(model, inputs["input_ids"], inputs)
    newlines = set(torch.nonzero((inputs["input_ids"][0] == tm.IMAGE_ID) & ~visual).flatten().tolist())
    assert len(newlines) == 6 and not newlines & set(pre.kept)
    assert [out.past_key_values.get_seq_length(i) for i in range(4)] == [n_prompt - 48] * 2 + [n_prompt - 56] * 2
    (record,) = records
    assert [(s["n"], s["markers"], s["grid"]) for s in record["image_spans"]] == [(32, 2, None), (32, 4, None)]
    assert (record["n_visual"], record["n_visual_final"]) == (64, 8)


@torch.no_grad()
def test_text_after_the_image_starts_after_its_last_newline(model, patched, monkeypatch):
    """DART's text pivots and final-normed text are the tokens after the image's LAST placeholder (its
    last row's newline token), not after its last visual token."""
    seen = spy_on(monkeypatch, "dart_intra_llm")
    inputs = tm.llava_next_inputs(sizes=((30, 100),), seed=4)
    custom_llava_next.patch(model, cfg(INTRA_LLM_LAYER_SPECS="2:dart_intra_llm:0.5"))
    model(**inputs)
    (ctx,) = seen
    last = int(torch.nonzero(inputs["input_ids"][0] == tm.IMAGE_ID).flatten()[-1])
    text = inputs["input_ids"].shape[1] - (last + 1)  # 7 text tokens
    assert text == 7 and ctx["final_normed_text"].shape[0] == ctx["prev_text_keys"].shape[0] == text
    assert ctx.crops is not None and ctx.crops.sizes == (16, 8, 8)


@torch.no_grad()
def test_vit_merges_are_skipped_with_a_note(model, patched):
    """ToMe's per-layer CLIP merge is not wired on LLaVA-NeXT: a ``vision`` note says so, and the
    labelled adaptation (the merge after the projector) reaches the budget."""
    inputs = tm.llava_next_inputs(sizes=((30, 100),), seed=5)
    custom_llava_next.patch(model, cfg(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="tome_pre_llm"))
    model(**inputs)
    vision, pre = model.prune_trace
    assert vision.note.startswith("ViT merge skipped: LLaVA-NeXT") and vision.n_keep == vision.n_in == 32
    assert pre.images == [(32, 16)]


@torch.no_grad()
def test_mistral_decoder_is_exact_and_its_sliding_window_refused():
    """LLaVA-NeXT-Mistral: a Mistral decoder without a sliding window (llava-hf's checkpoint) prunes
    exactly (prefill and decode against the no-cache reference); with one, the engine refuses."""
    model = tm.tiny_llava_next(seed=6, decoder="mistral")
    assert type(model.model.language_model).__name__ == "MistralModel"
    inputs = tm.llava_next_inputs(sizes=((30, 100), (60, 50)), seed=6)
    custom_llava_next.patch(model, cfg(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="divprune_pre_llm", INTRA_LLM_LAYER_SPECS="2:fastv_intra_llm:0.25"))
    prefill = model(**inputs).logits[0]
    assert drops_from_trace(model.prune_trace)
    check_pruned_decode(custom_llava_next, LlavaNextRef, model, inputs, prefill)
    sliding = tm.tiny_llava_next(seed=6, decoder="mistral", sliding_window=4096)
    custom_llava_next.patch(sliding, cfg(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="divprune_pre_llm"))
    with pytest.raises(NotImplementedError, match="sliding-window"):
        sliding(**inputs)


def test_crop_budgets_by_hand():
    """Largest remainder: 320 over five 576-token crops is 64 each; 639 gives the 4 first 128 and the
    last 127 (equal remainders, earlier first); 10 over (16, 8, 8) is 5, 2.5, 2.5 -> 5, 3, 2."""
    assert methods.crop_budgets([576] * 5, 320) == [64] * 5
    assert methods.crop_budgets([576] * 5, 639) == [128, 128, 128, 128, 127]
    assert methods.crop_budgets([16, 8, 8], 10) == [5, 3, 2]
    assert methods.crop_budgets([16, 8, 8], 32) == [16, 8, 8] and methods.crop_budgets([16, 8, 8], 0) == [0, 0, 0]
    with pytest.raises(ValueError):
        methods.crop_budgets([4], 5)
