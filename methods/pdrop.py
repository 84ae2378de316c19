"""PyramidDrop: staged visual-token dropping by the last instruction token's attention (Xing et al., CVPR 2025)."""

from __future__ import annotations

import torch

from methods import PruneContext, register_prune


def _up(t: torch.Tensor) -> torch.Tensor:
    """``t`` in at least fp32 (fp64 stays fp64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


# The original schedule (layer_list [8, 16, 24], image_token_ratio_list [0.5, 0.25, 0.125], lambda=0.5).
PDROP_LAYER_SPECS = "8:pdrop_intra_llm:0.5;16:pdrop_intra_llm:0.25;24:pdrop_intra_llm:0.125"


@register_prune(
    "pdrop_intra_llm",
    stage="intra_llm",
    needs=("last_query_attention_self",),
    source="Cooperx521/PyramidDrop",
    paper="https://arxiv.org/abs/2410.17247",
    deviation="Layer l's own q/k (UniPruneBench used layer l-1's, FastV-style) and ratios of the original N "
    "via the layer specs (UniPruneBench: r, r^2, r^3 at 6/12/18); positions kept, not renumbered. Named alone "
    "(PRUNE_METHOD_INTRA_LLM) it is ONE cut at layer 2; the original's schedule is INTRA_LLM_LAYER_SPECS="
    "'8:pdrop_intra_llm:0.5;16:pdrop_intra_llm:0.25;24:pdrop_intra_llm:0.125'.",
)
def pdrop(ctx: PruneContext, keep: int) -> torch.Tensor:
    """Keep the visual tokens most attended by the last instruction token under this layer's own q/k.

    Paper: https://arxiv.org/abs/2410.17247

    As the original (``llava/model/modeling_llama_pdrop.py :: pdrop_rank_drop``, called after
    layer l-1 with ``rank_layer = layer_idx + 1``): apply layer l's ``input_layernorm``, ``q_proj``,
    ``k_proj`` and RoPE to the current sequence, take the row of the last prompt token
    (``prompt_len + image_tokens - 1``), causal softmax in fp32, mean over heads, image columns,
    top-``keep``. The engine supplies that row as ``ctx["last_query_attention_self"]`` ``[H, N]``.

    Schedule. The original drops at the input of 0-based layers 8, 16 and 24 to
    ``int(N * ratio)`` of the ORIGINAL ``N``, ratios 0.5, 0.25, 0.125 (lambda = 0.5). Reproduce it with::

        INTRA_LLM_LAYER_SPECS="8:pdrop_intra_llm:0.5;16:pdrop_intra_llm:0.25;24:pdrop_intra_llm:0.125"

    (:data:`PDROP_LAYER_SPECS`; spec ratios are fractions of the original count, as in the
    original). The counts follow the harness budget ``max(1, round-half-up(N * ratio))``, which
    equals ``int(N * ratio)`` for N = 576 (288/144/72) but can be one more for other N.

    Deviation. The original renumbers the position ids of the shortened sequence to 0..L'-1 after
    every stage (and shifts decode positions accordingly); this harness keeps every survivor's
    original position, as FastV does.
    """
    attn = ctx["last_query_attention_self"]  # [H, N]
    return _up(attn).mean(dim=0).topk(keep).indices
