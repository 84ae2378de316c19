"""PruneConfig.from_env: the only reader of the environment, strict about everything."""

from __future__ import annotations

import pytest

from utils import ConfigError, LayerSpec, PruneConfig, parse_bool


def parse(**env) -> PruneConfig:
    return PruneConfig.from_env({k: str(v) for k, v in env.items()})


def test_nothing_set_means_no_pruning():
    cfg = parse()
    assert not cfg.active and cfg.tag() == "" and cfg.intra == () and cfg.pre_method is None


def test_unrelated_variables_are_ignored():
    assert not PruneConfig.from_env({"HOME": "/root", "PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0"}).active


def test_seed_readme_variables():
    cfg = parse(KEEP_RATIO=0.111, PRUNE_METHOD_PRE_LLM="divprune_pre_llm", METHOD_TIME="True", PREFILL_TIME="1")
    assert cfg.pre_method == "divprune_pre_llm" and cfg.keep_ratio == 0.111
    assert cfg.time_method and cfg.time_prefill


def test_intra_method_defaults_to_layer_2_with_keep_ratio():
    cfg = parse(KEEP_RATIO=0.5, PRUNE_METHOD_INTRA_LLM="fastv_intra_llm")
    assert cfg.intra == (LayerSpec(2, "fastv_intra_llm", 0.5),)


@pytest.mark.parametrize(
    "name, field",
    [("random_pre_llm", "pre_method"), ("fastv_intra_llm", "intra")],
)
def test_prune_method_routes_to_its_registered_stage(name, field):
    cfg = parse(KEEP_RATIO=0.25, PRUNE_METHOD=name)
    if field == "pre_method":
        assert cfg.pre_method == name and cfg.intra == ()
    else:
        assert cfg.pre_method is None and cfg.intra == (LayerSpec(2, name, 0.25),)


def test_layer_specs_both_separators_and_default_ratio():
    cfg = parse(KEEP_RATIO=0.5, INTRA_LLM_LAYER_SPECS=" 2:fastv_intra_llm ; 6:random_intra_llm:0.3, 12:random_intra_llm:0.2")
    assert cfg.intra == (
        LayerSpec(2, "fastv_intra_llm", 0.5),
        LayerSpec(6, "random_intra_llm", 0.3),
        LayerSpec(12, "random_intra_llm", 0.2),
    )


def test_prune_args_are_checked_against_the_signature():
    # random methods take no hyper-parameters: a typo is named, with what they take.
    with pytest.raises(ConfigError, match="no configured method .* takes 'alpha'"):
        parse(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="random_pre_llm", PRUNE_ARGS="alpha=1")
    with pytest.raises(ConfigError, match="not name=value"):
        parse(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="random_pre_llm", PRUNE_ARGS="alpha")
    with pytest.raises(ConfigError, match="no pruning method"):
        parse(PRUNE_ARGS="alpha=1")


def test_tag_names_every_setting_and_differs_between_configs():
    a = parse(KEEP_RATIO=0.111, PRUNE_METHOD_PRE_LLM="divprune_pre_llm")
    b = parse(KEEP_RATIO=0.222, PRUNE_METHOD_PRE_LLM="divprune_pre_llm")
    c = parse(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="random_pre_llm", PRUNE_SEED=3)
    assert a.tag() == "divprune_pre_llm-r0.111"
    assert a.tag() != b.tag()
    assert c.tag().endswith("seed3")
    d = parse(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="divprune_pre_llm", INTRA_LLM_LAYER_SPECS="2:fastv_intra_llm:0.25")
    assert d.tag() == "divprune_pre_llm-r0.5__L2-fastv_intra_llm-r0.25"
    assert "/" not in d.tag() and " " not in d.tag()


@pytest.mark.parametrize(
    "env, message",
    [
        # unknown methods list the close names
        (dict(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="divprun_pre_llm"), "did you mean divprune_pre_llm"),
        (dict(KEEP_RATIO=0.5, PRUNE_METHOD="fastv"), "did you mean fastv_intra_llm"),
        (dict(INTRA_LLM_LAYER_SPECS="2:fast_intra_llm:0.5"), "did you mean fastv_intra_llm"),
        # ratios
        (dict(KEEP_RATIO=0, PRUNE_METHOD_PRE_LLM="random_pre_llm"), r"not in \(0, 1\]"),
        (dict(KEEP_RATIO=1.5, PRUNE_METHOD_PRE_LLM="random_pre_llm"), r"not in \(0, 1\]"),
        (dict(KEEP_RATIO=11.1, PRUNE_METHOD_PRE_LLM="random_pre_llm"), "did you mean 0.111"),
        (dict(KEEP_RATIO="half", PRUNE_METHOD_PRE_LLM="random_pre_llm"), "not a number"),
        (dict(PRUNE_METHOD_PRE_LLM="random_pre_llm"), "set KEEP_RATIO"),
        (dict(KEEP_RATIO=0.5), "no method is"),
        # malformed specs
        (dict(INTRA_LLM_LAYER_SPECS="fastv_intra_llm"), "not 'layer:method"),
        (dict(INTRA_LLM_LAYER_SPECS="2:fastv_intra_llm:0.5:9"), "not 'layer:method"),
        (dict(INTRA_LLM_LAYER_SPECS="two:fastv_intra_llm:0.5"), "not an integer"),
        (dict(INTRA_LLM_LAYER_SPECS="2:fastv_intra_llm:-0.5"), r"not in \(0, 1\]"),
        (dict(INTRA_LLM_LAYER_SPECS="2:fastv_intra_llm"), "no ratio and KEEP_RATIO is not set"),
        (dict(INTRA_LLM_LAYER_SPECS="2:fastv_intra_llm:0.5;2:random_intra_llm:0.2"), "appears twice"),
        (dict(INTRA_LLM_LAYER_SPECS="6:fastv_intra_llm:0.2;2:random_intra_llm:0.5"), "increasing order"),
        (dict(INTRA_LLM_LAYER_SPECS=";"), "empty"),
        # ratios that grow with depth (fractions of the ORIGINAL count)
        (dict(INTRA_LLM_LAYER_SPECS="2:fastv_intra_llm:0.3;6:random_intra_llm:0.5"), "must shrink with depth"),
        (
            dict(KEEP_RATIO=0.111, PRUNE_METHOD_PRE_LLM="divprune_pre_llm", INTRA_LLM_LAYER_SPECS="2:fastv_intra_llm:0.5"),
            "write '2:fastv_intra_llm:0.0555'",
        ),
        (dict(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="random_pre_llm", PRUNE_METHOD_INTRA_LLM="random_intra_llm"), "must shrink"),
        # wrong stage
        (dict(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="fastv_intra_llm"), "is a intra_llm method"),
        (dict(KEEP_RATIO=0.5, PRUNE_METHOD_INTRA_LLM="divprune_pre_llm"), "is a pre_llm method"),
        (dict(INTRA_LLM_LAYER_SPECS="2:divprune_pre_llm:0.5"), "set it through PRUNE_METHOD_PRE_LLM"),
        # conflicting ways to say the same thing
        (dict(KEEP_RATIO=0.5, PRUNE_METHOD="random_pre_llm", PRUNE_METHOD_PRE_LLM="divprune_pre_llm"), "disagree"),
        (
            dict(KEEP_RATIO=0.5, PRUNE_METHOD_INTRA_LLM="fastv_intra_llm", INTRA_LLM_LAYER_SPECS="2:fastv_intra_llm"),
            "put the method in the specs",
        ),
        # booleans and seed
        (dict(METHOD_TIME="maybe"), "not a boolean"),
        (dict(PREFILL_TIME="2"), "not a boolean"),
        (dict(PRUNE_SEED="abc"), "not an integer"),
        # misspelt variables with a known prefix
        (dict(KEEP_RADIO=0.5), "unknown pruning variable KEEP_RADIO: did you mean KEEP_RATIO"),
        (dict(PRUNE_METOD_PRE_LLM="random_pre_llm"), "did you mean PRUNE_METHOD_PRE_LLM"),
        (dict(INTRA_LLM_LAYER_SPEC="2:fastv_intra_llm:0.5"), "did you mean INTRA_LLM_LAYER_SPECS"),
        (dict(METHOD_TIMES="1"), "did you mean METHOD_TIME"),
        (dict(PRUNE_RATIO="0.5"), "unknown pruning variable PRUNE_RATIO"),
    ],
)
def test_bad_configuration_is_refused_with_the_fix(env, message):
    with pytest.raises(ValueError, match=message):  # ConfigError, or the registry's UnknownMethodError
        parse(**env)


@pytest.mark.parametrize("text, value", [("1", True), ("true", True), ("True", True), ("yes", True), ("0", False), ("false", False), ("", False), (None, False)])
def test_booleans(text, value):
    assert parse_bool("X", text) is value
