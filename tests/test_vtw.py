"""VTW: withdrawal of every visual token at layer K, its exactness, and the K-search rule."""

from __future__ import annotations

import pytest
import torch

from families import FAMILIES, cfg, check_against_reference, greedy
from methods.vtw import vtw_kl, vtw_pick_layer
from reference import drops_from_trace
from utils import ConfigError, LayerSpec, PruneConfig


def test_config_takes_no_ratio_and_defaults_to_layer_16():
    assert PruneConfig.from_env({"PRUNE_METHOD_INTRA_LLM": "vtw_intra_llm"}).intra == (LayerSpec(16, "vtw_intra_llm", None),)
    c = PruneConfig.from_env({"INTRA_LLM_LAYER_SPECS": "1:fastv_intra_llm:0.5;3:vtw_intra_llm"})
    assert c.intra[1] == LayerSpec(3, "vtw_intra_llm", None) and c.tag() == "L1-fastv_intra_llm-r0.5__L3-vtw_intra_llm"
    with pytest.raises(ConfigError, match="takes no ratio: write '3:vtw_intra_llm'"):
        PruneConfig.from_env({"INTRA_LLM_LAYER_SPECS": "3:vtw_intra_llm:0.5"})


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_withdrawal_is_exact_against_the_reference(family):
    spec = FAMILIES[family]
    model = spec.build(seed=2)
    inputs = spec.make_inputs(seed=2, **spec.variants["2img"])
    spec.module.patch(model, cfg(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="divprune_pre_llm", INTRA_LLM_LAYER_SPECS="2:vtw_intra_llm"))
    prefill_logits = model(**inputs).logits[0]
    seq, steps = greedy(model, inputs)
    pre, vtw = model.prune_trace
    assert (vtw.layer, vtw.n_in, vtw.n_keep, vtw.kept) == (2, pre.n_keep, 0, [])
    n_prompt = inputs["input_ids"].shape[1]
    n_visual = sum(n for n, _ in pre.images)
    assert prefill_logits.shape[0] == n_prompt - n_visual  # nothing visual reaches the last layers
    drops = drops_from_trace(model.prune_trace)
    assert drops == {0: pre.kept, 2: []}
    spec.module.unpatch(model)
    check_against_reference(spec.ref, model, inputs, seq, steps, drops, prefill_logits)


def test_kl_is_kl_of_withdrawn_to_full():
    full, withdrawn = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    p, q = withdrawn.softmax(-1), full.softmax(-1)
    assert vtw_kl(full, withdrawn) == pytest.approx(float((p * (p.log() - q.log())).sum()), rel=1e-6)
    assert vtw_kl(full, full) == pytest.approx(0.0, abs=1e-7)


def test_pick_layer_is_the_first_mean_under_eta():
    # Columns are layers 5, 6, 7, 8; means 0.02, 0.004, 0.002, 0.001 -> first <= 0.003 is layer 7.
    kl = torch.tensor([[0.03, 0.006, 0.001, 0.001], [0.01, 0.002, 0.003, 0.001]])
    assert vtw_pick_layer(kl, eta=0.003) == 7
    assert vtw_pick_layer(kl, eta=0.0001) is None
    assert vtw_pick_layer(kl, eta=1.0, start=1) == 1


def test_find_k_script_on_a_tiny_checkpoint(tmp_path):
    import json

    from synthetic import tiny_checkpoints
    from synthetic import tiny_data
    from scripts.vtw_find_k import main

    ckpt = tiny_checkpoints.save_tiny_qwen(tmp_path / "ckpt")
    tsv = tiny_data.write_mme_tiny(tmp_path, n_per_category=1)
    out = tmp_path / "k.json"
    assert main(["--family", "qwen2_5_vl", "--model", str(ckpt), "--data", str(tsv), "--limit", "3",
                 "--start", "1", "--eta", "1e9", "--out", str(out)]) is None
    result = json.loads(out.read_text())
    kl = torch.tensor(result["kl"])
    assert kl.shape == (3, 3) and bool((kl >= -1e-6).all()) and result["k"] == 1
    assert main(["--family", "qwen2_5_vl", "--model", str(ckpt), "--data", str(tsv), "--limit", "2",
                 "--start", "1", "--eta", "-1"]) == 1  # no layer qualifies: said, exit code 1
