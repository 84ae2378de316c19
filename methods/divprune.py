"""DivPrune: diversity-based visual token pruning (Alvar et al., CVPR 2025)."""

from __future__ import annotations

import torch

from methods import PruneContext, register_prune


@register_prune(
    "divprune_pre_llm",
    stage="pre_llm",
    source="vbdi/divprune",
    paper="https://arxiv.org/abs/2503.02175",
    deviation="Same selection (a guard skips already-chosen tokens, which only matters for exact duplicates); kept count "
    "follows the harness budget max(1, round-half-up(N*r)); kept tokens keep their positions (the original renumbers "
    "the shortened sequence); one selection per image (UniPruneBench: InternVL tile 0 and the other tiles apart).",
)
def divprune(ctx: PruneContext, keep: int) -> torch.Tensor:
    """Greedy max-min diversity on cosine distance of the projected visual tokens.

    As the original (`LLaVA/llava/model/llava_arch.py :: DivPrune`): with D = 1 - cos(X, X),
    the first pick is the token whose nearest neighbour is farthest (argmax of each column's
    second-smallest entry, the smallest being the token itself); every later pick is
    argmax_j min_{s in selected} D[s, j]; ties go to the first index (torch.argmax).

    One guard the original lacks: already-selected tokens are excluded from later picks. The
    original leaves them in with a score of ~0 (their distance to themselves), which only matters
    when every remaining token duplicates a selected one; it would then pick a token twice, while
    this port picks the first remaining one and so always returns `keep` distinct tokens.
    """
    x = ctx.features.float()
    x = x / x.norm(dim=1, keepdim=True)
    dist = 1.0 - x @ x.T  # [N, N]
    chosen = torch.zeros(ctx.n, dtype=torch.bool, device=x.device)
    picks = torch.empty(keep, dtype=torch.long, device=x.device)
    # First pick: each column's second-smallest distance (its nearest neighbour other than itself).
    scores = dist.topk(2, dim=0, largest=False).values[1] if ctx.n > 1 else dist[0]
    # One device step a pick, no host sync: the pick stays a [1] tensor (index_select / scatter,
    # never a Python index), so the loop only queues kernels.
    min_dist = None
    pick = None
    for i in range(keep):
        if i > 0:
            row = dist.index_select(0, pick)[0]
            min_dist = row if min_dist is None else torch.minimum(min_dist, row)
            scores = min_dist.masked_fill(chosen, float("-inf"))
        pick = torch.argmax(scores).view(1)
        picks[i : i + 1] = pick
        chosen.index_fill_(0, pick, True)
    return picks
