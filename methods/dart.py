"""DART: duplication-aware token reduction with pivot tokens (Wen et al., 2025).

Registered as ``dart_intra_llm`` (:func:`dart`); :func:`dart_select` is the selection on explicit
tensors. Paper: https://arxiv.org/abs/2502.11494; original: ZichenWen1/DART (read at
xqy1111111/DART @5a19452, ``llava/model/language_model/modeling_llama_self.py ::
DART.get_retained_image_token`` l.397 and ``Qwen2_5-VL/.../modeling_qwen2_5_vl_self.py`` l.1553).
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F

from methods import PruneContext, Range, register_prune


def _up(t: torch.Tensor) -> torch.Tensor:
    """``t`` in at least fp32 (fp64 stays fp64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def dart_per_pivot(
    n_image: int,
    *,
    reduction_ratio: float = 0.778,
    max_num_trunction: int | None = 128,
    n_pivots: int = 8,
    family: str = "llava",
) -> int:
    """Tokens each pivot adds (the original's ``TOKEN_TOPK``).

    * ``family="llava"``: ``ceil(M // n_pivots)`` with ``M = max_num_trunction`` when set, else
      ``n_image * (1 - reduction_ratio)`` (defaults of ``llava/eval/model_vqa_loader.py``: M = 128,
      r = 0.778, giving 16);
    * ``family="qwen"``: ``int(n_image * (1 - reduction_ratio) / n_pivots)`` (``max_num_trunction``
      is ignored there).
    """
    if family == "llava":
        m = max_num_trunction if max_num_trunction is not None else n_image * (1 - reduction_ratio)
        return math.ceil(m // n_pivots)
    if family == "qwen":
        return int(n_image * (1 - reduction_ratio) / n_pivots)
    raise ValueError(f"family must be 'llava' or 'qwen', got {family!r}")


def dart_select(
    image_keys: torch.Tensor,
    text_keys: torch.Tensor,
    image_states: torch.Tensor,
    text_states: torch.Tensor,
    *,
    per_pivot: int,
    image_start: int | torch.Tensor,
    n_pivots_image: int = 4,
    n_pivots_text: int = 4,
) -> torch.Tensor:
    """The image tokens DART retains: its pivots plus each pivot's least similar tokens.

    Args:
        image_keys: ``[N, Dk]`` post-RoPE keys of layer K-1 for the image tokens, heads flattened
            (LLaVA: after ``repeat_kv``, ``Dk = H * Dh``; Qwen: before it, ``Dk = H_kv * Dh``; the
            L1 ranking is the same either way).
        text_keys: ``[T, Dk]`` the same for every token after the image (question + assistant prefix).
        image_states: ``[N, D]`` layer K-1's output for the image tokens passed through the model's
            final norm (``model.norm``).
        text_states: ``[T, D]`` the same for the text tokens.
        per_pivot: tokens each pivot adds (``TOKEN_TOPK``, see :func:`dart_per_pivot`).
        image_start: sequence index of the first image token (the original's
            ``image_token_start_index``, 35 on LLaVA-1.5). It only sets the pivots' iteration order,
            which is CPython ``set`` order of the absolute indices (see below).
        n_pivots_image / n_pivots_text: 4 and 4 in the original (UniPruneBench: 10 and 5).

    Returns:
        ``[n_pivots_image + <= (n_pivots_image + n_pivots_text) * per_pivot]`` indices into the image
        tokens (``0..N-1``), ascending. 132 = 4 + 8*16 for the LLaVA defaults: the count is the
        method's, not a budget.

    Math, as the original: image pivots = top-``n_pivots_image`` image tokens by the L1 norm of
    their key; text pivots = top-``n_pivots_text`` text tokens by the same norm. The pool starts
    as the image tokens minus the image pivots. For each pivot, in the iteration order of the
    Python ``set`` built from ``image_pivots + text_pivots`` (absolute sequence indices), the
    ``per_pivot`` pool tokens with the LOWEST cosine similarity (of the normed states) to the pivot
    are retained and leave the pool. Finally the text pivots are removed; the image pivots stay.

    Quirk kept: the pivot order is CPython ``set`` iteration order, which depends on the absolute
    index values (hash = value, slot = value mod table size), not the order given; this function
    builds that same set, so selections equal the original's. Each pivot's candidates are also
    listed in ``set`` order (ties in ``topk`` only).

    Guards the original lacks (it raises): fewer than ``n_pivots_*`` tokens take them all, and a
    pivot adds ``min(per_pivot, pool size)`` tokens.
    """
    n, t = image_keys.shape[0], text_keys.shape[0]
    device = image_keys.device
    image_l1 = _up(image_keys).abs().sum(dim=-1)  # [N] torch.norm(p=1)
    text_l1 = _up(text_keys).abs().sum(dim=-1)  # [T]
    n_img, n_txt = min(n_pivots_image, n), min(n_pivots_text, t)
    image_top = image_l1.topk(n_img).indices
    text_top = text_l1.topk(n_txt).indices
    # The one host sync: the pivots' absolute indices, whose CPython set order is the iteration order.
    start = torch.as_tensor(image_start, device=device).reshape(1)
    head = torch.cat([start, image_top + start, text_top + start + n]).tolist()
    image_start, image_pivots, text_pivots = head[0], head[1 : 1 + n_img], head[1 + n_img :]

    def state(i: int) -> torch.Tensor:  # absolute sequence index -> its normed state [D]
        return image_states[i - image_start] if i < image_start + n else text_states[i - image_start - n]

    retained = set(image_pivots + text_pivots)
    # The pool's iteration order (CPython set order, fixed: removals leave every entry in its slot),
    # as rows of image_states; the pool itself lives on the device as a mask over those rows, and its
    # size follows from the counts alone, so no pivot step reads the device.
    pool0 = set(range(image_start, image_start + n)) - set(image_pivots)
    order = torch.tensor([i - image_start for i in pool0], dtype=torch.long, device=device)  # [P]
    in_pool = torch.ones(n, dtype=torch.bool, device=device)
    in_pool[image_top] = False
    kept = torch.zeros(n, dtype=torch.bool, device=device)
    kept[image_top] = True
    size = len(pool0)
    for pivot in list(retained):  # CPython set order: reproduces the original's iteration
        if not size:
            break
        # The pool's members in set order: a stable sort moves the ones still in it to the front.
        live = torch.sort((~in_pool[order]).to(torch.uint8), stable=True).indices[:size]
        rows = order[live]  # [size] = the original's candidates, in its order
        cos = F.cosine_similarity(state(pivot).unsqueeze(0), image_states[rows], dim=-1)
        take = min(per_pivot, size)
        picked = rows[(-cos).topk(take).indices]
        kept[picked] = True
        in_pool[picked] = False
        size -= take
    # Retained image tokens: the image pivots and every pick (distinct), ascending.
    count = n_img + (len(pool0) - size)
    return torch.sort((~kept).to(torch.uint8), stable=True).indices[:count]


@register_prune(
    "dart_intra_llm",
    stage="intra_llm",
    needs=("prev_keys", "prev_text_keys", "final_normed_features", "final_normed_text", "sequence_index"),
    exact_count=False,
    source="ZichenWen1/DART",
    paper="https://arxiv.org/abs/2502.11494",
    deviation="Pivots 4+4 in the original's set order and final-norm cosine (UniPruneBench: 10+5, "
    "layer K's input_layernorm); per-pivot count from the harness budget: keep // 8.",
)
def dart(
    ctx: PruneContext,
    keep: int,
    *,
    n_pivots_image: Annotated[int, Range(ge=1)] = 4,
    n_pivots_text: Annotated[int, Range(ge=1)] = 4,
) -> torch.Tensor:
    """Keep pivot tokens (largest key L1 norm) and, per pivot, the least similar image tokens.

    Budget mapping (decided once): the original's per-pivot count is ``N(1-r)/8`` on Qwen and
    ``ceil(M // 8)`` with an absolute ``M`` on LLaVA; here ``M`` is the harness budget ``keep``, so
    each of the 8 pivots adds ``keep // 8`` tokens and DART retains ``4 + 8 * (keep // 8)`` (at most
    ``keep + 4``; the trace reports the actual count). At the input of layer K (2 by default) it reads
    layer K-1's keys and layer K-1's output through the final norm, as the original.
    """
    per_pivot = keep // (n_pivots_image + n_pivots_text)
    return dart_select(
        ctx["prev_keys"],
        ctx["prev_text_keys"],
        ctx["final_normed_features"],
        ctx["final_normed_text"],
        per_pivot=per_pivot,
        image_start=ctx["sequence_index"][0],  # read with the pivots, in dart_select's one sync
        n_pivots_image=n_pivots_image,
        n_pivots_text=n_pivots_text,
    )
