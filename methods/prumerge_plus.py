"""LLaVA-PruMerge+: PruMerge plus spatially uniform samples (Shang et al., 2024).

Registered as ``prumerge_plus_pre_llm`` for LLaVA, mapped onto the engine exactly as PruMerge (count
capped by ``KEEP_RATIO``, extra token in the last pruned slot, spatial order; see
:mod:`methods.prumerge`). Paper:
https://arxiv.org/abs/2403.15388; original: 42Shawn/LLaVA-PruMerge @097c041,
``llava/model/multimodal_encoder/clip_encoder.py :: token_prune_merge_advanced_plus`` (l.174),
the variant the repository's ``forward`` calls (l.295).
"""

from __future__ import annotations

import torch

from methods import PruneContext, register_prune
from methods.prumerge import (
    PRUMERGE_NEEDS,
    PRUMERGE_REFUSAL,
    PruMergeOutput,
    prumerge_cls_attention,
    prumerge_engine_output,
    prumerge_kept_count,
    prumerge_merge,
)


def prumerge_plus_samples(idx: torch.Tensor, ratio: float, n: int) -> torch.Tensor:
    """The spatial samples PruMerge+ appends to the outliers ``idx`` ``[K]``.

    Returns:
        ``[S]`` ``[s for s in range(0, n - 1, stride) if s not in idx]``, ascending, with
        ``stride = int(int(1 / ratio) / 3)``.

    Quirks of the original, and what this port does:

    * the upper end is a hard-coded ``575`` (= N - 1 for CLIP-L/336); here it is ``n - 1``, equal for
      N = 576, so the last token (index N - 1) is never a sample, as in the original;
    * no outliers (ratio 0) divides by zero there; here it is the limit of ever-smaller ratios, an
      infinite stride: the only sample is token 0;
    * ratio > 1/3 makes the stride 0 and ``arange`` fail; here the stride is clamped to 1 (every
      token but the last).
    """
    if ratio > 0:
        stride = max(1, int(int(1 / ratio) / 3))
    else:
        stride = n  # only 0
    grid = torch.arange(0, n - 1, stride, device=idx.device)
    taken = torch.zeros(n, dtype=torch.uint8, device=idx.device)
    taken[idx] = 1
    free = 1 - taken[grid]
    # The one host sync: how many grid points are no outlier (the count is data-dependent).
    count = int(free.sum())
    return grid[torch.sort(taken[grid], stable=True).indices[:count]]


def prumerge_plus_select(
    features: torch.Tensor, keys: torch.Tensor, cls_attn: torch.Tensor, *, limit: int | None = None
) -> PruMergeOutput:
    """PruMerge+ (``token_prune_merge_advanced_plus`` with ``if_adaptive=True``).

    Args:
        features: ``[N, C]`` penultimate CLIP patch features (``hidden_states[-2][:, 1:]``).
        keys: ``[N, C]`` layer-23 ``k_proj`` outputs of the patches.
        cls_attn: ``[N]`` from :func:`methods.prumerge.prumerge_cls_attention`.
        limit: keep at most this many tokens, the first of the output order (outliers, then
            samples; the harness's cap, applied before merging; ``None``: the original).

    Returns:
        :class:`~methods.prumerge.PruMergeOutput`: ``indices`` = the ``int(N * ratio)`` outliers in
        descending attention order followed by :func:`prumerge_plus_samples` (ascending); their
        merged features (every kept token, samples included, absorbs its 32 nearest neighbours by
        key cosine, weighted by [CLS] attention); and the extra token summarising the tokens left.
    """
    n = features.shape[0]
    k, ratio = prumerge_kept_count(cls_attn)
    idx = cls_attn.topk(k).indices
    idx = torch.cat([idx, prumerge_plus_samples(idx, ratio, n)])[:limit]
    merged, extra = prumerge_merge(features, keys, cls_attn, idx)
    return PruMergeOutput(idx, merged, extra)


@register_prune(
    "prumerge_plus_pre_llm",
    stage="pre_llm",
    needs=PRUMERGE_NEEDS,
    exact_count=False,
    families=("llava",),
    refusal=PRUMERGE_REFUSAL,
    source="42Shawn/LLaVA-PruMerge",
    paper="https://arxiv.org/abs/2403.15388",
    deviation=(
        "Not in UniPruneBench's code release. As prumerge_pre_llm (KEEP_RATIO caps the adaptive count, "
        "spatial order, extra token in the last pruned slot); sampling ends at N-1 (the original's 575), "
        "no-outlier and ratio > 1/3 cases defined (the original fails)."
    ),
)
def prumerge_plus(ctx: PruneContext, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PruMerge plus spatially uniform samples: outliers and every stride-th token, merged, plus one summary token.

    ``keep`` (``budget(N, KEEP_RATIO)``) only caps the adaptive count; see :mod:`methods.prumerge`.
    """
    q, k = ctx["vit_last_queries"], ctx["vit_last_keys"]  # [1 + N, C]
    out = prumerge_plus_select(ctx["vit_features"], k[1:], prumerge_cls_attention(q, k), limit=keep - 1)
    return prumerge_engine_output(ctx, out)
