"""VisionZip: dominant tokens by ViT attention plus merged contextual tokens (Yang et al., CVPR 2025).

Registered as ``visionzip_pre_llm``; what it computes depends on the family, as in the originals
(see ``docs/methods_vit.md``). Paper: https://arxiv.org/abs/2412.04467.

**LLaVA-1.5** (dvlab-research/VisionZip @3151f6d, ``visionzip/clip_encoder.py ::
CLIPVisionTower_VisionZip.forward``, ``visionzip/utils.py`` (the key ``metric`` of layer -2) and
``visionzip/main.py`` (``dominant`` counts the [CLS] token)): the engine captures the feature
layer's [CLS] attention, head-mean keys, patches and [CLS] state during the one vision pass, and the
method projects its ViT-space tokens with the model's projector (the original selects and merges
before the projector). :func:`visionzip_select` is the selection and merge on explicit tensors.
``KEEP_RATIO`` gives the output size T = ``budget(N, r)``, [CLS] included, as the original's
``dominant + contextual``; contextual = ``round(T * 10/64)`` (the paper's 54+10, 108+20, 162+30 for
64/128/192 tokens). The [CLS] token, which the original outputs first, takes the sequence slot of
the FIRST image token left over; dominant patches and contextual tokens stay at their own patch's
position (a contextual token at its target's), in spatial order with original position ids, where
the original feeds [CLS], dominant (spatial), then contextual tokens with sequential positions.

**Qwen2.5-VL** (the author's adaptation, not in the VisionZip snapshot: JulietChoo/VisionSelector
@800a70f ``qwen-evaluation/token_compression/visionzip_official.py``, l.1923-1979 and the vision
tower's forward): :func:`visionzip_qwen_select`. Scores: the attention each merged token receives
in the LAST ViT block (head mean, summed over the queries, mean over its 2x2 merge unit), keys of
the same block (post-rotary, unit mean, head mean); ``int((r - 0.05) N)`` dominant tokens and
``max(int(0.05 N), 1)`` contextual ones merged in LLM-embedding space (after the merger), each
replacing its target in place; kept tokens keep their mRoPE ids. Counts follow the original's
arithmetic from the ratio (``ctx.ratio``), not ``budget``. Differences: the attention is the
block's own (per image in a full-attention block), where the original's FA2 path recomputes it
without a mask, so several images in one prompt attend to each other (its eager path keeps the
mask; for one image the two agree); and each image is pruned on its own, where the original
selects over all images' tokens at once.

**LLaVA-NeXT**: the original runs its CLIP tower on every crop (the base image and the high-resolution
crops as one batch), each giving [CLS] + dominant + contextual with the same counts; its
``restore_image_features_sorted`` puts the base crop's tokens first, then the other crops' dominant
tokens in the stitched raster, their [CLS] tokens, their contextual tokens (no unpad, no newline).
Here every crop is a LLaVA-1.5 image of its own: its share of ``budget(N, r)``
(:func:`methods.crop_budgets`, so 64 each for five full crops at 0.111), among its tokens the
unpadding keeps, its [CLS] in the first of its left-over slots (``docs/llava_next.md``).

**InternVL3** (OURS): InternViT has a [CLS] token but drops it before the pixel shuffle, so no
[CLS] token reaches the LLM and a patch-level selection has no LLM token of its own. The Qwen
computation transfers unchanged at the level of LLM tokens: the last InternViT layer's received
attention (per tile, all 1 + P query rows, [CLS] column dropped) and keys, averaged over each
pixel-shuffle unit; the image's tiles are selected together (one budget per image).
"""

from __future__ import annotations

from typing import Annotated, NamedTuple

import torch

from methods import PruneContext, Range, crop_budgets, crop_rows, register_prune


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
    patches = vit_hidden[1:]
    dom_idx, rest_idx = _split(_up(cls_attention).sum(dim=0), n_dom)
    targets, ctx_tokens = visionzip_contextual(patches[rest_idx], keys[1:][rest_idx], contextual)
    indices = torch.cat([dom_idx, rest_idx[targets]])
    return VisionZipOutput(indices, torch.cat([patches[dom_idx], ctx_tokens]), vit_hidden[0])


def _split(scores: torch.Tensor, n_dom: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dominant [n_dom], rest [N - n_dom])``, both ascending: the top-``n_dom`` of ``scores``
    ``[N]`` and the others (the original's boolean masks), without a host sync."""
    is_dom = torch.zeros(scores.shape[0], dtype=torch.int8, device=scores.device)
    is_dom[scores.topk(n_dom).indices] = 1
    order = torch.argsort(is_dom, stable=True)  # the rest ascending, then the dominant ascending
    r = scores.shape[0] - n_dom
    return order[r:], order[:r]


def visionzip_contextual(hidden: torch.Tensor, keys: torch.Tensor, contextual: int) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip's contextual tokens from the ``R`` non-dominant tokens, in their ascending order.

    Args:
        hidden: ``[R, C]`` their states (LLaVA: CLIP ``hidden_states[-2]``; Qwen: the merger output).
        keys: ``[R, hd]`` their keys averaged over heads (the original's ``metric`` / ``attn_key``).
        contextual: the number of contextual tokens.

    Returns:
        ``(targets [c], tokens [c, C])``: positions in the R-list of the targets,
        ``range(0, R, max(1, R // c))[:c]``, and their merged tokens. Every other token joins its most
        similar target by cosine of the L2-normalised keys (argmax: first on ties); a contextual token
        is ``h_target + mean(h of its members)`` (the target is not in the mean; a target with no
        member stays as it is). ``c = min(contextual, R)``: the guard the original lacks (with fewer
        than ``contextual`` tokens its shapes would not broadcast).
    """
    r = hidden.shape[0]
    n_ctx = min(contextual, r)
    if n_ctx == 0:
        return torch.zeros(0, dtype=torch.long, device=hidden.device), hidden[:0]
    m = _up(keys)
    m = m / m.norm(dim=-1, keepdim=True)  # [R, hd]
    step = max(1, r // n_ctx)
    targets = torch.arange(0, r, step, device=m.device)[:n_ctx]  # positions in the rest list
    is_target = torch.zeros(r, dtype=torch.int8, device=m.device)
    is_target[targets] = 1
    others = torch.argsort(is_target, stable=True)[: r - n_ctx]  # the non-targets, ascending
    assign = (m[others] @ m[targets].T).argmax(dim=1)  # [R - c] target slot of each other token
    h = _up(hidden)
    sums = torch.zeros(n_ctx, h.shape[1], dtype=h.dtype, device=h.device).index_add_(0, assign, h[others])
    counts = torch.zeros(n_ctx, dtype=h.dtype, device=h.device).index_add_(0, assign, torch.ones_like(h[others, 0]))
    tokens = h[targets] + sums / counts.clamp(min=1).unsqueeze(-1)
    return targets, tokens.to(hidden.dtype)


QWEN_CONTEXTUAL = 0.05  # the Qwen adaptation's contextual share of N (hard-coded there)


def visionzip_qwen_select(
    features: torch.Tensor, attention: torch.Tensor, keys: torch.Tensor, ratio: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip as its author's Qwen2.5-VL adaptation computes it, on one image's merged tokens.

    Args:
        features: ``[N, D]`` the merger's output (LLM-embedding space), in token order.
        attention: ``[N]`` the attention each token receives in the last ViT block: head mean,
            summed over the queries, mean over its 2x2 merge unit (the original's ``attn_logits``).
        keys: ``[N, hd]`` the same block's keys, mean over each unit and over heads (``attn_key``).
        ratio: the kept fraction (the original's ``budget``).

    Returns:
        ``(indices [d + c], features [d + c, D])``: the ``d = int((ratio - 0.05) N)`` tokens with the
        highest attention (the dominant ones, unchanged), then the ``c = max(int(0.05 N), 1)``
        contextual targets (:func:`visionzip_contextual` over the non-dominant tokens, merged in
        LLM space), each replacing its target token in place.
    """
    n = features.shape[0]
    n_dom = min(n, max(0, int((ratio - QWEN_CONTEXTUAL) * n)))
    n_ctx = max(int(QWEN_CONTEXTUAL * n), 1)
    dom_idx, rest_idx = _split(_up(attention), n_dom)
    targets, tokens = visionzip_contextual(features[rest_idx], keys[rest_idx], n_ctx)
    return torch.cat([dom_idx, rest_idx[targets]]), torch.cat([features[dom_idx], tokens])


def _layers(family: str, args: dict) -> dict[str, tuple[int, ...]]:
    # Qwen2.5-VL / InternVL: the last ViT block's received attention and keys; LLaVA: the plain needs.
    return {} if family in ("llava", "llava_next") else {"vit_attention_received": (-1,), "vit_unit_keys": (-1,)}


@register_prune(
    "visionzip_pre_llm",
    stage="pre_llm",
    needs={
        "llava": ("vit_features", "vit_cls_feature", "vit_cls_attention", "vit_feature_keys", "vit_projector"),
        "llava_next": ("vit_features", "vit_cls_feature", "vit_cls_attention", "vit_feature_keys", "vit_projector"),
        "qwen2_5_vl": ("vit_attention_received", "vit_unit_keys"),
        "internvl": ("vit_attention_received", "vit_unit_keys"),
    },
    vit_layers=_layers,
    exact_count=False,
    families=("llava", "llava_next", "qwen2_5_vl", "internvl"),
    source="dvlab-research/VisionZip",
    paper="https://arxiv.org/abs/2412.04467",
    deviation=(
        "Not in UniPruneBench's code release. LLaVA: budget = [CLS] + dominant + contextual (contextual 10/64 of it, "
        "the paper's split); [CLS] takes the first left-over slot; tokens in spatial order at their own "
        "positions (original: [CLS], dominant, contextual, sequential positions). Qwen2.5-VL: the author's "
        "adaptation exactly (int((r-0.05)N) + max(int(0.05N),1) tokens); attention under the per-image mask "
        "(its FA2 path lets several images attend to each other); per image (it selects over all images at "
        "once). InternVL (OURS): the Qwen computation on InternViT's last layer, per pixel-shuffle unit, tiles "
        "of an image together. LLaVA-NeXT: the LLaVA computation per crop ([CLS] + dominant + contextual of each "
        "crop), budget(N, r) split over the crops in proportion to their tokens, among the tokens the unpadding keeps; "
        "each crop's [CLS] in one of its left-over slots (original: the same counts for every crop, no unpad, "
        "no newlines, crops' [CLS] and contextual tokens after the dominant ones)."
    ),
)
def visionzip(
    ctx: PruneContext, keep: int, *, contextual_ratio: Annotated[float, Range(ge=0, lt=1)] = 10 / 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the tokens the ViT attends to most (dominant), plus contextual tokens merged by key similarity.

    LLaVA: ``keep`` is the original's ``dominant + contextual`` ([CLS] included); ``contextual_ratio``
    is the contextual share of it (``round(keep * contextual_ratio)``, at most ``keep - 1``).
    Dominant patches keep their projected features; contextual tokens and [CLS] go through
    ``ctx["vit_projector"]``. Qwen2.5-VL and InternVL: :func:`visionzip_qwen_select` at the
    event's ratio (``contextual_ratio`` does not apply: the adaptation fixes 0.05 N).
    """
    if ctx.family in ("qwen2_5_vl", "internvl"):
        received = ctx["vit_attention_received"][-1].mean(dim=0)  # [N]: head mean of the sum over queries
        return visionzip_qwen_select(ctx.features, received, ctx["vit_unit_keys"][-1], ctx.ratio)
    if not 0.0 <= contextual_ratio < 1.0:
        raise ValueError(f"contextual_ratio must be in [0, 1), got {contextual_ratio}")
    cls, patches, attention, keys = ctx["vit_cls_feature"], ctx["vit_features"], ctx["vit_cls_attention"], ctx["vit_feature_keys"]
    if ctx.crops is None:
        return _llava(ctx.features, cls, patches, attention, keys, keep, contextual_ratio, ctx["vit_projector"])
    # LLaVA-NeXT: every crop as one LLaVA-1.5 image (its [CLS], its patches, its share of keep);
    # cls [crops, C], keys [crops + N, hd] (the crops' [CLS] keys first).
    rows = crop_rows(ctx)
    k = ctx.crops.n_crops
    indices, features = [], []
    for c, (r, t) in enumerate(zip(rows, crop_budgets([int(r.numel()) for r in rows], keep))):
        if t == 0:
            continue
        crop_keys = torch.cat([keys[c : c + 1], keys[k + r]])
        i, f = _llava(ctx.features[r], cls[c], patches[r], attention[:, r], crop_keys, t, contextual_ratio, ctx["vit_projector"])
        indices.append(r[i])
        features.append(f)
    return torch.cat(indices), torch.cat(features)


def _llava(
    features: torch.Tensor, cls: torch.Tensor, patches: torch.Tensor, attention: torch.Tensor, keys: torch.Tensor,
    keep: int, contextual_ratio: float, projector,
) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip on one CLIP image (LLaVA-1.5's image, or one LLaVA-NeXT crop) of ``n`` tokens:
    ``features`` ``[n, D]`` projected, ``cls`` ``[C]``, ``patches`` ``[n, C]``, ``attention`` ``[H, n]``,
    ``keys`` ``[1 + n, hd]``; ``(indices [<= keep], features)`` (see :func:`visionzip`)."""
    n_ctx = min(keep - 1, int(keep * contextual_ratio + 0.5))
    hidden = torch.cat([cls.unsqueeze(0), patches])  # [1 + n, C]
    out = visionzip_select(hidden, attention, keys, dominant=keep - n_ctx, contextual=n_ctx)
    n_dom = keep - n_ctx - 1  # patches; out.indices = [dominant (n_dom), contextual (n_ctx)]
    n, k = features.shape[0], out.indices.shape[0]
    taken = torch.zeros(n, dtype=torch.uint8, device=out.indices.device)
    taken[out.indices] = 1
    # [1] the first token left over carries [CLS] (a stable sort of the taken mask, no nonzero); the
    # indices are distinct, so one is left over iff k < n.
    slot = torch.sort(taken, stable=True).indices[: min(1, n - k)]
    projected = projector(torch.cat([out.features[n_dom:], out.cls_feature.unsqueeze(0)]))
    merged = torch.cat([features[out.indices[:n_dom]], projected.to(features.dtype)])
    # No token left over (the crop keeps all its tokens): [CLS] has no slot and is dropped.
    return torch.cat([out.indices, slot]), merged[: out.indices.shape[0] + slot.shape[0]]
