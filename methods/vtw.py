"""VTW, Visual Tokens Withdrawal (Lin et al., AAAI 2025): every visual token leaves at layer K."""

from __future__ import annotations


import torch
import torch.nn.functional as F

from methods import PruneContext, register_prune

# The original's thresholds on the mean KL (lmms-evaluation/lmms_eval/__main__.py, --findk).
VTW_ETA = {"llava-1.5-7b": 0.003, "llava-1.5-13b": 0.0005, "llava-1.6-7b": 0.0001}


@register_prune(
    "vtw_intra_llm",
    stage="intra_llm",
    uses_ratio=False,
    default_layer=16,
    source="lzhxmu/VTW",
    paper="https://arxiv.org/abs/2405.05803",
    deviation="Not in UniPruneBench's code release; K defaults to the lmms-eval CLI's 16 (find it "
    "per model with scripts/vtw_find_k.py).",
)
def vtw(ctx: PruneContext, keep: int) -> torch.Tensor:
    """Withdraw all visual tokens at the input of layer K (prefill only); the rest keep their positions.

    As the original (``VTWLlamaModel.forward``, ``pe_type="keep"``): layers below K keep the visual
    KV cache, layers from K on see only the text. All or nothing, so it takes no ratio: configure it
    as ``INTRA_LLM_LAYER_SPECS="16:vtw_intra_llm"`` (or ``PRUNE_METHOD_INTRA_LLM=vtw_intra_llm`` for
    K=16); the trace reports 0 kept tokens from K on.
    """
    return torch.empty(0, dtype=torch.long, device=ctx.features.device)


def vtw_kl(full_logits: torch.Tensor, withdrawn_logits: torch.Tensor) -> float:
    """The original's ``KLDivLoss(reduction="batchmean")(log_softmax(full), softmax(withdrawn))``,
    i.e. KL(P_withdrawn || P_full), on last-position logits ``[B, V]`` (or ``[V]``)."""
    full, withdrawn = full_logits.float().reshape(-1, full_logits.shape[-1]), withdrawn_logits.float()
    withdrawn = withdrawn.reshape(-1, withdrawn.shape[-1])
    return float(F.kl_div(full.log_softmax(-1), withdrawn.softmax(-1), reduction="batchmean"))


def vtw_pick_layer(kl: torch.Tensor, eta: float, start: int = 5) -> int | None:
    """K from a KL matrix ``[n_samples, n_candidates]`` whose column ``j`` is withdrawal at layer
    ``start + j``: ``start`` + the first column whose mean over samples is <= ``eta`` (the original's
    rule); ``None`` when no layer qualifies."""
    means = kl.double().mean(dim=0)
    ok = torch.nonzero(means <= eta).flatten()
    return start + int(ok[0]) if ok.numel() else None


__all__ = ["vtw", "vtw_kl", "vtw_pick_layer", "VTW_ETA"]
