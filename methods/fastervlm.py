"""FasterVLM: keep the patches the ViT's [CLS] token attends to most (Zhang et al., 2024).

Registered as ``fastervlm_pre_llm`` for LLaVA: the engine captures the feature layer's [CLS]
attention during the one vision pass (``vit_cls_attention``, the ``attentions[-2][:, :, 0, 1:]``
the original asks CLIP for with ``output_attentions=True``, recomputed from that layer's own q/k).
On LLaVA-NeXT every crop keeps its own top-T by its own [CLS] attention, as the original's v1_6
path (``docs/llava_next.md``). Qwen2.5-VL's and InternVL3's encoders have no [CLS] token: the
configuration refuses them.
:func:`fastervlm_select` is the selection on explicit tensors. Paper:
https://arxiv.org/abs/2412.01818v1 ("[CLS] Attention is All You Need for Training-Free Visual
Token Pruning", v1; v2 of the same arXiv id is VisPruner); original: Theia-4869/FasterVLM @f5d5f12, ``llava/model/llava_arch.py :: encode_images``
and ``llava/model/multimodal_encoder/clip_encoder.py :: feature_select``.
"""

from __future__ import annotations

import torch

from methods import PruneContext, register_prune, select_per_crop


def fastervlm_select(cls_attention: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` patches FasterVLM retains (``--visual-token-num`` T in the original).

    Args:
        cls_attention: ``[H, N]`` the [CLS] row of the feature layer's attention over the patches
            (``attentions[-2][:, :, 0, 1:]``), or ``[N]`` already averaged over heads.
        keep: T.

    Returns:
        ``[keep]`` patch indices in descending attention order (the original turns them into a
        mask, i.e. spatial order; the engine sorts).

    As ``encode_images``: the head mean of the [CLS] attention, ``topk(T)``; the mask is applied to
    the projected features (selection before, projection of all tokens after: the same tokens).
    Computed in fp32 (the original casts the attention to the image dtype, fp16, before the mean;
    near-ties can flip in half precision).
    """
    attn = cls_attention.to(torch.promote_types(cls_attention.dtype, torch.float32))
    if attn.dim() == 2:
        attn = attn.mean(dim=0)  # [N]
    if not 0 < keep <= attn.shape[0]:
        raise ValueError(f"keep must be in [1, {attn.shape[0]}], got {keep}")
    return attn.topk(keep).indices


@register_prune(
    "fastervlm_pre_llm",
    stage="pre_llm",
    needs=("vit_cls_attention",),
    families=("llava", "llava_next"),
    source="Theia-4869/FasterVLM",
    paper="https://arxiv.org/abs/2412.01818v1",
    deviation="Not in UniPruneBench's code release. T = budget(N, KEEP_RATIO) per image; head-mean [CLS] "
    "attention of the feature layer from its own q/k under sdpa (the original asks CLIP for eager attentions); "
    "own positions (original: sequential). LLaVA-NeXT: T per crop, budget(N, r) split over the crops in "
    "proportion to their tokens, among the tokens the unpadding keeps (original: T of 576 per crop, no unpad, no "
    "newlines). docs/methods_text.md, docs/llava_next.md",
    refusal="it ranks patches by the ViT's [CLS] attention, and this family's vision encoder has no [CLS] token",
)
def fastervlm(ctx: PruneContext, keep: int) -> torch.Tensor:
    """Keep the patches with the highest head-mean ViT [CLS] attention at the feature layer.

    ``keep`` is the original's ``visual_token_num`` T (``budget(N, KEEP_RATIO)``); the kept
    projected tokens keep their own positions, in spatial order as the original's mask. LLaVA-NeXT
    (``ctx.crops``): each crop keeps its share of ``keep`` (:func:`methods.select_per_crop`) by its
    own [CLS] attention, as the original's ``encode_images`` does per crop (T each).
    """
    attention = ctx["vit_cls_attention"]  # [H, N]
    if ctx.crops is None:
        return fastervlm_select(attention, keep)
    return select_per_crop(ctx, keep, lambda c, rows, t: fastervlm_select(attention[:, rows], t))
