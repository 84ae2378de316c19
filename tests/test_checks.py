"""The checks a run makes before it loads a model (issue #14, item 2): every input of the issue's
list that can be judged without the model is refused with a message that names the fix.

* hyper-parameters: ranges and choices declared with each method (``Annotated[..., Range/OneOf]``)
  and checked in ``PruneMethod.check_args`` for ``PRUNE_ARGS``, schedules and defaults;
* the configuration against the checkpoint's depth and family (``PruneConfig.validate_for`` with
  the depth ``check_checkpoint`` reads from ``config.json``);
* the checkpoint folder (``check_checkpoint``) and the dataset names (``check_datasets``).
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Annotated

import pytest

import methods
from methods import OneOf, Range, register_prune
from synthetic import tiny_checkpoints
from utils import (
    CheckpointError,
    CheckpointNotLocal,
    ConfigError,
    PruneConfig,
    check_before_loading,
    check_checkpoint,
    check_datasets,
)

QWEN = ("qwen2_5_vl", ["qwen2_5_vl"])  # (family name, config.json model types) as the Qwen runner passes them


def parse(**env) -> PruneConfig:
    return PruneConfig.from_env({k: str(v) for k, v in env.items()})


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checks")
    return {"qwen": tiny_checkpoints.save_tiny_qwen(root / "tiny-qwen"),
            "llava": tiny_checkpoints.save_tiny_llava(root / "tiny-llava"), "root": root}


def copy_of(ckpts: dict, family: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(ckpts[family], tmp_path / f"copy-{family}"))


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


# ----------------------------------------------------------------------------- the configuration against the checkpoint
def test_layer_indices_are_checked_against_the_depth_in_config_json(ckpts):
    """The issue's ``40:fastv_intra_llm:0.5``, layer -1 and FastV at layer 0, on the tiny Qwen checkpoint
    (4 layers, read from its config.json: no model is built)."""
    depth = check_checkpoint(str(ckpts["qwen"]), *QWEN).num_layers
    assert depth == 4
    with pytest.raises(ConfigError, match=r"layer 40 is out of range for this model's 4-layer decoder \(valid: 0..3\)"):
        parse(INTRA_LLM_LAYER_SPECS="40:fastv_intra_llm:0.5").validate_for(depth, "qwen2_5_vl")
    with pytest.raises(ConfigError, match="layer -1 .* is negative: decoder layers count from 0"):
        parse(INTRA_LLM_LAYER_SPECS="-1:fastv_intra_llm:0.5")  # refused before any checkpoint is read
    with pytest.raises(ConfigError, match=r"fastv_intra_llm reads the previous layer .*use layer >= 1 .*'1:fastv_intra_llm:0.5'"):
        parse(INTRA_LLM_LAYER_SPECS="0:fastv_intra_llm:0.5").validate_for(depth, "qwen2_5_vl")
    # Every method whose inputs come from the previous layer, not only FastV's.
    with pytest.raises(ConfigError, match=r"dart_intra_llm reads the previous layer \(prev_keys, prev_text_keys\)"):
        parse(INTRA_LLM_LAYER_SPECS="0:dart_intra_llm:0.5").validate_for(depth, "qwen2_5_vl")
    with pytest.raises(ConfigError, match="fitprune_intra_llm reads the previous layer"):
        parse(INTRA_LLM_LAYER_SPECS="0:fitprune_intra_llm:0.5").validate_for(depth, "qwen2_5_vl")
    parse(INTRA_LLM_LAYER_SPECS="0:random_intra_llm:0.5;3:fastv_intra_llm:0.25").validate_for(depth, "qwen2_5_vl")


def test_a_hybrid_deeper_than_the_model_names_its_layers_argument(ckpts):
    depth = check_checkpoint(str(ckpts["qwen"]), *QWEN).num_layers
    with pytest.raises(ConfigError, match=r"sparsevlm prunes the output of layers 2/6/15: out of range for this model's 4-layer decoder .* PRUNE_ARGS='layers=...' with every layer <= 2"):
        parse(KEEP_RATIO=0.333, PRUNE_METHOD="sparsevlm").validate_for(depth, "qwen2_5_vl")
    parse(KEEP_RATIO=0.333, PRUNE_METHOD="sparsevlm", PRUNE_ARGS="layers=0/1/2").validate_for(depth, "qwen2_5_vl")
    parse(KEEP_RATIO=0.333, PRUNE_METHOD="mustdrop", PRUNE_ARGS="layers=0/2").validate_for(depth, "qwen2_5_vl")


def test_a_method_of_another_family_is_refused_before_loading(ckpts):
    """The issue's ``PRUNE_METHOD_PRE_LLM=vispruner_pre_llm`` on a Qwen checkpoint, through the one call
    a runner makes before it loads anything."""
    config = parse(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="vispruner_pre_llm")
    with pytest.raises(ConfigError, match=r"vispruner_pre_llm does not apply to qwen2_5_vl: it supports llava, "
                                          r"llava_next only. Use run_llava.py or run_llava_next.py with a llava, llava_next checkpoint, "
                                          r"or another pre_llm method"):
        check_before_loading(config, str(ckpts["qwen"]), *QWEN)
    info = check_before_loading(config, str(ckpts["llava"]), "llava", ["llava"])
    assert (info.model_type, info.num_layers) == ("llava", 4)


# ----------------------------------------------------------------------------- the checkpoint folder
def test_a_good_checkpoint_is_described(ckpts):
    info = check_checkpoint(str(ckpts["qwen"]), *QWEN)
    assert (info.path, info.model_type, info.num_layers) == (str(ckpts["qwen"]), "qwen2_5_vl", 4)
    assert info.weights == (str(ckpts["qwen"] / "model.safetensors"),)
    assert info.config["model_type"] == "qwen2_5_vl"


def test_another_familys_checkpoint_names_its_runner(ckpts):
    """The issue's LLaVA checkpoint given to the Qwen runner (today: 'NoneType' object has no attribute 'device')."""
    with pytest.raises(CheckpointError, match=r"run_qwenvl2_5.py runs qwen2_5_vl checkpoints .* but this is a llava "
                                              r"checkpoint; use run_llava.py"):
        check_checkpoint(str(ckpts["llava"]), *QWEN)


def test_an_empty_folder_and_a_folder_without_config_json(ckpts, tmp_path):
    """The issue's empty folder, and a folder with weights but no config.json (today: a full-size default
    model is built and killed for memory)."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no config.json in .*empty \(the folder is empty\)"):
        check_checkpoint(str(tmp_path / "empty"), *QWEN)
    folder = copy_of(ckpts, "qwen", tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"no config.json in .* \(it holds .*model.safetensors.*\)"):
        check_checkpoint(str(folder), *QWEN)


def test_truncated_or_missing_weights(ckpts, tmp_path):
    folder = copy_of(ckpts, "qwen", tmp_path)
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CheckpointError, match=rf"model.safetensors is damaged: truncated: {size // 2} bytes, its header describes {size}"):
        check_checkpoint(str(folder), *QWEN)
    with open(weights, "r+b") as f:
        f.truncate(5)
    with pytest.raises(CheckpointError, match="too short for a safetensors header"):
        check_checkpoint(str(folder), *QWEN)
    weights.unlink()
    with pytest.raises(CheckpointError, match=r"no weights in .* \(no \*.safetensors, \*.bin or weight index"):
        check_checkpoint(str(folder), *QWEN)
    # A sharded checkpoint whose index names a shard that is not there.
    shutil.copy(ckpts["qwen"] / "model.safetensors", folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="lists 2 weight shards but 1 are missing .*model-00002-of-00002"):
        check_checkpoint(str(folder), *QWEN)
    # A torch .bin zip archive cut short.
    (folder / "model.safetensors.index.json").unlink()
    (folder / "model-00001-of-00002.safetensors").unlink()
    import torch

    torch.save({"w": torch.zeros(1000)}, folder / "pytorch_model.bin")
    assert check_checkpoint(str(folder), *QWEN).weights == (str(folder / "pytorch_model.bin"),)
    data = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="pytorch_model.bin is damaged: truncated"):
        check_checkpoint(str(folder), *QWEN)


def test_bad_paths_and_unreadable_configs(ckpts, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint folder /nonexistent/ckpt .*--model-path"):
        check_checkpoint("/nonexistent/ckpt", *QWEN)
    with pytest.raises(CheckpointError, match="is a file; --model / --model-path take a checkpoint FOLDER"):
        check_checkpoint(str(ckpts["qwen"] / "config.json"), *QWEN)
    folder = copy_of(ckpts, "qwen", tmp_path)
    (folder / "config.json").write_text('{"model_type": "qwen2_5_vl", ')
    with pytest.raises(CheckpointError, match="config.json cannot be read as JSON"):
        check_checkpoint(str(folder), *QWEN)
    (folder / "config.json").write_text(json.dumps({"model_type": "internvl_chat"}))
    with pytest.raises(CheckpointError, match="remote-code InternVL checkpoint .* use OpenGVLab/InternVL3-<size>-hf"):
        check_checkpoint(str(folder), "internvl", ["internvl"])
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer_config.json").unlink()
    shutil.copy(ckpts["qwen"] / "config.json", folder / "config.json")
    with pytest.raises(CheckpointError, match="no tokenizer in"):
        check_checkpoint(str(folder), *QWEN)


def test_a_config_json_without_the_depth_gets_the_architectures_default(ckpts, tmp_path):
    """llava-hf's config.json has no text_config.num_hidden_layers: LLaMA's default (32) applies, as in from_pretrained."""
    folder = copy_of(ckpts, "llava", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    del config["text_config"]["num_hidden_layers"]
    (folder / "config.json").write_text(json.dumps(config))
    assert check_checkpoint(str(folder), "llava", ["llava"]).num_layers == 32


def test_a_config_json_in_the_hubs_flat_qwen_layout(ckpts, tmp_path):
    """Qwen/Qwen2.5-VL-*-Instruct's config.json keeps the decoder's keys at the top level (no
    text_config): the depth is read as transformers reads it."""
    folder = copy_of(ckpts, "qwen", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    text = config.pop("text_config")
    text.pop("layer_types", None)
    (folder / "config.json").write_text(json.dumps({**text, **config, "num_hidden_layers": 7}))
    assert check_checkpoint(str(folder), *QWEN).num_layers == 7


def test_hub_ids_resolve_through_the_local_cache_only(ckpts, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(CheckpointNotLocal, match=r"me/tiny-qwen is neither a local folder nor a model in the Hugging Face "
                                                 r"cache .*huggingface-cli download me/tiny-qwen"):
        check_checkpoint("me/tiny-qwen", *QWEN)
    # The cache's layout: models--<org>--<name>/refs/main -> snapshots/<commit>/ (files, or links to blobs).
    repo = cache / "models--me--tiny-qwen"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    snapshot = Path(shutil.copytree(ckpts["qwen"], repo / "snapshots" / "0123abcd"))
    info = check_checkpoint("me/tiny-qwen", *QWEN)
    assert (info.path, info.num_layers) == (str(snapshot), 4)
    # download=True fetches config.json only when the cache lacks it; a failure is one clear message.
    import huggingface_hub

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(CheckpointError, match="other/model: its config.json cannot be fetched .* --model-path DIR"):
        check_checkpoint("other/model", *QWEN, download=True)


# ----------------------------------------------------------------------------- dataset names
def test_dataset_names_with_did_you_mean(tmp_path, monkeypatch):
    """The issue's ``--data POPE_tinyy`` (today: "is not valid, will be skipped" after the load, exit 0)."""
    monkeypatch.setenv("LMUData", str(tmp_path))
    (tmp_path / "MyOwnSet.tsv").write_text("index\tquestion\n1\tq\n")  # VLMEvalKit runs any TSV in LMUData
    check_datasets(["MME", "POPE", "POPE_tiny", "MMBench_DEV_EN_tiny", "Proxy_MCQ", "MyOwnSet"])
    with pytest.raises(ConfigError, match=r"--data: unknown dataset 'POPE_tinyy' \(did you mean POPE_tiny"):
        check_datasets(["POPE_tiny", "POPE_tinyy"])
    with pytest.raises(ConfigError, match=r"unknown datasets 'MMEE' \(did you mean MME.*\), 'xyzzy'"):
        check_datasets(["MMEE", "xyzzy"])
