"""The sweep (``scripts/sweep.sh``), its aggregation and plots, end to end on the tiny checkpoints.

One sweep on the tiny Qwen checkpoint and MME_tiny, one runner per cell, in the order a user meets
it: ``--dry-run`` lists the cells; a sweep killed in its first cell (after VLMEvalKit saved some
predictions), whose prediction root is then renamed to an older day as after midnight or a commit;
the full sweep, which resumes that cell without recomputing the saved predictions and runs the
others; a re-run, which starts no runner; then the tables and PNGs. Then ``scripts/tiny_sweep.py``:
the four families x the twelve tiny datasets of the paper's ten formats with ``--one-load``, its
tables and plots, and its cells compared with the per-cell runners'; one cell under ``--nproc 2``
(``torchrun`` on CPU) compared with the one-process run. A last part checks the aggregation's
arithmetic on hand-written score files.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from synthetic import tiny_checkpoints
from synthetic import tiny_data
from scripts import _common, aggregate, plots
from utils import PruneConfig

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "scripts" / "sweep.sh"
DATA = "MME_tiny"
N_SAMPLES = 28  # 14 categories x 1 image x 2 questions
METHODS = "vanilla pre:random_pre_llm intra:fastv_intra_llm"
RATIOS = ("0.5", "0.25")
SEEDS = ("0", "1")


# The sweep's mechanics are the subject here: the cheap protocol (the checkpoint's chat template,
# 16 tokens an image) rather than VLMEvalKit's (1296), which tests/test_runners.py runs.
RUNNER_ARGS = ("--protocol", "chat_template", "--max-new-tokens", "2")
PROTOCOL_TAG = "chat-template__mnt2"


def _model(ckpt: Path) -> str:
    """The report's model: the checkpoint under the sweep's protocol."""
    return f"{ckpt.name}__{PROTOCOL_TAG}"


def _name(ckpt: Path, env: dict[str, str]) -> str:
    return f"{_model(ckpt)}__{PruneConfig.from_env(env).tag() or 'vanilla'}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sweep")
    ckpt = tiny_checkpoints.save_tiny_qwen(root / "tiny-qwen")
    tiny_data.write_mme_tiny(root / "lmu", n_per_category=1)
    # A python that logs its arguments, so a test can tell whether a runner was started.
    wrapper = root / "python"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> "{root}/calls.log"\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEEP_", "PRUNE_", "INTRA_LLM", "MMEVAL_ROOT"))}
    env.update(LMUData=str(root / "lmu"), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    names = {"vanilla": _name(ckpt, {})}
    for r in RATIOS:
        for s in SEEDS:
            names[f"random {r} {s}"] = _name(ckpt, {"KEEP_RATIO": r, "PRUNE_METHOD_PRE_LLM": "random_pre_llm", "PRUNE_SEED": s})
        names[f"fastv {r}"] = _name(ckpt, {"KEEP_RATIO": r, "PRUNE_METHOD_INTRA_LLM": "fastv_intra_llm"})
    cmd = ["bash", str(SWEEP), "--model", f"qwen {ckpt}", "--methods", METHODS, "--ratios", " ".join(RATIOS),
           "--seeds", " ".join(SEEDS), "--datasets", DATA, "--work-dir", str(root / "work"), "--python", str(wrapper)]
    return {"root": root, "ckpt": ckpt, "work": root / "work", "env": env, "cmd": cmd, "names": names,
            "calls": root / "calls.log", "runner_args": ["--", *RUNNER_ARGS]}


def _sweep(setup: dict, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([*setup["cmd"], *flags, *setup["runner_args"]], env=setup["env"], cwd=setup["root"],
                          capture_output=True, text=True, timeout=600)


def _runner_calls(setup: dict) -> list[str]:
    calls = setup["calls"].read_text().splitlines() if setup["calls"].exists() else []
    return [c for c in calls if "run_qwenvl2_5.py" in c]


@pytest.fixture(scope="module")
def dry(setup) -> subprocess.CompletedProcess:
    return _sweep(setup, "--dry-run")


@pytest.fixture(scope="module")
def interrupted(setup, dry) -> int:
    """Kill the sweep in its first cell once VLMEvalKit has saved predictions; move that prediction
    root to an older day. Returns the number of saved predictions."""
    vanilla = setup["work"] / setup["names"]["vanilla"]
    proc = subprocess.Popen([*setup["cmd"], "--jobs", "1", *setup["runner_args"]], env=setup["env"], cwd=setup["root"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    saved: dict = {}
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            pkls = list(vanilla.glob(f"T*/01_{DATA}.pkl"))
            saved = _common.load_pickle(pkls[0]) if pkls else {}
            if saved:
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its runner (one session, started here)
        proc.wait()
    assert saved, "the first cell finished or failed before VLMEvalKit saved predictions"
    (root,) = _common.pred_roots(vanilla)
    assert not list(root.glob(f"*{DATA}_score.csv")), "the cell was not interrupted"
    saved = _common.load_pickle(root / f"01_{DATA}.pkl")  # what is on disk after the kill
    root.rename(root.with_name("T20000101_Gdeadbeef"))  # as if it were yesterday, or another commit
    return len(saved)


@pytest.fixture(scope="module")
def full(setup, interrupted) -> subprocess.CompletedProcess:
    return _sweep(setup, "--jobs", "2")


@pytest.fixture(scope="module")
def rerun(setup, full) -> dict:
    ledgers = {n: _common.ledger_path(setup["work"], n).read_text() for n in setup["names"].values()}
    setup["calls"].unlink()
    proc = _sweep(setup)
    return {"proc": proc, "ledgers_before": ledgers}


@pytest.fixture(scope="module")
def report(setup, rerun, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("report")
    result = aggregate.aggregate(setup["work"], out, warmup=2)
    return {"out": out, "result": result}


# ----------------------------------------------------------------------------- the sweep
def test_dry_run_lists_the_cells_and_runs_nothing(setup, dry):
    assert dry.returncode == 0, dry.stderr
    lines = [line for line in dry.stdout.splitlines() if line.startswith("todo")]
    assert len(lines) == len(setup["names"]) == 7  # vanilla + 2 ratios x (2 seeds of random + fastv)
    for name in setup["names"].values():
        (line,) = [ln for ln in lines if ln.split()[1] == name]
        assert f"--data {DATA}" in line and "run_qwenvl2_5.py" in line and "--max-new-tokens 2" in line
    assert "export KEEP_RATIO=0.25 PRUNE_METHOD_PRE_LLM=random_pre_llm PRUNE_SEED=1" in dry.stdout
    assert "export KEEP_RATIO=0.5 PRUNE_METHOD_INTRA_LLM=fastv_intra_llm" in dry.stdout
    assert not _runner_calls(setup)
    assert not setup["work"].exists()
    refused = subprocess.run([*setup["cmd"], "--one-load", "--jobs", "2", "--dry-run"], env=setup["env"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--one-load runs one process" in refused.stderr


def test_the_sweep_runs_every_cell(setup, full):
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    for name in setup["names"].values():
        assert _common.cell_status(setup["work"] / name, name, DATA) == "done", name
        attempts, how = _common.cell_records(setup["work"], name, DATA, [DATA])
        assert how == "ledger" and sum(map(len, attempts)) == N_SAMPLES, name
    # Vanilla cells write records too (the sweep sets PREFILL_TIME) and have no pruning event.
    (vanilla,) = _common.cell_records(setup["work"], setup["names"]["vanilla"], DATA, [DATA])[0][-1:]
    assert all(r["events"] == [] and r["prefill_ms"] is not None for r in vanilla)


def test_the_interrupted_cell_resumes_without_recomputing_saved_predictions(setup, interrupted, full):
    name = setup["names"]["vanilla"]
    work = setup["work"]
    assert f"merged {interrupted} saved predictions from T20000101_Gdeadbeef/01_{DATA}.pkl" in full.stdout
    n = len(_common.read_records(work / name))
    first, second = _common.read_ledger(work, name, n)[DATA]
    assert (first.saved_before, first.end is not None, first.rc) == (0, True, None)  # killed: no end line
    assert second.saved_before == interrupted and second.rc == 0
    assert second.end - second.start == N_SAMPLES - interrupted  # only the missing samples were generated
    assert first.useful == interrupted and first.end - first.start >= interrupted
    assert sum(len(a) for a in _common.cell_records(work, name, DATA, [DATA])[0]) == N_SAMPLES
    # The current root is the one VLMEvalKit chose (checks the mirror of its naming in _common).
    roots = [r.name for r in _common.pred_roots(work / name)]
    assert _common.current_pred_root(work / name).name in roots and "T20000101_Gdeadbeef" in roots


def test_a_rerun_skips_every_finished_cell(setup, rerun):
    proc = rerun["proc"]
    assert proc.returncode == 0, proc.stderr
    assert not _runner_calls(setup)
    assert sum(" skip " in line for line in proc.stdout.splitlines()) == len(setup["names"])
    for name, text in rerun["ledgers_before"].items():
        assert _common.ledger_path(setup["work"], name).read_text() == text


# ----------------------------------------------------------------------------- tables and plots
def test_accuracy_table_rows_and_columns(setup, report):
    ckpt = _model(setup["ckpt"])
    model = report["result"]["models"][ckpt]
    assert model["datasets"] == [DATA]
    table = pd.read_csv(report["out"] / f"{ckpt}_accuracy.csv")
    assert list(table.columns) == ["kept ratio", "method", "stage", "seeds", "MME_tiny", "MME_tiny std",
                                   "MME_tiny drop %", "Avg", "Avg drop %", "Avg complete"]
    assert [(r["method"], r["kept ratio"]) for _, r in table.iterrows()] == [
        ("vanilla", 1.0), ("fastv_intra_llm@L2", 0.5), ("random_pre_llm", 0.5),
        ("fastv_intra_llm@L2", 0.25), ("random_pre_llm", 0.25)]
    vanilla = table[table["method"] == "vanilla"].iloc[0]
    assert all(vanilla[c] == 0 for c in table.columns if c.endswith("drop %"))
    assert set(table[table["method"] == "random_pre_llm"]["seeds"]) == {"0 1"}
    md = (report["out"] / f"{ckpt}_accuracy.md").read_text()
    assert "Comprehensive<br>MME_tiny" in md and "| Vanilla | - |" in md
    assert "*Retain 50.0% tokens (↓ 50.0%)*" in md and "*Retain 25.0% tokens (↓ 75.0%)*" in md
    assert "random_pre_llm (seeds 0, 1) | pre | 0.00 ± 0.00 |" in md  # random weights: MME scores are 0
    assert (report["out"] / "report.md").read_text().count("### ") == 2


def test_system_metrics(setup, report):
    ckpt = _model(setup["ckpt"])
    rows = {(r["method"], r["kept ratio"], r["seed"]): r
            for r in report["result"]["models"][ckpt]["system"]}
    assert len(rows) == 7
    for r in rows.values():
        assert (r["records"], r["timed"], r["dataset"]) == (N_SAMPLES, N_SAMPLES - 2 * r["runs"], DATA)
        assert r["prefill ms mean"] > 0 and r["prefill ms median"] > 0 and r["total s"] > 0
        assert r["visual in"] == 16 and r["layers"] == 4 and r["KV dtype"] == "float32"
    assert rows[("vanilla", 1.0, "-")]["runs"] == 2  # killed once, then resumed
    assert rows[("vanilla", 1.0, "-")]["method ms mean"] == 0 and rows[("vanilla", 1.0, "-")]["FLOPs ratio"] == 1
    # 16 visual tokens, 4 layers: pre-LLM keeps 8 everywhere; FastV at layer 2 keeps 16, 16, 8, 8.
    assert rows[("random_pre_llm", 0.5, 0)]["equiv tokens"] == 8 and rows[("random_pre_llm", 0.25, 1)]["equiv tokens"] == 4
    assert rows[("fastv_intra_llm@L2", 0.5, "-")]["equiv tokens"] == 12
    assert rows[("fastv_intra_llm@L2", 0.25, "-")]["equiv tokens"] == 10
    assert rows[("fastv_intra_llm@L2", 0.5, "-")]["method ms mean"] > 0
    flops = [rows[k]["FLOPs ratio"] for k in (("random_pre_llm", 0.5, 0), ("random_pre_llm", 0.25, 0))]
    assert 1 > flops[0] > flops[1] > 0
    assert rows[("random_pre_llm", 0.25, 0)]["KV MB"] < rows[("random_pre_llm", 0.25, 0)]["KV MB full"]
    md = (report["out"] / f"{ckpt}_system.md").read_text()
    assert "first 2 samples of every runner process excluded as warm-up" in md
    assert "16.0 → 4.0" in md


def test_plots(setup, report):
    out = report["out"] / "plots"
    paths = plots.make_plots(setup["work"], out, report["result"]["cells"])
    name = setup["names"]["fastv 0.5"]
    paths.append(plots.overlay(setup["work"], name, DATA, 3, setup["root"] / "lmu", out))
    ckpt = _model(setup["ckpt"])
    assert [p.name for p in paths] == [f"{ckpt}_accuracy_vs_ratio.png", f"{ckpt}_accuracy_vs_prefill.png",
                                       f"overlay_{name}_{DATA}_s3.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


# ----------------------------------------------------------------------------- every family, all ten formats, one load
ALL = list(tiny_data.TINY_DATASETS)  # the paper's ten datasets (ScienceQA and MMBench twice): 12 tiny names
GROUP_ORDER = ["Comprehensive", "OCR", "Multidisciplinary", "Hallucination", "Mathematical", "Instruction"]


@pytest.fixture(scope="module")
def tiny(setup, full, tmp_path_factory) -> dict:
    """``scripts/tiny_sweep.py``: the four tiny families x the 12 tiny datasets x (vanilla, FastV at
    0.5), through ``sweep.sh --one-load`` (rule-scored datasets with exact matching, then the three
    judged ones with a local stub judge), aggregated and plotted. Qwen is the shell sweep's
    checkpoint, so the cells both sweeps ran can be compared."""
    from scripts import tiny_sweep

    return tiny_sweep.run(tmp_path_factory.mktemp("tiny_sweep"), checkpoints={"qwen": setup["ckpt"]}, warmup=1,
                          protocol="chat_template")


def _pred_score(work: Path, name: str, data: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    (xlsx,) = (work / name).glob(f"T*/{name}_{data}.xlsx")
    score = _common.find_score_file(work / name, name, data)
    return pd.read_excel(xlsx), pd.read_csv(score)


def _comparable(record: dict) -> dict:
    """A record without what differs between two runs of the same cell (times, memory, file paths, the run's id)."""
    out = {k: v for k, v in record.items() if k not in ("prefill_ms", "images", "peak_memory_bytes", "run")}
    out["events"] = [{k: v for k, v in e.items() if k != "ms"} for e in record["events"]]
    return out


def test_tiny_sweep_covers_every_family_and_dataset_format(tiny):
    for proc in tiny["sweeps"]:
        assert "FAIL" not in proc.stdout and proc.stdout.count("loaded ") == 4  # one load per checkpoint
    models = tiny["report"]["models"]
    assert sorted(models) == sorted(_model(p) for p in tiny["checkpoints"].values())
    for name, model in models.items():
        assert model["datasets"] == sorted(ALL, key=_common.dataset_sort_key) and len(ALL) == 12, name
        groups = [_common.dataset_spec(d).group for d in model["datasets"]]
        assert sorted(set(groups), key=groups.index) == GROUP_ORDER  # columns grouped by ability, in the paper's order
        for d in ALL:  # every cell has its score file and one ledger attempt, in one-load mode
            for cell in (f"{name}__vanilla", f"{name}__L2-fastv_intra_llm-r0.5"):
                assert _common.cell_status(tiny["work"] / cell, cell, d) == "done", (cell, d)
                (attempt,) = _common.read_ledger(tiny["work"], cell, 10**6)[d]
                assert attempt.rc == 0 and attempt.command.startswith("[one load] ")


def test_tiny_sweep_accuracy_tables(tiny):
    work = tiny["work"]
    for family, ckpt in tiny["checkpoints"].items():
        table = pd.read_csv(work / "_report" / f"{_model(ckpt)}_accuracy.csv")
        labels = aggregate.column_labels(ALL)
        assert list(table.columns[:4]) == ["kept ratio", "method", "stage", "seeds"]
        for d in ALL:
            assert {labels[d], f"{labels[d]} std", f"{labels[d]} drop %"} <= set(table.columns), d
        assert [(r["method"], r["kept ratio"], r["Avg complete"]) for _, r in table.iterrows()] == [
            ("vanilla", 1.0, True), ("fastv_intra_llm@L2", 0.5, True)]
        vanilla, fastv = table.iloc[0], table.iloc[1]
        # MME normalised to 0-100 from the score file VLMEvalKit wrote
        cell = _name(ckpt, {})
        mme = pd.read_csv(_common.find_score_file(work / cell, cell, "MME_tiny")).iloc[0]
        assert vanilla["MME_tiny"] == pytest.approx((mme["perception"] + mme["reasoning"]) / 28) and 0 <= vanilla["MME_tiny"] <= 100
        # The judged datasets were scored by the stub judge: MIA-Bench's fixed grade, 5/10, is 50.
        assert vanilla["MIA_tiny"] == fastv["MIA_tiny"] == 50.0 and fastv["MIA_tiny drop %"] == 0
        for col in [c for c in table.columns if c.endswith(" drop %")]:
            base, score = vanilla[col[: -len(" drop %")]], fastv[col[: -len(" drop %")]]
            assert vanilla[col] == 0
            assert (math.isnan(fastv[col]) if base == 0 else fastv[col] == pytest.approx((base - score) / base * 100)), col
        assert vanilla["Avg"] == pytest.approx(statistics.fmean(vanilla[labels[d]] for d in ALL))
        md = (work / "_report" / f"{_model(ckpt)}_accuracy.md").read_text()
        header = md.splitlines()[2]
        assert [header.index(g + "<br>") for g in GROUP_ORDER] == sorted(header.index(g + "<br>") for g in GROUP_ORDER)
        assert "*Retain 50.0% tokens (↓ 50.0%)*" in md, family


# Visual tokens of a tiny dataset's 112-px image: 16 in each tiny family, but the tiny LLaVA-NeXT's
# base image + 2 x 2 crops of 16 (its 8 newline tokens are in no count).
TINY_VISUAL = {"llava_next": 80}


def test_tiny_sweep_system_metrics(tiny):
    assert sorted(tiny["checkpoints"]) == ["internvl", "llava", "llava_next", "qwen"]
    for family, ckpt in tiny["checkpoints"].items():
        v = TINY_VISUAL.get(family, 16)
        rows = tiny["report"]["models"][_model(ckpt)]["system"]
        assert len(rows) == 2 * len(ALL)
        lmu = tiny["out"] / "lmu"
        for r in rows:
            n = len(pd.read_csv(lmu / f"{r['dataset']}.tsv", sep="\t"))
            assert (r["records"], r["timed"], r["runs"]) == (n, n - 1, 1), (family, r["dataset"])
            assert r["total s"] > 0 and r["visual in"] == v and r["KV dtype"] == "float32"
            assert r["KV cache MB (measured)"] == pytest.approx(r["KV MB"])  # the engine's cache = the theory
            assert r["peak mem MB"] is None  # CUDA only
            assert n == 1 or r["prefill ms mean"] > 0
            if r["method"] == "vanilla":
                assert r["FLOPs ratio"] == 1 and r["visual final"] == v and r["method ms mean"] in (0, None)
            else:  # FastV at layer 2 keeps half (8 of 16; 40 of 80) from there on
                layers = r["layers"]
                assert r["visual final"] == v // 2 and r["equiv tokens"] == pytest.approx((2 * v + (layers - 2) * v // 2) / layers)
                assert r["FLOPs ratio"] < 1 and r["KV MB"] < r["KV MB full"]
                assert n == 1 or r["method ms mean"] > 0
        assert set(SYSTEM_KEYS) <= set(rows[0])


SYSTEM_KEYS = ("prefill ms mean", "prefill ms median", "method ms mean", "method ms median", "equiv tokens",
               "prefill GFLOPs full", "prefill GFLOPs", "KV MB full", "KV MB")


def test_tiny_sweep_plots_are_pngs(tiny):
    from PIL import Image

    names = sorted(p.name for p in tiny["plots"])
    assert names == sorted(f"{_model(c)}_{kind}.png" for c in tiny["checkpoints"].values()
                           for kind in ("accuracy_vs_ratio", "accuracy_vs_prefill"))
    for p in tiny["plots"]:
        with Image.open(p) as img:
            assert img.format == "PNG" and img.width > 400 and img.height > 300
            img.verify()


def test_tiny_sweep_plot_panels(tiny):
    """One panel per dataset, titled with the tables' column labels (the two ScienceQA splits apart),
    plus the average; x ticks at the evaluated ratio. The prefill plot leaves out the datasets with
    no sample past the warm-up (no empty panel, no note)."""
    ckpt = _model(tiny["checkpoints"]["qwen"])
    cells = [c for c in tiny["report"]["cells"] if c.model == ckpt]
    labels = aggregate.column_labels(ALL)
    order = sorted(ALL, key=_common.dataset_sort_key)
    timed = [d for d in order if any(c.data == d and c.metrics["prefill ms mean"] is not None for c in cells)]
    assert "MME_tiny" in timed and "SEED_tiny" not in timed  # SEED_tiny: one sample, the warm-up
    ratio = plots.ratio_figure(ckpt, cells)
    titles = [ax.get_title() for ax in ratio.axes]
    assert titles == [labels[d] for d in order] + [f"Average ({len(ALL)} datasets)"]
    assert "ScienceQA_VAL_tiny" in titles and "ScienceQA_TEST_tiny" in titles
    assert all(list(ax.get_xticks()) == [0.5] and ax.get_xticklabels()[0].get_text().startswith("50.0 %")
               for ax in ratio.axes)
    prefill = plots.cost_figure(ckpt, cells, "prefill_ms")
    assert [ax.get_title() for ax in prefill.axes] == [labels[d] for d in timed] + [f"Average ({len(ALL)} datasets)"]
    assert not [t for ax in prefill.axes for t in ax.texts if "no timed" in t.get_text()]
    plots.plt.close("all")


def test_one_load_equals_the_shell_path(setup, full, tiny):
    """The cells both sweeps ran (vanilla and FastV 0.5 on MME_tiny, same checkpoint): the one-load
    process gives the same predictions, scores and per-sample records as one runner per cell."""
    for key in ("vanilla", "fastv 0.5"):
        name = setup["names"][key]
        shell, one = _pred_score(setup["work"], name, DATA), _pred_score(tiny["work"], name, DATA)
        assert shell[0].equals(one[0]) and shell[1].equals(one[1]), key
    name = setup["names"]["fastv 0.5"]
    shell = [_comparable(r) for r in _common.cell_records(setup["work"], name, DATA, [DATA])[0][0]]
    one = [_comparable(r) for r in _common.cell_records(tiny["work"], name, DATA, ALL)[0][0]]
    assert len(shell) == N_SAMPLES and shell == one
    assert json.loads((setup["work"] / name / "prune_config.json").read_text()) == \
        json.loads((tiny["work"] / name / "prune_config.json").read_text())


# ----------------------------------------------------------------------------- torchrun
@pytest.fixture(scope="module")
def torchrun(setup, full, tmp_path_factory) -> dict:
    """The FastV 0.5 cell again, through ``sweep.sh --nproc 2``: ``torchrun --nproc-per-node=2
    run_qwenvl2_5.py ...`` on CPU (gloo, ``vlm_adapter._cpu_distributed``)."""
    work = tmp_path_factory.mktemp("torchrun") / "work"
    cmd = ["bash", str(SWEEP), "--model", f"qwen {setup['ckpt']}", "--methods", "intra:fastv_intra_llm", "--ratios", "0.5",
           "--datasets", DATA, "--work-dir", str(work), "--python", sys.executable, "--nproc", "2", *setup["runner_args"]]
    n = len(setup["runner_args"])
    dry = subprocess.run([*cmd[:-n], "--dry-run", *cmd[-n:]], env=setup["env"], capture_output=True, text=True, timeout=120)
    proc = subprocess.run(cmd, env=setup["env"], cwd=setup["root"], capture_output=True, text=True, timeout=600)
    return {"work": work, "proc": proc, "dry": dry, "name": setup["names"]["fastv 0.5"]}


def test_torchrun_two_ranks_give_the_one_process_results(setup, torchrun):
    work, name, proc = torchrun["work"], torchrun["name"], torchrun["proc"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    launcher = f"{sys.executable} -m torch.distributed.run --standalone --nproc-per-node=2 {ROOT}/run_qwenvl2_5.py"
    assert launcher in torchrun["dry"].stdout
    (attempt,) = _common.read_ledger(work, name, 10**6)[DATA]
    assert attempt.rc == 0 and launcher in attempt.command
    # Rank 0 merged both shards: the same predictions and score as the one-process shell cell.
    shell, ranks = _pred_score(setup["work"], name, DATA), _pred_score(work, name, DATA)
    assert shell[0].equals(ranks[0]) and shell[1].equals(ranks[1])
    assert not list((work / name).glob(f"T*/*_{DATA}.pkl"))  # the rank pickles were merged and removed
    # Each rank built its own model and wrote its own records and timing lines (rank, then the configuration, last).
    records = _common.cell_records(work, name, DATA, [DATA])[0][0]
    assert sorted(r["rank"] for r in records) == [0] * (N_SAMPLES // 2) + [1] * (N_SAMPLES // 2)
    one = _common.cell_records(setup["work"], name, DATA, [DATA])[0][0]
    key = lambda r: json.dumps({k: v for k, v in _comparable(r).items() if k not in ("sample", "rank")}, sort_keys=True)  # noqa: E731
    assert sorted(map(key, records)) == sorted(map(key, one))
    for rank in (0, 1):  # each rank numbers its own samples; VLMEvalKit gave it rows rank, rank + 2, ...
        assert [r["sample"] for r in records if r["rank"] == rank] == list(range(1, N_SAMPLES // 2 + 1))
    folder = work / _common.SWEEP_DIR / name / DATA
    for timing in ("prefill_times.txt", "method_times_fastv_intra_llm.txt"):
        lines = (folder / timing).read_text().splitlines()
        assert sorted(line.split("\t")[-2] for line in lines) == ["0"] * (N_SAMPLES // 2) + ["1"] * (N_SAMPLES // 2)
        assert {line.split("\t")[-1] for line in lines} == {name}  # the configuration that wrote the lines
    # The overlay finds the row of rank 0's third sample (row 4) and checks the record against it.
    assert plots.first_run_record(records, 3)[1] == 4
    png = plots.overlay(work, name, DATA, 3, setup["root"] / "lmu", work / "_report")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plots.first_run_record(one, 3) == (one[2], 2)
    # Warm-up is excluded per rank: 2 samples of each of the two processes.
    (row,) = aggregate.aggregate(work, work / "_report", warmup=2)["models"][_model(setup["ckpt"])]["system"]
    assert (row["records"], row["timed"]) == (N_SAMPLES, N_SAMPLES - 4)


# ----------------------------------------------------------------------------- aggregation arithmetic
def _cell(work: Path, name: str, cfg: dict, scores: dict[str, str]) -> None:
    folder = work / name
    folder.mkdir(parents=True)
    full = {"model": str(work / "no-checkpoint"), "pre_method": None, "keep_ratio": None, "intra": [],
            "method_args": {}, "seed": 0, "time_method": True, "time_prefill": True, **cfg}
    (folder / "prune_config.json").write_text(json.dumps(full))
    for data, text in scores.items():
        (folder / f"{name}_{data}.xlsx").write_bytes(b"")
        suffix = {"MME": "_score.csv", "POPE": "_score.csv", "MMBench_DEV_EN": "_acc.csv", "OCRBench": "_score.json",
                  "MathVista_MINI": "_gpt-4o-mini_score.csv"}[data]
        (folder / f"{name}_{data}{suffix}").write_text(text)


def _mme(p: float, r: float) -> str:
    return f"perception,reasoning,OCR\n{p},{r},0\n"


def _pope(f1: float) -> str:
    return f"split,Overall,acc,precision,recall\nOverall,{f1},1,1,1\nadversarial,1,1,1,1\n"


def _mmb(acc: float) -> str:
    return f"split,Overall,AR\ndev,{acc},0.1\n"


def test_aggregation_arithmetic_on_written_score_files(tmp_path):
    work = tmp_path / "work"
    rnd = {"pre_method": "random_pre_llm", "keep_ratio": 0.111}
    _cell(work, "M", {}, {"MME": _mme(1400, 400), "POPE": _pope(80.0), "MMBench_DEV_EN": _mmb(0.75),
                          "OCRBench": json.dumps({"Final Score": {"sum": 600, "count": 1000}}),
                          "MathVista_MINI": "Task&Skill,tot,acc\nOverall,1000,60.0\nFQA,10,1\n"})
    _cell(work, "M__random_pre_llm-r0.111__seed0", {**rnd, "seed": 0}, {"MME": _mme(1260, 360), "POPE": _pope(70.0), "MMBench_DEV_EN": _mmb(0.7)})
    _cell(work, "M__random_pre_llm-r0.111__seed1", {**rnd, "seed": 1}, {"MME": _mme(1200, 340), "POPE": _pope(72.0), "MMBench_DEV_EN": _mmb(0.6)})
    _cell(work, "M__divprune_pre_llm-r0.333", {"pre_method": "divprune_pre_llm", "keep_ratio": 0.333}, {"MME": _mme(1400, 400)})
    _cell(work, "M__L2-fastv_intra_llm-r0.111", {"intra": [{"layer": 2, "method": "fastv_intra_llm", "ratio": 0.111}]},
          {"POPE": _pope(88.0)})
    result = aggregate.aggregate(work, tmp_path / "out")
    model = result["models"]["M"]
    assert model["datasets"] == ["MME", "MMBench_DEV_EN", "OCRBench", "POPE", "MathVista_MINI"]  # ability order
    rows = {(r["method"], r["kept ratio"]): r for r in model["accuracy"]}
    assert list(rows) == [("vanilla", 1.0), ("divprune_pre_llm", 0.333), ("fastv_intra_llm@L2", 0.111),
                          ("random_pre_llm", 0.111)]
    v = rows[("vanilla", 1.0)]
    assert v["MME"] == pytest.approx(1800 / 28) and v["MMB-en"] == pytest.approx(75) and v["POPE"] == 80
    assert v["OCR-B"] == pytest.approx(60) and v["MathVista"] == 60
    assert v["Avg"] == pytest.approx((1800 / 28 + 75 + 60 + 80 + 60) / 5)
    assert all(v[c] == 0 for c in v if c.endswith("drop %"))
    r = rows[("random_pre_llm", 0.111)]
    mme = [1620 / 28, 1540 / 28]
    assert r["MME"] == pytest.approx(sum(mme) / 2) and r["MME std"] == pytest.approx(abs(mme[0] - mme[1]) / math.sqrt(2))
    assert r["MME drop %"] == pytest.approx((1800 / 28 - sum(mme) / 2) / (1800 / 28) * 100)
    assert r["MMB-en"] == pytest.approx(65) and r["MMB-en drop %"] == pytest.approx(100 * 10 / 75)
    assert r["seeds"] == "0 1" and not r["Avg complete"] and r["OCR-B"] is None
    assert r["Avg drop %"] == pytest.approx((80 + 75 + 1800 / 28 - 71 - 65 - sum(mme) / 2) / (80 + 75 + 1800 / 28) * 100)
    fastv = rows[("fastv_intra_llm@L2", 0.111)]
    assert fastv["POPE drop %"] == pytest.approx(-10) and fastv["stage"] == "intra"
    md = (tmp_path / "out" / "M_accuracy.md").read_text()
    assert "↑10.0%" in md and "56.43 ± 2.02" in md and "*Retain 11.1% tokens (↓ 88.9%)*" in md
    assert md.index("Comprehensive<br>MME") < md.index("OCR<br>OCR-B") < md.index("Hallucination<br>POPE")


def test_carry_forward_copies_a_finished_prediction_file(tmp_path):
    model_dir = tmp_path / "N"
    old = model_dir / "T19990101_Gabc"
    old.mkdir(parents=True)
    (old / f"N_{DATA}.xlsx").write_bytes(b"predictions")
    with open(old / f"01_{DATA}.pkl", "wb") as f:
        pickle.dump({1: "Yes"}, f)
    assert _common.cell_status(model_dir, "N", DATA) == "partial"
    assert "copied all predictions" in _common.carry_forward(model_dir, "N", DATA)
    current = _common.current_pred_root(model_dir)
    assert (current / f"N_{DATA}.xlsx").read_bytes() == b"predictions"
    assert (old / f"N_{DATA}.xlsx").exists()  # copied, never moved
    assert "VLMEvalKit's own state" in _common.carry_forward(model_dir, "N", DATA)
    shutil.rmtree(current)
    (old / f"N_{DATA}.xlsx").unlink()
    assert "merged 1 saved predictions" in _common.carry_forward(model_dir, "N", DATA)
    assert _common.load_pickle(current / f"01_{DATA}.pkl") == {1: "Yes"}
    shutil.rmtree(current)  # a torchrun resume: every rank of the coming run gets the saved predictions
    assert _common.carry_forward(model_dir, "N", DATA, world_size=2).endswith(f"02_{DATA}.pkl, 12_{DATA}.pkl")
    assert [p.name for p in _common.rank_pickles(current, DATA)] == [f"02_{DATA}.pkl", f"12_{DATA}.pkl"]
    assert _common.saved_predictions(model_dir, "N", DATA, world_size=2) == 1
    # Resumed with one process: VLMEvalKit reads only 01_<data>.pkl, so the two ranks' pickles are merged into it.
    assert _common.saved_predictions(model_dir, "N", DATA) == 0
    assert _common.carry_forward(model_dir, "N", DATA).endswith(f"-> {current.name}/01_{DATA}.pkl")
    assert _common.saved_predictions(model_dir, "N", DATA) == 1
    assert "VLMEvalKit's own state" in _common.carry_forward(model_dir, "N", DATA, world_size=1)


def test_score_readers_on_files_vlmeval_wrote(tmp_path, monkeypatch):
    """A perfect model scores 100 on every rule-scored tiny dataset and an always-"Yes"/"A" model
    scores MME 25 (50 a category, acc+ 0) and POPE 200/3 (F1 at precision 1/2, recall 1), read back
    by the same readers the tables use, from the files VLMEvalKit itself wrote."""
    import ast
    import functools

    import vlmeval.config
    import vlmeval.dataset.image_base
    import vlmeval.run
    from vlmeval.vlm.base import BaseModel

    names = ["MME_tiny", "MMBench_DEV_EN_tiny", "OCRBench_tiny", "ScienceQA_TEST_tiny", "POPE_tiny", "HallusionBench_tiny"]
    lmu, work = tmp_path / "lmu", tmp_path / "work"
    answers = {}
    for name in names:
        df = pd.read_csv(tiny_data.write_tiny(name, lmu), sep="\t", dtype=str, keep_default_na=False)
        values = [ast.literal_eval(a)[0] for a in df["answer"]] if name.startswith("OCRBench") else list(df["answer"])
        answers[name] = dict(zip(df["index"], values))

    class Oracle(BaseModel):
        def generate_inner(self, message, dataset=None):
            return answers[dataset][Path(next(m["value"] for m in message if m["type"] == "image")).stem]

    class Const(BaseModel):
        def generate_inner(self, message, dataset=None):
            return "Yes" if dataset in ("MME_tiny", "POPE_tiny", "HallusionBench_tiny") else "A"

    monkeypatch.setenv("LMUData", str(lmu))
    for var in ("MMEVAL_ROOT", "WORLD_SIZE", "RANK", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(vlmeval.dataset.image_base, "download_file", lambda *a, **k: pytest.fail("download"))
    monkeypatch.setitem(vlmeval.config.supported_VLM, "oracle", functools.partial(Oracle))
    monkeypatch.setitem(vlmeval.config.supported_VLM, "const", functools.partial(Const))
    tiny_data.register_tiny_datasets()
    monkeypatch.setattr(sys, "argv", ["vlmeval", "--model", "oracle", "const", "--data", *names, "--work-dir", str(work),
                                      "--judge", "exact_matching", "--api-nproc", "1"])
    vlmeval.run.main()
    for name in names:
        path = _common.find_score_file(work / "oracle", "oracle", name)
        assert path is not None and _common.read_score(path, name) == pytest.approx(100.0), name
        assert _common.cell_status(work / "const", "const", name) == "done"
    const = {n: _common.read_score(_common.find_score_file(work / "const", "const", n), n) for n in ("MME_tiny", "POPE_tiny")}
    assert const == pytest.approx({"MME_tiny": 25.0, "POPE_tiny": 200 / 3})
