"""Timers, the files they append to, and the VLMEvalKit runner end to end."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import custom_qwenvl
from synthetic import tiny_models as tm
from utils import PruneConfig, Stopwatch, TimingSink, append_line

ROOT = Path(__file__).resolve().parents[1]


def _writer(path: str, tag: int) -> None:
    for i in range(300):
        append_line(path, f"{tag}\t{i}\t" + "x" * 2000)


def test_concurrent_appends_never_interleave(tmp_path):
    path = tmp_path / "times.txt"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(path), t)) for t in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    lines = path.read_text().splitlines()
    assert len(lines) == 1200
    assert all(len(line.split("\t")) == 3 and line.endswith("x" * 2000) for line in lines)


def test_stopwatch_measures_the_block():
    import time

    with Stopwatch("cpu") as sw:
        time.sleep(0.02)
    assert 15 <= sw.ms < 1000
    assert Stopwatch("cpu", enabled=False).start().ms is None


@torch.no_grad()
def test_method_and_prefill_times_are_appended_per_sample(tmp_path):
    cfg = PruneConfig.from_env(
        {"KEEP_RATIO": "0.25", "PRUNE_METHOD_PRE_LLM": "divprune_pre_llm",
         "INTRA_LLM_LAYER_SPECS": "2:fastv_intra_llm:0.125", "METHOD_TIME": "1", "PREFILL_TIME": "yes"}
    )
    sink = TimingSink(text_dir=tmp_path, jsonl=tmp_path / "records.jsonl", rank=0, label="tiny__" + cfg.tag())
    model = custom_qwenvl.patch(tm.tiny_qwen(), cfg, sink)
    inputs = tm.qwen_inputs()
    model.generate(**inputs, max_new_tokens=3, do_sample=False)  # one prefill: one line per event
    model(**inputs)
    div = (tmp_path / "method_times_divprune_pre_llm.txt").read_text().splitlines()
    fastv = (tmp_path / "method_times_fastv_intra_llm.txt").read_text().splitlines()
    prefill = (tmp_path / "prefill_times.txt").read_text().splitlines()
    assert len(div) == len(fastv) == len(prefill) == 2
    label = "tiny__divprune_pre_llm-r0.25__L2-fastv_intra_llm-r0.125"  # which configuration wrote the line: last
    ms, stage, layer, n_in, n_keep, rank, written_by = div[0].split("\t")
    assert float(ms) > 0 and (stage, layer, n_in, n_keep, rank, written_by) == ("pre_llm", "-", "16", "4", "0", label)
    assert fastv[0].split("\t")[1:] == ["intra_llm", "2", "4", "2", "0", label]
    n_prompt = inputs["input_ids"].shape[1]
    assert prefill[0].split("\t")[1:] == [str(n_prompt), "16", "2", "0", label]
    # The prefill covers the method calls it contains.
    assert float(prefill[0].split("\t")[0]) > float(ms)
    records = [json.loads(x) for x in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert [r["sample"] for r in records] == [1, 2] and records[0]["run"] == records[1]["run"] == sink.run
    assert [e["method"] for e in records[0]["events"]] == ["divprune_pre_llm", "fastv_intra_llm"]
    assert records[0]["events"][1]["kept"] == model.prune_trace[1].kept


@torch.no_grad()
def test_unpruned_runs_are_timed_the_same_way(tmp_path):
    cfg = PruneConfig.from_env({"PREFILL_TIME": "1"})
    sink = TimingSink(text_dir=tmp_path, jsonl=tmp_path / "records.jsonl", rank=0)
    model = custom_qwenvl.patch(tm.tiny_qwen(), cfg, sink)
    model(**tm.qwen_inputs())
    record = json.loads((tmp_path / "records.jsonl").read_text())
    assert record["events"] == [] and record["n_visual"] == record["n_visual_final"] == 16
    assert record["prefill_ms"] > 0
    assert not list(tmp_path.glob("method_times_*"))


def _run(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("KEEP_", "PRUNE_", "INTRA_LLM"))}
    full_env.update(env, LMUData=str(tmp_path / "lmu"), PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, str(ROOT / "run_qwenvl2_5.py"), *args], env=full_env, cwd=tmp_path,
        capture_output=True, text=True, timeout=600,
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from synthetic import tiny_checkpoints
    from synthetic import tiny_data

    root = tmp_path_factory.mktemp("runner")
    tiny_checkpoints.save_tiny_qwen(root / "tiny-qwen")
    (root / "lmu").mkdir()
    tiny_data.write_mme_tiny(root / "lmu", n_per_category=1)
    return root


def test_runner_end_to_end_with_config_in_the_model_name(checkpoint):
    args = ("--model", str(checkpoint / "tiny-qwen"), "--data", "MME_tiny", "--work-dir", "work", "--max-new-tokens", "3")
    vanilla = _run(checkpoint, {}, *args)
    assert vanilla.returncode == 0, vanilla.stderr[-2000:]
    pruned = _run(checkpoint, {"KEEP_RATIO": "0.25", "PRUNE_METHOD_PRE_LLM": "divprune_pre_llm", "PREFILL_TIME": "1"}, *args)
    assert pruned.returncode == 0, pruned.stderr[-2000:]
    work = checkpoint / "work"
    # VLMEvalKit's protocol of the family's reference model (the folder is no VLMEvalKit name), the
    # answer length overridden; the unpruned run gets its own tag.
    prefix = "tiny-qwen__vlmeval-Qwen2.5-VL-7B-Instruct__mnt3"
    for name in (f"{prefix}__vanilla", f"{prefix}__divprune_pre_llm-r0.25"):
        assert (work / name / f"{name}_MME_tiny_score.csv").exists(), sorted(p.name for p in work.iterdir())
    config = json.loads((work / f"{prefix}__divprune_pre_llm-r0.25" / "prune_config.json").read_text())
    assert config["pre_method"] == "divprune_pre_llm" and config["keep_ratio"] == 0.25
    records = (work / f"{prefix}__divprune_pre_llm-r0.25" / "prune_records.jsonl").read_text().splitlines()
    assert len(records) == 28  # 14 categories x 1 image x 2 questions
    # A 112-px image upscaled to min_pixels=1280*28*28: 36 x 36 tokens, a quarter kept.
    assert all((json.loads(r)["n_visual"], json.loads(r)["n_visual_final"]) == (1296, 324) for r in records)
    assert len((checkpoint / "prefill_times.txt").read_text().splitlines()) == 28


def test_runner_refuses_a_misspelt_variable_before_loading_anything(checkpoint):
    bad = _run(checkpoint, {"KEEP_RADIO": "0.5"}, "--model", "Qwen2.5-VL-7B-Instruct", "--data", "MME")
    assert bad.returncode != 0 and "KEEP_RADIO: did you mean KEEP_RATIO" in bad.stderr


def test_runner_names_the_models_it_knows(checkpoint):
    bad = _run(checkpoint, {}, "--model", "Qwen2.5-VL-9B", "--data", "MME_tiny")
    assert bad.returncode != 0 and "Qwen2.5-VL-7B-Instruct" in bad.stderr and "--model-path" in bad.stderr


@torch.no_grad()
def test_records_carry_image_spans_and_the_kv_cache_size(tmp_path):
    cfg = PruneConfig.from_env({"KEEP_RATIO": "0.25", "PRUNE_METHOD_PRE_LLM": "random_pre_llm"})
    sink = TimingSink(text_dir=None, jsonl=tmp_path / "r.jsonl", rank=0)
    model = custom_qwenvl.patch(tm.tiny_qwen(), cfg, sink)
    inputs = tm.qwen_inputs(grids=((1, 8, 8), (1, 4, 4)))
    out = model(**inputs, use_cache=True)
    record = json.loads((tmp_path / "r.jsonl").read_text())
    image = torch.nonzero(inputs["input_ids"][0] == tm.IMAGE_ID).flatten().tolist()
    assert record["image_spans"] == [{"start": image[0], "n": 16, "grid": [1, 4, 4]}, {"start": image[16], "n": 4, "grid": [1, 2, 2]}]
    # 4 layers x (keys + values) x [1, KV=2, L', hd=16] fp32, L' = prompt less the 15 pruned tokens.
    n_kept = inputs["input_ids"].shape[1] - 15
    assert record["kv_cache_bytes"] == 4 * 2 * 2 * n_kept * 16 * 4 == sum(
        l.keys.numel() * 4 + l.values.numel() * 4 for l in out.past_key_values.layers
    )
    assert record["peak_memory_bytes"] is None  # CPU
