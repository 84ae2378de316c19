"""FastV: prune visual tokens by the attention they receive from the last prompt token."""

from __future__ import annotations

import torch

from methods import PruneContext, register_prune


@register_prune(
    "fastv_intra_llm",
    stage="intra_llm",
    needs=("last_query_attention_prev",),
    source="pkunlp-icler/FastV",
    paper="https://arxiv.org/abs/2403.06764",
    deviation="Kept tokens are sorted (UniPruneBench kept topk order); scores come from layer K-1's "
    "q/k under sdpa instead of an eager re-run.",
)
def fastv(ctx: PruneContext, keep: int) -> torch.Tensor:
    """Keep the visual tokens most attended by the last prompt token at the previous layer.

    As the original (`LlamaModel.forward`, inplace branch): layer K-1's attention probabilities,
    mean over heads, row of the last sequence token, image columns, top-`keep`. The engine
    computes that one attention row from layer K-1's own queries and keys (RoPE applied, softmax
    over the whole causal row), so no eager pass is needed; positions of kept tokens are kept.
    """
    attn = ctx["last_query_attention_prev"]  # [H, N]
    return attn.float().mean(dim=0).topk(keep).indices
