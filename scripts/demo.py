"""The embedded demo (``make demo``): trained proxy models, no download, a few minutes on two cores.

Runs the shipped proxy checkpoints (``synthetic/proxy_checkpoints/``: tiny models of the three families'
real architectures trained on the synthetic suite by ``scripts/train_proxy.py``) on the held-out
synthetic suite (``proxy_data``: Proxy_MCQ, Proxy_POPE, Proxy_OCRBench in VLMEvalKit's real
formats), vanilla and a handful of methods at the paper's kept ratios 0.333 / 0.222 / 0.111, as a
sweep (``scripts/sweep.sh --one-load``: each checkpoint loaded once, every cell named and stored as
the runners ``run_<family>.py`` store it), scored by VLMEvalKit's own code. It then reads the
scores per question type and prints the
paper-style table (rows: method grouped by kept ratio; columns: question types, average and drop
against vanilla; prefill and method ms; kept visual tokens) and draws accuracy against the kept
ratio (``demo_outputs/<family>_accuracy_vs_ratio.png``).

One torch thread unless ``OMP_NUM_THREADS`` is set. Timing means exclude the first samples of each
cell (warm-up). Everything lands in ``demo_outputs/``.
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

from synthetic import proxy_data  # noqa: E402

logger = logging.getLogger("demo")

CHECKPOINTS = ROOT / "synthetic" / "proxy_checkpoints"
# (family label, sweep.sh family, shipped checkpoint folder)
FAMILIES: list[tuple[str, str, str]] = [
    ("qwen2.5-vl", "qwen", "qwen2_5_vl"),
    ("internvl3", "internvl", "internvl3"),
    ("llava-1.5", "llava", "llava1_5"),
]
RATIOS = (0.333, 0.222, 0.111)
METHODS = ("pre:random_pre_llm", "pre:divprune_pre_llm", "intra:fastv_intra_llm")  # sweep.sh method tokens
DATASETS = tuple(proxy_data.DATASETS)
WARMUP = 2  # first samples of each cell excluded from the timing means


def sweep(out: Path, ckpts: dict[str, Path], lmu: Path) -> None:
    """Every family x (vanilla + METHODS x RATIOS) x DATASETS through ``scripts/sweep.sh --one-load``
    (each checkpoint loaded once; cells named and stored exactly as the per-cell runners do)."""
    cmd = ["bash", str(ROOT / "scripts" / "sweep.sh"), "--methods", " ".join(("vanilla", *METHODS)),
           "--ratios", " ".join(map(str, RATIOS)), "--seeds", "0", "--datasets", " ".join(DATASETS),
           "--work-dir", str(out / "work"), "--python", sys.executable, "--one-load"]
    for family, path in ckpts.items():
        cmd += ["--model", f"{family} {path}"]
    # The proxy models were trained on their own chat template (64 tokens an image): that protocol, not VLMEvalKit's.
    cmd += ["--", "--judge", "exact_matching", "--protocol", "chat_template", "--max-new-tokens", "4"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEEP_", "PRUNE_", "INTRA_LLM", "MMEVAL_ROOT"))}
    env.update(LMUData=str(lmu), PYTHONPATH=str(ROOT), OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    logger.info("%s", " ".join(cmd))
    proc = subprocess.run(cmd, env=env, cwd=out, capture_output=True, text=True)
    (out / "sweep.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"the sweep failed (exit {proc.returncode}); log: {out / 'sweep.log'}\n{proc.stderr[-3000:]}")


def type_accuracy(model_dir: Path) -> dict[str, float]:
    """Accuracy (%) per question type from the score files VLMEvalKit wrote in ``model_dir``."""
    import pandas as pd

    def one(suffix: str) -> Path:
        found = sorted(model_dir.glob(f"{model_dir.name}_{suffix}"))
        if not found:
            raise SystemExit(f"no VLMEvalKit score file *_{suffix} under {model_dir}")
        return found[0]

    acc = {}
    mcq = pd.read_csv(one("Proxy_MCQ_acc.csv")).iloc[0]
    for t in proxy_data.DATASETS["Proxy_MCQ"][1]:
        acc[t] = 100 * float(mcq[proxy_data.CATEGORY[t]])
    pope = pd.read_csv(one("Proxy_POPE_score.csv")).set_index("split")
    acc["existence"] = float(pope.loc[proxy_data.CATEGORY["existence"], "acc"])
    text = json.loads(one("Proxy_OCRBench_score.json").read_text())[proxy_data.CATEGORY["text"]]
    acc["text"] = 100 * text["sum"] / text["count"]
    return acc


def read_cell(model_dir: Path, family: str) -> dict:
    """One configuration's row: its method and ratio (from ``prune_config.json``), accuracy per type,
    timing means after warm-up, kept visual tokens."""
    cfg = json.loads((model_dir / "prune_config.json").read_text())
    if cfg["pre_method"]:
        method, ratio = cfg["pre_method"], cfg["keep_ratio"]
    elif cfg["intra"]:
        method, ratio = cfg["intra"][0]["method"], cfg["intra"][0]["ratio"]
    else:
        method, ratio = "vanilla", 1.0
    records = [json.loads(line) for line in (model_dir / "prune_records.jsonl").read_text().splitlines()]
    timed = [r for d in DATASETS for r in [x for x in records if x.get("dataset") == d][WARMUP:]] or records
    acc = type_accuracy(model_dir)
    return {
        "family": family, "method": method, "ratio": float(ratio), **acc, "avg": statistics.fmean(acc.values()),
        "prefill ms": statistics.mean(r["prefill_ms"] for r in timed),
        "method ms": statistics.mean(sum((e["ms"] or 0.0 for e in r["events"]), 0.0) for r in timed),
        "kept": statistics.mean(r["n_visual_final"] for r in records), "visual": records[0]["n_visual"],
        "samples": len(records),
    }


def format_table(rows: list[dict]) -> str:
    """Markdown: per family, vanilla then the methods grouped by kept ratio; accuracy per question
    type, the average and its drop against the family's vanilla."""
    types = list(proxy_data.TYPES)
    cols = ["family", "kept ratio", "method", *types, "avg", "Δ avg", "prefill ms", "method ms", "kept tokens"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    vanilla = {r["family"]: r["avg"] for r in rows if r["method"] == "vanilla"}
    for r in rows:
        ratio = "100 %" if r["method"] == "vanilla" else f"{100 * r['ratio']:.1f} %"
        drop = "" if r["method"] == "vanilla" else f"{r['avg'] - vanilla[r['family']]:+.1f}"
        cells = [r["family"], ratio, r["method"], *(f"{r[t]:.1f}" for t in types), f"{r['avg']:.1f}", drop,
                 f"{r['prefill ms']:.1f}", f"{r['method ms']:.2f}", f"{r['kept']:.1f}/{r['visual']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], family: str, path: Path) -> Path:
    """Accuracy against the kept ratio: one panel per question type with a score (and the average),
    one line per method (its own colour, hollow marker and line style, dodged a little left or right
    of the tick so tied methods stay visible), x ticks at the evaluated ratios labelled as the table
    labels them (with the kept tokens), vanilla as a dashed reference line."""
    from scripts import plot_style

    plt = plot_style.plt
    mine = [r for r in rows if r["family"] == family]
    vanilla = next(r for r in mine if r["method"] == "vanilla")
    methods = [token.split(":", 1)[1] for token in METHODS]
    styles = plot_style.method_styles(methods)
    ratios = sorted({r["ratio"] for r in mine if r["method"] != "vanilla"})
    kept = {}
    for ratio in ratios:
        tokens = {(r["kept"], r["visual"]) for r in mine if r["ratio"] == ratio and r["method"] != "vanilla"}
        if len(tokens) == 1:
            ((k, v),) = tokens
            kept[ratio] = f"{k:g}/{v:g} tokens"

    def has(key: str) -> bool:
        return any(r.get(key) is not None for r in mine if r["method"] != "vanilla")

    panels = [key for key in (*proxy_data.TYPES, "avg") if has(key)]
    fig, axes = plot_style.grid(len(panels), cols=3, width=4.0, height=3.1)
    offset = plot_style.dodge_offsets(list(styles), ratios)
    for ax, key in zip(axes, panels):
        for label, style in styles.items():
            pts = sorted((r["ratio"], r[key]) for r in mine if r["method"] == label and r.get(key) is not None)
            ax.plot([p[0] + offset[label] for p in pts], [p[1] for p in pts], label=label, **style.line_kwargs())
        if vanilla.get(key) is not None:
            ax.axhline(vanilla[key], label="vanilla", **plot_style.VANILLA_STYLE)
        plot_style.set_ratio_ticks(ax, ratios, kept)
        ax.set_ylim(-4, 104)
        ax.set_title("average" if key == "avg" else key, fontsize=10)
        ax.set_xlabel("kept visual tokens (ratio)", fontsize=9)
        ax.set_ylabel("accuracy (%)", fontsize=9)
        ax.grid(alpha=0.3)
    handles, labels = plot_style.legend_handles(styles)
    plot_style.finish(fig, handles, labels, f"{family} proxy: accuracy vs kept visual tokens (held-out synthetic suite, "
                      f"{vanilla.get('samples', '?')} questions a run)",
                      "Each method's points sit slightly left/right of the evaluated ratio so ties stay visible. "
                      "Kept tokens: visual tokens left at the last decoder layer.")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "demo_outputs")
    parser.add_argument("--scenes", type=int, default=40,
                        help="held-out scenes (each gives one question of every type; default 40: 200 questions a run)")
    parser.add_argument("--families", nargs="+", default=[f for f, *_ in FAMILIES], choices=[f for f, *_ in FAMILIES])
    parser.add_argument("--checkpoints", type=Path, default=CHECKPOINTS)
    args = parser.parse_args(argv)
    if args.scenes < 1:
        parser.error("--scenes must be >= 1")
    out = args.out.resolve()
    shutil.rmtree(out / "work", ignore_errors=True)
    t0 = time.perf_counter()
    lmu = out / "LMUData"
    proxy_data.write_datasets(lmu, n=args.scenes)
    ckpts = {}
    for label, family, folder in FAMILIES:
        if label in args.families:
            ckpts[family] = args.checkpoints / folder
            if not (ckpts[family] / "config.json").exists():
                raise SystemExit(f"no proxy checkpoint at {ckpts[family]}; train one with "
                                 f"`python -m scripts.train_proxy --family {family} --out {ckpts[family]}`")
    sweep(out, ckpts, lmu)
    rows = []
    for label, family, folder in FAMILIES:
        if family in ckpts:
            display = ckpts[family].resolve().name  # the runner names a checkpoint folder by its name
            cells = [read_cell(d, label) for d in sorted((out / "work").glob(f"{display}*")) if (d / "prune_config.json").exists()]
            rows += sorted(cells, key=lambda r: (-r["ratio"], r["method"]))
    table = format_table(rows)
    (out / "results.md").write_text(table + "\n")
    plots = [plot(rows, family, out / f"{family}_accuracy_vs_ratio.png") for family in dict.fromkeys(r["family"] for r in rows)]
    print(table)
    print(f"\n{len(rows)} runs of {rows[0]['samples']} held-out questions each ({args.scenes} scenes x 5 types) in "
          f"{time.perf_counter() - t0:.0f} s. Accuracy in %; Δ avg = average minus the family's vanilla; timing means "
          f"exclude the first {WARMUP} samples of each run; kept = mean visual tokens left / per image.")
    print(f"Plots: {', '.join(str(p) for p in plots)}. Files: {out}/work/<model>__<config>/ (VLMEvalKit predictions "
          f"and scores, prune_records.jsonl, prune_config.json), {out}/work/_sweep/ (per-cell logs, ledgers, timing "
          f"files), {out}/sweep.log, {out}/results.md.")


if __name__ == "__main__":
    main()
