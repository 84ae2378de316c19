"""VScan: local and global scans in the vision encoder with token merging, then pruning in the LLM (Zhang et al., 2025).

Registered as ``vscan``, a hybrid: one name, a pre-LLM stage (ViT-space scores, at the decoder's
input) and an intra-LLM stage at the decoder's middle layer. Paper: https://arxiv.org/abs/2505.22654;
original: Tencent/SelfEvolvingAgent @a82450e ``VScan/`` (MIT): LLaVA
``llava/model/llava_arch.py :: encode_images, window_cls_selection, token_merging`` and
``llava/model/modeling_llama_x.py :: LlamaModel.forward_x, layer_prune``; Qwen2.5-VL
``qwen/model/qwen2_5_vl_custom.py`` (``Qwen2_5_VisionTransformerPretrainedModel_X.forward``,
``Qwen2_5_VLForConditionalGeneration_X.forward``, ``Qwen2_5_VLModel_X.forward, layer_prune``) and
``qwen/model/qwen2_5_vl_utils.py :: window_selection, token_merging``.

**Stage 1, ViT scans and merge** (one image of N tokens keeps T):

* LLaVA-1.5: scores are the [CLS] rows (head mean) of ``attentions[5]`` (local) and
  ``attentions[-2]`` (global). Local scan (:func:`vscan_window_topk`): the 24x24 grid in 6x6
  windows, the top ``k = int(T * 0.5) // 16`` of each window, so ``(int(T/2) // 16) * 16`` in all;
  global scan: the local tokens' global scores set to 0, then the top ``T - int(T * 0.5)``. The kept
  set is their union: ``T`` = 96 keeps 96, 100 keeps 98, 40 keeps 36.
* Qwen2.5-VL: scores are the attention each merged token receives (head SUM, summed over the
  queries where the original averages them: a constant factor per image, the same selection; mean
  over its 2x2 unit) in the first full-attention block (7) and the last (31). Local scan
  (:func:`vscan_window_select`): ``T // 2`` tokens, the merged grid cut into 4x4 windows (the
  leftover rows / columns join the last window), at most ``ceil((T // 2) / windows)`` from a window,
  greedily in descending score order; global: ``T - T // 2`` after zeroing the local ones.
  ``T = int(ratio * N)``.
* Merge (:func:`vscan_merge`, both families, after the projector / merger): every dropped token joins
  the kept token of highest cosine similarity; a kept token becomes the mean of itself and its
  members. The kept tokens keep their slots (positions).

**Stage 2, LLM pruning** (PyramidDrop's ``layer_prune``): at the input of layer ``L``, that layer's
own ``input_layernorm`` / ``q_proj`` / ``k_proj`` for the last prompt token over the visual tokens,
softmax, head mean, top-k, sorted. LLaVA applies RoPE and keeps an absolute count (``image_token_list``
32); Qwen does NOT apply RoPE (the mRoPE line is commented out) and keeps ``int(0.333 * current)``.

**KEEP_RATIO -> the original's budgets** (decided once, :func:`vscan_schedule`): KEEP_RATIO ``r`` is
the average fraction of visual tokens over the decoder's layers, the budget the paper reports
("64 tokens" = 96 in layers 0-15 and 32 in 16-31 of LLaVA-1.5; Qwen 0.167 then 0.333 of it over
14 + 14 layers = 0.111). ViT stage ratio ``round(1.5 r, 3)`` (0.111 -> 0.167, 0.222 -> 0.333,
0.333 -> 0.5: LLaVA 96 / 192 / 288 of 576, the Qwen scripts' 0.167); LLM stage at the decoder's middle layer
(16 of LLaVA-1.5-7B's 32, 14 of Qwen2.5-VL-7B's 28; ``llm_layer``), LLaVA keeping ``budget(N, r / 2)``
(32 / 64 / 96), Qwen ``int(llm_ratio * current)`` (``llm_ratio`` 0.333).

**LLaVA-NeXT**: the original's NeXT path (``prepare_inputs_labels_for_multimodal_x`` with its
``spatial_unpad`` line uncommented) runs stage 1 on every crop (T each; the newline column of its mask
set to True) and the ``llava1_6`` scripts keep 96 per crop, then 32 tokens in all at layer 16. Here
stage 1 runs per crop with the crop's share of ``round(1.5 r, 3)`` of the image
(:func:`methods.crop_budgets`), among the tokens the unpadding keeps, and stage 2 keeps
``budget(N, r / 2)`` of the image (the ratio, not the scripts' absolute 32; ``docs/llava_next.md``).

**InternVL3** (OURS): stage 1 as Qwen's (received attention per tile, averaged over each
pixel-shuffle unit; InternViT layers 5 and the last, as CLIP-L's 24-layer depth; 4x4 windows on each
tile's token grid, all the image's windows in one greedy scan; ``T = int(ratio * N)``); stage 2
with RoPE (InternVL's decoder uses 1-D RoPE, as LLaMA's) and ``int(llm_ratio * current)``.

Host syncs: stage 1 one per image (the kept mask to indices); the scans and the merge are tensor
ops (no per-token loop).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from methods import MIDDLE_LAYER, PruneContext, crop_budgets, crop_rows, register_prune

LOCAL_LAYER = {"llava": 5, "llava_next": 5, "qwen2_5_vl": 7, "internvl": 5}  # attentions[5]; Qwen fullatt_block_indexes[0]
GLOBAL_LAYER = {"llava": -2, "llava_next": -2, "qwen2_5_vl": -1, "internvl": -1}  # attentions[-2]; Qwen's last block
WINDOW = {"llava": 6, "llava_next": 6, "qwen2_5_vl": 4, "internvl": 4}  # window_cls_selection / window_selection
CLIP_FAMILIES = ("llava", "llava_next")  # [CLS] rows of a CLIP tower, LLaVA's computation


def _up(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def vscan_window_topk(scores: torch.Tensor, grid: tuple[int, int], n_local: int, window: int = 6) -> torch.Tensor:
    """LLaVA's local scan (``window_cls_selection``): ``[k * W]`` token indices (window by window).

    Args:
        scores: ``[h * w]`` the local layer's [CLS] attention (head mean), row-major.
        grid: ``(h, w)``.
        n_local: the local budget (``int(T * 0.5)``).
        window: the window side (6).

    The grid's first ``(h // window) * window`` rows and columns are cut into ``W`` windows (the
    original asserts a 24x24 grid; leftover rows / columns are never picked, as its loops do); each
    gives its top ``k = n_local // W`` tokens. A grid smaller than the window is one window (ours:
    the original's count divides by zero there).
    """
    h, w = grid
    wh, ww = min(window, h), min(window, w)
    nh, nw = h // wh, w // ww
    k = n_local // (nh * nw)
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    windows = scores.view(h, w)[: nh * wh, : nw * ww].reshape(nh, wh, nw, ww).permute(0, 2, 1, 3).reshape(nh * nw, wh * ww)
    top = windows.topk(k, dim=1).indices  # [W, k] positions inside each window
    wy = torch.arange(nh, device=scores.device).repeat_interleave(nw)[:, None]  # the window's row and column
    wx = torch.arange(nw, device=scores.device).repeat(nh)[:, None]
    return ((wy * wh + top // ww) * w + wx * ww + top % ww).flatten()


def vscan_window_select(scores: torch.Tensor, grid: tuple[int, int, int], n_local: int, window: int = 4) -> torch.Tensor:
    """Qwen's local scan (``window_selection``): ``[n_local]`` token indices, in descending score order.

    Args:
        scores: ``[t * h * w]`` the local block's received attention per merged token (row-major;
            ``t`` tiles / frames one after the other).
        grid: ``(t, h, w)``.
        n_local: tokens to pick (``T // 2``).
        window: the window side in tokens (4).

    As the original: ``floor(h / window) x floor(w / window)`` windows (per tile here); a token in the
    leftover rows / columns belongs to the last window of its row / column; at most
    ``ceil(n_local / windows)`` tokens from a window; tokens are taken greedily in descending
    score order, skipping those whose window is full, until ``n_local``. Vectorised: a token is
    taken iff its rank within its window (in that order) is below the limit, and it is among the
    first ``n_local`` such tokens. Where the windows cannot give ``n_local`` tokens (the original's
    assertion fails) the best remaining tokens fill up (ours); a grid smaller than the window is
    one window (ours: the original divides by zero).
    """
    t, h, w = grid
    n = scores.shape[0]
    nh, nw = max(h // window, 1), max(w // window, 1)
    idx = torch.arange(n, device=scores.device)
    row, col = (idx % (h * w)) // w, idx % w
    win = (idx // (h * w)) * nh * nw + (row // window).clamp(max=nh - 1) * nw + (col // window).clamp(max=nw - 1)
    n_windows = t * nh * nw
    limit = math.ceil(n_local / n_windows)
    order = torch.argsort(scores, descending=True, stable=True)  # the greedy's visiting order
    win_sorted = win[order]
    # Rank of each visited token within its window: group the visiting order by window (stable).
    by_window = torch.argsort(win_sorted, stable=True)
    counts = torch.bincount(win_sorted, minlength=n_windows)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(idx)
    rank[by_window] = idx - starts[win_sorted[by_window]]
    taken = rank < limit
    # The first n_local taken tokens in visiting order (then, if too few, the others in that order).
    key = idx + n * (~taken).long()
    return order[key.topk(n_local, largest=False).indices]


def vscan_merge(features: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``[T, D]``: the kept tokens after VScan's ``token_merging`` (``scaling=1``).

    Args:
        features: ``[N, D]`` the image's tokens after the projector / merger.
        kept: ``[T]`` kept indices, ascending.

    Every other token joins the kept token with the highest cosine similarity (argmax: first on
    ties); a kept token becomes ``(x + sum of its members) / (1 + count)``.
    """
    x = _up(features)
    is_kept = torch.zeros(x.shape[0], dtype=torch.int8, device=x.device)
    is_kept[kept] = 1
    others = x[torch.argsort(is_kept, stable=True)[: x.shape[0] - kept.shape[0]]]  # [N - T, D] (no host sync)
    retained = x[kept]  # [T, D]
    nearest = (F.normalize(others, dim=-1) @ F.normalize(retained, dim=-1).T).argmax(dim=1)  # [N - T]
    sums = retained.clone().index_add_(0, nearest, others)
    counts = torch.ones(retained.shape[0], dtype=x.dtype, device=x.device).index_add_(0, nearest, torch.ones_like(others[:, 0]))
    return (sums / counts.unsqueeze(-1)).to(features.dtype)


def vscan_vit_stage(
    ctx: PruneContext, keep: int, local: torch.Tensor, global_: torch.Tensor, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1 on one image: ``(kept indices [k], merged features [k, D])``. ``local`` / ``global_``
    ``[N]`` are the two scans' scores."""
    if ctx.crops is not None:
        return _vit_stage_per_crop(ctx, keep, local, global_, window)
    if ctx.family == "llava":
        t = keep  # visual_token_num: budget(N, ratio)
        grid = ctx.grid[1:] if ctx.grid is not None else (math.isqrt(ctx.n),) * 2
        local_idx = vscan_window_topk(local, grid, int(t * 0.5), window)
        n_global = t - int(t * 0.5)
    else:
        t = min(ctx.n, int(ctx.ratio * ctx.n))  # num_keep_tokens = int(visual_token_ratio * n_image_tokens)
        grid = ctx.grid if ctx.grid is not None else (1, 1, ctx.n)
        local_idx = vscan_window_select(local, grid, t // 2, window)
        n_global = t - t // 2
    scores = global_.clone()
    scores[local_idx] = 0  # "avoid repetition": the local tokens' global scores are zeroed
    kept = torch.zeros(ctx.n, dtype=torch.bool, device=scores.device)
    kept[local_idx] = True
    kept[scores.topk(min(ctx.n, n_global)).indices] = True
    kept = torch.nonzero(kept).flatten()  # the one host sync: a global pick may be a local one again
    return kept, vscan_merge(ctx.features, kept)


def _vit_stage_per_crop(
    ctx: PruneContext, keep: int, local: torch.Tensor, global_: torch.Tensor, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1 on a LLaVA-NeXT image: every crop as the original's LLaVA path treats it (its
    ``encode_images`` runs on each crop: T each, windows on the crop's 24 x 24 grid, the merge within
    the crop), T = the crop's share of ``keep``. Patches the unpadding removed are scored ``-inf`` on
    the crop's grid: a window's pick that falls on one is dropped (the crop keeps fewer local tokens),
    and the global scan never takes one. Returns rows of ``ctx.features`` and their merged features."""
    crops = ctx.crops
    grid = crops.side**2
    patch_of = crops.patch.to(local.device)[ctx.token_index]  # [N] each token's patch in its crop
    rows = crop_rows(ctx)
    crops_kept = []  # (rows, patches, kept & valid on the crop's grid) of every crop with a share
    for r, t in zip(rows, crop_budgets([int(r.numel()) for r in rows], keep)):
        if t == 0:
            continue
        patches = patch_of[r]
        full = torch.full((2, grid), -torch.inf, dtype=local.dtype, device=local.device)
        full[:, patches] = torch.stack([local[r], global_[r]])
        valid = torch.zeros(grid, dtype=torch.bool, device=local.device)
        valid[patches] = True
        local_idx = vscan_window_topk(full[0], (crops.side, crops.side), int(t * 0.5), window)
        # A window's pick on an absent patch is dropped: a mask, not a filtered index list (no sync).
        is_local = torch.zeros(grid, dtype=torch.bool, device=local.device).index_fill_(0, local_idx, True) & valid
        scores = torch.where(is_local, torch.zeros_like(full[1]), full[1])  # "avoid repetition", as on LLaVA-1.5
        kept = is_local.clone()
        kept[scores.topk(t - int(t * 0.5)).indices] = True  # never -inf: t <= the crop's tokens
        crops_kept.append((r, patches, kept & valid))
    if not crops_kept:
        return local.new_zeros(0, dtype=torch.long), ctx.features[:0]
    # The one host sync of the image: every crop's kept count (data-dependent), read at once.
    counts = torch.stack([k.sum() for _, _, k in crops_kept]).tolist()
    indices, features = [], []
    for (r, patches, kept), count in zip(crops_kept, counts):
        position = torch.full((grid,), -1, dtype=torch.long, device=local.device)
        position[patches] = torch.arange(r.numel(), device=local.device)
        on_grid = torch.sort((~kept).to(torch.uint8), stable=True).indices[:count]  # kept patches, ascending
        mine = position[on_grid]  # positions in r
        indices.append(r[mine])
        features.append(vscan_merge(ctx.features[r], mine))
    return torch.cat(indices), torch.cat(features)


def vscan_schedule(keep_ratio: float, args: dict) -> tuple[tuple[tuple[int | None, float], ...], dict]:
    """The events of ``PRUNE_METHOD=vscan``: ``((None, ViT ratio), (LLM layer, r / 2))`` (module
    docstring). ``vit_ratio`` / ``llm_layer`` in PRUNE_ARGS override the derived values."""
    vit = float(args["vit_ratio"]) or min(1.0, round(1.5 * keep_ratio + 1e-9, 3))
    layer = int(args["llm_layer"])
    if not 0.0 < vit <= 1.0:
        raise ValueError(f"vit_ratio must be in (0, 1], got {vit}")
    if layer < MIDDLE_LAYER:
        raise ValueError(f"llm_layer must be >= 0 (or -1: the decoder's middle layer), got {layer}")
    return ((None, vit), (layer, keep_ratio / 2)), {}


def _layers(family: str, args: dict) -> dict[str, tuple[int, ...]]:
    local = LOCAL_LAYER[family] if args["local_layer"] is None else int(args["local_layer"])
    global_ = GLOBAL_LAYER[family] if args["global_layer"] is None else int(args["global_layer"])
    return {("vit_cls_rows" if family in CLIP_FAMILIES else "vit_attention_received"): (local, global_)}


@register_prune(
    "vscan",
    stage="intra_llm",
    needs={
        "llava": ("vit_cls_rows", "last_query_attention_self"),
        "llava_next": ("vit_cls_rows", "last_query_attention_self"),
        "qwen2_5_vl": ("vit_attention_received", "last_query_attention_self_norope"),
        "internvl": ("vit_attention_received", "last_query_attention_self"),
    },
    vit_layers=_layers,
    exact_count=False,
    uses_ratio=True,
    families=("llava", "llava_next", "qwen2_5_vl", "internvl"),
    source="Tencent/SelfEvolvingAgent",
    paper="https://arxiv.org/abs/2505.22654",
    deviation=(
        "Not in UniPruneBench. KEEP_RATIO = the average over layers: ViT stage round(1.5r, 3) (0.111 -> 96 of 576 / "
        "Qwen 0.167), LLM stage at the middle layer (16 / 14) keeping budget(N, r/2) (LLaVA 32) or int(0.333 "
        "current) (Qwen); Qwen attention under the per-image mask, per image; positions kept (LLaVA original "
        "renumbers). InternVL (OURS): Qwen's stage 1 per pixel-shuffle unit and tile, stage 2 with RoPE. LLaVA-NeXT: "
        "stage 1 per crop (budget split in proportion to the crops' tokens, among the tokens the unpadding keeps), "
        "stage 2 budget(N, r/2) of the image (the llava1_6 scripts: 96 per crop, then 32 in all)."
    ),
    default_layer=MIDDLE_LAYER,
    schedule=vscan_schedule,
    pre_stage=True,
)
def vscan(
    ctx: PruneContext,
    keep: int,
    *,
    vit_ratio: float = 0.0,
    llm_layer: int = MIDDLE_LAYER,
    llm_ratio: float = 0.333,
    window: int = 0,
    local_layer: int | None = None,
    global_layer: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
    """Keep local (windowed) and global ViT-attention tokens with the rest merged in, then prune by the last prompt token mid-LLM.

    Paper: https://arxiv.org/abs/2505.22654

    One name, two stages (``ctx.stage``); the module docstring has the rules. ``vit_ratio`` (0:
    ``round(1.5 * KEEP_RATIO, 3)``) and ``llm_layer`` (-1: the decoder's middle layer) shape the
    schedule; ``llm_ratio`` is the Qwen / InternVL LLM-stage share of the current tokens;
    ``window`` (0: 6 on LLaVA, 4 on Qwen / InternVL), ``local_layer`` / ``global_layer`` (None: the
    original's ViT layers: LLaVA 5 / -2, Qwen 7 / -1, InternVL 5 / -1) tune stage 1.
    """
    if ctx.stage == "pre_llm":
        layers = _layers(ctx.family, {"local_layer": local_layer, "global_layer": global_layer})
        need, (lo, gl) = next(iter(layers.items()))
        rows = ctx[need]
        reduce = (lambda a: _up(a).mean(dim=0)) if ctx.family in CLIP_FAMILIES else (lambda a: _up(a).sum(dim=0))
        return vscan_vit_stage(ctx, keep, reduce(rows[lo]), reduce(rows[gl]), window or WINDOW[ctx.family])
    if ctx.family == "qwen2_5_vl":
        attn, k = ctx["last_query_attention_self_norope"], int(llm_ratio * ctx.n)
    elif ctx.family == "internvl":
        attn, k = ctx["last_query_attention_self"], int(llm_ratio * ctx.n)
    else:
        attn, k = ctx["last_query_attention_self"], keep  # image_token_list: an absolute count
    return _up(attn).mean(dim=0).topk(min(k, ctx.n)).indices
