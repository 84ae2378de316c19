"""The embedded demo (``make demo``): no download, a few minutes on two cores.

Builds a tiny random-weight checkpoint of each family (Qwen2.5-VL, InternVL3, LLaVA-1.5) and a
tiny MME-format dataset (all 14 categories), then runs the family's runner (``run_qwenvl2_5.py``,
``run_internvl3.py``, ``run_llava.py``) once per configuration, exactly as a user would
(``export KEEP_RATIO=... PRUNE_METHOD_...=...; python run_<family>.py --model ... --data ...``),
through the real VLMEvalKit path, and prints one table: family, configuration, MME score, prefill
ms, method ms and kept visual tokens. The weights are random, so the scores are noise: the demo
shows the machinery.

Sample count: ``--per-category N`` images per MME category (two questions each; default 2, i.e.
56 samples a run). VLMEvalKit's ``--first-n`` cannot shorten an MME run: MME scoring needs all 14
categories, so a truncated run writes no score file. Each run uses one torch thread unless
``OMP_NUM_THREADS`` is set (the tiny models gain nothing from more, and a busy machine makes
multi-threaded timings erratic).

Everything lands in ``demo_outputs/`` (the checkpoints are kept between runs; results are redone).
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

# (family label, runner script, checkpoint folder name, name of the tiny_checkpoints writer)
FAMILIES: list[tuple[str, str, str, str]] = [
    ("qwen2.5-vl", "run_qwenvl2_5.py", "tiny-qwen2.5-vl", "save_tiny_qwen"),
    ("internvl3", "run_internvl3.py", "tiny-internvl3", "save_tiny_internvl"),
    ("llava-1.5", "run_llava.py", "tiny-llava-1.5", "save_tiny_llava"),
]

# (label, environment) — vanilla is a configuration like any other.
CONFIGS: list[tuple[str, dict[str, str]]] = [
    ("vanilla", {}),
    ("random_pre_llm 0.333", {"KEEP_RATIO": "0.333", "PRUNE_METHOD_PRE_LLM": "random_pre_llm"}),
    ("divprune_pre_llm 0.111", {"KEEP_RATIO": "0.111", "PRUNE_METHOD_PRE_LLM": "divprune_pre_llm"}),
    ("fastv_intra_llm L2 0.333", {"KEEP_RATIO": "0.333", "PRUNE_METHOD_INTRA_LLM": "fastv_intra_llm"}),
    (
        "divprune 0.333 + fastv L2 0.111",
        {"KEEP_RATIO": "0.333", "PRUNE_METHOD_PRE_LLM": "divprune_pre_llm", "INTRA_LLM_LAYER_SPECS": "2:fastv_intra_llm:0.111"},
    ),
]
WARMUP = 2  # first samples of each run excluded from the timing means


def prepare(out: Path, per_category: int) -> tuple[dict[str, Path], Path]:
    import tiny_checkpoints
    import tiny_data

    ckpts = {}
    for family, _, folder, writer in FAMILIES:
        ckpt = out / "checkpoints" / folder
        if not (ckpt / "config.json").exists():
            getattr(tiny_checkpoints, writer)(ckpt)
        ckpts[family] = ckpt
    lmu = out / "LMUData"
    lmu.mkdir(parents=True, exist_ok=True)
    tiny_data.write_mme_tiny(lmu, n_per_category=per_category)
    return ckpts, lmu


def run_config(family: str, runner: str, label: str, env: dict[str, str], ckpt: Path, lmu: Path, out: Path) -> dict:
    timing_dir = out / "timing" / family / label.replace(" ", "_").replace("+", "and")
    timing_dir.mkdir(parents=True, exist_ok=True)
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("KEEP_", "PRUNE_", "INTRA_LLM"))}
    child_env.setdefault("OMP_NUM_THREADS", "1")
    child_env.update(env, LMUData=str(lmu), METHOD_TIME="1", PREFILL_TIME="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / runner), "--model", str(ckpt), "--data", "MME_tiny",
           "--work-dir", str(out / "work"), "--max-new-tokens", "8"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=child_env, cwd=timing_dir, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (timing_dir / "run.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{family} / {label}: run failed (exit {proc.returncode}); log: {timing_dir / 'run.log'}\n{proc.stderr[-3000:]}")
    from utils import PruneConfig

    tag = PruneConfig.from_env(env).tag()
    name = f"{ckpt.name}__{tag}" if tag else ckpt.name
    score_files = sorted((out / "work" / name).glob(f"{name}_MME_tiny_score.csv"))
    if not score_files:
        raise SystemExit(f"{family} / {label}: no score file under {out / 'work' / name}; log: {timing_dir / 'run.log'}")
    import pandas as pd

    score = pd.read_csv(score_files[0]).iloc[0]
    records = [json.loads(line) for line in (out / "work" / name / "prune_records.jsonl").read_text().splitlines()]
    timed = records[WARMUP:] or records
    row = {
        "family": family,
        "config": label,
        "MME": float(score["perception"]) + float(score["reasoning"]),
        "samples": len(records),
        "wall s": wall,
    }
    row["prefill ms"] = statistics.mean(r["prefill_ms"] for r in timed)
    row["method ms"] = statistics.mean(sum((e["ms"] or 0.0 for e in r["events"]), 0.0) for r in timed)
    row["kept"] = f"{statistics.mean(r['n_visual_final'] for r in records):.1f}/{records[0]['n_visual']}"
    return row


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "demo_outputs")
    parser.add_argument("--per-category", type=int, default=2,
                        help="MME_tiny images per category (2 questions each, 14 categories; default 2: 56 samples a run)")
    parser.add_argument("--families", nargs="+", default=[f for f, *_ in FAMILIES],
                        choices=[f for f, *_ in FAMILIES], help="families to run (default: all three)")
    args = parser.parse_args()
    out = args.out.resolve()
    shutil.rmtree(out / "work", ignore_errors=True)
    shutil.rmtree(out / "timing", ignore_errors=True)
    t0 = time.perf_counter()
    ckpts, lmu = prepare(out, args.per_category)
    rows = []
    for family, runner, _, _ in FAMILIES:
        if family not in args.families:
            continue
        for label, env in CONFIGS:
            logger.info("running %s / %s ...", family, label)
            rows.append(run_config(family, runner, label, env, ckpts[family], lmu, out))
    table = format_table(rows)
    (out / "results.md").write_text(table + "\n")
    print(table)
    print(f"\n{len(rows)} runs of {rows[0]['samples'] if rows else 0} MME_tiny samples each "
          f"({args.per_category} image(s) x 2 questions x 14 categories) in {time.perf_counter() - t0:.0f} s. "
          f"Timing means exclude the first {WARMUP} samples of each run; kept = mean visual tokens left / per image.")
    print(f"Files: {out}/work/<model>__<config>/ (VLMEvalKit predictions and scores, prune_records.jsonl, "
          f"prune_config.json), {out}/timing/<family>/<config>/ (method_times_*.txt, prefill_times.txt, run.log), "
          f"{out}/results.md.")


def format_table(rows: list[dict]) -> str:
    cols = ["family", "config", "MME", "prefill ms", "method ms", "kept", "samples"]
    fmt = lambda v: "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
