"""What the shipped proxy checkpoints (``proxy_checkpoints/``, trained by scripts/train_proxy.py)
show, loaded through the harness's own ``from_pretrained`` path and pruned by the engine.

Margins: each bound sits well inside what the shipped checkpoints measure (see train_log.json and
the README's proxy table), so a re-trained checkpoint still meets them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import custom_internvl
import custom_llava
import custom_qwenvl
import methods
import proxy_data as P
from scripts.train_proxy import heldout_accuracy
from utils import PruneConfig
from vlm_adapter import load_pretrained

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = {"qwen2_5_vl": custom_qwenvl, "internvl3": custom_internvl, "llava1_5": custom_llava}
N = 40  # held-out scenes per measurement (40 questions of each type)
BLANK = "keep_blank_background_pre_llm"  # test-only: keeps only tokens whose cell holds no object


@pytest.fixture(scope="module", params=list(FAMILIES))
def proxy(request):
    module = FAMILIES[request.param]
    model, processor = load_pretrained(module, str(ROOT / "proxy_checkpoints" / request.param), torch.device("cpu"))
    module.patch(model)
    return module, model, processor


@pytest.fixture(scope="module")
def blank_method():
    """Register the test-only method (and remove it afterwards): from the current scene's true
    labels it keeps the first ``keep`` tokens whose cell is empty background."""
    current: dict[str, torch.Tensor] = {}

    @methods.register_prune(BLANK, stage="pre_llm")
    def keep_blank(ctx, keep):
        empty = torch.nonzero(current["shape"][ctx.token_index] == 0).flatten()
        assert len(empty) >= keep, "not enough empty cells for this budget"
        return empty[:keep]

    def on_batch(scenes):
        (scene,) = scenes
        current["shape"] = torch.from_numpy(P.token_labels(scene)["shape"])

    yield on_batch
    methods._REGISTRY.pop(BLANK, None)


_VANILLA: dict[int, dict[str, float]] = {}


def vanilla(module, model, processor):
    if id(model) not in _VANILLA:
        _VANILLA[id(model)] = measure(module, model, processor)
    return _VANILLA[id(model)]


def measure(module, model, processor, env=None, on_batch=None):
    module.patch(model, PruneConfig.from_env(env or {}))
    try:
        with torch.no_grad():
            return heldout_accuracy(model, processor, n=N, seed=7, batch=1, on_batch=on_batch)
    finally:
        module.patch(model, PruneConfig())


def test_vanilla_answers_held_out_questions(proxy):
    acc = vanilla(*proxy)
    assert sum(acc.values()) / len(acc) >= 0.95, acc  # all held-out questions
    assert min(acc.values()) >= 0.85, acc  # and every type


def test_keeping_only_blank_background_kills_text_reading_not_background_colour(proxy, blank_method):
    acc = measure(*proxy, {"KEEP_RATIO": "0.5", "PRUNE_METHOD_PRE_LLM": BLANK}, on_batch=blank_method)
    assert acc["global"] >= 0.9, acc  # the background is in every token
    assert acc["text"] <= 0.4, acc  # the digit's token is gone: near chance (10 digits)
    assert acc["attribute"] <= 0.6, acc  # so is the square's


def test_random_pruning_at_11_percent_hurts_text_more_than_background(proxy):
    """The paper's finding 4 on the proxy: OCR-like questions suffer most under aggressive pruning."""
    full = vanilla(*proxy)
    pruned = measure(*proxy, {"KEEP_RATIO": "0.111", "PRUNE_METHOD_PRE_LLM": "random_pre_llm", "PRUNE_SEED": "0"})
    drop = {t: full[t] - pruned[t] for t in P.TYPES}
    assert drop["text"] >= drop["global"] + 0.3, (full, pruned)
    assert pruned["global"] >= 0.85, pruned
