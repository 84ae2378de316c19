"""SparseVLM: text-guided visual-token sparsification with token recycling (Zhang et al., ICML 2025).

Registered as ``sparsevlm`` (:func:`sparsevlm`), a hybrid: one name, three intra-LLM events.
Original: Gumpest/SparseVLMs @535f8ba (the v1.5 budgets),
``llava/model/language_model/modelling_sparse_llama.py :: LlamaDynamicvitModel.forward`` (raters
l.204, pruning and recycling l.255-311), ``score.py :: attn_postprocess_topk`` and
``utils.py :: cluster_and_merge``. Paper: https://arxiv.org/abs/2410.04417.

What the original computes (LLaVA-1.5, one image of 576 tokens):

* **Raters**, once, on the decoder's input embeddings: ``m = softmax(V T^T, over text).mean(over
  visual)``; the raters are the text tokens with ``m > mean(m)``.
* **Prune** the OUTPUT of layers 2, 6 and 15 with that layer's own causal softmax attention:
  ``relation_j = mean over raters of (head-mean A)[rater, j]``; keep the top
  ``min(budget, v_num - 1)`` visual tokens (a mask: survivors stay in sequence order). Budgets for
  ``retained_tokens`` 192 / 128 / 64: (300, 200, 110) / (303, 110, 36) / (66, 30, 17).
* **Recycle**: of the pruned tokens, the top ``int(0.3 * n_pruned) + 1`` by relation (topk order)
  are clustered by DPC-kNN into ``int(n / 10) + 1`` clusters; each cluster's mean becomes a new
  visual token inserted after the kept visual tokens. Recycled tokens count as visual tokens in
  later layers (they can be ranked, pruned and recycled again).

How it runs here:

* Pruning the output of layer l with layer l's attention is pruning at the INPUT of layer l + 1
  with the previous layer's attention (``prev_attention_text_only``): events at spec layers
  3, 7, 16. ``layers`` (PRUNE_ARGS) are the original's 0-based layer indices.
* **KEEP_RATIO -> budgets** (decided once): a budget is a fraction of the image's own token count
  ``N`` (``budget(N, b / 576)``, exact for N = 576). KEEP_RATIO 192/576, 128/576 and 64/576
  (0.333, 0.222, 0.111; within half a token of 576) select the published lists; between them each stage's fraction is
  interpolated linearly in KEEP_RATIO; above 192/576 (below 64/576) the 192 (64) list is scaled by
  ``KEEP_RATIO / (192/576)`` (``/ (64/576)``), and a stage whose fraction reaches 1 is skipped.
  ``retained_tokens`` (192/128/64) or ``budgets`` (three counts for a 576-token image) override
  it. The trace reports each event's actual count (kept + recycled, ``Event.merged`` of them
  recycled); the sample record's ``avg_visual`` is the mean over layers, the original's
  "equal token number".
* "Text" is every token after the image that is no image's visual token (for one image, the
  question and the assistant prefix, as in the original); its rows are the same at every layer.

Deviations (documented in the README table):

* Positions: the original renumbers the shortened sequence 0..L'-1; here survivors keep their
  original positions (as for every method of the engine) and recycled tokens, inserted right
  after the image's last kept token, take the position of the image's last original token.
* The density noise ``rand * 1e-6`` is drawn from the harness's seeded generator (``PRUNE_SEED``),
  not the global RNG; ``noise=0`` makes the clustering deterministic.
* When the budget reaches the current count the original still drops one token (``v_num - 1``)
  and recycles it as a one-token cluster; the engine skips such a stage (nothing to cut).
* Multi-image prompts (the original handles one image): each image is pruned on its own, with its
  own raters (the text after it).
"""

from __future__ import annotations

from typing import Annotated

import torch

from methods import OneOf, PruneContext, Range, Selection, register_prune

LLAVA_TOKENS = 576
LAYERS = (2, 6, 15)  # 0-based layers whose OUTPUT is pruned (score.py :: layer_dict)
BUDGETS = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}  # score.py :: sparse_token_dict (v1.5)


def _up(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def sparsevlm_raters(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Indices ``[R]`` (ascending) into ``text`` of the rater tokens.

    Args:
        visual: ``[N, D]`` the image's tokens at the decoder input.
        text: ``[T, D]`` the text after the image at the decoder input.

    ``m = softmax(visual @ text^T, dim=text).mean(dim=visual)``; raters: ``m > m.mean()`` (every
    text token when none is above the mean, where the original would average over none: NaN).
    """
    return torch.nonzero(sparsevlm_rater_mask(visual, text)).flatten()


def sparsevlm_rater_mask(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``[T]`` bool: the raters of :func:`sparsevlm_raters` as a mask (no host sync)."""
    m = (_up(visual) @ _up(text).T).softmax(dim=-1).mean(dim=0)  # [T]
    raters = m > m.mean()
    # All scores equal (e.g. one text token): the original's mean over no rater is NaN; all rate.
    return raters | ~raters.any()


def sparsevlm_relation(attn_text: torch.Tensor, raters: torch.Tensor) -> torch.Tensor:
    """``[N]`` relation of each visual token: head-mean attention ``attn_text`` ``[H, T, N]``
    (rows = the text tokens, columns = the current visual tokens), averaged over the rater rows."""
    a = _up(attn_text).mean(dim=0)  # [T, N]
    if raters.dtype == torch.bool:  # a mask (sparsevlm_rater_mask): a masked mean, no host sync
        return torch.where(raters[:, None], a, 0).sum(dim=0) / raters.sum().to(a.dtype)
    return a[raters].mean(dim=0)


def dpc_knn_assign(x: torch.Tensor, cluster_num: int, noise: torch.Tensor | None = None) -> torch.Tensor:
    """``[M]``: the cluster (0..cluster_num-1, centres in score order) of each row of ``x`` ``[M, C]``
    under :func:`cluster_and_merge`'s DPC-kNN rule."""
    x = _up(x)
    c = x.shape[1]
    dist = (x[:, None, :] - x[None, :, :]).norm(dim=-1, p=2) / c**0.5  # [M, M]
    nearest = torch.topk(dist, k=cluster_num, dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()
    if noise is not None:
        density = density + noise.to(density)
    denser = (density[None, :] > density[:, None]).to(x.dtype)  # [i, j]: j is denser than i
    parent_dist = (dist * denser + dist.max() * (1 - denser)).min(dim=-1).values
    centres = torch.topk(parent_dist * density, k=cluster_num).indices  # [cluster_num]
    assign = dist[centres].argmin(dim=0)  # [M]: the nearest centre of every token
    assign[centres] = torch.arange(cluster_num, device=x.device)
    return assign


def cluster_and_merge(x: torch.Tensor, cluster_num: int, noise: torch.Tensor | None = None) -> torch.Tensor:
    """DPC-kNN clustering of ``x`` ``[M, C]`` into ``cluster_num`` clusters; ``[cluster_num, C]`` means.

    As ``utils.py :: cluster_and_merge``: distances ``||x_i - x_j|| / sqrt(C)``; density
    ``exp(-mean(k-NN dist^2))`` with k = cluster_num (itself included) plus ``noise`` ``[M]``;
    each token's distance to the nearest denser token (the maximum distance for the densest);
    centres = top ``cluster_num`` of ``dist * density`` (in that order); every token joins its
    nearest centre, each centre its own cluster; a cluster's token is ``sum / (count + 1e-6)``.
    """
    x = _up(x)
    c = x.shape[1]
    assign = dpc_knn_assign(x, cluster_num, noise)
    counts = torch.zeros(cluster_num, dtype=x.dtype, device=x.device).index_add_(0, assign, torch.ones_like(x[:, 0]))
    sums = torch.zeros(cluster_num, c, dtype=x.dtype, device=x.device).index_add_(0, assign, x)
    return sums / (counts[:, None] + 1e-6)


def sparsevlm_select(
    relation: torch.Tensor,
    features: torch.Tensor,
    keep: int,
    *,
    recycle: bool = True,
    recycle_ratio: float = 0.3,
    cluster_ratio: float = 0.1,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One SparseVLM layer: ``(kept indices [keep] ascending, recycled tokens [c, D] or None)``.

    Args:
        relation: ``[N]`` (:func:`sparsevlm_relation`); features: ``[N, D]`` the layer's output
            states of the same tokens; keep: ``min(budget, N - 1)``, the caller's.
        noise: ``[m]`` density noise for the ``m`` recycled candidates (None: none).
    """
    n = relation.numel()
    mask = torch.zeros(n, dtype=torch.bool, device=relation.device)
    mask[torch.topk(relation, keep).indices] = True
    # The counts are known (keep and n - keep): a stable sort of the mask lists the pruned tokens,
    # then the kept ones, each ascending (no nonzero: no host sync).
    order = torch.sort(mask.to(torch.uint8), stable=True).indices
    kept = order[n - keep :]
    if not recycle or keep == n:
        return kept, None
    pruned = order[: n - keep]  # ascending, as torch.where(pred_score_vis == 0)
    m = int(pruned.numel() * recycle_ratio) + 1
    top = relation[pruned].topk(min(m, pruned.numel())).indices  # topk order
    candidates = features[pruned[top]]
    clusters = int(candidates.shape[0] * cluster_ratio) + 1
    if clusters == 0:
        clusters = candidates.shape[0]
    return kept, cluster_and_merge(candidates, min(clusters, candidates.shape[0]), noise)


def sparsevlm_fractions(keep_ratio: float) -> tuple[float, ...]:
    """The three stage budgets as fractions of the image's tokens, for ``keep_ratio`` (see the
    module docstring): the published lists at 192/128/64 of 576, linear in between, scaled outside."""
    points = sorted((r / LLAVA_TOKENS, tuple(b / LLAVA_TOKENS for b in BUDGETS[r])) for r in BUDGETS)
    for r, f in points:  # within half a token of 576 (e.g. 0.333): the published list itself
        if abs(keep_ratio - r) * LLAVA_TOKENS <= 0.5:
            return f
    lo, hi = points[0], points[-1]
    if keep_ratio >= hi[0]:
        return tuple(f * keep_ratio / hi[0] for f in hi[1])
    if keep_ratio <= lo[0]:
        return tuple(f * keep_ratio / lo[0] for f in lo[1])
    for (r0, f0), (r1, f1) in zip(points, points[1:]):
        if r0 <= keep_ratio <= r1:
            t = (keep_ratio - r0) / (r1 - r0)
            return tuple(a + t * (b - a) for a, b in zip(f0, f1))
    raise AssertionError("unreachable")


def sparsevlm_schedule(keep_ratio: float | None, args: dict) -> tuple[tuple[tuple[int, float], ...], dict]:
    """The events of ``PRUNE_METHOD=sparsevlm``: ``((spec layer, fraction), ...)`` (the original's
    layer + 1), stages whose fraction reaches 1 left out."""
    layers = tuple(int(x) for x in args["layers"])
    if args["budgets"]:
        fractions = tuple(float(b) / LLAVA_TOKENS for b in args["budgets"])
    elif args["retained_tokens"]:
        if args["retained_tokens"] not in BUDGETS:
            raise ValueError(f"retained_tokens={args['retained_tokens']} has no published budgets (192, 128 or 64)")
        fractions = tuple(b / LLAVA_TOKENS for b in BUDGETS[args["retained_tokens"]])
    else:
        fractions = sparsevlm_fractions(keep_ratio)
    if len(fractions) != len(layers):
        raise ValueError(f"{len(layers)} layers {layers} but {len(fractions)} budgets")
    if list(layers) != sorted(set(layers)) or layers[0] < 0:
        raise ValueError(f"layers must increase from >= 0 (the original's 0-based layers), got {layers}")
    return tuple((layer + 1, f) for layer, f in zip(layers, fractions) if f < 1.0), {}


@register_prune(
    "sparsevlm",
    stage="intra_llm",
    needs=("input_visual", "input_text_only", "prev_attention_text_only"),
    source="Gumpest/SparseVLMs",
    paper="https://arxiv.org/abs/2410.04417",
    deviation="Not in UniPruneBench's code. v1.5 budgets scaled to KEEP_RATIO and N; positions kept (original "
    "renumbers), recycled tokens at the image's last position; density noise from PRUNE_SEED.",
    default_layer=3,
    schedule=sparsevlm_schedule,
)
def sparsevlm(
    ctx: PruneContext,
    keep: int,
    *,
    layers: Annotated[tuple, Range(ge=0)] = LAYERS,  # the original's 0-based layers
    retained_tokens: Annotated[int, OneOf(0, *sorted(BUDGETS))] = 0,  # 0: from KEEP_RATIO
    budgets: Annotated[tuple, Range(gt=0)] = (),  # tokens of a 576-token image, one per layer
    recycle: bool = True,
    recycle_ratio: Annotated[float, Range(ge=0, le=1)] = 0.3,
    cluster_ratio: Annotated[float, Range(ge=0, le=1)] = 0.1,
    noise: Annotated[float, Range(ge=0)] = 1e-6,
) -> Selection:
    """Keep the visual tokens the text raters attend to most; recycle the best pruned ones as cluster means.

    Paper: https://arxiv.org/abs/2410.04417

    One event of the schedule (module docstring): raters from the decoder input
    (``input_visual`` / ``input_text_only``), relation from the previous layer's attention
    (``prev_attention_text_only``), top ``keep`` kept, then ``recycle_ratio`` / ``cluster_ratio``
    recycling with density noise ``noise * rand`` (``PRUNE_SEED``). ``layers``,
    ``retained_tokens`` and ``budgets`` only shape the schedule.
    """
    raters = sparsevlm_rater_mask(ctx["input_visual"], ctx["input_text_only"])
    relation = sparsevlm_relation(ctx["prev_attention_text_only"], raters)
    n_pruned = ctx.n - keep
    m = min(int(n_pruned * recycle_ratio) + 1, n_pruned)
    draw = None
    if recycle and noise and m:
        draw = torch.rand(m, generator=ctx.generator) * noise
    kept, added = sparsevlm_select(
        relation, ctx.features, keep, recycle=recycle, recycle_ratio=recycle_ratio, cluster_ratio=cluster_ratio, noise=draw
    )
    return Selection(kept, None, added)
