"""HiPrune: hierarchical attention in the vision encoder: object anchors, their buffers, global registers (2025).

Registered as ``hiprune_pre_llm``; what it computes depends on the family, as in the original
(see ``docs/methods_vit.md``). Paper: https://arxiv.org/abs/2508.00553; original:
Danielement321/HiPrune @6e83a12 (MIT), ``LLaVA/llava/model/llava_arch.py :: encode_images`` and
``Qwen2_5_VL/qwen2_5_vl_HiPrune.py`` (the vision tower's ``attn_list``, l.566-577; the selection,
l.1854-1896).

What the original computes on one image of ``N`` tokens, keeping ``T``:

* two "global attention" score vectors, each the attention every token RECEIVES in one ViT layer:
  the *object* layer ``HIPRUNE_OBJECT_LAYER - 1`` (9 -> ``attentions[8]`` on LLaVA, 16 -> block 15
  on Qwen) and the *deep* layer (LLaVA: the feature layer ``attentions[-2]``; Qwen: the last block);
* ``a = round(T * alpha / 5)`` anchors: the top-``a`` tokens by the object-layer score (Python
  ``round``, half to even);
* buffers: every anchor ``i`` with ``i - 1``, ``i + 1``, ``i - w``, ``i + w`` (``w``: the grid width),
  clamped to ``[0, N - 1]`` (flat indices: ``i + 1`` at a row's end is the next row's first token,
  the original checks no row wrap), deduplicated;
* registers: ``T - |buffers|`` tokens, the top of ``deep - mask`` where ``mask`` is 1 at the buffers
  (``deep_attention -= available_index_mask.int()``); the kept set is buffers + registers, sorted
  (a mask).

Per family:

* **LLaVA-1.5**: scores are head means of the attention averaged over all 1 + N queries ([CLS]
  row included), [CLS] column dropped, so every score is at most 1 and the ``- 1`` takes the
  buffers out of the register pick. ``T`` = ``budget(N, KEEP_RATIO)``: the original's
  ``HIPRUNE_RETENTION`` 192 / 128 / 64 of 576 at 0.333 / 0.222 / 0.111. ``w`` = 24 (hard-coded,
  = the grid width, used here) and ``N - 1`` = 575.
* **Qwen2.5-VL**: scores as VisionZip's Qwen adaptation computes them: head mean, SUMMED over the
  queries, mean over each 2x2 merge unit. A score can exceed 1, so ``- 1`` does not exclude a
  buffer from the register pick: a buffer can be picked again and the image then keeps FEWER
  than ``T`` tokens (reproduced; the trace reports the count). ``T = round(N * r)`` (half to even, from
  ``ctx.ratio``: the original's ``HIPRUNE_QWEN_RETENTION``); ``w`` = the image's merged grid width (the
  original takes the first image's, and fails on prompts whose images are not adjacent).
* **LLaVA-NeXT**: per crop, as the original's LLaVA path runs on every crop of a LLaVA-1.6 image
  (``bench_llava_next.sh``: ``HIPRUNE_RETENTION=640`` over the crops, ``int(640 / crops)`` each):
  each crop keeps its share of ``budget(N, r)`` (:func:`methods.crop_budgets`), scores as LLaVA-1.5's
  on the crop's own 577 query rows, anchors and buffers on the crop's own 24 x 24 grid (``w`` = 24,
  clamped to its 576 patches); patches the unpadding removed are neither anchors nor registers, and
  a buffer on one is dropped (the original, under ``spatial``, keeps all 576 of every crop).
* **InternVL3** (OURS): per tile the LLaVA scores (InternViT has a [CLS] query row: the mean over all
  1 + P rows, [CLS] column dropped), averaged over each pixel-shuffle unit; object layer 9 of
  InternViT's 24 (as CLIP-L's), deep = the feature layer (the last); ``T`` = ``budget(N, r)``;
  buffers on the image's tokens in flat order (tiles one after the other, ``w`` = the tile side).

Host syncs: one per image (the deduplicated buffer count sets the register count); on LLaVA-NeXT
one per crop, plus its index conversion.
"""

from __future__ import annotations

import torch

from methods import PruneContext, crop_budgets, crop_rows, register_prune

# HIPRUNE_OBJECT_LAYER (1-based): the scripts' (bench_llava_next.sh: 9 too)
OBJECT_LAYER = {"llava": 9, "llava_next": 9, "qwen2_5_vl": 16, "internvl": 9}
DEEP_LAYER = {"llava": -2, "llava_next": -2, "qwen2_5_vl": -1, "internvl": -1}  # LLaVA mm_vision_select_layer; Qwen attn_list[-1]


def _up(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def hiprune_mask(
    shallow: torch.Tensor, deep: torch.Tensor, keep: int, width: int, alpha: float = 0.1, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """HiPrune's kept tokens of one image as a mask ``[N]`` bool (``<= keep`` set; no host sync;
    :func:`hiprune_select` lists them).

    Args:
        shallow: ``[N]`` the object layer's global attention score of every token.
        deep: ``[N]`` the deep layer's.
        keep: ``T``, the retention.
        width: ``w``, the buffer step between rows.
        alpha: the anchor share (``HIPRUNE_ALPHA``, 0.1 in the scripts).
        valid: ``[N]`` bool, the tokens that exist (None: all). LLaVA-NeXT's crops on their full
            24 x 24 grid, where the unpadding removed some patches: an invalid token is never an
            anchor or a register, and a buffer that falls on one is no buffer (it does not count).

    As the original (module docstring): ``round(T * alpha / 5)`` anchors, their flat ``+-1``,
    ``+-w`` buffers clamped to ``[0, N - 1]``, then ``T - |buffers|`` registers: the top of
    ``deep - 1[buffer]``; the union (the original's index mask). If ``|buffers| > T`` (only with
    ``alpha`` far above 1) the original's ``topk`` gets a negative k and fails; here no register
    is picked and every buffer is kept.
    """
    n = shallow.shape[0]
    if valid is not None:  # absent tokens: never an anchor, never a register
        shallow = shallow.masked_fill(~valid, -torch.inf)
        deep = deep.masked_fill(~valid, -torch.inf)
    anchors = shallow.topk(min(n, round(keep * alpha / 5))).indices  # round(): half to even, as the original
    buffers = torch.cat([anchors, anchors - 1, anchors + 1, anchors - width, anchors + width]).clamp(0, n - 1)
    mask = torch.zeros(n, dtype=torch.bool, device=shallow.device)
    mask[buffers] = True
    if valid is not None:
        mask &= valid
    # The registers: the top max(T - |buffers|, 0) of the scores, chosen by rank on the device (the
    # buffer count is never read on the host).
    n_registers = (keep - mask.sum()).clamp(0, n)
    scores = deep - mask.to(deep.dtype)  # deep_attention -= available_index_mask.int()
    order = torch.sort(scores, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(n, device=order.device))
    kept = mask | (rank < n_registers)  # a register may be a buffer again (Qwen's scale)
    if valid is not None:
        kept &= valid
    return kept


def hiprune_select(
    shallow: torch.Tensor, deep: torch.Tensor, keep: int, width: int, alpha: float = 0.1, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """``[k]`` the kept indices, ascending, of :func:`hiprune_mask` (same arguments)."""
    mask = hiprune_mask(shallow, deep, keep, width, alpha, valid)
    return torch.nonzero(mask).flatten()  # the one host sync: the kept count is data-dependent


def _layers(family: str, args: dict) -> dict[str, tuple[int, ...]]:
    obj = args["object_layer"]
    obj = OBJECT_LAYER[family] if obj is None else int(obj)
    if obj < 1:
        raise ValueError(f"object_layer is 1-based (HIPRUNE_OBJECT_LAYER), got {obj}")
    return {"vit_attention_received": (obj - 1, DEEP_LAYER[family])}


@register_prune(
    "hiprune_pre_llm",
    stage="pre_llm",
    needs=("vit_attention_received",),
    vit_layers=_layers,
    exact_count=False,
    families=("llava", "llava_next", "qwen2_5_vl", "internvl"),
    source="Danielement321/HiPrune",
    paper="https://arxiv.org/abs/2508.00553",
    deviation=(
        "Not in UniPruneBench. As the original per family: LLaVA T = budget(N, r) (192/128/64 of 576); Qwen "
        "T = round(N*r), scores summed over queries so buffers can be re-picked (fewer than T kept), width of "
        "each image (original: the first image's); attention under the per-image mask (its FA2 path: none). "
        "InternVL (OURS): LLaVA scoring per tile, mean over pixel-shuffle units, T = budget(N, r). LLaVA-NeXT: per "
        "crop, budget(N, r) split over the crops in proportion to their tokens (original: HIPRUNE_RETENTION / crops), "
        "unpadded patches neither anchors nor registers."
    ),
)
def hiprune(ctx: PruneContext, keep: int, *, alpha: float = 0.1, object_layer: int | None = None) -> torch.Tensor:
    """Keep object anchors (shallow ViT attention) with their spatial buffers, plus global registers (deep ViT attention).

    Paper: https://arxiv.org/abs/2508.00553

    ``alpha``: ``HIPRUNE_ALPHA``; ``object_layer``: ``HIPRUNE_OBJECT_LAYER`` (1-based; None: the
    scripts' 9 on LLaVA-1.5 / InternVL, 16 on Qwen2.5-VL). The deep layer is the feature layer
    (LLaVA ``-2``, InternVL ``-1``) or the last block (Qwen). See the module docstring.
    """
    layers = _layers(ctx.family, {"object_layer": object_layer})["vit_attention_received"]
    received = ctx["vit_attention_received"]  # {layer: [H, N]}: summed over the query rows
    shallow, deep = (_up(received[l]).mean(dim=0) for l in layers)  # head means
    if ctx.crops is not None:  # LLaVA-NeXT: every crop on its own CLIP grid
        return _per_crop(ctx, keep, shallow, deep, alpha)
    if ctx.family == "qwen2_5_vl":
        t = round(ctx.n * ctx.ratio)  # HIPRUNE_QWEN_RETENTION: round() of the image's count
    else:  # a mean over the query rows: [CLS] + the patches of a CLIP image / an InternViT tile
        rows = ctx.n + 1 if ctx.family == "llava" else _tile_rows(ctx)
        shallow, deep, t = shallow / rows, deep / rows, keep
    width = ctx.grid[2] if ctx.grid is not None else max(1, round(ctx.n**0.5))
    return hiprune_select(shallow, deep, t, width, alpha)


def _per_crop(ctx: PruneContext, keep: int, shallow: torch.Tensor, deep: torch.Tensor, alpha: float) -> torch.Tensor:
    """LLaVA-NeXT: :func:`hiprune_select` on each crop's ``side x side`` CLIP grid (scores of the
    patches the unpadding removed left out via ``valid``), T = the crop's share of ``keep``, scores
    averaged over the crop's ``1 + side**2`` query rows. Returns rows of ``ctx.features``."""
    crops = ctx.crops
    grid = crops.side**2
    patch_of = crops.patch.to(shallow.device)[ctx.token_index]  # [N] each token's patch in its crop
    rows = crop_rows(ctx)
    kept = torch.zeros(ctx.n, dtype=torch.bool, device=shallow.device)  # over the image's rows
    for r, t in zip(rows, crop_budgets([int(r.numel()) for r in rows], keep)):
        if t == 0:
            continue
        patches = patch_of[r]
        full = torch.zeros(2, grid, dtype=shallow.dtype, device=shallow.device)  # shallow, deep on the crop's grid
        full[:, patches] = torch.stack([shallow[r], deep[r]]) / (grid + 1)
        valid = torch.zeros(grid, dtype=torch.bool, device=shallow.device)
        valid[patches] = True
        kept[r] = hiprune_mask(full[0], full[1], t, crops.side, alpha, valid)[patches]  # invalid patches are never kept
    return torch.nonzero(kept).flatten()  # the one host sync of the image (every crop's kept count at once)


def _tile_rows(ctx: PruneContext) -> int:
    """1 + the patches of one InternViT tile: its LLM tokens times the pixel-shuffle unit (2x2 in
    InternVL3) plus [CLS]."""
    tokens = ctx.grid[1] * ctx.grid[2] if ctx.grid is not None else ctx.n
    return 4 * tokens + 1
