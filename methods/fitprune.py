"""FitPrune: per-layer pruning fitted to keep the attention mass (Ye et al., AAAI 2025).

Not registered yet: the engine does not provide a layer's full attention (the rows of every
visual and every text token) and FitPrune's schedule is a per-layer table of delete counts. The
functions here are the inference rule and the calibration rule on explicit tensors. Paper:
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
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[torch.sort(scores).indices[:n_delete]] = False
    return torch.nonzero(keep).flatten()


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
