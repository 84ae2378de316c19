"""VisionZip (Qwen2.5-VL / InternVL path), HiPrune and VScan: hand-derived selections, the ViT inputs
the engine captures against the unpatched models' eager attention, and runs through the engine
against the no-cache reference (tests/families.py, tests/reference.py).

Every expected index below is written literally, derived by hand from the original's rules (the
comment next to it says how); METHODS.md "Second batch" lists the quirks pinned here.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import methods
from methods import PruneContext, check_selection, get_method
from methods.hiprune import hiprune_select
from methods.visionzip import visionzip_qwen_select
from methods.vscan import vscan_merge, vscan_schedule, vscan_window_select, vscan_window_topk

F64 = torch.float64


def ctx_for(x: torch.Tensor, *, family: str, ratio: float | None = None, grid=None, stage="pre_llm", **extras) -> PruneContext:
    n = x.shape[0]
    return PruneContext(
        features=x, stage=stage, layer=None if stage == "pre_llm" else 2, positions=torch.arange(n),
        token_index=torch.arange(n), n_orig=n, grid=grid, extras=extras, family=family, ratio=ratio,
    )


def run(name: str, ctx: PruneContext, keep: int, **hyper):
    m = get_method(name)
    return check_selection(m, m.fn(ctx, keep, **hyper), ctx.n, keep)


def unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


class SyncCounter(TorchDispatchMode):
    """Counts the operators that make the host wait for the device (ENVIRONMENT.md): ``.item()`` /
    ``int(t)`` / ``bool(t)`` (``_local_scalar_dense``), ``nonzero`` and boolean-mask indexing."""

    SYNCS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique")

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket) in self.SYNCS or (
            str(func.overloadpacket) == "aten.index" and any(t is not None and t.dtype == torch.bool for t in args[1])
        ):
            self.count += 1
        return func(*args, **(kwargs or {}))


# ------------------------------------------------------------------------------ VisionZip (Qwen path)
def visionzip_qwen_example():
    # 40 merged tokens. Attention: 0.9 at tokens 5, 12, 13, 20, 33, 39, 0.1 elsewhere. At ratio 0.2:
    # dominant int((0.2 - 0.05) * 40) = int(6.000000000000001) = 6 -> those six; contextual
    # max(int(0.05 * 40), 1) = 2. The 34 others ascending [0, 1, 2, 3, 4, 6, ..., 11, 14, ..., 19, 21, ...]:
    # step 34 // 2 = 17 -> targets at list positions 0 and 17 = tokens 0 and 21. Keys: token 0 at
    # 0 deg, 21 at 90 deg, every other even token at 10 deg (-> target 0), odd at 80 deg (-> 21).
    # Features h_t = t: contextual_0 = 0 + mean(even others: 2..38 without 12, 20: 348 / 17),
    # contextual_21 = 21 + mean(odd others: 1..39 without 5, 13, 21, 33, 39: 289 / 15).
    n = 40
    attention = torch.full((n,), 0.1, dtype=F64)
    attention[[5, 12, 13, 20, 33, 39]] = 0.9
    keys = torch.tensor([unit(10 if t % 2 == 0 else 80) for t in range(n)], dtype=F64)
    keys[0], keys[21] = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    features = torch.arange(n, dtype=F64).view(n, 1)
    return features, attention, keys


def test_visionzip_qwen_hand_checked():
    features, attention, keys = visionzip_qwen_example()
    idx, feats = visionzip_qwen_select(features, attention, keys, 0.2)
    assert idx.tolist() == [5, 12, 13, 20, 33, 39, 0, 21]  # dominant ascending, then the targets
    torch.testing.assert_close(feats.flatten(), torch.tensor([5, 12, 13, 20, 33, 39, 348 / 17, 21 + 289 / 15], dtype=F64))


def test_visionzip_registered_on_qwen_and_internvl_replaces_targets_in_place():
    # The same example through the registry: the scores are the head mean of the received attention
    # (2 heads: 0.9 = mean(1.2, 0.6)); the kept tokens are sorted, the targets carry their merged tokens.
    features, attention, keys = visionzip_qwen_example()
    received = torch.stack([attention * 4 / 3, attention * 2 / 3])
    for family in ("qwen2_5_vl", "internvl"):
        ctx = ctx_for(features, family=family, ratio=0.2, vit_attention_received={-1: received}, vit_unit_keys={-1: keys})
        idx, feats = run("visionzip_pre_llm", ctx, methods.budget(40, 0.2))
        assert idx.tolist() == [0, 5, 12, 13, 20, 21, 33, 39]
        torch.testing.assert_close(feats.flatten(), torch.tensor([348 / 17, 5, 12, 13, 20, 21 + 289 / 15, 33, 39], dtype=F64))


def test_visionzip_qwen_counts_are_the_originals_int_arithmetic():
    # int((r - 0.05) N) + max(int(0.05 N), 1), floats included: at r = 0.6, N = 20 the original's
    # int((0.6 - 0.05) * 20) = int(10.999999999999998) = 10, so it keeps 10 + 1 = 11 (budget: 12);
    # at r = 0.35, N = 12: int(3.5999999999999996) = 3 dominant + max(int(0.6), 1) = 1 contextual.
    g = torch.Generator().manual_seed(0)
    for n, r, expected in [(20, 0.6, 11), (12, 0.35, 4), (576, 0.111, 35 + 28), (1000, 0.222, 172 + 50)]:
        x = torch.randn(n, 3, generator=g, dtype=F64)
        idx, feats = visionzip_qwen_select(x, torch.rand(n, generator=g, dtype=F64), torch.randn(n, 4, generator=g, dtype=F64), r)
        assert idx.numel() == feats.shape[0] == idx.unique().numel() == expected


def test_visionzip_qwen_selection_makes_no_host_sync():
    features, attention, keys = visionzip_qwen_example()
    with SyncCounter() as counter:
        visionzip_qwen_select(features, attention, keys, 0.2)
    assert counter.count == 0


# ------------------------------------------------------------------------------------------ HiPrune
def hiprune_example():
    # A 4 x 4 grid (w = 4), T = 10. Object scores: 5 (0.9) > 3 (0.8) > 15 (0.7) > the rest.
    shallow = torch.full((16,), 0.01, dtype=F64)
    shallow[[5, 3, 15]] = torch.tensor([0.9, 0.8, 0.7], dtype=F64)
    return shallow


def test_hiprune_hand_checked_flat_buffers_and_registers():
    # alpha = 1.25: anchors round(10 * 1.25 / 5) = round(2.5) = 2 (half to even; half up would be 3):
    # tokens 5 and 3. Buffers, flat +-1 / +-w clamped to [0, 15]: 5 -> 5, 4, 6, 1, 9; 3 -> 3, 2, 4
    # (3 + 1: the next row's first token, no row-wrap check), -1 -> 0 (clamped), 7. Unique: {0, 1,
    # 2, 3, 4, 5, 6, 7, 9}, 9 tokens -> 10 - 9 = 1 register. Deep scores (means, <= 1): token 2 (a
    # buffer) 0.95 -> -0.05 after "- 1", token 12 0.5 -> the register is 12.
    deep = torch.full((16,), 0.01, dtype=F64)
    deep[2], deep[12] = 0.95, 0.5
    kept = hiprune_select(hiprune_example(), deep, keep=10, width=4, alpha=1.25)
    assert kept.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 9, 12]


def test_hiprune_qwen_scale_lets_a_buffer_be_picked_again():
    # The Qwen scores are SUMS over the queries: token 2's 3.0 - 1 = 2.0 still beats token 12's 1.5,
    # so the one register is buffer 2 again and the image keeps 9 tokens, not T = 10 (the original's
    # select_mask[retain] collapses the duplicate).
    deep = torch.full((16,), 0.2, dtype=F64)
    deep[2], deep[12] = 3.0, 1.5
    kept = hiprune_select(hiprune_example(), deep, keep=10, width=4, alpha=1.25)
    assert kept.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 9]


def literal_hiprune(shallow: list[float], deep: list[float], t: int, width: int, alpha: float) -> set[int]:
    """The original's selection rule, one token at a time, written out from its description."""
    n = len(shallow)
    anchors = sorted(range(n), key=lambda i: -shallow[i])[: round(t * alpha / 5)]
    buffers = {min(max(i + d, 0), n - 1) for i in anchors for d in (0, -1, 1, -width, width)}
    scores = [deep[i] - (1 if i in buffers else 0) for i in range(n)]
    registers = sorted(range(n), key=lambda i: -scores[i])[: t - len(buffers)]
    return buffers | set(registers)


@pytest.mark.parametrize("n, width, t", [(576, 24, 192), (576, 24, 64), (1036, 37, 231), (80, 10, 40)])
def test_hiprune_equals_the_rule_written_out(n, width, t):
    g = torch.Generator().manual_seed(n + t)
    shallow, deep = torch.rand(n, generator=g, dtype=F64), torch.rand(n, generator=g, dtype=F64) * 3
    kept = hiprune_select(shallow, deep, t, width, 0.1)
    assert set(kept.tolist()) == literal_hiprune(shallow.tolist(), deep.tolist(), t, width, 0.1)


def test_hiprune_registered_per_family():
    # Received sums over the query rows, 2 heads. LLaVA: divided by the 1 + N = 17 query rows -> the
    # means of hiprune_example (deep: token 2 0.95, 12 0.5), keep = T = 10, alpha 1.25: as the hand
    # example, 10 tokens. Qwen: the same sums are used as they are (T = round(16 * 0.625) = 10):
    # token 2's 0.95 * 17 - 1 still wins, 9 tokens. Layers: the default object layer 9 (LLaVA,
    # attentions[8]) / 16 (Qwen, block 15) and the deep layer -2 / -1.
    shallow = hiprune_example()
    deep = torch.full((16,), 0.01, dtype=F64)
    deep[2], deep[12] = 0.95, 0.5
    heads = lambda v: torch.stack([v * 17 * 1.5, v * 17 * 0.5])  # noqa: E731 (head mean = v * 17)
    llava = ctx_for(torch.zeros(16, 1), family="llava", grid=(1, 4, 4), vit_attention_received={8: heads(shallow), -2: heads(deep)})
    idx, _ = run("hiprune_pre_llm", llava, 10, alpha=1.25)
    assert idx.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 9, 12]
    qwen = ctx_for(
        torch.zeros(16, 1), family="qwen2_5_vl", ratio=0.625, grid=(1, 4, 4),
        vit_attention_received={15: heads(shallow), -1: heads(deep)},
    )
    idx, _ = run("hiprune_pre_llm", qwen, methods.budget(16, 0.625), alpha=1.25)
    assert idx.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 9]
    # Qwen's T is round() of N * r, half to even: 16 * 0.53125 = 8.5 -> 8 (budget() would give 9).
    qwen = ctx_for(torch.zeros(16, 1), family="qwen2_5_vl", ratio=0.53125, grid=(1, 4, 4),
                   vit_attention_received={15: heads(shallow), -1: heads(torch.rand(16, dtype=F64) * 0.1)})
    idx, _ = run("hiprune_pre_llm", qwen, methods.budget(16, 0.53125), alpha=0.1)
    assert idx.numel() == 8


def test_hiprune_makes_one_host_sync_an_image():
    shallow, deep = torch.rand(576, dtype=F64), torch.rand(576, dtype=F64)
    with SyncCounter() as counter:
        hiprune_select(shallow, deep, 192, 24, 0.1)
    assert counter.count == 1  # the kept mask to indices (registers chosen by rank on the device)


# -------------------------------------------------------------------------------------------- VScan
def test_vscan_llava_window_topk_hand_checked():
    # A 4 x 4 grid in 2 x 2 windows, local budget 4 -> k = 4 // 4 = 1 a window:
    # window (0, 0) = tokens 0, 1, 4, 5 -> 1 (0.9); (0, 1) = 2, 3, 6, 7 -> 7 (0.8);
    # (1, 0) = 8, 9, 12, 13 -> 8 (0.5); (1, 1) = 10, 11, 14, 15 -> 15 (0.7).
    scores = torch.tensor([.1, .9, .2, .3, .4, .2, .1, .8, .5, .1, .6, .2, .1, .3, .2, .7], dtype=F64)
    assert vscan_window_topk(scores, (4, 4), 4, window=2).tolist() == [1, 7, 8, 15]
    # Local budget 7 -> k = 7 // 4 = 1 still (the original floors per window): 4 tokens.
    assert vscan_window_topk(scores, (4, 4), 7, window=2).numel() == 4


@pytest.mark.parametrize("t, kept", [(96, 96), (100, 98), (40, 36), (192, 192), (64, 64)])
def test_vscan_llava_stage1_counts(t, kept):
    # local (int(T / 2) // 16) * 16 on the 24 x 24 grid's 16 windows of 6 x 6, global T - int(T / 2)
    # after the local ones are zeroed: T = 100 keeps 48 + 50 = 98, T = 40 keeps 16 + 20 = 36.
    g = torch.Generator().manual_seed(t)
    local, global_ = torch.rand(2, 576, generator=g, dtype=F64) + 0.01
    ctx = ctx_for(torch.randn(576, 3, generator=g, dtype=F64), family="llava", grid=(1, 24, 24),
                  vit_cls_rows={5: local.expand(2, -1), -2: global_.expand(2, -1)})
    idx, feats = run("vscan", ctx, t)
    assert idx.numel() == feats.shape[0] == kept
    local_idx = vscan_window_topk(local, (24, 24), t // 2, 6)
    assert local_idx.numel() == (t // 2) // 16 * 16 and set(local_idx.tolist()) <= set(idx.tolist())


def test_vscan_llava_stage1_hand_checked():
    # T = 8 on the 4 x 4 example (window 2): local = [1, 7, 8, 15] (test above), global T - int(T / 2)
    # = 4 from the global scores with the local ones zeroed: 1 (0.99 -> 0) and 7 (0.65 -> 0) drop
    # out, so 10 (0.8), 3 (0.7), 14 (0.6), 5 (0.5). Kept: {1, 3, 5, 7, 8, 10, 14, 15}.
    local = torch.tensor([.1, .9, .2, .3, .4, .2, .1, .8, .5, .1, .6, .2, .1, .3, .2, .7], dtype=F64)
    global_ = torch.full((16,), 0.1, dtype=F64)
    global_[[1, 10, 3, 7, 14, 5]] = torch.tensor([.99, .8, .7, .65, .6, .5], dtype=F64)
    ctx = ctx_for(torch.randn(16, 2, dtype=F64), family="llava", grid=(1, 4, 4),
                  vit_cls_rows={0: local.expand(2, -1), 1: global_.expand(2, -1)})
    idx, _ = run("vscan", ctx, 8, local_layer=0, global_layer=1, window=2)
    assert idx.tolist() == [1, 3, 5, 7, 8, 10, 14, 15]


def test_vscan_qwen_window_select_hand_checked():
    # A 5 x 5 merged grid, windows of 2: floor(5 / 2) = 2 a side -> 4 windows; row 4 and column 4
    # join the last window of their column / row: W0 = rows 0-1 x cols 0-1, W1 = rows 0-1 x cols
    # 2-4, W2 = rows 2-4 x cols 0-1, W3 = rows 2-4 x cols 2-4. 6 local tokens: limit ceil(6 / 4) = 2.
    # Descending: 24 (W3, taken), 18 (W3, taken), 12 (W3 full: skipped), 0 (W0), 4 (row 0, col 4:
    # W1), 20 (row 4, col 0: W2), 1 (W0, its second) -> 6 taken: [24, 18, 0, 4, 20, 1].
    scores = torch.linspace(0.01, 0.2, 25, dtype=F64)
    scores[[24, 18, 12, 0, 4, 20, 1, 2]] = torch.tensor([.99, .98, .97, .9, .85, .8, .7, .6], dtype=F64)
    assert vscan_window_select(scores, (1, 5, 5), 6, window=2).tolist() == [24, 18, 0, 4, 20, 1]


def literal_window_select(scores: list[float], h: int, w: int, k: int, window: int) -> list[int]:
    """The original's greedy loop (``window_selection``), token by token, written out from its rules."""
    nh, nw = h // window, w // window
    limit = math.ceil(k / (nh * nw))
    count: dict[tuple[int, int], int] = {}
    out: list[int] = []
    for i in sorted(range(len(scores)), key=lambda i: -scores[i]):
        x, y = min((i // w) // window, nh - 1), min((i % w) // window, nw - 1)
        if count.get((x, y), 0) < limit:
            count[(x, y)] = count.get((x, y), 0) + 1
            out.append(i)
        if len(out) == k:
            break
    return out


@pytest.mark.parametrize("h, w, k", [(24, 36, 72), (17, 23, 60), (9, 9, 40), (37, 28, 86), (8, 8, 5)])
def test_vscan_qwen_window_select_equals_the_greedy_loop(h, w, k):
    g = torch.Generator().manual_seed(h * w + k)
    scores = torch.rand(h * w, generator=g, dtype=F64)
    assert vscan_window_select(scores, (1, h, w), k, 4).tolist() == literal_window_select(scores.tolist(), h, w, k, 4)


def test_vscan_window_select_fills_up_where_the_windows_cannot_give_enough():
    # A 4 x 9 grid, window 4: floor(4/4) x floor(9/4) = 1 x 2 windows, W0 = columns 0-3 (16 tokens),
    # W1 = columns 4-8 (20, the leftover column joins it). 34 tokens: limit ceil(34 / 2) = 17, but W0
    # has 16, so the greedy ends at 16 + 17 = 33 (the original's assertion fails). Ours takes the
    # best remaining token next: W1's 18th. Kept: everything but W1's two lowest.
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(36, generator=g, dtype=F64)
    w1 = [i for i in range(36) if i % 9 >= 4]
    lowest = sorted(w1, key=lambda i: float(scores[i]))[:2]
    got = vscan_window_select(scores, (1, 4, 9), 34, 4)
    assert sorted(got.tolist()) == sorted(set(range(36)) - set(lowest))


def test_vscan_merge_hand_checked():
    # Kept 0 = (1, 0) and 1 = (0, 2). Token 2 = (2, 0.2) is closest to 0, 3 = (0.1, 3) to 1, 4 = (1, 1)
    # ties (cos 0.7071 with both): argmax takes the first kept, 0. Means: (x0 + x2 + x4) / 3 =
    # (4/3, 0.4), (x1 + x3) / 2 = (0.05, 2.5).
    x = torch.tensor([[1, 0], [0, 2], [2, 0.2], [0.1, 3], [1, 1]], dtype=F64)
    torch.testing.assert_close(vscan_merge(x, torch.tensor([0, 1])), torch.tensor([[4 / 3, 0.4], [0.05, 2.5]], dtype=F64))


def test_vscan_qwen_stage1_and_llm_stage_counts():
    # Qwen: T = int(0.5 * 16) = 8, local T // 2 = 4 (4 x 4 grid, window 2: one a window), global 4
    # after zeroing: 8 distinct. LLM stage: int(0.333 * current) of the no-RoPE attention (head mean).
    g = torch.Generator().manual_seed(3)
    local, global_ = torch.rand(2, 2, 16, generator=g, dtype=F64) + 0.01
    ctx = ctx_for(torch.randn(16, 3, generator=g, dtype=F64), family="qwen2_5_vl", ratio=0.5, grid=(1, 4, 4),
                  vit_attention_received={7: local, -1: global_})
    idx, _ = run("vscan", ctx, methods.budget(16, 0.5), window=2)
    assert idx.numel() == 8
    attn = torch.rand(4, 12, generator=g, dtype=F64)
    llm = ctx_for(torch.randn(12, 3, dtype=F64), family="qwen2_5_vl", ratio=0.25, stage="intra_llm",
                  last_query_attention_self_norope=attn)
    idx, _ = run("vscan", llm, 4)
    assert idx.tolist() == sorted(attn.mean(0).topk(int(0.333 * 12)).indices.tolist())  # int(3.996) = 3
    llava = ctx_for(torch.randn(12, 3, dtype=F64), family="llava", ratio=0.25, stage="intra_llm", last_query_attention_self=attn)
    idx, _ = run("vscan", llava, 4)  # LLaVA: the absolute budget (image_token_list)
    assert idx.tolist() == sorted(attn.mean(0).topk(4).indices.tolist())


def test_vscan_stage1_makes_one_host_sync_an_image():
    g = torch.Generator().manual_seed(5)
    local, global_ = torch.rand(2, 2, 1036, generator=g, dtype=F64)
    ctx = ctx_for(torch.randn(1036, 8, generator=g, dtype=F64), family="qwen2_5_vl", ratio=0.167, grid=(1, 28, 37),
                  vit_attention_received={7: local, -1: global_})
    with SyncCounter() as counter:
        get_method("vscan").fn(ctx, 173)
    assert counter.count == 1  # the kept mask to indices; scans and merge are tensor ops


@pytest.mark.parametrize("r, vit, llm, vit_576, llm_576", [
    # KEEP_RATIO = the average over the decoder's layers: the ViT stage at round(1.5 r, 3), the LLM
    # stage at r / 2 of the original count: the original's 96 -> 32 (LLaVA "64 tokens"), Qwen 0.167.
    (0.111, 0.167, 0.0555, 96, 32), (0.222, 0.333, 0.111, 192, 64), (0.333, 0.5, 0.1665, 288, 96),
])
def test_vscan_schedule_maps_keep_ratio_onto_the_originals_budgets(r, vit, llm, vit_576, llm_576):
    m = get_method("vscan")
    events, args = vscan_schedule(r, dict(m.params))
    assert events == ((None, vit), (methods.MIDDLE_LAYER, llm)) and args == {}
    assert methods.budget(576, vit) == vit_576 and methods.budget(576, llm) == llm_576


# --------------------------------------------------------------- the unpatched models' own tensors
@torch.no_grad()
def llava_vit(model, inputs) -> tuple[tuple, torch.Tensor]:
    """The unpatched eager CLIP's ``attentions`` (``[B, H, 1+N, 1+N]`` per layer)."""
    out = model.model.vision_tower(inputs["pixel_values"], output_attentions=True)
    return out.attentions


@torch.no_grad()
def qwen_vit(model, inputs) -> dict[int, dict[str, list[torch.Tensor]]]:
    """Per vision block of the unpatched eager Qwen2.5-VL: ``{"received": [H, N] per image,
    "keys": [N, hd] per image}`` from the probabilities and keys its eager attention computes chunk by
    chunk (recorded through an ``AttentionInterface``), put back in the merger's token order."""
    from transformers import AttentionInterface
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import eager_attention_forward
    from transformers.vision_utils import get_vision_window_index

    visual = model.model.visual
    record: list = []

    def recording(module, query, key, value, attention_mask, **kwargs):
        out, weights = eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
        record.append((module, weights[0], key[0]))  # [H, n, n], [H, n, hd] of one chunk
        return out, weights

    AttentionInterface.register("record_eager", recording)
    visual.config._attn_implementation = "record_eager"
    try:
        model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    finally:
        visual.config._attn_implementation = "eager"
    thw = inputs["image_grid_thw"]
    window_index, _ = get_vision_window_index(thw, visual.spatial_merge_size, visual.window_size, visual.patch_size)
    reverse, sizes = torch.argsort(window_index), (thw.prod(-1) // 4).tolist()
    out = {}
    for b, blk in enumerate(visual.blocks):
        chunks = [(w, k) for m, w, k in record if m is blk.attn]
        received = torch.cat([w.float().sum(dim=1) for w, _ in chunks], dim=-1)  # [H, S], window order
        keys = torch.cat([k for _, k in chunks], dim=1).float().mean(dim=0)  # [S, hd]
        received = received.view(received.shape[0], -1, 4).mean(-1)[:, reverse]  # 2x2 units, token order
        keys = keys.view(-1, 4, keys.shape[-1]).mean(1)[reverse]
        out[b] = {"received": list(received.split(sizes, dim=-1)), "keys": list(keys.split(sizes))}
    return out


@torch.no_grad()
def internvl_vit(model, inputs) -> dict[int, dict[str, torch.Tensor]]:
    """Per InternViT layer of the unpatched eager model: ``{"received": [tiles, H, 16], "keys":
    [tiles, 16, hd]}``: its ``attentions`` summed over the query rows ([CLS] column dropped) and its
    ``k_norm`` outputs averaged over heads, each averaged over the patches that
    ``InternVLModel.pixel_shuffle`` puts into one token (found by shuffling patch indices)."""
    layers = model.model.vision_tower.encoder.layer
    keys = {}
    hooks = [l.attention.k_norm.register_forward_hook(lambda m, a, o, i=i: keys.__setitem__(i, o)) for i, l in enumerate(layers)]
    out = model.model.vision_tower(pixel_values=inputs["pixel_values"], output_attentions=True)
    for h in hooks:
        h.remove()
    side = math.isqrt(out.attentions[0].shape[-1] - 1)
    members = model.model.pixel_shuffle(torch.arange(float(side * side)).view(1, side, side, 1), 0.5).reshape(-1, 4).long()
    heads = model.config.vision_config.num_attention_heads
    result = {}
    for i, attn in enumerate(out.attentions):
        received = attn.float().sum(dim=-2)[..., 1:]  # [tiles, H, P]
        k = keys[i].view(*keys[i].shape[:2], heads, -1).float().mean(dim=2)[:, 1:]  # [tiles, P, hd]
        result[i] = {"received": received[..., members].mean(-1), "keys": k[:, members].mean(2)}
    return result


def tiles_of(t: torch.Tensor, start: int, count: int, dim: int) -> torch.Tensor:
    return torch.cat(list(t[start : start + count]), dim=dim)


# Which layered needs each test configuration reads, with PRUNE_ARGS for the tiny 2-layer ViTs
# (LLaVA: CLIP layer 0 is the feature layer -2; Qwen: block 0 a window block, block 1 full).
CAPTURE_CASES = [
    ("llava", "hiprune_pre_llm", "object_layer=2", {"vit_attention_received": (1, -2)}),
    ("llava", "vscan", "local_layer=1,window=2", {"vit_cls_rows": (1, -2)}),
    ("qwen2_5_vl", "visionzip_pre_llm", "", {"vit_attention_received": (-1,), "vit_unit_keys": (-1,)}),
    ("qwen2_5_vl", "hiprune_pre_llm", "object_layer=1", {"vit_attention_received": (0, -1)}),
    ("qwen2_5_vl", "vscan", "local_layer=0,window=1", {"vit_attention_received": (0, -1)}),
    ("internvl", "visionzip_pre_llm", "", {"vit_attention_received": (-1,), "vit_unit_keys": (-1,)}),
    ("internvl", "hiprune_pre_llm", "object_layer=1", {"vit_attention_received": (0, -1)}),
    ("internvl", "vscan", "local_layer=0,window=2", {"vit_attention_received": (0, -1)}),
]


def expected_inputs(family: str, eager, inputs, need: str, layer: int, img: int, n_img: int) -> torch.Tensor:
    """Image ``img``'s ``ctx[need][layer]`` computed from the unpatched eager model."""
    if family == "llava":
        attn = llava_vit(eager, inputs)[layer]  # [B, H, 1+N, 1+N]
        return attn[img].sum(dim=-2)[:, 1:] if need == "vit_attention_received" else attn[img, :, 0, 1:]
    if family == "qwen2_5_vl":
        ref = qwen_vit(eager, inputs)[layer % len(eager.model.visual.blocks)]
        return ref["received" if need == "vit_attention_received" else "keys"][img]
    ref = internvl_vit(eager, inputs)[layer % len(eager.model.vision_tower.encoder.layer)]
    tiles = inputs["pixel_values"].shape[0] // n_img  # the 2img prompt's images have 4 and 3 tiles
    start, count = (0, 4) if img == 0 else (4, 3)
    if need == "vit_attention_received":
        return tiles_of(ref["received"], start, count, -1)
    return tiles_of(ref["keys"], start, count, 0)


@pytest.mark.parametrize("family, method, args, layered", CAPTURE_CASES, ids=[f"{c[1]}-{c[0]}" for c in CAPTURE_CASES])
@torch.no_grad()
def test_captured_vit_inputs_equal_the_unpatched_models_eager_attention(monkeypatch, family, method, args, layered):
    """One vision pass under sdpa: the hooks' tensors equal what the unpatched model's eager attention
    gives, per image (Qwen: two images in one packed pass, a window block and a full one; InternVL:
    4 + 3 tiles), and only the configured method's needs are captured."""
    from families import FAMILIES, cfg, spy_on

    spec = FAMILIES[family]
    eager = spec.build(seed=4, attn="eager")
    inputs = spec.inputs("2img", seed=4)
    model = spec.build(seed=4)  # the same weights, sdpa
    captured: list[set] = []
    fn = get_method(method).fn

    def select(ctx, keep, **args):
        captured.append(set(model._prune_state.vision))
        return fn(ctx, keep, **args)

    seen = spy_on(monkeypatch, method, select=select)
    env = dict(KEEP_RATIO=0.5, PRUNE_METHOD=method, **({"PRUNE_ARGS": args} if args else {}))
    spec.module.patch(model, cfg(**env))
    model(**inputs)
    pre = [ctx for ctx in seen if ctx.stage == "pre_llm"]
    assert len(pre) == 2 and [ctx.family for ctx in pre] == [family] * 2
    for img, ctx in enumerate(pre):
        assert set(ctx.extras) == set(get_method(method).needs_for(family, "pre_llm"))
        for need, layers in layered.items():
            assert set(ctx[need]) == set(layers)
            for layer in layers:
                expected = expected_inputs(family, eager, inputs, need, layer, img, 2)
                torch.testing.assert_close(ctx[need][layer], expected, rtol=1e-5, atol=1e-6)
    wanted = set(layered) | ({"vit_projector"} if family == "llava" else set())
    assert all(keys <= wanted for keys in captured), captured


# ----------------------------------------------------------------- through the engine, end to end
@torch.no_grad()
def image_features(family: str, model, inputs) -> list[torch.Tensor]:
    """The unpatched model's projected visual tokens, ``[N, D]`` per image of the 2img prompt."""
    inner = model.model
    if family == "qwen2_5_vl":
        return list(inner.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output)
    feats = inner.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    if family == "llava":
        return list(feats)
    return [tiles_of(feats, 0, 4, 0), tiles_of(feats, 4, 3, 0)]  # InternVL: 4 + 3 tiles


def expected_pre_llm(family: str, method: str, eager, inputs, ratio: float, args: dict) -> list[tuple[list[int], dict]]:
    """Per image: ``(kept token indices, {token: LLM-space feature replacing its own})`` from the
    pure functions on the unpatched eager model's tensors (the rules are the hand-checked ones above)."""
    feats = image_features(family, eager, inputs)
    grids = {"llava": [(1, 4, 4)] * 2, "qwen2_5_vl": [(1, 4, 2), (1, 2, 4)], "internvl": [(4, 4, 4), (3, 4, 4)]}[family]
    out = []
    for img, (x, grid) in enumerate(zip(feats, grids)):
        n = x.shape[0]

        def get(need, layer):
            return expected_inputs(family, eager, inputs, need, layer, img, 2).double()

        if method == "visionzip_pre_llm":
            idx, merged = visionzip_qwen_select(x, get("vit_attention_received", -1).mean(0), get("vit_unit_keys", -1), ratio)
            out.append((sorted(idx.tolist()), dict(zip(idx.tolist(), merged))))
        elif method == "hiprune_pre_llm":
            obj = int(args["object_layer"]) - 1
            deep_layer = -2 if family == "llava" else -1
            shallow, deep = get("vit_attention_received", obj).mean(0), get("vit_attention_received", deep_layer).mean(0)
            rows = {"llava": n + 1, "internvl": 65, "qwen2_5_vl": 1}[family]  # mean over query rows (Qwen: sums)
            t = round(n * ratio) if family == "qwen2_5_vl" else methods.budget(n, ratio)
            kept = hiprune_select(shallow / rows, deep / rows, t, grid[2], 0.1)
            out.append((kept.tolist(), {}))
        else:  # vscan stage 1 at the ViT ratio round(1.5 r, 3)
            vit = round(1.5 * ratio + 1e-9, 3)
            window, local_layer = int(args["window"]), int(args["local_layer"])
            if family == "llava":
                local = get("vit_cls_rows", local_layer).mean(0)
                glob = get("vit_cls_rows", -2).mean(0)
                t = methods.budget(n, vit)
                local_idx, n_global = vscan_window_topk(local, grid[1:], int(t * 0.5), window), t - int(t * 0.5)
            else:
                local = get("vit_attention_received", local_layer).sum(0)
                glob = get("vit_attention_received", -1).sum(0)
                t = int(vit * n)
                local_idx, n_global = vscan_window_select(local, grid, t // 2, window), t - t // 2
            glob[local_idx] = 0
            kept = sorted(set(local_idx.tolist()) | set(glob.topk(n_global).indices.tolist()))
            merged = vscan_merge(x.double(), torch.tensor(kept)).to(x.dtype)
            out.append((kept, dict(zip(kept, merged))))
    return out


E2E_CASES = [
    ("qwen2_5_vl", "visionzip_pre_llm", ""),
    ("internvl", "visionzip_pre_llm", ""),
    ("llava", "hiprune_pre_llm", "object_layer=2"),
    ("qwen2_5_vl", "hiprune_pre_llm", "object_layer=1"),
    ("internvl", "hiprune_pre_llm", "object_layer=1"),
    ("llava", "vscan", "local_layer=1,window=2"),
    ("qwen2_5_vl", "vscan", "local_layer=0,window=2"),
    ("internvl", "vscan", "local_layer=0,window=2"),
]


@pytest.mark.parametrize("family, method, args", E2E_CASES, ids=[f"{c[1]}-{c[0]}" for c in E2E_CASES])
@torch.no_grad()
def test_pruned_run_equals_the_unpatched_model_on_the_pruned_sequence(family, method, args):
    """The pre-LLM selection (and merged tokens) equals the pure functions on the unpatched eager
    model's tensors; prefill logits and every decode step equal the unpatched model run without cache
    on the same sequence (merged tokens written into their slots; VScan's second cut at the middle
    layer), kept tokens at their original position ids."""
    from families import FAMILIES, cfg, check_against_reference, greedy
    from reference import drops_from_trace

    spec = FAMILIES[family]
    ratio = 0.5
    parsed = dict(a.split("=") for a in args.split(",") if a)
    eager = spec.build(seed=6, attn="eager")
    inputs = spec.inputs("2img", seed=6)
    image = torch.nonzero(inputs["input_ids"][0] == eager.config.image_token_id).flatten()
    starts = [0, {"llava": 16, "qwen2_5_vl": 8, "internvl": 64}[family]]
    kept, replaced = [], {}
    for img, (tokens, merged) in enumerate(expected_pre_llm(family, method, eager, inputs, ratio, parsed)):
        kept += image[starts[img] + torch.tensor(tokens, dtype=torch.long)].tolist()
        replaced.update({int(image[starts[img] + t]): f for t, f in merged.items()})

    model = spec.build(seed=6)
    spec.module.patch(model, cfg(KEEP_RATIO=ratio, PRUNE_METHOD=method, **({"PRUNE_ARGS": args} if args else {})))
    prefill_logits = model(**inputs).logits[0]
    trace = list(model.prune_trace)
    assert trace[0].stage == "pre_llm" and trace[0].kept == sorted(kept)
    if method == "vscan":  # the second cut, at the tiny 4-layer decoder's middle layer
        assert [(e.stage, e.layer) for e in trace] == [("pre_llm", None), ("intra_llm", 2)]
        assert set(trace[1].kept) < set(trace[0].kept)

    class MergedRef(spec.ref):
        @staticmethod
        def embed(model, inputs, ids):
            emb = spec.ref.embed(model, inputs, ids).clone()
            for pos, feature in replaced.items():
                emb[0, pos] = feature
            return emb

    seq, steps = greedy(model, inputs)
    assert [e.kept for e in model.prune_trace] == [e.kept for e in trace]
    spec.module.unpatch(model)
    check_against_reference(MergedRef, model, inputs, seq, steps, drops_from_trace(trace), prefill_logits)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
@torch.no_grad()
def test_vscan_llm_stage_scores_with_the_layers_own_qk(monkeypatch, family):
    """Stage 2 reads the last prompt token's attention from the PRUNING layer's own q/k on its input
    (PyramidDrop's look-ahead): with RoPE on LLaVA, without it on Qwen2.5-VL (the original's mRoPE line
    is commented out). Reference: that layer's eager attention module of the unpatched model, given
    the layer's input and rotary embeddings of the kept tokens' positions (Qwen: cos 1, sin 0)."""
    from families import FAMILIES, cfg, spy_on

    spec = FAMILIES[family]
    eager = spec.build(seed=2, attn="eager")
    inputs = spec.inputs("1img", seed=2)
    model = spec.build(seed=2)
    seen = spy_on(monkeypatch, "vscan", select=get_method("vscan").fn)
    entering: list[torch.Tensor] = []
    text = model.model.language_model
    text.layers[1].register_forward_hook(lambda m, a, o: entering.append(o[0] if isinstance(o, tuple) else o))
    spec.module.patch(model, cfg(KEEP_RATIO=0.5, PRUNE_METHOD="vscan", PRUNE_ARGS="local_layer=0"))
    model(**inputs)
    (ctx,) = [c for c in seen if c.stage == "intra_llm"]
    pre = model.prune_trace[0]
    ids = inputs["input_ids"][0]
    visual = ids == eager.config.image_token_id
    current = sorted(set(torch.nonzero(~visual).flatten().tolist()) | set(pre.kept))  # the sequence at layer 2
    columns = [current.index(p) for p in pre.kept]
    h = entering[0]  # [1, L', D]: layer 1's output = layer 2's input, before the cut
    assert h.shape[1] == len(current)
    etext = eager.model.language_model
    n = len(current)
    if family == "llava":
        cos, sin = etext.rotary_emb(h, torch.tensor([current]))
        need = "last_query_attention_self"
    else:
        cos = torch.ones(1, n, etext.layers[0].self_attn.head_dim)  # [B, L, hd], as Qwen2_5_VLRotaryEmbedding returns
        sin = torch.zeros_like(cos)
        need = "last_query_attention_self_norope"
    layer = etext.layers[2]
    mask = torch.full((n, n), torch.finfo(h.dtype).min).triu(1)[None, None]
    _, weights = layer.self_attn(layer.input_layernorm(h), attention_mask=mask, position_embeddings=(cos, sin))
    torch.testing.assert_close(ctx[need], weights[0, :, -1, columns], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- configuration
def test_vscan_configuration_one_name_two_stages_middle_layer_per_model():
    from families import FAMILIES, cfg
    from utils import ConfigError, LayerSpec

    c = cfg(KEEP_RATIO=0.111, PRUNE_METHOD="vscan")
    assert (c.pre_method, c.keep_ratio) == ("vscan", 0.167)
    assert c.intra == (LayerSpec(methods.MIDDLE_LAYER, "vscan", 0.0555),)
    assert c.tag() == "vscan-r0.167__Lmid-vscan-r0.0555"
    # The middle layer on each model: LLaVA-1.5-7B's 32 layers -> 16, Qwen2.5-VL-7B's 28 -> 14.
    assert [c.for_model(n).intra[0].layer for n in (32, 28, 36, 4)] == [16, 14, 18, 2]
    assert c.for_model(32).tag() == "vscan-r0.167__L16-vscan-r0.0555"
    pinned = cfg(KEEP_RATIO=0.111, PRUNE_METHOD_INTRA_LLM="vscan", PRUNE_ARGS="llm_layer=14,vit_ratio=0.2")
    assert (pinned.keep_ratio, pinned.intra[0].layer) == (0.2, 14) and pinned.for_model(32) is pinned
    spec = FAMILIES["qwen2_5_vl"]
    model = spec.module.patch(spec.build(), c)
    assert model._prune_state.config.intra[0].layer == 2  # the tiny decoder's 4 layers
    with pytest.raises(ConfigError, match="vscan has its own pre-LLM stage"):
        cfg(KEEP_RATIO=0.111, PRUNE_METHOD_INTRA_LLM="vscan", PRUNE_METHOD_PRE_LLM="divprune_pre_llm")
    with pytest.raises(ConfigError, match="negative"):
        cfg(KEEP_RATIO=0.5, INTRA_LLM_LAYER_SPECS="-1:fastv_intra_llm")
    with pytest.raises(ConfigError, match="llm_layer must be"):
        cfg(KEEP_RATIO=0.111, PRUNE_METHOD="vscan", PRUNE_ARGS="llm_layer=-3")


@pytest.mark.parametrize("method", ["visionzip_pre_llm", "hiprune_pre_llm", "vscan"])
def test_a_family_the_port_does_not_cover_is_refused(method):
    # Every family here has a port (InternVL: ours; LLaVA-NeXT: per crop, docs/llava_next.md); a new
    # one is refused by the configuration until its rules are written.
    from families import cfg

    c = cfg(KEEP_RATIO=0.111, PRUNE_METHOD=method).for_model(32)
    with pytest.raises(ValueError, match=f"{method} does not apply to llava_onevision: it supports llava, llava_next, qwen2_5_vl, internvl"):
        c.validate_for(32, "llava_onevision")


def test_a_vit_layer_the_tower_lacks_is_a_clear_error():
    from families import FAMILIES, cfg

    spec = FAMILIES["llava"]
    model = spec.module.patch(spec.build(), cfg(KEEP_RATIO=0.5, PRUNE_METHOD="hiprune_pre_llm"))
    with pytest.raises(ValueError, match="ViT layer 8 does not exist in this 2-layer vision tower .* PRUNE_ARGS"):
        model(**spec.inputs("1img"))
