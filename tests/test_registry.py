"""The registry: budget rule, return validation, discovery of dropped-in files, first methods."""

from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import methods
from methods import PruneContext, budget, check_selection, get_method, register_prune

METHODS_DIR = Path(methods.__file__).parent


def ctx_for(x: torch.Tensor, **extras) -> PruneContext:
    n = x.shape[0]
    return PruneContext(
        features=x, stage="pre_llm", layer=None, positions=torch.arange(n), token_index=torch.arange(n),
        n_orig=n, generator=torch.Generator().manual_seed(0), extras=extras,
    )


@pytest.mark.parametrize(
    "n, ratio, expected",
    [(576, 0.111, 64), (576, 0.222, 128), (576, 0.333, 192), (576, 1.0, 576), (5, 0.5, 3), (30, 0.1, 3), (10, 0.04, 1), (1, 0.01, 1)],
)
def test_budget_rounds_half_up_and_keeps_at_least_one(n, ratio, expected):
    assert budget(n, ratio) == expected


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.01])
def test_budget_rejects_ratios_outside_0_1(ratio):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        budget(10, ratio)


def test_check_selection_sorts_and_validates():
    m = get_method("random_pre_llm")
    idx, feats = check_selection(m, torch.tensor([4, 0, 2]), n=5, keep=3)
    assert idx.tolist() == [0, 2, 4] and feats is None
    f = torch.arange(6.0).view(3, 2)
    idx, feats = check_selection(m, (torch.tensor([4, 0, 2]), f), n=5, keep=3)
    assert feats.tolist() == [f[1].tolist(), f[2].tolist(), f[0].tolist()]  # reordered with the indices
    for bad, message in [
        (torch.tensor([0, 0, 1]), "duplicate"),
        (torch.tensor([0, 1]), "2 indices for a budget of 3"),
        (torch.tensor([0, 1, 5]), "outside"),
        (torch.tensor([2, -1, 1]), "outside"),
        (torch.tensor([0.0, 1.0, 2.0]), "integer tensor"),
        ([0, 1, 2], "integer tensor"),
        ((torch.tensor([0, 1, 2]), torch.zeros(2, 4)), "merged features"),
    ]:
        with pytest.raises((TypeError, ValueError), match=message):
            check_selection(m, bad, n=5, keep=3)
    from scripts.op_count import OpCounter

    with OpCounter() as ops:  # range and duplicates are read back together: one host sync
        check_selection(m, torch.tensor([4, 0, 2]), n=5, keep=3)
    assert len(ops.syncs) == 1, ops.syncs


def test_register_validates_signature_stage_and_needs():
    with pytest.raises(ValueError, match="stage must be one of"):
        register_prune("x_pre_llm", stage="post_llm")
    with pytest.raises(ValueError, match="unknown need"):
        register_prune("x_pre_llm", stage="pre_llm", needs=("cls_attention_typo",))
    with pytest.raises(ValueError, match="does not exist at stage"):
        register_prune("x_pre_llm", stage="pre_llm", needs=("last_query_attention_prev",))
    with pytest.raises(TypeError, match="keyword-only with a default"):
        register_prune("x_pre_llm", stage="pre_llm")(lambda ctx, keep, alpha: None)
    with pytest.raises(ValueError, match="registered twice"):
        register_prune("divprune_pre_llm", stage="pre_llm")(lambda ctx, keep: None)
    assert "x_pre_llm" not in methods.names()


def test_every_registered_method_is_documented():
    for name, m in methods.all_methods().items():
        # Hybrids (one name, several events: sparsevlm, mustdrop) keep the original's name.
        assert name.endswith(("_pre_llm", "_intra_llm")) or m.schedule is not None or m.stage not in ("pre_llm", "intra_llm"), name
        assert m.summary, f"{name} has no docstring"
        assert m.source and m.paper, f"{name} names no source repository or paper"


def test_a_dropped_in_file_is_the_whole_job(tmp_path):
    """A new file in methods/ registers itself and runs through the engine with no other edit."""
    import custom_qwenvl
    from synthetic import tiny_models as tm
    from utils import PruneConfig

    path = METHODS_DIR / "zz_dropin_probe.py"
    path.write_text(textwrap.dedent('''
        import torch
        from methods import PruneContext, register_prune

        @register_prune("lastk_probe_pre_llm", stage="pre_llm", source="tests", paper="none")
        def lastk(ctx: PruneContext, keep: int, *, offset: int = 0) -> torch.Tensor:
            """Keep the last tokens (a probe for the drop-in test)."""
            return torch.arange(ctx.n - keep - offset, ctx.n - offset)
    '''))
    methods._discovered = False
    try:
        cfg = PruneConfig.from_env({"KEEP_RATIO": "0.25", "PRUNE_METHOD_PRE_LLM": "lastk_probe_pre_llm", "PRUNE_ARGS": "offset=2"})
        assert cfg.args_for("lastk_probe_pre_llm") == {"offset": 2}
        model = custom_qwenvl.patch(tm.tiny_qwen(), cfg)
        inputs = tm.qwen_inputs()
        model(**inputs)
        image = torch.nonzero(inputs["input_ids"][0] == tm.IMAGE_ID).flatten().tolist()
        assert model.prune_trace[0].kept == image[10:14]  # 16 tokens, keep 4, offset 2
    finally:
        path.unlink()
        methods._REGISTRY.pop("lastk_probe_pre_llm", None)
        sys.modules.pop("methods.zz_dropin_probe", None)


def test_divprune_hand_checked():
    # Unit vectors at 0, 10, 90, 95 and 180 degrees; D = 1 - cos(angle between).
    # First pick: largest nearest-neighbour distance: 180 deg (its neighbour, 95 deg, is 85 deg away) -> 4.
    # Then argmax of the min distance to {4}: 0 deg (180 deg away) -> 0.
    # Then min distance to {4, 0}: 10 deg: 1-cos10=0.015; 90 deg: 1-cos90=1; 95 deg: 1-cos85=0.913 -> 2.
    # Then: 10 deg: 0.015; 95 deg: 1-cos5=0.0038 -> 1.
    angles = torch.tensor([0.0, 10.0, 90.0, 95.0, 180.0], dtype=torch.float64) * math.pi / 180
    x = torch.stack([angles.cos(), angles.sin()], dim=1) * torch.tensor([[1.0], [2.0], [0.5], [3.0], [1.0]], dtype=torch.float64)
    m = get_method("divprune_pre_llm")
    assert m.fn(ctx_for(x), 4).tolist() == [4, 0, 2, 1]
    assert check_selection(m, m.fn(ctx_for(x), 3), 5, 3)[0].tolist() == [0, 2, 4]


def test_divprune_picks_distinct_tokens_on_duplicates():
    x = torch.ones(6, 4)  # all tokens identical: the original would pick a token twice
    x[5] = -1
    idx = get_method("divprune_pre_llm").fn(ctx_for(x), 4)
    assert len(set(idx.tolist())) == 4


def test_fastv_keeps_the_top_mean_attention():
    attn = torch.tensor([[0.1, 0.5, 0.2, 0.05, 0.15], [0.3, 0.1, 0.4, 0.1, 0.1]])  # [H=2, N=5]
    # head means: 0.2, 0.3, 0.3, 0.075, 0.125 -> top 3: {1, 2, 0}
    idx = get_method("fastv_intra_llm").fn(ctx_for(torch.zeros(5, 3), last_query_attention_prev=attn), 3)
    assert sorted(idx.tolist()) == [0, 1, 2]


def test_a_need_that_was_not_declared_is_named():
    with pytest.raises(KeyError, match="declare it in"):
        ctx_for(torch.zeros(3, 2))["last_query_attention_prev"]


def test_random_is_deterministic_per_generator_state():
    m = get_method("random_pre_llm")
    a = m.fn(ctx_for(torch.zeros(50, 2)), 10)
    b = m.fn(ctx_for(torch.zeros(50, 2)), 10)  # a fresh generator with the same seed
    assert torch.equal(a, b) and len(set(a.tolist())) == 10


def test_readme_method_table_is_current():
    from scripts.method_table import readme_with_table

    readme = (METHODS_DIR.parent / "README.md").read_text()
    assert readme_with_table(readme) == readme, "run: python -m scripts.method_table --write"
