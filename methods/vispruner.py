"""VisPruner: important tokens by [CLS] attention plus diverse tokens by similarity pruning (Zhang et al., ICCV 2025).

Registered as ``vispruner_pre_llm`` for LLaVA (the engine captures the ViT's [CLS] attention and
features during the one vision pass); Qwen2.5-VL's and InternVL's encoders have no [CLS] token, so
the configuration refuses them. On LLaVA-NeXT each crop selects its own share (the original's v1_6
path runs ``encode_images`` on every crop with T each; ``docs/llava_next.md``).
:func:`vispruner_select` is the selection on explicit tensors. Paper:
https://arxiv.org/abs/2412.01818; original: Theia-4869/VisPruner @aefa01a,
``llava/model/llava_arch.py :: encode_images`` (l.141) and ``clip_encoder.py :: feature_select``.
"""

from __future__ import annotations

from typing import Annotated

import torch

from methods import PruneContext, Range, register_prune, select_per_crop


def _up(t: torch.Tensor) -> torch.Tensor:
    """``t`` in at least fp32 (fp64 stays fp64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def vispruner_select(
    vit_features: torch.Tensor, cls_attention: torch.Tensor, keep: int, *, important_ratio: float = 0.5
) -> torch.Tensor:
    """The ``keep`` tokens VisPruner retains (``visual_token_num`` T in the original).

    Args:
        vit_features: ``[N, C]`` the ViT's penultimate patch features (``hidden_states[-2][:, 1:]``,
            before the projector).
        cls_attention: ``[H, N]`` the [CLS] row of the same layer's attention over the patches
            (``attentions[-2][:, :, 0, 1:]``), or ``[N]`` already averaged over heads.
        keep: tokens to keep, T.
        important_ratio: r, the share of T chosen by attention (0.5 in the CLI and the scripts).

    Returns:
        ``[keep]`` token indices, ascending (the original returns a mask in spatial order).

    As the original: T_imp = ``int(T * r)`` tokens with the highest head-mean [CLS] attention
    (argsort descending); the rest, in that same descending order, is the residual. While the
    residual holds more than T_div = T - T_imp tokens, with ``r' = min(8, R - T_div)``: split the
    residual into a = residual[0::2] and b = residual[1::2], score each a by its maximum cosine
    similarity to any b, drop the r' a-tokens with the highest score, and continue with
    [kept a (in descending-score order), b].

    Odd residual (the original's batched index ``expand(-1, R // 2 - r)`` fails when R is odd,
    which cannot happen for N = 576 with an even T_imp but can for any N): a has ceil(R/2) tokens
    and all ``ceil(R/2) - r'`` survivors of a are kept, i.e. exactly r' tokens are dropped per
    round as for even R. If a holds fewer than r' tokens (tiny residuals) all of a is dropped and
    the loop goes on, so exactly T_div residual tokens remain in every case.
    """
    n = vit_features.shape[0]
    if not 0 < keep <= n:
        raise ValueError(f"keep must be in [1, {n}], got {keep}")
    attn = _up(cls_attention)
    if attn.dim() == 2:
        attn = attn.mean(dim=0)  # [N]
    n_important = int(keep * important_ratio)
    n_diverse = keep - n_important
    order = attn.argsort(descending=True)  # [N]
    important, residual = order[:n_important], order[n_important:]

    x = _up(vit_features)
    x = x / x.norm(dim=-1, keepdim=True)  # [N, C]
    while n_diverse > 0:
        r = min(8, residual.numel() - n_diverse)
        if r <= 0:
            break
        a, b = residual[0::2], residual[1::2]
        scores = (x[a] @ x[b].T).max(dim=-1).values  # [len(a)]
        distinct = scores.argsort(descending=True)[r:]  # a-tokens kept, in descending-score order
        residual = torch.cat([a[distinct], b])
    selected = torch.cat([important, residual]) if n_diverse > 0 else important
    return selected.sort().values


@register_prune(
    "vispruner_pre_llm",
    stage="pre_llm",
    needs=("vit_features", "vit_cls_attention"),
    families=("llava", "llava_next"),
    source="Theia-4869/VisPruner",
    paper="https://arxiv.org/abs/2412.01818",
    deviation="Not in UniPruneBench's code release; odd residuals handled (the original's expand fails). "
    "LLaVA-NeXT: T per crop, budget(N, r) split over the crops in proportion to their tokens, among the tokens "
    "the unpadding keeps (original: T of 576 per crop, no unpad, no newlines). docs/llava_next.md",
    refusal="it ranks patches by the ViT's [CLS] attention, and this family's vision encoder has no [CLS] token",
)
def vispruner(ctx: PruneContext, keep: int, *, important_ratio: Annotated[float, Range(gt=0, le=1)] = 0.5) -> torch.Tensor:
    """Keep important tokens by ViT [CLS] attention, then diverse ones by similarity pruning.

    ``keep`` is the original's ``visual_token_num``; the selection (a mask in the original) is
    applied to the projected tokens, as in the original's ``encode_images``. LLaVA-NeXT
    (``ctx.crops``): each crop selects its share of ``keep`` (:func:`methods.select_per_crop`) among
    its own tokens, as the original runs ``encode_images`` on every crop.
    """
    features, attention = ctx["vit_features"], ctx["vit_cls_attention"]
    if ctx.crops is None:
        return vispruner_select(features, attention, keep, important_ratio=important_ratio)
    return select_per_crop(
        ctx, keep, lambda c, rows, t: vispruner_select(features[rows], attention[:, rows], t, important_ratio=important_ratio)
    )
