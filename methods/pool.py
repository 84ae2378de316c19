"""Spatial pooling: UniPruneBench's pooling baseline, made to honour an arbitrary budget."""

from __future__ import annotations

import logging
import math

from typing import Annotated

import torch

from methods import OneOf, PruneContext, crop_budgets, register_prune

logger = logging.getLogger(__name__)

MODES = ("avg", "max")


def resolve_hw(n: int) -> tuple[int, int]:
    """UniPruneBench's grid guess for ``n`` tokens without a known grid (``Pool_PreLLM._resolve_hw``).

    A square if ``n`` is one, else the largest divisor ``h <= sqrt(n)`` as height and ``n // h`` as
    width (a prime ``n`` gives ``(1, n)``).
    """
    root = math.isqrt(n)
    for h in range(root, 0, -1):
        if n % h == 0:
            return h, n // h
    return n, 1


def _windows(size: int, cells: int) -> list[tuple[int, int]]:
    """Adaptive-pooling windows ``[start, end)`` of ``F.adaptive_*_pool``: floor(i*S/c) .. ceil((i+1)*S/c)."""
    return [((i * size) // cells, -((-(i + 1) * size) // cells)) for i in range(cells)]


def pool_layout(h: int, w: int, k: int) -> list[tuple[int, int, int, int]]:
    """Windows ``(row_start, row_end, col_start, col_end)`` that pool an ``h x w`` grid into ``k`` cells.

    ``r`` row bands, ``r = round(sqrt(k*h/w))`` clamped to ``[max(1, ceil(k/w)), min(h, k)]`` (the
    output grid keeps the input's aspect ratio); band ``i`` gets ``k // r`` cells, the first
    ``k % r`` bands one more. Rows and columns are split with the adaptive-pooling rule. When
    ``r`` divides ``k`` this is exactly ``adaptive_*_pool2d(x, (r, k // r))``; on a square grid
    ``k`` = 4, 16, 25 gives UniPruneBench's 2x2, 4x4, 5x5 targets. Windows are in row-major order.
    """
    if not 1 <= k <= h * w:
        raise ValueError(f"cannot pool a {h}x{w} grid into {k} cells")
    lo, hi = max(1, -(-k // w)), min(h, k)
    rows = min(max(round(math.sqrt(k * h / w)), lo), hi)
    base, extra = divmod(k, rows)
    out = []
    for band, (r0, r1) in enumerate(_windows(h, rows)):
        for c0, c1 in _windows(w, base + (band < extra)):
            out.append((r0, r1, c0, c1))
    return out


def _frame_budgets(t: int, keep: int) -> list[int]:
    """``keep`` spread over ``t`` frames/tiles as evenly as possible, earlier frames first."""
    base, extra = divmod(keep, t)
    return [base + (f < extra) for f in range(t)]


@register_prune(
    "pool_pre_llm",
    stage="pre_llm",
    source="TianfanPeng/VLMUniPruneBench",
    paper="https://arxiv.org/abs/2511.02650",
    deviation="Any budget (UniPruneBench: 4/16/25 per tile, square targets only, InternVL only); pooled "
    "tokens take the position of their window's centre token instead of the image span's first k slots. "
    "LLaVA-NeXT (ours): the base grid and the unpadded high-resolution grid pooled apart, the budget split between them.",
)
def pool(ctx: PruneContext, keep: int, *, mode: Annotated[str, OneOf(*MODES)] = "avg") -> tuple[torch.Tensor, torch.Tensor]:
    """Pool the visual tokens into `keep` spatial cells (adaptive average or max pooling).

    Paper (UniPruneBench): https://arxiv.org/abs/2511.02650

    Budget mapping. UniPruneBench (``methods/Pool_PreLLM.py``) runs ``adaptive_{avg,max}_pool2d``
    on every InternVL tile separately, to a square target of 4, 16 or 25 tokens per tile
    (``POOL_TARGET_TOKENS``, default 16; ``POOLING_MODE`` avg). Here the budget ``keep`` decides:

    * ``ctx.grid = (t, h, w)``: ``keep`` is spread over the ``t`` frames/tiles as evenly as possible
      (the first ``keep % t`` get one more; a frame with 0 cells is dropped entirely);
    * each frame's ``h x w`` grid is pooled into its ``k`` cells by :func:`pool_layout`:
      ``r`` adaptive row bands of ``k // r`` or ``k // r + 1`` adaptive column windows each, so that
      exactly ``k`` cells come out. When ``k = r*c`` with that aspect-preserving ``r`` (e.g. 4, 16,
      25 on a square grid) the result equals ``adaptive_*_pool2d(frame, (r, c))``, i.e.
      UniPruneBench's output at its targets;
    * without a grid (or one that does not match ``ctx.n``) the tokens are one frame on
      UniPruneBench's guessed grid (:func:`resolve_hw`);
    * LLaVA-NeXT (``ctx.crops``): two frames, the base image's ``side x side`` grid and the
      unpadded high-resolution window (the crops stitched, ``Crops.window``), ``keep`` split
      between them in proportion to their tokens (:func:`methods.crop_budgets`).

    Each pooled token replaces the token at its window's centre (row ``(r0+r1-1)//2``, column
    ``(c0+c1-1)//2``), which is unique per window, so the pooled token keeps a position inside the
    region it summarises (Qwen's 3-D RoPE). UniPruneBench put the pooled tokens in the first
    ``k`` slots of the image span instead (InternVL renumbers positions, so it made no difference
    there).

    Args:
        ctx: ``ctx.features`` ``[N, D]`` projector outputs in the image's grid order.
        keep: number of pooled tokens.
        mode: ``"avg"`` (window mean) or ``"max"`` (window maximum per channel).

    Returns:
        ``(indices [keep], pooled [keep, D])``: the window-centre tokens, ascending, and the pooled
        features that replace them.
    """
    if mode not in MODES:
        raise ValueError(f"pool_pre_llm: mode must be one of {MODES}, got {mode!r}")
    x = ctx.features
    n = ctx.n
    d = x.shape[-1]
    pool_2d = torch.nn.functional.adaptive_avg_pool2d if mode == "avg" else torch.nn.functional.adaptive_max_pool2d
    if ctx.crops is not None and n == ctx.n_orig:
        # LLaVA-NeXT: the base image's side x side grid and the unpadded high-resolution window, two
        # grids, the budget split between them in proportion to their tokens (as per-tile budgets).
        crops = ctx.crops
        top, bottom, left, right = crops.window
        base = crops.side**2
        grids = [(0, crops.side, crops.side), (base, bottom - top, right - left)]
        budgets = crop_budgets([base, n - base], keep)
    else:
        if ctx.grid is not None and math.prod(ctx.grid) == n:
            t, h, w = ctx.grid
        else:
            if ctx.grid is not None:
                logger.warning("pool_pre_llm: grid %s does not hold %d tokens; guessing the grid", ctx.grid, n)
            t, (h, w) = 1, resolve_hw(n)
        grids = [(f * h * w, h, w) for f in range(t)]
        budgets = _frame_budgets(t, keep)
    indices: list[int] = []
    pooled: list[torch.Tensor] = []
    for (start, h, w), k in zip(grids, budgets):
        if k == 0:
            continue
        frame = x[start : start + h * w].reshape(1, h, w, d).permute(0, 3, 1, 2)  # [1, D, h, w]
        layout = pool_layout(h, w, k)
        # One adaptive pool per row band: the band [r0, r1) pooled to (1, cells) gives the same
        # windows as pool_layout (same floor/ceil rule).
        bands: dict[tuple[int, int], int] = {}
        for r0, r1, _, _ in layout:
            bands[(r0, r1)] = bands.get((r0, r1), 0) + 1
        for (r0, r1), cells in bands.items():
            out = pool_2d(frame[:, :, r0:r1, :], (1, cells))  # [1, D, 1, cells]
            pooled.append(out[0, :, 0, :].T)  # [cells, D]
        for r0, r1, c0, c1 in layout:
            indices.append(start + ((r0 + r1 - 1) // 2) * w + (c0 + c1 - 1) // 2)
    return torch.tensor(indices, dtype=torch.long, device=x.device), torch.cat(pooled)
