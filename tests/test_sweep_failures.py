"""A failed run says so (issue #14, items 4, 5, 6 and 8): the sweep's edge cases, the aggregation of
a plain runner's work dir, and the timing files, through the real entry points on the tiny Qwen
checkpoint (``scripts/sweep.sh``, ``scripts/sweep_one_load.py``, ``run_qwenvl2_5.py``,
``scripts/aggregate.py``).

The sweep part is one story: a sweep started with a relative ``PYTHON=.venv/bin/python`` under
``--nproc 2`` is interrupted by Ctrl-C (SIGINT to its process group) once VLMEvalKit saved
predictions in its first cell; the whole sweep stops. It is resumed with one process: the saved
predictions are not recomputed and no record is counted twice. A ``--one-load`` re-run, and a plan
computed before the cells finished, then skip the finished cells. ``--dry-run`` flags the cells the
runner would refuse before loading, and a real run never starts them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from scripts import _common, aggregate
from synthetic import tiny_checkpoints, tiny_data

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "scripts" / "sweep.sh"
BIG, SMALL = "MME_tiny", "POPE_tiny"
N_BIG = 56  # 14 categories x 2 images x 2 questions: 28 a rank under --nproc 2, saved every 10
N_SMALL = 4  # 1 image x 4 questions
# The checkpoint's chat template (16 tokens an image), a cheap protocol: the failures are the subject.
RUNNER_ARGS = ["--", "--protocol", "chat_template", "--max-new-tokens", "2", "--judge", "exact_matching"]
PROTOCOL_TAG = "chat-template__mnt2"


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEEP_", "PRUNE_", "INTRA_LLM", "MMEVAL_ROOT",
                                                                     "METHOD_TIME", "PREFILL_TIME"))}
    for var in tiny_data.JUDGE_ENV_VARS:
        env.pop(var, None)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    return env


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("failures")
    ckpt = tiny_checkpoints.save_tiny_qwen(root / "tiny-qwen")
    lmu = root / "lmu"
    tiny_data.write_mme_tiny(lmu, n_per_category=2)
    tiny_data.write_tiny(SMALL, lmu, n=1)
    # The README's PYTHON=.venv/bin/python, relative to the folder the sweep starts in: a python that
    # logs its arguments, so a test can tell which runners were started.
    venv_python = root / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text(f'#!/bin/sh\necho "$@" >> "{root}/calls.log"\nexec "{sys.executable}" "$@"\n')
    venv_python.chmod(0o755)
    return {"root": root, "ckpt": ckpt, "lmu": lmu, "work": root / "work", "calls": root / "calls.log",
            "env": _clean_env(LMUData=str(lmu), PYTHON=".venv/bin/python"),
            "model": f"{ckpt.name}__{PROTOCOL_TAG}",  # the report's model: the checkpoint under that protocol
            "name": f"{ckpt.name}__{PROTOCOL_TAG}__vanilla"}  # the vanilla cell


def _sweep_cmd(setup: dict, *flags: str) -> list[str]:
    return ["bash", str(SWEEP), "--model", f"qwen {setup['ckpt']}", "--methods", "vanilla",
            "--datasets", f"{BIG} {SMALL}", "--work-dir", "work", *flags, *RUNNER_ARGS]


def _runner_calls(setup: dict) -> list[str]:
    lines = setup["calls"].read_text().splitlines() if setup["calls"].exists() else []
    return [line for line in lines if "run_qwenvl2_5.py" in line]


def _session_processes(sid: int) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid=,sid=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.split()[1] == str(sid)]


@pytest.fixture(scope="module")
def interrupted(setup) -> dict:
    """``sweep.sh --nproc 2`` (torchrun, 2 ranks on CPU), Ctrl-C once a rank saved predictions of the
    first cell: SIGINT to the sweep's whole process group, as a terminal sends it."""
    proc = subprocess.Popen(_sweep_cmd(setup, "--nproc", "2"), env=setup["env"], cwd=setup["root"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    model_dir = setup["work"] / setup["name"]
    deadline = time.time() + 300
    saved = False
    try:
        while time.time() < deadline and proc.poll() is None and not saved:
            saved = any(_common.load_pickle(p) for p in model_dir.glob(f"T*/[01]2_{BIG}.pkl"))
            time.sleep(0.05)
        assert saved, "the first cell finished or failed before VLMEvalKit saved predictions"
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        t_end = time.time()
        left = _session_processes(proc.pid)
        while left and time.time() < t_end + 20:  # what the sweep killed may take a moment to exit
            time.sleep(0.2)
            left = _session_processes(proc.pid)
    finally:
        if proc.poll() is None or _session_processes(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)  # only this test's own session
            proc.wait()
    return {"rc": proc.returncode, "stdout": out, "stderr": err, "left": left,
            "calls": _runner_calls(setup)}


@pytest.fixture(scope="module")
def resumed(setup, interrupted) -> subprocess.CompletedProcess:
    """The same sweep again, with one process per cell."""
    return subprocess.run(_sweep_cmd(setup), env=setup["env"], cwd=setup["root"], capture_output=True, text=True,
                          timeout=900)


# ----------------------------------------------------------------------------- stopping and resuming
def test_a_relative_python_runs_the_cells(setup, interrupted, resumed):
    """Cells run in their own folder (cd): PYTHON=.venv/bin/python used to fail every cell with exit 127."""
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"--data {BIG}" in " ".join(interrupted["calls"])  # the interrupted sweep started its runner too
    for data in (BIG, SMALL):
        assert _common.cell_status(setup["work"] / setup["name"], setup["name"], data) == "done", data
        assert any(f"--data {data}" in call for call in _runner_calls(setup)), data


def test_ctrl_c_under_nproc_stops_the_whole_sweep(setup, interrupted):
    assert interrupted["rc"] == 130, interrupted["stdout"][-3000:] + interrupted["stderr"][-3000:]
    assert "interrupted by SIGINT: stopping the sweep" in interrupted["stdout"]
    # The next cell never started, and nothing the sweep started is left running (ranks included).
    assert not any(f"--data {SMALL}" in call for call in interrupted["calls"]), interrupted["calls"]
    assert "FAIL" not in interrupted["stdout"]
    assert interrupted["left"] == []
    ledger = _common.ledger_path(setup["work"], setup["name"])
    assert [line.split("\t")[:2] for line in ledger.read_text().splitlines()][:1] == [["start", BIG]]


def test_a_resume_with_another_nproc_recomputes_nothing_and_counts_each_record_once(setup, interrupted, resumed):
    work, name = setup["work"], setup["name"]
    first, second = _common.read_ledger(work, name, len(_common.read_records(work / name)))[BIG]
    assert "--nproc-per-node=2" in first.command and "torch.distributed.run" not in second.command
    saved = second.saved_before  # what the two ranks had saved when Ctrl-C came
    assert 10 <= saved < N_BIG
    assert second.rc == 0 and second.end - second.start == N_BIG - saved  # only the missing samples ran
    attempts, how = _common.cell_records(work, name, BIG, [BIG, SMALL])
    assert how == "ledger" and sum(map(len, attempts)) == N_BIG  # not saved + N_BIG (the 264 of 224)
    root = _common.current_pred_root(work / name).name
    assert f"merged {saved} saved predictions from" in resumed.stdout and f"-> {root}/01_{BIG}.pkl" in resumed.stdout
    assert first.rc is None  # killed: a start line, no end line


# ----------------------------------------------------------------------------- finished cells are skipped
def test_one_load_skips_finished_cells(setup, resumed):
    ledger = _common.ledger_path(setup["work"], setup["name"])
    before = ledger.read_text()
    proc = subprocess.run(_sweep_cmd(setup, "--one-load"), env=setup["env"], cwd=setup["root"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count(" skip ") == 2 and "loaded " not in proc.stdout
    assert ledger.read_text() == before


def test_one_load_rechecks_a_cell_the_plan_called_todo(setup, resumed):
    """A plan computed before the cells finished (another sweep finished them meanwhile): each cell's
    state is read again when its turn comes, and a finished one is skipped without loading anything."""
    ledger = _common.ledger_path(setup["work"], setup["name"])
    before = ledger.read_text()
    stale = "".join(f"todo\t{setup['name']}\trun_qwenvl2_5.py\t{setup['ckpt']}\t-\t{data}\t\n" for data in (BIG, SMALL))
    proc = subprocess.run([sys.executable, "-m", "scripts.sweep_one_load", "--work-dir", str(setup["work"]), *RUNNER_ARGS],
                          input=stale, env=setup["env"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count(" skip ") == 2 and "loaded " not in proc.stdout
    assert ledger.read_text() == before


# ----------------------------------------------------------------------------- invalid cells
@pytest.fixture(scope="module")
def invalid_grid(setup, resumed) -> dict:
    """A grid mixing finished cells with cells every runner would refuse before loading: a method of
    another family, a layer beyond the depth, a hyper-parameter out of range, a misspelt dataset, and
    another family's checkpoint given to the Qwen runner."""
    llava_like = Path(shutil.copytree(setup["ckpt"], setup["root"] / "not-qwen"))
    config = json.loads((llava_like / "config.json").read_text())
    (llava_like / "config.json").write_text(json.dumps({**config, "model_type": "llava"}))
    cmd = ["bash", str(SWEEP), "--model", f"qwen {setup['ckpt']}", "--model", f"qwen {llava_like}",
           "--methods", "vanilla pre:vispruner_pre_llm intra@40:fastv_intra_llm pre:gprune_pre_llm?temperature=0",
           "--ratios", "0.5", "--datasets", f"{SMALL} POPE_tinyy", "--work-dir", "work", *RUNNER_ARGS]
    dry = subprocess.run([*cmd[:-len(RUNNER_ARGS)], "--dry-run", *RUNNER_ARGS], env=setup["env"], cwd=setup["root"],
                         capture_output=True, text=True, timeout=600)
    calls_before = len(_runner_calls(setup))
    run = subprocess.run(cmd, env=setup["env"], cwd=setup["root"], capture_output=True, text=True, timeout=600)
    return {"dry": dry, "run": run, "new_calls": _runner_calls(setup)[calls_before:], "llava_like": llava_like}


def test_dry_run_flags_the_cells_a_runner_would_refuse(setup, invalid_grid):
    dry = invalid_grid["dry"]
    assert dry.returncode == 1, dry.stdout[-3000:] + dry.stderr[-3000:]
    lines = [line for line in dry.stdout.splitlines() if line.split(" ", 1)[0] in ("done", "todo", "partial", "invalid")]
    assert len(lines) == 16  # 2 checkpoints x 4 configurations x 2 datasets
    valid = [line for line in lines if not line.startswith("invalid")]
    assert [line.split()[:3] for line in valid] == [["done", setup["name"], SMALL]]

    def why(name: str, data: str) -> str:
        (line,) = [ln for ln in lines if ln.split()[1:3] == [name, data]]
        assert line.startswith("invalid "), line
        return line.split("  |  ")[1]

    qwen, other = setup["model"], f"{invalid_grid['llava_like'].name}__{PROTOCOL_TAG}__vanilla"
    assert "--data: unknown dataset 'POPE_tinyy' (did you mean POPE_tiny" in why(setup["name"], "POPE_tinyy")
    assert why(f"{qwen}__vispruner_pre_llm-r0.5", SMALL).startswith(
        "vispruner_pre_llm does not apply to qwen2_5_vl: it supports llava, llava_next only. "
        "Use run_llava.py or run_llava_next.py")
    assert why(f"{qwen}__L40-fastv_intra_llm-r0.5", SMALL).startswith(
        "INTRA_LLM_LAYER_SPECS: layer 40 is out of range for this model's 4-layer decoder")
    assert "gprune_pre_llm: temperature=0 is not valid: it must be > 0" in why(f"{qwen}__?", SMALL)
    assert "this is a llava checkpoint; use run_llava.py" in why(other, SMALL)
    assert "dry run: 16 cells (1 done, 0 to run, 15 invalid)" in dry.stdout


def test_a_sweep_never_starts_an_invalid_cell(setup, invalid_grid):
    run = invalid_grid["run"]
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    assert invalid_grid["new_calls"] == []  # the finished cell is skipped, the invalid ones never start
    fails = [line for line in run.stdout.splitlines() if "] FAIL  " in line]
    assert len(fails) == 15 and all("(not run: " in line for line in fails)
    assert any("layer 40 is out of range" in line for line in fails)
    assert not (setup["work"] / f"{setup['model']}__L40-fastv_intra_llm-r0.5").exists()


# ----------------------------------------------------------------------------- a plain runner's work dir
@pytest.fixture(scope="module")
def runner_dir(setup, tmp_path_factory) -> dict:
    """Two runners in one folder, as a user types them: vanilla on three datasets in one call (the
    third, MathVista, needs an LLM judge: its predictions and records are written, its score is not),
    then DivPrune on one, both appending the seed's timing files in the same directory."""
    cwd = tmp_path_factory.mktemp("runner_dir")
    lmu = cwd / "lmu"
    for name in (SMALL, "HallusionBench_tiny", "MathVista_MINI_tiny"):
        tiny_data.write_tiny(name, lmu, n=1)
    common = ["--model", str(setup["ckpt"]), "--work-dir", "work", *RUNNER_ARGS[1:]]
    timing = {"METHOD_TIME": "1", "PREFILL_TIME": "1", "LMUData": str(lmu)}
    runs = [
        ({}, ["--data", SMALL, "HallusionBench_tiny", "MathVista_MINI_tiny"]),
        ({"KEEP_RATIO": "0.5", "PRUNE_METHOD_PRE_LLM": "divprune_pre_llm"}, ["--data", SMALL]),
    ]
    procs = [subprocess.run([sys.executable, str(ROOT / "run_qwenvl2_5.py"), *common, *data],
                            env=_clean_env(**timing, **env), cwd=cwd, capture_output=True, text=True, timeout=600)
             for env, data in runs]
    rows = {name: len(pd.read_csv(lmu / f"{name}.tsv", sep="\t")) for name in (SMALL, "HallusionBench_tiny", "MathVista_MINI_tiny")}
    return {"cwd": cwd, "procs": procs, "rows": rows, "work": cwd / "work"}


def test_aggregate_attributes_a_runners_records_by_their_dataset(setup, runner_dir):
    work, rows = runner_dir["work"], runner_dir["rows"]
    vanilla, pruned = setup["name"], f"{setup['model']}__divprune_pre_llm-r0.5"
    for name, data in ((vanilla, SMALL), (vanilla, "HallusionBench_tiny"), (pruned, SMALL)):
        assert _common.cell_status(work / name, name, data) == "done", (name, data, runner_dir["procs"][0].stderr[-2000:])
    result = aggregate.aggregate(work, work / "_report", warmup=1)
    system = {(r["method"], r["dataset"]): r for r in result["models"][setup["model"]]["system"]}
    assert sorted(system) == [("divprune_pre_llm", SMALL), ("vanilla", "HallusionBench_tiny"), ("vanilla", SMALL)]
    for (method, data), r in system.items():
        assert (r["records"], r["timed"], r["runs"], r["attributed by"]) == (rows[data], rows[data] - 1, 1, "dataset field")
        assert r["visual in"] == 16 and r["prefill ms mean"] > 0
    assert system[("divprune_pre_llm", SMALL)]["visual final"] == 8
    md = (work / "_report" / f"{setup['model']}_system.md").read_text()
    assert f"| vanilla | 1 | - | {SMALL} | {rows[SMALL]} ({rows[SMALL] - 1}) |" in md


def test_records_of_a_dataset_that_failed_are_not_counted(setup, runner_dir):
    """MathVista's run wrote records but no score: they belong to no cell, and no other cell takes them."""
    work, name = runner_dir["work"], setup["name"]
    records = _common.read_records(work / name)
    assert sum(r["dataset"] == "MathVista_MINI_tiny" for r in records) == runner_dir["rows"]["MathVista_MINI_tiny"] == 1
    assert _common.find_score_file(work / name, name, "MathVista_MINI_tiny") is None
    cells = aggregate.collect(work, warmup=1)
    counted = {c.data: c.metrics["records"] for c in cells if c.name == name}
    assert counted == {SMALL: 4, "HallusionBench_tiny": 4}
    # A folder with one scored dataset used to take every record in the file ("whole file").
    attempts, how = _common.cell_records(work, name, SMALL, [SMALL])
    assert how == "dataset field" and sum(map(len, attempts)) == 4


def test_timing_lines_say_which_configuration_wrote_them(setup, runner_dir):
    cwd, rows = runner_dir["cwd"], runner_dir["rows"]
    vanilla, pruned = setup["name"], f"{setup['model']}__divprune_pre_llm-r0.5"
    prefill = (cwd / "prefill_times.txt").read_text().splitlines()
    by_label: dict[str, int] = {}
    for line in prefill:
        fields = line.split("\t")
        assert len(fields) == 6 and float(line.split()[0]) > 0  # ms first, as the seed reads it
        by_label[fields[-1]] = by_label.get(fields[-1], 0) + 1
    assert by_label == {vanilla: sum(rows.values()), pruned: rows[SMALL]}
    method = (cwd / "method_times_divprune_pre_llm.txt").read_text().splitlines()
    assert len(method) == rows[SMALL] and all(line.split("\t")[1:] == ["pre_llm", "-", "16", "8", "0", pruned] for line in method)


# ----------------------------------------------------------------------------- orphaned records, written by hand
def _records(run: str, data: str, n: int, start: int = 1) -> list[str]:
    return [json.dumps({"sample": start + i, "dataset": data, "rank": 0, "run": run, "prefill_ms": 1.0, "n_prompt": 40,
                        "n_visual": 16, "n_visual_final": 16, "events": []}) for i in range(n)]


def test_a_resumed_or_restarted_dataset_counts_each_prediction_once(tmp_path):
    """Runner records of one dataset over three processes: one killed after 3 samples with 2 saved,
    one resumed that finished the other 2, and (another folder) one restarted from scratch."""
    work = tmp_path / "work"
    for name, lines, expected in (
        ("resumed", _records("a", "POPE", 3) + _records("b", "POPE", 2, start=1), [2, 2]),
        ("restarted", _records("a", "POPE", 3) + _records("b", "POPE", 4, start=1), [4]),
        ("no-run-ids", [json.dumps({k: v for k, v in json.loads(x).items() if k != "run"})
                        for x in _records("a", "POPE", 3) + _records("b", "POPE", 2)], [2, 2]),
    ):
        folder = work / name
        folder.mkdir(parents=True)
        (folder / "prune_config.json").write_text(json.dumps({"model": str(work / "no-checkpoint"), "pre_method": None, "keep_ratio": None,
                                                              "intra": [], "method_args": {}, "seed": 0}))
        (folder / "prune_records.jsonl").write_text("\n".join(lines) + "\n")
        pd.DataFrame({"index": range(4), "prediction": ["Yes"] * 4}).to_excel(folder / f"{name}_POPE.xlsx", index=False)
        (folder / f"{name}_POPE_score.csv").write_text("split,Overall\nOverall,50\n")
        attempts, how = _common.cell_records(work, name, "POPE", ["POPE"])
        assert (how, [len(a) for a in attempts]) == ("dataset field", expected), name
    counted = {c.name: c.metrics["records"] for c in aggregate.collect(work, warmup=0)}
    assert counted == {"resumed": 4, "restarted": 4, "no-run-ids": 4}


def test_the_plans_family_table_is_the_runners():
    """The plan checks checkpoint folders from a table (no model class imported): it must say what the
    family modules say."""
    import importlib

    from scripts import cell_name

    for runner, (module, family, model_types) in cell_name.RUNNERS.items():
        mod = importlib.import_module(module)
        assert (mod.FAMILY.name, model_types) == (family, (mod.MODEL_CLASS.config_class.model_type,)), runner
        assert (ROOT / runner).read_text().count(f"vlm_adapter.main({module})") == 1
    assert sorted(cell_name.RUNNERS) == sorted(p.name for p in ROOT.glob("run_*.py"))  # every runner has its row
