"""The checks a run makes before it loads a model (issue #14, item 2): every input of the issue's
list that can be judged without the model is refused with a message that names the fix.

* hyper-parameters: ranges and choices declared with each method (``Annotated[..., Range/OneOf]``)
  and checked in ``PruneMethod.check_args`` for ``PRUNE_ARGS``, schedules and defaults;
* the configuration against the checkpoint's depth and family (``PruneConfig.validate_for`` with
  the depth ``check_checkpoint`` reads from ``config.json``);
* the checkpoint folder (``check_checkpoint``) and the dataset names (``check_datasets``).
"""

from __future__ import annotations

import sys
import textwrap
from typing import Annotated

import pytest

import methods
from methods import OneOf, Range, register_prune
from utils import ConfigError, PruneConfig

def parse(**env) -> PruneConfig:
    return PruneConfig.from_env({k: str(v) for k, v in env.items()})


# ----------------------------------------------------------------------------- hyper-parameters
@pytest.mark.parametrize(
    "env, message",
    [
        # the list
        (dict(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="gprune_pre_llm", PRUNE_ARGS="temperature=0"),
         "gprune_pre_llm: temperature=0 is not valid: it must be > 0"),
        (dict(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="gprune_pre_llm", PRUNE_ARGS="iterations=-3"),
         "gprune_pre_llm: iterations=-3 is not valid: it must be >= 1"),
        (dict(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="pool_pre_llm", PRUNE_ARGS="mode=bogus"),
         "pool_pre_llm: mode='bogus' is not valid: it must be one of 'avg', 'max'"),
        (dict(KEEP_RATIO=0.333, PRUNE_METHOD="sparsevlm", PRUNE_ARGS="budgets=300/-200/110"),
         r"sparsevlm: budgets=300/-200/110 is not valid: each element must be > 0 \(-200 is not\)"),
        # the other declarations
        (dict(KEEP_RATIO=0.333, PRUNE_METHOD="sparsevlm", PRUNE_ARGS="layers=2/-6/15"), "each element must be >= 0"),
        (dict(KEEP_RATIO=0.333, PRUNE_METHOD="sparsevlm", PRUNE_ARGS="retained_tokens=100"), "one of 0, 64, 128, 192"),
        (dict(KEEP_RATIO=0.333, PRUNE_METHOD="sparsevlm", PRUNE_ARGS="recycle_ratio=1.5"), r"in \[0, 1\]"),
        (dict(KEEP_RATIO=0.333, PRUNE_METHOD="mustdrop", PRUNE_ARGS="window=1"), "window=1 is not valid: it must be >= 2"),
        (dict(KEEP_RATIO=0.333, PRUNE_METHOD="mustdrop", PRUNE_ARGS="global_thr=-0.1"), r"in \[0, 1\]"),
        (dict(INTRA_LLM_LAYER_SPECS="2:dart_intra_llm:0.5", PRUNE_ARGS="n_pivots_text=0"), "must be >= 1"),
        (dict(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="vispruner_pre_llm", PRUNE_ARGS="important_ratio=0"), r"in \(0, 1\]"),
        (dict(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="visionzip_pre_llm", PRUNE_ARGS="contextual_ratio=1"), r"in \[0, 1\)"),
        (dict(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="gprune_pre_llm", PRUNE_ARGS="similarity=nan"), r"in \[-1, 1\]"),
    ],
)
def test_bad_hyper_parameter_values_are_refused_with_the_fix(env, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse(**env)
    assert "Set PRUNE_ARGS=" in str(err.value) and "for its default" in str(err.value)


def test_check_args_checks_declared_values_and_keeps_good_ones():
    gprune = methods.get_method("gprune_pre_llm")
    assert gprune.check_args({"temperature": "0.05", "iterations": "2"}) == {"temperature": 0.05, "iterations": 2}
    with pytest.raises(ValueError, match="temperature=-1 is not valid"):
        gprune.check_args({"temperature": -1.0})  # values from code, not only strings
    assert methods.get_method("pool_pre_llm").check_args({"mode": "max"}) == {"mode": "max"}


def test_every_declared_default_satisfies_its_declaration():
    declared = {name: m.constraints for name, m in methods.all_methods().items() if m.constraints}
    assert {"gprune_pre_llm", "pool_pre_llm", "sparsevlm", "mustdrop", "dart_intra_llm", "vispruner_pre_llm",
            "visionzip_pre_llm"} <= set(declared)
    for name, constraints in declared.items():
        m = methods.get_method(name)
        assert m.check_args({k: m.params[k] for k in constraints}) == {k: m.params[k] for k in constraints}


def test_a_new_method_gets_the_check_by_declaring_it(monkeypatch):
    """Declaring the range on the parameter is all a method does; from_env then refuses bad values."""
    methods.all_methods()
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))  # the demo leaves with the test

    @register_prune("checked_demo_pre_llm", stage="pre_llm", source="me/demo", paper="https://example.org")
    def demo(ctx, keep, *, alpha: Annotated[float, Range(gt=0, le=1)] = 0.5,
             kind: Annotated[str, OneOf("a", "b")] = "a"):
        """Demo."""
        return ctx.features.norm(dim=-1).topk(keep).indices

    with pytest.raises(ConfigError, match=r"alpha=2 is not valid: it must be in \(0, 1\]"):
        parse(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="checked_demo_pre_llm", PRUNE_ARGS="alpha=2")
    with pytest.raises(ConfigError, match="kind='c' is not valid"):
        parse(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="checked_demo_pre_llm", PRUNE_ARGS="kind=c")
    assert parse(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="checked_demo_pre_llm", PRUNE_ARGS="alpha=1").args_for(
        "checked_demo_pre_llm") == {"alpha": 1.0}


def test_a_default_outside_its_declaration_is_a_registration_error():
    def bad(ctx, keep, *, alpha: Annotated[float, Range(gt=0)] = 0.0):
        return None

    with pytest.raises(TypeError, match="the default breaks the declared constraint: bad_default_pre_llm: alpha=0"):
        register_prune("bad_default_pre_llm", stage="pre_llm")(bad)
    assert "bad_default_pre_llm" not in methods.names()


def test_declarations_in_a_dropped_in_file_with_string_annotations(tmp_path, monkeypatch):
    """Method files use ``from __future__ import annotations``: the declarations are read all the same."""
    source = textwrap.dedent('''
        from __future__ import annotations
        from typing import Annotated
        from methods import Range, register_prune

        @register_prune("future_demo_pre_llm", stage="pre_llm")
        def future_demo(ctx, keep, *, beta: Annotated[int, Range(ge=2)] = 3):
            """Demo."""
            return ctx.features.norm(dim=-1).topk(keep).indices
    ''')
    (tmp_path / "future_demo_method.py").write_text(source)
    methods.all_methods()
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))  # the demo leaves with the test
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "future_demo_method", raising=False)
    __import__("future_demo_method")
    assert methods.get_method("future_demo_pre_llm").constraints == {"beta": (Range(ge=2),)}
    with pytest.raises(ConfigError, match="beta=1 is not valid: it must be >= 2"):
        parse(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="future_demo_pre_llm", PRUNE_ARGS="beta=1")
