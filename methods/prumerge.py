"""LLaVA-PruMerge: adaptive [CLS]-attention outlier selection plus key-similarity merging (Shang et al., 2024).

Registered as ``prumerge_pre_llm`` for LLaVA: the engine captures the last CLIP layer's
``q_proj``/``k_proj`` outputs and the feature layer's patches during the one vision pass, and the
method projects its merged ViT-space tokens with the model's projector (the original merges before
the projector). Qwen2.5-VL's and InternVL's encoders have no [CLS] token, and the original has no
LLaVA-NeXT path: the configuration refuses them (:data:`PRUMERGE_REFUSAL`). The functions below are
the selection and merge on explicit tensors. Paper:
https://arxiv.org/abs/2403.15388; original: 42Shawn/LLaVA-PruMerge @097c041,
``llava/model/multimodal_encoder/clip_encoder.py :: token_prune_merge_advanced`` (l.85). PruMerge+
is in :mod:`methods.prumerge_plus`.

In the harness (see :func:`prumerge_engine_output`, shared with PruMerge+):

* **count**: the original's adaptive one (IQR outliers, plus PruMerge+'s samples, plus the extra
  token); ``KEEP_RATIO`` only caps it at ``budget(N, KEEP_RATIO)`` tokens, extra token included, by
  keeping the first ``budget - 1`` of the original's output order. The paper reports ~5.5% of
  LLaVA-1.5's 576 tokens for PruMerge (~25% for PruMerge+), so ``KEEP_RATIO`` of about 0.1 (0.3)
  or more usually leaves the original's selection unchanged; ``KEEP_RATIO=1`` prunes nothing, as
  for every method. The trace reports the actual count per image.
* **extra token** (the original appends ``sum over pruned j of a_j x_j`` last, output K + 1): it
  takes the sequence slot of the LAST pruned token of the image (the free slot nearest to where the
  original puts it), so the image keeps K + 1 tokens.
* **order and positions**: every kept token stays at its own patch's position (spatial order,
  original position ids, the harness's convention), where the original feeds them in descending
  attention order with sequential positions.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from methods import PruneContext, register_prune


def _up(t: torch.Tensor) -> torch.Tensor:
    """``t`` in at least fp32 (fp64 stays fp64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


KNN = 32  # neighbours merged into every kept token (hard-coded in the original)


class PruMergeOutput(NamedTuple):
    """``indices [K]`` kept tokens in the original's output order; ``merged [K, C]`` their new
    features (same order); ``extra [C]`` the summary of the pruned tokens the original appends last
    (output length K + 1)."""

    indices: torch.Tensor
    merged: torch.Tensor
    extra: torch.Tensor


def prumerge_cls_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[CLS] attention over the patches, rebuilt as the original does from layer-23 projections.

    Args:
        q: ``[N + 1, C]`` output of CLIP layer 23's ``self_attn.q_proj`` (a forward hook: bias
            included, no head split, no HF scaling), [CLS] first.
        k: ``[N + 1, C]`` output of the same layer's ``k_proj``.

    Returns:
        ``[N]`` softmax(q k^T * C^-1/2)[0, 1:]: one full-width "head" over all N + 1 keys, so it does
        not sum to 1 (the [CLS] key takes part in the softmax).
    """
    c = q.shape[-1]
    logits = (_up(q[0]) @ _up(k).T) * c**-0.5  # [N + 1]
    return torch.softmax(logits, dim=-1)[1:]


def prumerge_outlier_ratio(cls_attn: torch.Tensor) -> float:
    """IQR outlier share of ``cls_attn`` ``[N]``: #(a > Q3 + 1.5 IQR) / N, numpy linear percentiles."""
    a = cls_attn.detach().to(dtype=torch.float32).cpu().numpy().reshape(-1)
    q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
    return len(np.where(a > q3 + 1.5 * (q3 - q1))[0]) / len(a)


def _percentile(sorted_a: torch.Tensor, q: float) -> torch.Tensor:
    """numpy's ``percentile(a, q)`` (method "linear") of the ascending ``sorted_a`` ``[N]``, on the
    device and in its dtype: the same virtual index and the same ``_lerp`` (one rounding per
    operation, each operation its own kernel)."""
    n = sorted_a.numel()
    virtual = q / 100 * (n - 1)
    lo = math.floor(virtual)
    hi = min(lo + 1, n - 1)
    t = virtual - lo
    a, b = sorted_a[lo], sorted_a[hi]
    diff = b - a
    return b - diff * (1 - t) if t >= 0.5 else a + diff * t


def prumerge_outlier_count(cls_attn: torch.Tensor) -> torch.Tensor:
    """``[]`` long on the device: how many of ``cls_attn`` ``[N]`` are IQR outliers (``> Q3 + 1.5
    IQR``), as :func:`prumerge_outlier_ratio` counts them (fp32, numpy's linear percentiles), with
    no host sync."""
    a = cls_attn.detach().to(dtype=torch.float32).reshape(-1)
    s = a.sort().values
    q1, q3 = _percentile(s, 25), _percentile(s, 75)
    return (a > q3 + (q3 - q1) * 1.5).sum()


def prumerge_kept_count(cls_attn: torch.Tensor) -> tuple[int, float]:
    """``(int(N * ratio), ratio)`` with ratio = :func:`prumerge_outlier_ratio`: the adaptive count,
    read with the method's one host sync."""
    n = cls_attn.numel()
    ratio = int(prumerge_outlier_count(cls_attn)) / n  # the one host sync: the adaptive count
    return int(n * ratio), ratio


def prumerge_merge(
    features: torch.Tensor, keys: torch.Tensor, cls_attn: torch.Tensor, idx: torch.Tensor, *, knn: int = KNN
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge every token into the kept ones as the original does.

    Args:
        features: ``[N, C]`` penultimate CLIP patch features (``hidden_states[-2][:, 1:]``).
        keys: ``[N, C]`` layer-23 ``k_proj`` outputs of the patches (``k[1:]``).
        cls_attn: ``[N]`` from :func:`prumerge_cls_attention`.
        idx: ``[K]`` kept token indices, in output order.
        knn: neighbours per kept token (32, fixed in the original).

    Returns:
        ``(merged [K, C], extra [C])``. For kept token i the candidates are every other token (the
        other kept ones and all pruned ones); the ``knn`` with the highest cosine similarity of
        L2-normalised keys are merged as ``new_i = x_i + sum_j a_j x_j`` (an UNnormalised sum
        weighted by [CLS] attention; the original has ``/ sum(weights)`` commented out), always from
        the original features. ``extra = sum over pruned j of a_j x_j``.

    The original lists candidates as [kept before i, kept after i, pruned ascending]; only the set
    of the top ``knn`` matters (up to ``topk`` ties and summation order, so merged features are
    allclose to the original's, not bitwise). Fewer than ``knn`` candidates (N <= 32) merge them all.
    """
    n = features.shape[0]
    x = features
    w = cls_attn.to(x.dtype)
    kn = F.normalize(keys.to(x.dtype), p=2, dim=-1)
    sim = kn[idx] @ kn.T  # [K, N]
    sim[torch.arange(idx.numel(), device=idx.device), idx] = float("-inf")  # a token is not its own neighbour
    nbr = sim.topk(min(knn, n - 1), dim=1).indices  # [K, knn]
    merged = x[idx] + (x[nbr] * w[nbr].unsqueeze(-1)).sum(dim=1)  # [K, C]
    pruned = _pruned(n, idx)  # ascending, as x[mask] lists them
    extra = (x[pruned] * w[pruned].unsqueeze(-1)).sum(dim=0)  # [C]
    return merged, extra


def _pruned(n: int, idx: torch.Tensor) -> torch.Tensor:
    """``[N - K]`` the indices of ``0..n-1`` not in ``idx`` ``[K]`` (distinct), ascending; no host sync
    (a stable sort of the kept mask: the count is known)."""
    kept = torch.zeros(n, dtype=torch.uint8, device=idx.device)
    kept[idx] = 1
    return torch.sort(kept, stable=True).indices[: n - idx.numel()]


def prumerge_select(
    features: torch.Tensor, keys: torch.Tensor, cls_attn: torch.Tensor, *, limit: int | None = None
) -> PruMergeOutput:
    """PruMerge (``token_prune_merge_advanced`` with ``if_adaptive=True``): outliers, then merge.

    Args:
        features: ``[N, C]``, keys: ``[N, C]``, cls_attn: ``[N]`` as in :func:`prumerge_merge`.
        limit: keep at most this many tokens, the first of the output order (the harness's cap;
            ``None``: the original).

    Returns:
        :class:`PruMergeOutput`: ``indices`` = the top ``int(N * ratio)`` tokens by [CLS] attention in
        DESCENDING attention order (not sorted; the original feeds them to the LLM in that order
        with sequential positions), ratio = :func:`prumerge_outlier_ratio`; their merged features;
        and the extra token. With no outliers K = 0 and only the extra token remains.
    """
    k, _ = prumerge_kept_count(cls_attn)
    idx = cls_attn.topk(k).indices[:limit]
    merged, extra = prumerge_merge(features, keys, cls_attn, idx)
    return PruMergeOutput(idx, merged, extra)


def prumerge_engine_output(ctx: PruneContext, out: PruMergeOutput) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices [K + 1], features [K + 1, D])`` for the engine: the kept tokens' merged features
    and the extra token, in the slot of the last pruned token, all through ``ctx["vit_projector"]``.
    ``out`` keeps fewer than ``ctx.n`` tokens (the engine runs a method only to prune)."""
    slot = _pruned(ctx.n, out.indices)[-1:]  # [1] the last pruned token
    vit = torch.cat([out.merged, out.extra.unsqueeze(0)])  # [K + 1, C]
    return torch.cat([out.indices, slot]), ctx["vit_projector"](vit)


PRUMERGE_NEEDS = ("vit_features", "vit_last_queries", "vit_last_keys", "vit_projector")

# Why PruMerge(+) does not run on the other families (the configuration shows it).
PRUMERGE_REFUSAL = {
    "llava_next": "its repository has no LLaVA-NeXT path (LLaVA-1.5 only): its adaptive count (IQR outliers of one "
    "image's [CLS] attention), its spatial samples (stride up to the hard-coded 575) and its one summary token are "
    "defined for one 576-patch CLIP image, and a per-crop version would be a new method",
    "*": "it ranks patches by the ViT's [CLS] attention, and this family's vision encoder has no [CLS] token",
}


@register_prune(
    "prumerge_pre_llm",
    stage="pre_llm",
    needs=PRUMERGE_NEEDS,
    exact_count=False,
    families=("llava",),
    refusal=PRUMERGE_REFUSAL,
    source="42Shawn/LLaVA-PruMerge",
    paper="https://arxiv.org/abs/2403.15388",
    deviation=(
        "Not in UniPruneBench's code release. Adaptive (IQR) count, capped by KEEP_RATIO (extra token "
        "included); tokens in spatial order at their own positions (original: descending attention, "
        "sequential positions); the extra token takes the last pruned token's slot."
    ),
)
def prumerge(ctx: PruneContext, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the [CLS]-attention outliers (IQR), merge their key-nearest neighbours into them, plus one summary token.

    The attention is the original's one full-width head from the last CLIP layer's ``q_proj`` /
    ``k_proj`` outputs; merging runs on the feature layer's patches before the projector. ``keep``
    (``budget(N, KEEP_RATIO)``) only caps the adaptive count; see the module docstring.
    """
    q, k = ctx["vit_last_queries"], ctx["vit_last_keys"]  # [1 + N, C]
    out = prumerge_select(ctx["vit_features"], k[1:], prumerge_cls_attention(q, k), limit=keep - 1)
    return prumerge_engine_output(ctx, out)
