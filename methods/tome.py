"""ToMe: bipartite soft matching token merging inside the ViT (Bolya et al., ICLR 2023), as
ModelTC/LightCompress applies it to LLaVA-1.5's CLIP.

Registered as ``tome_pre_llm`` (:func:`tome`). Originals: facebookresearch/ToMe @af95e4b
``tome/merge.py :: bipartite_soft_matching, merge_wavg`` (the matching) and ``tome/patch/timm.py``;
ModelTC/LightCompress @9701d03 ``llmc/compression/token_reduction/tome.py`` (the same matching,
patched into every ``CLIPEncoderLayer`` of LLaVA's vision tower). Paper:
https://arxiv.org/abs/2210.09461.

What LightCompress computes in every CLIP layer (``tome_CLIPEncoderLayer_forward``):

* after the attention block and its residual, before ``layer_norm2`` / MLP: the layer's keys
  (``k_proj`` output, heads split, averaged over heads) are the metric;
* :func:`tome_match`: L2-normalise the metric; tokens at even positions are set A, odd ones set B;
  each A token's most similar B token (cosine) is its edge; the [CLS] token (A's first) never
  merges (its scores are -inf); the ``r`` A tokens with the highest edge scores merge into their B
  token; ``r`` is capped at ``(T - 1) // 2`` (T tokens, [CLS] included);
* :func:`tome_merge_mean`: ``merge_wavg`` with ``size=None`` at EVERY layer: each B token becomes
  the plain mean of itself and the A tokens merged into it (sizes are not carried to the next
  layer and there is no proportional attention: ToMe's timm patch carries both);
* the output order is [unmerged A tokens ascending ([CLS] first), all B tokens in order].

How it runs here:

* **LLaVA** (:class:`methods.ViTLayerMerge`, wired by ``custom_llava.LlavaFamily.install_vit_layer_merge``):
  the merge runs in every CLIP layer whose output reaches the feature layer (CLIP-L, feature
  ``hidden_states[-2]``: layers 0..22; LightCompress also merges in layer 23, whose output LLaVA
  never reads). A ``vision`` trace event then cuts each image's 576 placeholders to the merged count,
  a merged token at the slot (prompt position) of its group's LAST patch, in slot order (the
  original feeds the merged tokens in ToMe's output order with sequential positions).
* **KEEP_RATIO -> r** (:func:`tome_schedule`): the LLM should see ``budget(N, KEEP_RATIO)`` tokens
  an image, so the layers remove ``N - budget`` tokens in all, as evenly as possible (the first
  ``(N - budget) mod L`` layers one more), within the 50 % cap, taking more earlier when later caps
  would not suffice. CLIP-L (576 patches, 23 merging layers) reaches every budget >= 1 exactly.
  ``PRUNE_ARGS="r=16"`` instead runs LightCompress's constant ``r`` (``r: 16`` in its config: 576 - 23 x 16 =
  208 tokens reach the LLM, whatever KEEP_RATIO says).
* **Qwen2.5-VL / InternVL3: a labelled adaptation** (the ViT merge is skipped with a ``vision``
  note): Qwen's ViT attends within windows it indexes by a fixed window permutation and merges
  2x2 neighbours after its last block, InternViT's output goes through a pixel shuffle of 2x2
  neighbours: both need the full patch grid, which a merge inside them destroys. There the same
  bipartite matching runs on the projector / merger output before the LLM
  (:func:`tome_merge_tokens`, a ``pre_llm`` event): metric = the features themselves (no keys
  exist there), no protected token, ``r = min(T - budget, T // 2)`` per round until the budget,
  each round a plain mean as above. Merged tokens take their group's last slot (original position
  ids). The same step merges whatever the CLIP layers could not remove (a ViT with too few layers,
  e.g. the tiny test models); with a fixed ``r`` nothing is merged after the projector.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from methods import PruneContext, ViTLayerMerge, budget, register_prune


def _up(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def tome_match(metric: torch.Tensor, r: int, class_token: bool = True) -> tuple[torch.Tensor, int]:
    """ToMe's bipartite soft matching: where each token goes.

    Args:
        metric: ``[B, T, c]`` the similarity metric (LightCompress: the layer's head-mean keys).
        r: tokens to remove; capped at ``(T - protected) // 2``.
        class_token: the first token is [CLS]: it never merges and stays first.

    Returns:
        ``(dest [B, T], r)``: ``dest[b, j]`` is token j's index in the merged sequence of ``T - r``
        tokens, whose order is [unmerged A tokens, B tokens] (A = even positions, B = odd ones;
        unmerged A ascending when ``class_token``, else in ascending edge-score order as ToMe
        leaves them), and the ``r`` actually applied.
    """
    b_, t, _ = metric.shape
    r = min(r, (t - int(class_token)) // 2)
    if r <= 0:
        return torch.arange(t, device=metric.device).expand(b_, t), 0
    m = _up(metric)
    m = m / m.norm(dim=-1, keepdim=True)
    scores = m[:, ::2] @ m[:, 1::2].transpose(-1, -2)  # [B, |A|, |B|]
    if class_token:
        scores[:, 0, :] = -torch.inf
    node_max, node_idx = scores.max(dim=-1)  # each A token's best B token
    edge = node_max.argsort(dim=-1, descending=True)  # A tokens, most similar first
    unm, src = edge[:, r:], edge[:, :r]
    if class_token:
        unm = unm.sort(dim=-1).values  # [CLS] (A's index 0) back at the front
    n_a, n_b = scores.shape[1], scores.shape[2]
    n_unm = n_a - r
    dst = node_idx.gather(1, src)  # [B, r] the B token each merged A token goes into
    dest_a = torch.empty(b_, n_a, dtype=torch.long, device=metric.device)
    dest_a.scatter_(1, unm, torch.arange(n_unm, device=metric.device).expand(b_, n_unm))
    dest_a.scatter_(1, src, n_unm + dst)
    dest = torch.empty(b_, t, dtype=torch.long, device=metric.device)
    dest[:, ::2] = dest_a
    dest[:, 1::2] = n_unm + torch.arange(n_b, device=metric.device)
    return dest, r


def tome_merge_mean(x: torch.Tensor, dest: torch.Tensor, n_out: int) -> torch.Tensor:
    """``merge_wavg(merge, x, size=None)``: ``[B, n_out, C]``, each output token the plain mean of
    the input tokens ``x`` ``[B, T, C]`` that ``dest`` ``[B, T]`` sends to it (computed in fp32)."""
    xs = _up(x)
    sums = torch.zeros(x.shape[0], n_out, x.shape[2], dtype=xs.dtype, device=x.device)
    sums.scatter_add_(1, dest.unsqueeze(-1).expand_as(xs), xs)
    counts = torch.zeros(x.shape[0], n_out, dtype=xs.dtype, device=x.device)
    counts.scatter_add_(1, dest, torch.ones_like(dest, dtype=xs.dtype))
    return (sums / counts.unsqueeze(-1)).to(x.dtype)


def tome_vit_merge(x: torch.Tensor, metric: torch.Tensor, r: int, args: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """One CLIP layer's merge (the :class:`methods.ViTLayerMerge` ``fn``): ``x`` ``[B, 1 + T, C]``
    and its head-mean keys ``metric`` ``[B, 1 + T, hd]`` -> ``(merged [B, 1 + T - r, C], dest [B, 1 + T])``."""
    dest, r = tome_match(metric, r, class_token=True)
    return tome_merge_mean(x, dest, x.shape[1] - r), dest


def tome_schedule(n: int, n_layers: int, keep_ratio: float | None, args: Mapping[str, Any]) -> tuple[int, ...]:
    """Tokens each of the ``n_layers`` merging ViT layers removes from ``n`` patches (+ [CLS]).

    ``args["r"] > 0``: LightCompress's constant ``r``, capped per layer at ``(T - 1) // 2`` as
    ``bipartite_soft_matching`` caps it. Else the layers remove ``n - budget(n, keep_ratio)``
    tokens in all: layer ``l`` takes ``ceil(left / layers left)``, more when the later layers'
    caps could not remove the rest, never more than its own cap.
    """
    caps_t = n + 1  # tokens entering the current layer, [CLS] included
    r_fixed = int(args.get("r", 0))
    out = []
    if r_fixed > 0:
        for _ in range(n_layers):
            r = min(r_fixed, (caps_t - 1) // 2)
            out.append(r)
            caps_t -= r
        return tuple(out)
    if keep_ratio is None:
        raise ValueError("tome_pre_llm needs KEEP_RATIO (or PRUNE_ARGS r=...)")
    left = n - budget(n, keep_ratio)

    def removable(t: int, layers: int) -> int:  # the most `layers` capped layers can remove from t tokens
        total = 0
        for _ in range(layers):
            r = (t - 1) // 2
            total, t = total + r, t - r
        return total

    for i in range(n_layers):
        cap = (caps_t - 1) // 2
        r = min(cap, -(-left // (n_layers - i)))
        while r < cap and left - r > removable(caps_t - r, n_layers - i - 1):
            r += 1
        out.append(r)
        caps_t, left = caps_t - r, left - r
    return tuple(out)


def tome_merge_tokens(features: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The adaptation after the projector: bipartite matching on the tokens themselves.

    Args:
        features: ``[N, D]`` one image's tokens (the metric and the merged values).
        keep: tokens to end with.

    Returns:
        ``(slots [keep], merged [keep, D])``: the group of each merged token, represented by its
        LAST member (largest index), and the plain mean of the group's features (one round's mean
        per round, ``size=None``). Rounds of :func:`tome_match` (no protected token) with
        ``r = min(T - keep, T // 2)`` until ``keep`` tokens remain.
    """
    n = features.shape[0]
    x = features.unsqueeze(0)  # [1, T, D]
    cols = torch.arange(n, device=features.device)  # each token's current column
    t = n
    while t > keep:
        dest, r = tome_match(x, min(t - keep, t // 2), class_token=False)
        x = tome_merge_mean(x, dest, t - r)
        cols = dest[0].gather(0, cols)
        t -= r
    slots = torch.full((t,), -1, dtype=torch.long, device=features.device)
    slots = slots.scatter_reduce(0, cols, torch.arange(n, device=features.device), reduce="amax")
    return slots, x[0]


@register_prune(
    "tome_pre_llm",
    stage="pre_llm",
    needs=("n_vit_tokens",),
    exact_count=False,
    source="facebookresearch/ToMe",
    paper="https://arxiv.org/abs/2210.09461",
    deviation="Not in UniPruneBench. LLaVA: ModelTC/LightCompress's CLIP port (every layer to the feature layer, "
    "head-mean keys, [CLS] kept, plain means, size=None); KEEP_RATIO -> r per layer so budget(N, r) tokens reach "
    "the LLM (PRUNE_ARGS r: LightCompress's constant r); merged tokens at their group's last patch slot "
    "(original: ToMe's order, sequential positions). Qwen2.5-VL/InternVL3: ADAPTATION, the same matching on the "
    "merger/projector output (metric = features). docs/methods_text.md",
    vit_merge=ViTLayerMerge(schedule=tome_schedule, fn=tome_vit_merge),
)
def tome(ctx: PruneContext, keep: int, *, r: int = 0) -> Any:
    """Merge similar tokens by bipartite soft matching in every ViT layer (ToMe); elsewhere after the projector.

    Runs as a ``pre_llm`` event only when tokens are left over the budget after the ViT merge:
    on families without the ViT merge (Qwen2.5-VL, InternVL3: the labelled adaptation,
    :func:`tome_merge_tokens` on ``ctx.features``), or when the CLIP layers could not reach the
    budget. ``r`` > 0 (LightCompress's constant per-layer count) applies inside CLIP only.
    """
    vit_merged = ctx["n_vit_tokens"] < ctx.n_orig
    if r > 0:
        if not vit_merged:
            raise ValueError(
                "tome_pre_llm: r (tokens merged per CLIP layer, LightCompress's setting) applies to the CLIP merge, "
                "which this family does not run; set KEEP_RATIO without r"
            )
        return torch.arange(ctx.n, device=ctx.features.device)  # r decides the count: nothing more is merged
    return tome_merge_tokens(ctx.features, keep)
