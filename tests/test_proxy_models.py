"""What the shipped proxy checkpoints (``synthetic/proxy_checkpoints/``, trained by scripts/train_proxy.py)
show, loaded through the harness's own ``from_pretrained`` path and pruned by the engine. The
measurements are ``scripts/proxy_checks.py``'s (``python -m scripts.proxy_checks`` prints them).

Margins: each bound sits well inside what the shipped checkpoints measure (see the README's proxy
section), so a re-trained checkpoint still meets them.
"""

from __future__ import annotations

import pytest

from synthetic import proxy_data as P
from scripts import proxy_checks as C


@pytest.fixture(scope="module", params=list(C.CHECKPOINTS))
def proxy(request):
    return C.load_proxy(request.param)


@pytest.fixture(scope="module")
def blank_method():
    with C.blank_background_method() as on_batch:
        yield on_batch


_VANILLA: dict[int, dict[str, float]] = {}


def vanilla(module, model, processor):
    if id(model) not in _VANILLA:
        _VANILLA[id(model)] = C.measure(module, model, processor)
    return _VANILLA[id(model)]


def test_vanilla_answers_held_out_questions(proxy):
    acc = vanilla(*proxy)
    assert sum(acc.values()) / len(acc) >= 0.95, acc  # all held-out questions
    assert min(acc.values()) >= 0.85, acc  # and every type


def test_keeping_only_blank_background_kills_text_reading_not_background_colour(proxy, blank_method):
    acc = C.measure(*proxy, C.BLANK_05, on_batch=blank_method)
    assert acc["global"] >= 0.9, acc  # the background is in every token
    assert acc["text"] <= 0.4, acc  # the digit's token is gone: near chance (10 digits)
    assert acc["attribute"] <= 0.6, acc  # so is the square's


def test_random_pruning_at_11_percent_hurts_text_more_than_background(proxy):
    """The paper's finding 4 on the proxy: OCR-like questions suffer most under aggressive pruning."""
    full = vanilla(*proxy)
    pruned = C.measure(*proxy, C.RANDOM_011)
    drop = {t: full[t] - pruned[t] for t in P.TYPES}
    assert drop["text"] >= drop["global"] + 0.3, (full, pruned)
    assert pruned["global"] >= 0.85, pruned
