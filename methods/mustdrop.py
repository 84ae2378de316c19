"""MustDrop: multi-stage visual-token dropping (Liu et al., 2024).

Registered as ``mustdrop`` (:func:`mustdrop`), a hybrid: one name runs every stage: the ViT window
merge (LLaVA), four intra-LLM events and a KV-cache trim after the prefill. Original: liuting20/MustDrop @909afa5,
``llava/model/multimodal_encoder/local_merge.py :: conditional_pooling, merge_wavg`` and
``clip_encoder.py :: CLIPVisionModelAcc.custom_forward`` (vision stage),
``llava/model/language_model/modelling_sparse_llama.py :: LlamaDynamicvitModel.forward,
dual_attention_filter`` (prefill and cache). Paper: https://arxiv.org/abs/2411.10803.

What the original computes (LLaVA-1.5, CLIP ViT-L/14-336, one image):

* **Vision, window merge** (after CLIP layer 0): 3x3 windows of the 24x24 grid; a window's
  similarity is the mean off-diagonal pairwise cosine; the ``r`` windows with similarity >= 0.8
  (top-r by similarity) become their mean; output CLS, merged windows (descending similarity),
  unmerged tokens (ascending). :func:`mustdrop_window_merge`.
* **Vision, key set**: the top ``ceil(0.08 * n_patches)`` patches by the [CLS] row of the LAST
  CLIP layer's attention, head-mean (:func:`mustdrop_key_set`).
* **Prefill, dual-attention filter** at the OUTPUT of layers 2, 6, 10, 14, with that layer's own
  attention: ``A`` = head-mean attention of every token after the image to the visual tokens; a
  token is dropped iff ``sum_t A < global_thr * sum A`` and ``max_t A < individual_thr``; key-set
  tokens always stay (:func:`mustdrop_filter`). Scripts: (0.001, 0.001) for 192 tokens,
  (0.0012, 0.001) for 128, (0.011, 0.01) for 64; the code defaults (1.0, 0.0) drop nothing.
* **Decoding**: a one-shot KV-cache trim after the prefill: the caches of layers 2..14 keep only
  the final survivors (layers 0-1 keep everything; later layers hold only survivors anyway).

How it runs here:

* Layer l's output with layer l's attention = the input of layer l + 1 with the previous layer's
  attention (``prev_attention_text``): events at spec layers 3, 7, 11, 15 (``layers`` in
  PRUNE_ARGS are the original's 0-based indices). The cache trim is the engine's
  ``trim_cache`` (a ``post_prefill`` event in the trace): caches from layer (first event - 1) on
  keep only the final survivors, exactly the original's composition of per-stage indices.
* **KEEP_RATIO -> thresholds** (decided once): the kept count is adaptive, so KEEP_RATIO only
  selects the published threshold pair of the nearest setting (192/576, 128/576, 64/576 of the
  tokens; nearest in log ratio); PRUNE_ARGS ``global_thr`` / ``individual_thr`` override it. The
  trace reports each event's actual count; the record's ``avg_visual`` is the mean over layers
  (the original's "equal token number").
* **Window merge (LLaVA)**: registered as the method's ``vit_merge``
  (:func:`mustdrop_vit_merge`, :class:`methods.ViTMerge`): a hook replaces CLIP layer 0's output by
  the merged sequence, so CLIP layers 1..23 run on it as in ``custom_forward``; the feature layer
  (``hidden_states[-2]``) and the last layer's [CLS] attention (the key set) are therefore over the
  ``N'`` merged tokens, and the key set has ``ceil(0.08 * N')`` of them (``n_vit_tokens``). The
  prompt still has 576 placeholders an image: a ``vision`` trace event (before the LLM, ``layer``
  None, ``images`` = ``(576, N')``) cuts them to ``N'``. **Position of a merged token**: the slot
  of its window's LAST patch (row-major: bottom-right), the token ``merge_wavg`` reduces into
  (``dst_idx``); unmerged patches keep theirs; the LLM sees them in slot order with those slots'
  position ids (the original puts the merged windows first, then renumbers 0..L'-1). Several
  images in one forward: ``r`` = the minimum over them, as ``conditional_pooling`` computes it for
  a batch (each image merges its own top-r windows; the original's eval sends one image).
  ``merge_threshold`` (0.8) and ``window`` (3) are hyper-parameters; a grid that ``window``
  does not tile is left unmerged, with a ``vision`` trace note.
* **Key set and merge by family**: LLaVA captures the last CLIP layer's [CLS] attention
  (``vit_last_cls_attention``). Qwen2.5-VL's ViT has no [CLS] token and InternViT is not hooked:
  there the key set is EMPTY (nothing replaces it; the filter alone decides), and the window merge
  is SKIPPED (a logged warning and a ``vision`` trace note with ``n_keep == n_in``): Qwen's ViT
  attends within windows of its own and merges 2x2 patches after, InternViT is followed by a pixel
  shuffle, so a 3x3 merge after their layer 0 has no counterpart in the original - a documented
  adaptation.

Positions: the original renumbers the shortened sequence 0..L'-1; survivors keep their original
positions here (as for every method of the engine).
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F

from methods import PruneContext, Range, ViTMerge, ViTMergeSkipped, register_prune

LAYERS = (2, 6, 10, 14)  # 0-based layers whose OUTPUT is filtered (LlamaDynamicvitModel.pruning_layers)
THRESHOLDS = {192: (0.001, 0.001), 128: (0.0012, 0.001), 64: (0.011, 0.01)}  # scripts/v1_5/eval/*_{192,128,64}.sh
LLAVA_TOKENS = 576


def _up(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def mustdrop_filter(
    attn_text: torch.Tensor, global_thr: float, individual_thr: float, key_set: torch.Tensor | None = None
) -> torch.Tensor:
    """Kept indices ``[k]`` (ascending, unique) of one dual-attention filter.

    Args:
        attn_text: ``[H, T, N]`` the filtering layer's attention probabilities, rows = every token
            after the image, columns = the current visual tokens.
        key_set: ``[K]`` indices into the N tokens that are always kept (None: none).

    As ``dual_attention_filter`` plus the union of l.256-257: drop j iff
    ``sum_t A[t, j] < global_thr * sum A`` and ``max_t A[t, j] < individual_thr`` (A head-mean).
    """
    a = _up(attn_text).mean(dim=0)  # [T, N]
    col = a.sum(dim=0)
    drop = (col < col.sum() * global_thr) & (a.max(dim=0).values < individual_thr)
    kept = ~drop
    if key_set is not None:
        kept = kept.index_fill(0, key_set.to(kept.device), True)
    # The one host sync: the adaptive count (nonzero of the union, ascending and unique).
    return torch.nonzero(kept).flatten()


def mustdrop_key_set(cls_attention: torch.Tensor, key_ratio: float = 0.08) -> torch.Tensor:
    """``[ceil(key_ratio * N)]`` patch indices (topk order) with the highest head-mean [CLS]
    attention ``cls_attention`` ``[H, N]`` (``custom_forward``, ``idx == 23``)."""
    n = cls_attention.shape[-1]
    k = min(math.ceil(key_ratio * n), n)
    return torch.topk(_up(cls_attention).mean(dim=0), k).indices


def _windows(n: int, window: int, device: torch.device) -> torch.Tensor:
    """``[g*g, window*window]`` patch indices of each window (row-major over windows and within)."""
    side = math.isqrt(n)
    if side * side != n or side % window:
        raise ValueError(f"{n} patches are not a square grid divisible by {window} windows")
    g = side // window
    return torch.arange(n, device=device).view(g, window, g, window).permute(0, 2, 1, 3).reshape(g * g, window * window)


def mustdrop_window_similarity(feat: torch.Tensor, window: int = 3) -> torch.Tensor:
    """``[g*g]``: each window's mean off-diagonal pairwise cosine of the patches ``feat`` ``[N, C]``."""
    grid = _windows(feat.shape[0], window, feat.device)
    w = _up(feat)[grid]  # [g*g, w*w, C]
    sims = F.cosine_similarity(w[:, :, None, :], w[:, None, :, :], dim=-1)  # [g*g, w*w, w*w]
    sims = sims * (1 - torch.eye(window * window, device=feat.device))
    return sims.sum(dim=(-1, -2)) / (window * window * (window * window - 1))


def mustdrop_window_merge(
    x: torch.Tensor, threshold: float = 0.8, window: int = 3, r: int | None = None
) -> tuple[torch.Tensor, list[list[int]]]:
    """The vision-stage merge on one image's ViT states ``x`` ``[1 + N, C]`` ([CLS] first, an
    ``s x s`` patch grid, ``s`` divisible by ``window``): ``(out [1 + N', C], groups)``.

    As ``conditional_pooling`` + ``merge_wavg``: per ``window x window`` window, the mean of the
    off-diagonal pairwise cosines; ``r`` = #windows >= ``threshold``; the top-r windows (descending
    similarity) become their mean; output = [CLS], the merged windows in that order, then every
    other patch in ascending order. ``groups[j]``: the original patch indices behind output
    patch ``j`` (ascending within a window). ``r`` given: merge that many windows instead (the
    batch minimum of :func:`mustdrop_vit_merge`).
    """
    sim = mustdrop_window_similarity(x[1:], window)
    if r is None:
        r = int((sim >= threshold).sum())
    out, groups = _merge_windows(x.unsqueeze(0), sim.unsqueeze(0), window, r)
    return out[0], groups[0]


def _merge_windows(x: torch.Tensor, sim: torch.Tensor, window: int, r: int) -> tuple[torch.Tensor, list[list[list[int]]]]:
    """:func:`mustdrop_window_merge` of every image of ``x`` ``[B, 1 + N, C]`` at once, each merging
    its own top ``r`` windows by ``sim`` ``[B, G]`` (:func:`mustdrop_window_similarity`). One host sync (the groups, which the ViT-merge contract returns as
    lists), whatever ``r`` and ``N``."""
    b_, n = x.shape[0], x.shape[1] - 1
    cls, feat = x[:, :1], x[:, 1:]
    grid = _windows(n, window, x.device)  # [G, w*w]
    top = sim.topk(r, dim=1).indices  # [B, r] descending similarity
    members = grid[top]  # [B, r, w*w]
    # The other patches, ascending: a stable sort of the "merged" mask puts them first (their
    # count, N - r*w*w, is known).
    merged_mask = torch.zeros(b_, n, dtype=torch.bool, device=x.device)
    merged_mask.scatter_(1, members.reshape(b_, -1), True)
    rest = torch.sort(merged_mask.to(torch.uint8), dim=1, stable=True).indices[:, : n - r * window * window]
    means = feat.gather(1, members.reshape(b_, -1, 1).expand(-1, -1, feat.shape[-1]))
    means = means.view(b_, r, window * window, feat.shape[-1]).mean(dim=2)  # [B, r, C]
    others = feat.gather(1, rest.unsqueeze(-1).expand(-1, -1, feat.shape[-1]))  # [B, N - r*w*w, C]
    out = torch.cat([cls, means.to(x.dtype), others], dim=1)
    order = torch.cat([members.reshape(b_, -1), rest], dim=1).tolist()  # the one host sync
    ww = r * window * window
    groups = [[o[i : i + window * window] for i in range(0, ww, window * window)] + [[i] for i in o[ww:]] for o in order]
    return out, groups


def mustdrop_vit_merge(x: torch.Tensor, args: dict) -> tuple[torch.Tensor, list[list[list[int]]]]:
    """The window merge as the method's :class:`methods.ViTMerge` (CLIP layer 0's output ``x``
    ``[B, 1 + N, C]``): ``r`` = the fewest windows at ``>= merge_threshold`` over the images
    (``conditional_pooling``'s ``.sum(dim=1).min()``), then :func:`mustdrop_window_merge` per image.
    Two host syncs (``r``, then the groups), whatever the grid and ``r``."""
    threshold, window = float(args["merge_threshold"]), int(args["window"])
    n = x.shape[1] - 1
    side = math.isqrt(n)
    if side * side != n or side % window:
        raise ViTMergeSkipped(f"{n} patches are not a square grid of {window}x{window} windows")
    sim = torch.stack([mustdrop_window_similarity(x[b, 1:], window) for b in range(x.shape[0])])  # [B, G]
    r = int((sim >= threshold).sum(dim=1).min())
    return _merge_windows(x, sim, window, r)


def mustdrop_thresholds(keep_ratio: float) -> tuple[float, float]:
    """The published ``(global_thr, individual_thr)`` of the setting nearest ``keep_ratio`` (in log ratio)."""
    nearest = min(THRESHOLDS, key=lambda t: abs(math.log(keep_ratio * LLAVA_TOKENS / t)))
    return THRESHOLDS[nearest]


def mustdrop_schedule(keep_ratio: float | None, args: dict) -> tuple[tuple[tuple[int, None], ...], dict]:
    """The events of ``PRUNE_METHOD=mustdrop``: ``((original layer + 1, None), ...)`` and the
    thresholds KEEP_RATIO selects (PRUNE_ARGS override them)."""
    layers = tuple(int(x) for x in args["layers"])
    if not layers or list(layers) != sorted(set(layers)) or layers[0] < 0:
        raise ValueError(f"layers must increase from >= 0 (the original's 0-based layers), got {layers}")
    g, i = mustdrop_thresholds(keep_ratio)
    return tuple((layer + 1, None) for layer in layers), {"global_thr": g, "individual_thr": i}


@register_prune(
    "mustdrop",
    stage="intra_llm",
    needs=("prev_attention_text", "vit_last_cls_attention", "n_vit_tokens"),
    exact_count=False,
    uses_ratio=False,
    source="liuting20/MustDrop",
    paper="https://arxiv.org/abs/2411.10803",
    deviation="Not in UniPruneBench's code. KEEP_RATIO picks the nearest published thresholds; ViT window merge "
    "on LLaVA only (merged token at its window's last patch); no merge or [CLS] key set on Qwen/InternVL; "
    "positions kept (original renumbers).",
    default_layer=3,
    schedule=mustdrop_schedule,
    trim_cache=True,
    vit_merge=ViTMerge(layer=0, fn=mustdrop_vit_merge),
)
def mustdrop(
    ctx: PruneContext,
    keep: int,
    *,
    layers: Annotated[tuple, Range(ge=0)] = LAYERS,  # the original's 0-based layers
    global_thr: Annotated[float, Range(ge=0, le=1)] = 0.001,  # a share of the total attention
    individual_thr: Annotated[float, Range(ge=0, le=1)] = 0.001,  # an attention probability
    key_ratio: Annotated[float, Range(ge=0, le=1)] = 0.08,
    merge_threshold: Annotated[float, Range(ge=-1, le=1)] = 0.8,  # a cosine similarity
    window: Annotated[int, Range(ge=2)] = 3,  # a 1x1 window has no pair to compare
) -> torch.Tensor:
    """Drop the visual tokens that the text attends to little both in total and individually; keep the ViT key set.

    Paper: https://arxiv.org/abs/2411.10803

    One filter event (module docstring): :func:`mustdrop_filter` on the previous layer's attention
    (``prev_attention_text``), the key set :func:`mustdrop_key_set` of ``vit_last_cls_attention``
    (empty where the family has none, or with ``key_ratio=0``). Defaults: the 192-token scripts'
    thresholds; with ``PRUNE_METHOD=mustdrop`` KEEP_RATIO selects them. ``layers`` only shapes
    the schedule; ``merge_threshold`` / ``window`` only the ViT merge (:func:`mustdrop_vit_merge`).
    ``keep`` (the current count) is not a budget: the count is adaptive.
    """
    cls_attention = ctx["vit_last_cls_attention"]
    key_set = None
    if cls_attention is not None and key_ratio > 0:
        # Over the survivors' columns: the key set is kept at every stage, so its members are all
        # there and the top ceil(key_ratio * N') of the survivors is the top of the image (N': the
        # ViT's tokens, after its window merge: custom_forward's ceil(0.08 * (N - 1))).
        k = min(math.ceil(key_ratio * ctx["n_vit_tokens"]), ctx.n)
        key_set = torch.topk(_up(cls_attention).mean(dim=0), k).indices
    return mustdrop_filter(ctx["prev_attention_text"], global_thr, individual_thr, key_set)
