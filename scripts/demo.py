"""The embedded demo (``make demo``): no download, a few minutes on two cores.

Builds a tiny random-weight Qwen2.5-VL checkpoint and a tiny MME-format dataset (all 14
categories), then runs ``run_qwenvl2_5.py`` once per configuration, exactly as a user would
(``export KEEP_RATIO=... PRUNE_METHOD_...=...; python run_qwenvl2_5.py --model ... --data ...``),
through the real VLMEvalKit path, and prints one table: MME score, prefill ms, method ms and kept
visual tokens. The weights are random, so the scores are noise: the demo shows the machinery.

Everything lands in ``demo_outputs/`` (the checkpoint is kept between runs; results are redone).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

logger = logging.getLogger("demo")

# (label, environment) — vanilla is a configuration like any other.
CONFIGS: list[tuple[str, dict[str, str]]] = [
    ("vanilla", {}),
    ("random_pre_llm 0.333", {"KEEP_RATIO": "0.333", "PRUNE_METHOD_PRE_LLM": "random_pre_llm"}),
    ("divprune_pre_llm 0.333", {"KEEP_RATIO": "0.333", "PRUNE_METHOD_PRE_LLM": "divprune_pre_llm"}),
    ("divprune_pre_llm 0.111", {"KEEP_RATIO": "0.111", "PRUNE_METHOD_PRE_LLM": "divprune_pre_llm"}),
    ("fastv_intra_llm L2 0.333", {"KEEP_RATIO": "0.333", "PRUNE_METHOD_INTRA_LLM": "fastv_intra_llm"}),
    (
        "divprune 0.333 + fastv L2 0.111",
        {"KEEP_RATIO": "0.333", "PRUNE_METHOD_PRE_LLM": "divprune_pre_llm", "INTRA_LLM_LAYER_SPECS": "2:fastv_intra_llm:0.111"},
    ),
]
WARMUP = 2  # first samples of each run excluded from the timing means


def prepare(out: Path) -> tuple[Path, Path]:
    import tiny_checkpoints
    import tiny_data

    ckpt = out / "checkpoints" / "tiny-qwen2.5-vl"
    if not (ckpt / "config.json").exists():
        tiny_checkpoints.save_tiny_qwen(ckpt)
    lmu = out / "LMUData"
    lmu.mkdir(parents=True, exist_ok=True)
    tiny_data.write_mme_tiny(lmu)
    return ckpt, lmu


def run_config(label: str, env: dict[str, str], ckpt: Path, lmu: Path, out: Path, first_n: int | None) -> dict:
    timing_dir = out / "timing" / label.replace(" ", "_").replace("+", "and")
    timing_dir.mkdir(parents=True, exist_ok=True)
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("KEEP_", "PRUNE_", "INTRA_LLM"))}
    child_env.update(env, LMUData=str(lmu), METHOD_TIME="1", PREFILL_TIME="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "run_qwenvl2_5.py"), "--model", str(ckpt), "--data", "MME_tiny",
           "--work-dir", str(out / "work"), "--max-new-tokens", "8"]
    if first_n:
        cmd += ["--first-n", str(first_n)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=child_env, cwd=timing_dir, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (timing_dir / "run.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{label}: run failed (exit {proc.returncode}); log: {timing_dir / 'run.log'}\n{proc.stderr[-3000:]}")
    sys.path.insert(0, str(ROOT))
    from utils import PruneConfig

    tag = PruneConfig.from_env(env).tag()
    name = f"{ckpt.name}__{tag}" if tag else ckpt.name
    score_files = sorted((out / "work" / name).glob(f"{name}_MME_tiny_score.csv"))
    if not score_files:
        raise SystemExit(f"{label}: no score file under {out / 'work' / name}; log: {timing_dir / 'run.log'}")
    import pandas as pd

    score = pd.read_csv(score_files[0]).iloc[0]
    records = [json.loads(line) for line in (out / "work" / name / "prune_records.jsonl").read_text().splitlines()]
    timed = records[WARMUP:] or records
    row = {
        "config": label,
        "MME": float(score["perception"]) + float(score["reasoning"]),
        "samples": len(records),
        "wall s": wall,
    }
    row["prefill ms"] = statistics.mean(r["prefill_ms"] for r in timed)
    row["method ms"] = statistics.mean(sum(e["ms"] or 0.0 for e in r["events"]) for r in timed)
    row["kept"] = f"{statistics.mean(r['n_visual_final'] for r in records):.1f}/{records[0]['n_visual']}"
    return row


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "demo_outputs")
    parser.add_argument("--first-n", type=int, default=None, help="evaluate only the first N samples")
    args = parser.parse_args()
    out = args.out.resolve()
    shutil.rmtree(out / "work", ignore_errors=True)
    shutil.rmtree(out / "timing", ignore_errors=True)
    ckpt, lmu = prepare(out)
    rows = []
    for label, env in CONFIGS:
        logger.info("running %s ...", label)
        rows.append(run_config(label, env, ckpt, lmu, out, args.first_n))
    table = format_table(rows)
    (out / "results.md").write_text(table + "\n")
    print(table)
    print(f"\nFiles: {out}/work/<model>__<config>/ (VLMEvalKit predictions and scores, prune_records.jsonl, "
          f"prune_config.json), {out}/timing/<config>/ (method_times_*.txt, prefill_times.txt, run.log), "
          f"{out}/results.md. Timing means exclude the first {WARMUP} samples of each run.")


def format_table(rows: list[dict]) -> str:
    cols = ["config", "MME", "prefill ms", "method ms", "kept", "samples"]
    fmt = lambda v: "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
