"""A failed run says so (issue #14), through the real runner on a tiny Qwen2.5-VL checkpoint:

* a dataset that produced no score makes the runner exit non-zero, naming the dataset and why,
  unless ``--mode infer`` asked for predictions only;
* a sample whose image cannot be decoded fails alone: the dataset is scored, that sample's
  prediction says why it failed, its record says ``failed``, the other samples ran.

The runs use the checkpoint's chat template (16 tokens an image): the protocol is not the subject.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from synthetic import tiny_checkpoints, tiny_data

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ("--protocol", "chat_template", "--max-new-tokens", "2", "--work-dir", "work")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("failures")
    tiny_checkpoints.save_tiny_qwen(root / "tiny-qwen")
    tiny_data.write_tiny("POPE", root / "lmu", n=2)
    tiny_data.write_tiny("MathVista_MINI", root / "lmu", n=2)
    return root


def run(root: Path, cwd: Path, *args: str, lmu: Path | None = None, **env_vars: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KEEP_", "PRUNE_", "INTRA_LLM", "MMEVAL_ROOT")) and k not in tiny_data.JUDGE_ENV_VARS}
    env.update(LMUData=str(lmu or root / "lmu"), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **env_vars)
    cwd.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "run_qwenvl2_5.py"), "--model", str(root / "tiny-qwen"), *args, *FLAGS]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_a_dataset_without_a_score_fails_the_run_and_says_which(root):
    # MathVista needs an LLM judge; with exact matching VLMEvalKit writes no score.
    proc = run(root, root / "judged", "--data", "POPE_tiny", "MathVista_MINI_tiny", "--judge", "exact_matching")
    assert proc.returncode == 1, proc.stderr[-3000:]
    message = proc.stderr.strip().splitlines()
    summary = [line for line in message if "produced no score" in line]
    assert summary and summary[0].startswith("1 of 2 model x dataset runs"), message[-10:]
    assert any("MathVista_MINI_tiny:" in line for line in message) and not any("x POPE_tiny:" in line for line in message)


def test_predictions_only_is_not_a_failure(root):
    proc = run(root, root / "infer", "--data", "MathVista_MINI_tiny", "--judge", "exact_matching", "--mode", "infer")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_an_undecodable_image_fails_that_sample_only(root):
    lmu = root / "broken_lmu"
    tiny_data.write_tiny("POPE", lmu, n=2)
    tsv = lmu / "POPE_tiny.tsv"
    data = pd.read_csv(tsv, sep="\t")
    row = int(data.index[data["image"].str.len() > 64][1])  # a row holding its own image (not an index)
    bad = int(data.loc[row, "index"])
    data.loc[row, "image"] = data.loc[row, "image"][:200]  # truncated base64: a PNG cut short
    data.to_csv(tsv, sep="\t", index=False)
    # POPE asks several questions of one image: the other rows name the image's row by index.
    broken = {bad} | {int(i) for i, img in zip(data["index"], data["image"]) if str(img) == str(bad)}
    assert 1 < len(broken) < len(data)
    # PREFILL_TIME: an unpruned run writes a record per sample too
    proc = run(root, root / "broken", "--data", "POPE_tiny", "--judge", "exact_matching", lmu=lmu, PREFILL_TIME="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (model_dir,) = (root / "broken" / "work").iterdir()
    assert list(model_dir.glob(f"{model_dir.name}_POPE_tiny_score.csv"))  # the dataset was scored
    (xlsx,) = model_dir.glob(f"T*/{model_dir.name}_POPE_tiny.xlsx")
    predictions = pd.read_excel(xlsx).set_index("index")["prediction"]
    failed_rows = {int(i) for i, p in predictions.items() if str(p).startswith("[sample failed] ")}
    assert failed_rows == broken
    records = [json.loads(line) for line in (model_dir / "prune_records.jsonl").read_text().splitlines()]
    failed = [r for r in records if r.get("failed")]
    assert len(failed) == len(broken) and len(records) == len(data)
    assert failed[0]["dataset"] == "POPE_tiny"
