"""VisionZip: dominant tokens by [CLS] attention plus merged contextual tokens (Yang et al., CVPR 2025).

Registered as ``visionzip_pre_llm`` for LLaVA: the engine captures the feature layer's [CLS]
attention, head-mean keys, patches and [CLS] state during the one vision pass, and the method
projects its ViT-space tokens with the model's projector (the original selects and merges before
the projector). Qwen2.5-VL's and InternVL's encoders have no [CLS] token: the configuration refuses
them. :func:`visionzip_select` is the selection and merge on explicit tensors. Paper:
https://arxiv.org/abs/2412.04467; original: dvlab-research/VisionZip @3151f6d,
``visionzip/clip_encoder.py :: CLIPVisionTower_VisionZip.forward``, ``visionzip/utils.py`` (the
key ``metric`` of layer -2) and ``visionzip/main.py`` (``dominant`` counts the [CLS] token).

In the harness (:func:`visionzip`): ``KEEP_RATIO`` gives the output size T = ``budget(N, r)``,
[CLS] included, as the original's ``dominant + contextual``; contextual = ``round(T * 10/64)``
(the paper's 54+10, 108+20, 162+30 for 64/128/192 tokens). The [CLS] token, which the original
outputs first, takes the sequence slot of the FIRST image token left over; dominant patches and
contextual tokens stay at their own patch's position (a contextual token at its target's), in
spatial order with original position ids, where the original feeds [CLS], dominant (spatial),
then contextual tokens with sequential positions.
"""

from __future__ import annotations

from typing import Annotated, NamedTuple

import torch

from methods import PruneContext, Range, register_prune


def _up(t: torch.Tensor) -> torch.Tensor:
    """``t`` in at least fp32 (fp64 stays fp64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class VisionZipOutput(NamedTuple):
    """``indices [dominant - 1 + contextual]`` patch indices (0..N-1): the dominant patches ascending,
    then the contextual targets ascending; ``features`` ``[same, C]`` their (merged) features in that
    order; ``cls_feature`` ``[C]`` the [CLS] hidden state, which the original outputs FIRST (before
    the dominant patches), so its output has ``dominant + contextual`` tokens."""

    indices: torch.Tensor
    features: torch.Tensor
    cls_feature: torch.Tensor


def visionzip_select(
    vit_hidden: torch.Tensor,
    cls_attention: torch.Tensor,
    keys: torch.Tensor,
    *,
    dominant: int = 191,
    contextual: int = 30,
) -> VisionZipOutput:
    """VisionZip's dominant + contextual tokens.

    Args:
        vit_hidden: ``[N + 1, C]`` ``hidden_states[-2]`` of the CLIP tower (output of layer 22 of
            24), [CLS] first.
        cls_attention: ``[H, N]`` ``attentions[-2][:, 0, 1:]``: the [CLS] row of layer 22's attention
            over the patches, per head.
        keys: ``[N + 1, Dh]`` layer 22's raw keys (``k_proj`` output split into heads, before
            scaling) averaged over heads (``metric`` in the original), [CLS] first.
        dominant: the original's ``visionzip(model, dominant=191, contextual=30)`` defaults; the
            README uses 54/10 (64 tokens). ``dominant`` counts the [CLS] token: ``dominant - 1``
            patches are selected.
        contextual: number of contextual (merged) tokens.

    Returns:
        :class:`VisionZipOutput`.

    As the original: the ``dominant - 1`` patches with the highest [CLS] attention summed over
    heads are kept, in spatial order, after [CLS]. The R remaining patches (spatial order) are
    L2-normalised by their keys; the targets are ``range(0, R, max(1, R // contextual))[:contextual]``
    of that list; every other remaining patch goes to its most similar target (argmax, first on
    ties); contextual_t = h_t + mean of the hidden states assigned to t (the target itself is not
    in the mean; a target with none gets h_t). Guard the original lacks: with fewer remaining
    patches than ``contextual`` (its shapes would not broadcast), every remaining patch is a target.
    """
    n = vit_hidden.shape[0] - 1
    n_dom = dominant - 1
    if not 0 <= n_dom <= n:
        raise ValueError(f"dominant must be in [1, {n + 1}], got {dominant}")
    patches, metric = vit_hidden[1:], _up(keys[1:])
    top = _up(cls_attention).sum(dim=0).topk(n_dom).indices  # [n_dom]
    is_dom = torch.zeros(n, dtype=torch.bool, device=vit_hidden.device)
    is_dom[top] = True
    dom_idx = torch.nonzero(is_dom).flatten()  # ascending (masked_select order)
    rest_idx = torch.nonzero(~is_dom).flatten()  # [R]
    r = rest_idx.numel()
    n_ctx = min(contextual, r)
    if n_ctx == 0:
        return VisionZipOutput(dom_idx, patches[dom_idx], vit_hidden[0])

    m = metric[rest_idx]
    m = m / m.norm(dim=-1, keepdim=True)  # [R, Dh]
    step = max(1, r // n_ctx)
    targets = torch.arange(0, r, step, device=m.device)[:n_ctx]  # positions in the rest list
    is_target = torch.zeros(r, dtype=torch.bool, device=m.device)
    is_target[targets] = True
    others = torch.nonzero(~is_target).flatten()
    assign = (m[others] @ m[targets].T).argmax(dim=1)  # [R - n_ctx] target slot of each other token
    hidden = _up(patches[rest_idx])  # [R, C]
    sums = torch.zeros(n_ctx, hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
    sums.index_add_(0, assign, hidden[others])
    counts = torch.bincount(assign, minlength=n_ctx).clamp(min=1).unsqueeze(-1).to(hidden.dtype)
    ctx_tokens = (hidden[targets] + sums / counts).to(vit_hidden.dtype)  # [n_ctx, C]
    indices = torch.cat([dom_idx, rest_idx[targets]])
    return VisionZipOutput(indices, torch.cat([patches[dom_idx], ctx_tokens]), vit_hidden[0])


@register_prune(
    "visionzip_pre_llm",
    stage="pre_llm",
    needs=("vit_features", "vit_cls_feature", "vit_cls_attention", "vit_feature_keys", "vit_projector"),
    families=("llava",),
    source="dvlab-research/VisionZip",
    paper="https://arxiv.org/abs/2412.04467",
    deviation=(
        "Not in UniPruneBench's code release. Budget = [CLS] + dominant + contextual (contextual 10/64 of it, "
        "the paper's split); [CLS] takes the first left-over slot; tokens in spatial order at their own "
        "positions (original: [CLS], dominant, contextual, sequential positions)."
    ),
)
def visionzip(
    ctx: PruneContext, keep: int, *, contextual_ratio: Annotated[float, Range(ge=0, lt=1)] = 10 / 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep [CLS] and the patches it attends to most, plus contextual tokens merged by key similarity.

    ``keep`` is the original's ``dominant + contextual`` ([CLS] included); ``contextual_ratio`` is
    the contextual share of it (``round(keep * contextual_ratio)``, at most ``keep - 1``).
    Dominant patches keep their projected features; contextual tokens and [CLS] go through
    ``ctx["vit_projector"]``.
    """
    if not 0.0 <= contextual_ratio < 1.0:
        raise ValueError(f"contextual_ratio must be in [0, 1), got {contextual_ratio}")
    n_ctx = min(keep - 1, int(keep * contextual_ratio + 0.5))
    hidden = torch.cat([ctx["vit_cls_feature"].unsqueeze(0), ctx["vit_features"]])  # [1 + N, C]
    out = visionzip_select(
        hidden, ctx["vit_cls_attention"], ctx["vit_feature_keys"], dominant=keep - n_ctx, contextual=n_ctx
    )
    n_dom = keep - n_ctx - 1  # patches; out.indices = [dominant (n_dom), contextual (n_ctx)]
    free = torch.ones(ctx.n, dtype=torch.bool, device=out.indices.device)
    free[out.indices] = False
    slot = torch.nonzero(free).flatten()[:1]  # [1] the first image token left over carries [CLS]
    projected = ctx["vit_projector"](torch.cat([out.features[n_dom:], out.cls_feature.unsqueeze(0)]))
    features = torch.cat([ctx.features[out.indices[:n_dom]], projected.to(ctx.features.dtype)])
    return torch.cat([out.indices, slot]), features
