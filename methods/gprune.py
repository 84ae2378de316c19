"""G-Prune: graph-based visual token pruning (Jiang et al., AAAI 2025)."""

from __future__ import annotations

from typing import Annotated

import torch

from methods import PruneContext, Range, crop_budgets, crop_rows, register_prune


def gprune_scores(
    features: torch.Tensor, *, similarity: float = 0.5, temperature: float = 0.03, iterations: int = 5
) -> torch.Tensor:
    """Information-propagation score of every token on the cosine graph.

    Args:
        features: ``[N, D]`` the projected visual tokens.

    Returns:
        ``[N]`` score_j = (sum_i ||x_i||_2 P_ij) / degree_j with P = softmax_row(A)^iterations.

    As the original (``LLaVA-NeXT/llava/model/llava_arch.py`` l.239-288): A = cos(X, X); entries
    below ``similarity`` set to 0; A /= temperature; entries with |A| < 1e-6 (the zeroed ones) set
    to -5000 so that the row softmax gives them exactly 0; degree_j counts the positive entries of
    row j after the softmax. Computed in at least fp32 (the 1/0.03 softmax is fragile in fp16).
    """
    dtype = torch.promote_types(features.dtype, torch.float32)
    x = features.to(dtype)
    xn = torch.nn.functional.normalize(x, p=2, dim=1)
    adj = xn @ xn.T  # [N, N]
    adj = torch.where(adj < similarity, torch.zeros_like(adj), adj) / temperature
    adj = torch.where(adj.abs() < 1e-6, torch.full_like(adj, -5000.0), adj)
    adj = torch.softmax(adj, dim=1)
    degree = (adj > 0).sum(dim=1)  # [N]
    prop = torch.linalg.matrix_power(adj, iterations)
    weight = x.norm(dim=-1)  # [N]
    return (weight @ prop) / degree


@register_prune(
    "gprune_pre_llm",
    stage="pre_llm",
    source="jytmelon/G-Prune",
    paper="https://arxiv.org/abs/2501.02268",
    deviation="Same scores as the original and UniPruneBench; round-half-up budget (theirs: max(1, int(N*r))); one "
    "graph per image (UniPruneBench: InternVL tile 0 and tiles 1..P-1 apart). LLaVA-NeXT as the original: the base "
    "image and the high-resolution tokens as two graphs, newlines always kept; budget(N, r) split between them in "
    "proportion to their tokens (original: int(r*576) and int(r*rows*cols)).",
)
def gprune(
    ctx: PruneContext,
    keep: int,
    *,
    similarity: Annotated[float, Range(ge=-1, le=1)] = 0.5,  # a cosine threshold
    temperature: Annotated[float, Range(gt=0)] = 0.03,  # divides the adjacency: 0 gives NaN scores
    iterations: Annotated[int, Range(ge=1)] = 5,  # matrix power: < 1 propagates nothing (negative: an inverse)
) -> torch.Tensor:
    """Keep the tokens with the highest propagated feature-norm score on a cosine-similarity graph.

    Paper: https://arxiv.org/abs/2501.02268

    See :func:`gprune_scores`. ``ctx.features``: ``[N, D]`` projector outputs; returns the
    top-``keep`` indices ``[keep]``. Every image is one graph (InternVL tiles and Qwen frames are not
    separated), except on LLaVA-NeXT, the original's own model (``LLaVA-NeXT/llava/model/llava_arch.py``):
    the base image's tokens and the high-resolution tokens are two graphs, each keeping its share of
    ``keep`` (:func:`methods.crop_budgets` over the two; the original: ``int(0.5 * 576)`` and
    ``int(0.5 * rows * cols)``); the row-end newline tokens, which the original always keeps and
    leaves out of both graphs, are no visual tokens here (never pruned).
    """
    hyper = dict(similarity=similarity, temperature=temperature, iterations=iterations)
    if ctx.crops is None:
        return gprune_scores(ctx.features, **hyper).topk(keep).indices
    base, *high = crop_rows(ctx)
    parts = [base, torch.cat(high).sort().values] if high else [base]
    picks = [
        r[gprune_scores(ctx.features[r], **hyper).topk(t).indices]
        for r, t in zip(parts, crop_budgets([int(r.numel()) for r in parts], keep))
        if t > 0
    ]
    return torch.cat(picks)
