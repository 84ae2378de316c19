"""Random selection: UniPruneBench's baseline, at either stage."""

from __future__ import annotations

import torch

from methods import PruneContext, register_prune

_SOURCE = "TianfanPeng/VLMUniPruneBench"
_PAPER = "https://arxiv.org/abs/2511.02650"


def _random(ctx: PruneContext, keep: int) -> torch.Tensor:
    # Drawn on the CPU from the engine's seeded generator (PRUNE_SEED): the same seed and the same
    # sequence of prompts give the same selections on every device.
    return torch.randperm(ctx.n, generator=ctx.generator)[:keep].to(ctx.features.device)


@register_prune(
    "random_pre_llm",
    stage="pre_llm",
    source=_SOURCE,
    paper=_PAPER,
    deviation="Seeded (PRUNE_SEED) and sorted on every family (the seed left InternVL unsorted); round-half-up "
    "budget (theirs: max(1, int(N*r))); one draw per image (UniPruneBench: InternVL tile 0 and the other tiles apart).",
)
def random_pre_llm(ctx: PruneContext, keep: int) -> torch.Tensor:
    """Keep `keep` visual tokens drawn uniformly at random after the projector."""
    return _random(ctx, keep)


@register_prune(
    "random_intra_llm",
    stage="intra_llm",
    source=_SOURCE,
    paper=_PAPER,
    deviation="Seeded; keeps max(1, round(N*r)) like every method (the seed's int(N*r) could keep 0).",
)
def random_intra_llm(ctx: PruneContext, keep: int) -> torch.Tensor:
    """Keep `keep` visual tokens drawn uniformly at random at a decoder layer's input."""
    return _random(ctx, keep)
