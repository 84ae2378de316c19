"""FitPrune: per-layer pruning fitted to keep the attention mass (Ye et al., AAAI 2025).

Registered as ``fitprune_intra_llm`` (:func:`fitprune`). The original deletes tokens inside layer
l, after its attention (layer l's KV cache keeps them); for the survivors that is pruning at the
input of layer l+1 with layer l's attention, which is how the harness runs it: the original's layer
l is spec layer l+1 here. Its per-layer schedule (delete counts) becomes layer specs through
:func:`fitprune_specs`; :data:`LLAVA15_7B_SCHEMES` are the original's published schedules and
``scripts/fitprune_calibrate.py`` calibrates one for any model and budget. The functions below are
also the inference and calibration rules on explicit tensors. Paper:
https://arxiv.org/abs/2409.10197; original: ywh187/FitPrune @d28e418,
``LLaVA_1.5/llava/model/language_model/modeling_llama.py :: LlamaAttention.forward`` (l.356) and
``LLaVA_1.5/llava/eval/statistical_analysis.py``.

All attention arguments are one layer's softmax probabilities (every softmax over the key axis,
causal) restricted to this image's visual columns:

* ``attn_visual``: ``[H, Nv, Nv]`` rows of the visual tokens;
* ``attn_text``: ``[H, T, Nv]`` rows of every token after the image (question + assistant prefix).

Heads are reduced by MAX (the original's ``attn_weights.max(dim=1)``); restricting rows and columns
before the max is the same as after it.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import torch

from methods import PruneContext, register_prune


def _up(t: torch.Tensor) -> torch.Tensor:
    """``t`` in at least fp32 (fp64 stays fp64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _head_max(attn: torch.Tensor) -> torch.Tensor:
    return _up(attn).max(dim=0).values


def fitprune_scores(attn_visual: torch.Tensor, attn_text: torch.Tensor) -> torch.Tensor:
    """Inference score ``[Nv]``: cross_j * self_j.

    self_j = sum_{i in V} A[i, j] / Nv and cross_j = sum_{i in text} A[i, j], with A the head-max
    attention (``LlamaAttention.forward``, l.392-396).
    """
    a_self = (_head_max(attn_visual) / attn_visual.shape[-1]).sum(dim=0)
    a_cross = _head_max(attn_text).sum(dim=0)
    return a_cross * a_self


def fitprune_keep(attn_visual: torch.Tensor, attn_text: torch.Tensor, n_delete: int) -> torch.Tensor:
    """The visual tokens a FitPrune layer keeps: all but the ``n_delete`` lowest scores.

    Args:
        attn_visual: ``[H, Nv, Nv]``, attn_text: ``[H, T, Nv]`` (see the module docstring): the
            attention of the pruning layer itself.
        n_delete: this layer's entry of the delete scheme (``delete_scheme[layer_idx]``).

    Returns:
        ``[Nv - n_delete]`` kept indices, ascending. The original deletes
        ``sort(score).indices[:n_delete]`` (ascending; note UniPruneBench instead KEPT the lowest)
        and drops those rows from the layer's attention output, so they leave after this layer's
        attention; the survivors keep their positions. For the survivors that equals pruning at the
        input of the next layer with this layer's attention (the MLP is per token).
    """
    scores = fitprune_scores(attn_visual, attn_text)
    # The complement of the n_delete lowest is the rest of the same sort (no nonzero: no host sync).
    return torch.sort(scores).indices[n_delete:].sort().values


def fitprune_reference_masses(attn_visual: torch.Tensor, attn_text: torch.Tensor) -> tuple[float, float]:
    """``(W_cross, W_self)`` of one sample and layer from an UNPRUNED forward (``compute_attention_weights``).

    W_cross = sum A[text, V] / n_text and W_self = sum A[V, V] / Nv (head-max A).
    """
    w_cross = _head_max(attn_text).sum().item() / attn_text.shape[-2]
    w_self = _head_max(attn_visual).sum().item() / max(attn_visual.shape[-1], 1)
    return w_cross, w_self


def fitprune_delete_count(values: torch.Tensor, reference: float, alpha: float) -> int:
    """How many of the lowest ``values`` ``[Nv]`` one criterion deletes at ``alpha``.

    The original's loop (``fit_model``): for i = 0, 1, ...: if ``sum(values) - sum(i lowest values)
    < reference - reference * alpha``, delete ``max(i - 1, 0)``. That is the largest prefix of the
    ascending order whose removal leaves at least ``reference * (1 - alpha)``, one short of the
    first that does not. If the threshold is never crossed the original reads a stale (or
    undefined) count; here it is ``Nv - 1``.
    """
    order = torch.argsort(values)
    total = values.sum()
    threshold = reference - reference * alpha
    for i in range(values.numel()):
        if total - values[order[:i]].sum() < threshold:
            return max(i - 1, 0)
    return values.numel() - 1


def fitprune_calibration_step(
    attn_visual: torch.Tensor, attn_text: torch.Tensor, w_cross: float, w_self: float, alpha: float
) -> torch.Tensor:
    """The visual tokens one calibration step deletes for one sample at one layer.

    Args:
        attn_visual / attn_text: the layer's attention on the CURRENT (already calibrated-pruned)
            sequence, see the module docstring.
        w_cross / w_self: :func:`fitprune_reference_masses` of this sample and layer (unpruned).
        alpha: the bisected mass-loss fraction.

    Returns:
        ``[d]`` deleted indices into the current visual tokens, ascending: the INTERSECTION of the
        lowest-cross and lowest-self prefixes (:func:`fitprune_delete_count` each), with
        cross_j = sum_{text} A[:, j] / n_text and self_j = sum_{V} A[:, j] / Nv. Note this is not the
        inference criterion (lowest cross * self); the original uses both as written.
    """
    cross = _head_max(attn_text).sum(dim=0) / attn_text.shape[-2]
    self_ = (_head_max(attn_visual) / attn_visual.shape[-1]).sum(dim=0)
    del_cross = torch.argsort(cross)[: fitprune_delete_count(cross, w_cross, alpha)]
    del_self = torch.argsort(self_)[: fitprune_delete_count(self_, w_self, alpha)]
    both = torch.zeros(cross.numel(), dtype=torch.int64, device=cross.device)
    both[del_cross] += 1
    both[del_self] += 1
    return torch.nonzero(both == 2).flatten()


def fitprune_average_counts(totals: Mapping[int, int], n_samples: int) -> dict[int, int]:
    """The scheme from per-layer delete counts summed over samples: floor average (``scheme[i] // n``)."""
    return {layer: total // n_samples for layer, total in totals.items()}


def fitprune_bisect(
    fit: Callable[[float], tuple[bool, Mapping[int, int]]], *, lo: float = 0.0, hi: float = 1.0, width: float = 0.01
) -> tuple[float, Mapping[int, int]]:
    """The original's outer loop (``statistical_analysis``): bisect alpha until the interval is <= ``width``.

    Args:
        fit: ``alpha -> (reached, scheme)``: the original's ``fit_model``, where ``reached`` means
            the projected FLOPs fell to ``(1 - reduction) x`` the unpruned FLOPs.

    Returns:
        ``(alpha, scheme)`` of the LAST evaluated mid-point (the original prints that scheme,
        whether or not it reached the target). Reached: hi = mid, else lo = mid; the loop runs
        while ``hi - lo > width + 1e-6``.
    """
    mid, scheme = math.nan, {}
    while hi - lo > width + 1e-6:
        mid = (lo + hi) / 2
        reached, scheme = fit(mid)
        if reached:
            hi = mid
        else:
            lo = mid
    return mid, scheme


# The original's schedules for LLaVA-1.5-7B (576 visual tokens, 32 layers): per reduction % of the
# visual tokens, {layer: tokens deleted after that layer's attention} (LLaVA_1.5/llava/model/
# language_model/modeling_llama.py, LlamaAttention.forward). Layers not listed delete nothing.
LLAVA15_7B_SCHEMES: dict[int, dict[int, int]] = {
    10: {2: 1, 3: 2, 4: 1, 6: 1, 7: 4, 8: 5, 9: 5, 10: 11, 11: 4, 12: 2, 13: 2, 16: 1, 17: 1, 18: 2, 19: 4, 20: 2,
         21: 10, 22: 1, 23: 1, 24: 1, 25: 2, 26: 1, 27: 1, 29: 1},
    20: {2: 3, 3: 3, 4: 1, 5: 1, 6: 4, 7: 16, 8: 14, 9: 15, 10: 24, 11: 4, 12: 2, 13: 3, 14: 2, 16: 6, 18: 5, 19: 13,
         20: 4, 21: 19, 22: 2, 23: 1, 24: 1, 25: 1, 26: 1, 27: 1, 28: 2, 29: 1},
    30: {2: 7, 3: 6, 4: 4, 5: 5, 6: 16, 7: 40, 8: 24, 9: 21, 10: 24, 11: 4, 12: 2, 13: 3, 14: 4, 16: 16, 18: 11,
         19: 26, 20: 6, 21: 32, 22: 3, 23: 1, 25: 1, 26: 2, 27: 2, 28: 4},
    40: {1: 1, 2: 21, 3: 13, 4: 14, 5: 11, 6: 41, 7: 53, 8: 29, 9: 15, 10: 14, 11: 5, 12: 1, 13: 4, 14: 5, 15: 1,
         16: 26, 17: 1, 18: 13, 19: 28, 20: 6, 21: 27, 22: 2, 23: 1, 26: 1, 27: 1, 28: 2},
    50: {0: 3, 1: 7, 2: 49, 3: 24, 4: 29, 5: 17, 6: 59, 7: 41, 8: 26, 9: 8, 10: 10, 11: 6, 12: 2, 13: 5, 14: 7,
         15: 2, 16: 30, 17: 3, 18: 13, 19: 27, 20: 5, 21: 23, 22: 2, 23: 1, 26: 1, 27: 1, 28: 2},
    55: {0: 6, 1: 17, 2: 69, 3: 31, 4: 34, 5: 19, 6: 59, 7: 30, 8: 23, 9: 6, 10: 8, 11: 7, 12: 2, 13: 5, 14: 8,
         15: 2, 16: 29, 17: 4, 18: 12, 19: 25, 20: 4, 21: 19, 22: 2, 23: 1, 26: 1, 28: 1},
    60: {0: 14, 1: 33, 2: 89, 3: 36, 4: 36, 5: 20, 6: 55, 7: 21, 8: 18, 9: 4, 10: 7, 11: 5, 12: 2, 13: 5, 14: 7,
         15: 4, 16: 26, 17: 5, 18: 11, 19: 24, 20: 4, 21: 18, 22: 2, 23: 1, 26: 1, 28: 1},
    70: {0: 48, 1: 79, 2: 118, 3: 41, 4: 33, 5: 17, 6: 36, 7: 9, 8: 9, 9: 2, 10: 3, 11: 2, 12: 1, 13: 3, 14: 4,
         15: 8, 16: 18, 17: 7, 18: 8, 19: 20, 20: 4, 21: 13, 22: 2, 23: 1, 26: 1, 28: 1},
    80: {0: 128, 1: 127, 2: 118, 3: 35, 4: 26, 5: 8, 6: 13, 7: 3, 8: 2, 9: 1, 13: 2, 14: 1, 15: 8, 16: 7, 17: 8,
         18: 5, 19: 11, 20: 2, 21: 6, 22: 1, 23: 1, 27: 1},
    90: {0: 262, 1: 153, 2: 80, 3: 19, 4: 13, 5: 1, 6: 2, 15: 1, 16: 1, 17: 2, 18: 1, 19: 2, 21: 1, 27: 1},
}


def fitprune_specs(scheme: Mapping[int, int], n_tokens: int, n_layers: int) -> str:
    """``INTRA_LLM_LAYER_SPECS`` running a delete scheme ``{layer: count}`` of an image of
    ``n_tokens`` visual tokens: deletions after layer l's attention become a cut at the input of
    layer l+1 down to the survivors' fraction of the original count. Deletions after the last
    layer change no logit and are left out."""
    specs, left = [], n_tokens
    for layer in sorted(scheme):
        if scheme[layer] <= 0 or layer + 1 >= n_layers:
            continue
        left -= scheme[layer]
        if left < 1:
            raise ValueError(f"the scheme deletes all {n_tokens} visual tokens by layer {layer}")
        specs.append(f"{layer + 1}:fitprune_intra_llm:{left / n_tokens:.6g}")
    return ";".join(specs)


@register_prune(
    "fitprune_intra_llm",
    stage="intra_llm",
    needs=("prev_attention_visual", "prev_attention_text"),
    source="ywh187/FitPrune",
    paper="https://arxiv.org/abs/2409.10197",
    deviation="Deletes the LOWEST cross x self scores (UniPruneBench keeps them: inverted), head MAX, "
    "per-layer schedules (fitprune_specs / scripts/fitprune_calibrate.py); original layer l = spec l+1.",
)
def fitprune(ctx: PruneContext, keep: int) -> torch.Tensor:
    """Delete the visual tokens with the lowest cross x self attention (head max) of the previous layer.

    As the original's inference rule (``LlamaAttention.forward``): self_j = sum over visual rows of
    A[i, j] / N_v, cross_j = sum over the text after the image of A[t, j], delete the ``N - keep``
    lowest ``cross * self``. Reproduce a published schedule with
    ``INTRA_LLM_LAYER_SPECS="$(python -c 'from methods.fitprune import *; print(fitprune_specs(LLAVA15_7B_SCHEMES[80], 576, 32))')"``.
    """
    return fitprune_keep(ctx["prev_attention_visual"], ctx["prev_attention_text"], ctx.n - keep)
