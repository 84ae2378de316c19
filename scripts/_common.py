"""What the sweep helper, the aggregator and the plots share: the datasets (ability group, column
label, which VLMEvalKit score file holds the paper's number), VLMEvalKit's folder layout under a work
dir, and the sweep ledger. Light on purpose (standard library at import; pandas only inside the
score readers) so that ``python -m scripts.cell_name status ...`` stays fast.

VLMEvalKit layout (``nvidia-vlmeval`` 26.3, see ``tiny_data.py`` for line numbers): a model's folder
``<work>/<model name>/`` holds one prediction root per day and vlmeval git hash,
``T<YYYYMMDD>_G<hash8>/``, with ``<name>_<data>.xlsx`` (all predictions), the in-flight
``<rank><world_size>_<data>.pkl`` (a ``{index: prediction}`` dict dumped every 10 samples, deleted
once the xlsx is written) and the score files; after a successful evaluation every
``<name>_<data>*`` file is symlinked into the model folder.

Sweep bookkeeping (ours): ``<work>/_sweep/<model name>/`` holds ``ledger.tsv`` and one folder per
dataset (the runner's working directory: ``run.log`` and the seed's ``prefill_times.txt`` /
``method_times_*.txt``). ``ledger.tsv`` lines, tab-separated:

    start  <data>  <records line>  <saved predictions>  <unix time>  <command>
    end    <data>  <records line>  <exit code>          <unix time>

``records line`` is the line count of ``<work>/<name>/prune_records.jsonl`` at that moment: the
records of one attempt are the lines between its ``start`` and its ``end`` (or the next ``start``
when the attempt was killed). The harness writes them without the dataset's name, so this is how the
aggregator attributes them; the sweep runs the datasets of one model name one after another.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import pickle
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
SWEEP_DIR = "_sweep"
TINY_SUFFIX = "_tiny"
MME_MAX = 2800.0  # 10 perception + 4 reasoning categories, 200 points each
GROUPS = ("Comprehensive", "OCR", "Multidisciplinary", "Hallucination", "Mathematical", "Instruction", "Other")


@dataclass(frozen=True)
class DatasetSpec:
    """``group``: the paper's ability column group; ``abbr``: the paper's column label; ``kind``: how
    VLMEvalKit scores it (which file, which number; see :func:`read_score`)."""

    group: str
    abbr: str
    kind: str


# The paper's ten datasets (VLMEvalKit names), in the paper's column order, plus close variants.
DATASETS: dict[str, DatasetSpec] = {
    "MME": DatasetSpec("Comprehensive", "MME", "mme"),
    "MMBench_DEV_CN": DatasetSpec("Comprehensive", "MMB-cn", "mcq"),
    "MMBench_DEV_EN": DatasetSpec("Comprehensive", "MMB-en", "mcq"),
    "MMBench_DEV_CN_V11": DatasetSpec("Comprehensive", "MMB-cn", "mcq"),
    "MMBench_DEV_EN_V11": DatasetSpec("Comprehensive", "MMB-en", "mcq"),
    "SEEDBench2_Plus": DatasetSpec("OCR", "SEED", "mcq"),
    "OCRBench": DatasetSpec("OCR", "OCR-B", "ocrbench"),
    "ScienceQA_TEST": DatasetSpec("Multidisciplinary", "ScienceQA", "mcq"),
    "ScienceQA_VAL": DatasetSpec("Multidisciplinary", "ScienceQA", "mcq"),
    "POPE": DatasetSpec("Hallucination", "POPE", "pope"),
    "HallusionBench": DatasetSpec("Hallucination", "Hallus", "hallusion"),
    "MathVision": DatasetSpec("Mathematical", "Math-V", "judge_acc"),
    "MathVision_MINI": DatasetSpec("Mathematical", "Math-V", "judge_acc"),
    "MathVista_MINI": DatasetSpec("Mathematical", "MathVista", "judge_acc"),
    "MIA-Bench": DatasetSpec("Instruction", "MIA", "mia"),
}
_ORDER = {name: i for i, name in enumerate(DATASETS)}


def dataset_spec(data: str) -> DatasetSpec:
    """The spec of ``data``; a tiny dataset (``<real name>_tiny``) is scored and grouped like the real
    one and labelled ``<abbr>_tiny``; unknown datasets go to the ``Other`` group."""
    base = data[: -len(TINY_SUFFIX)] if data.endswith(TINY_SUFFIX) else data
    spec = DATASETS.get(base)
    if spec is None:
        return DatasetSpec("Other", data, "generic")
    if base != data:
        return DatasetSpec(spec.group, spec.abbr + TINY_SUFFIX, spec.kind)
    return spec


def dataset_sort_key(data: str) -> tuple[int, int, str]:
    base = data[: -len(TINY_SUFFIX)] if data.endswith(TINY_SUFFIX) else data
    return GROUPS.index(dataset_spec(data).group), _ORDER.get(base, len(_ORDER)), data


# ----------------------------------------------------------------------------- score files
def _score_names(name: str, data: str, kind: str) -> list[str]:
    stem = f"{name}_{data}"
    return {
        "mme": [f"{stem}_score.csv"],
        "pope": [f"{stem}_score.csv"],
        "hallusion": [f"{stem}_score.csv"],
        "mcq": [f"{stem}_acc.csv"],
        "ocrbench": [f"{stem}_score.json"],
        "judge_acc": [],  # <stem>_<judge>_score.csv, globbed
        "mia": [],
        "generic": [f"{stem}_score.csv", f"{stem}_acc.csv", f"{stem}_score.json", f"{stem}_acc.json"],
    }[kind]


def _judge_score_files(folder: Path, name: str, data: str) -> list[Path]:
    """``<name>_<data>_<judge>_score.csv`` (MathVista, MathVision, MIA-Bench), excluding files of a
    longer dataset name sharing the prefix (``MathVision`` vs ``MathVision_MINI``)."""
    stem = f"{name}_{data}_"
    out = []
    for p in sorted(folder.glob(f"{glob_escape(stem)}*_score.csv")):
        judge = p.name[len(stem) : -len("_score.csv")]
        longer = f"{data}_{judge.split('_')[0]}"
        if judge and longer not in DATASETS and not longer.endswith(TINY_SUFFIX) and judge != "auxmatch":
            out.append(p)
    return out


def glob_escape(text: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", text)


PRED_ROOT = re.compile(r"^T\d{8}_G\w*$")


def pred_roots(model_dir: Path) -> list[Path]:
    """The model folder's prediction roots, oldest first (the order VLMEvalKit sorts them in)."""
    if not model_dir.is_dir():
        return []
    return sorted(p for p in model_dir.iterdir() if p.is_dir() and PRED_ROOT.match(p.name))


def find_score_file(model_dir: Path, name: str, data: str) -> Path | None:
    """The score file of one cell: the model folder's symlink first (made only after an evaluation
    that finished), then the prediction roots, newest first."""
    kind = dataset_spec(data).kind
    for folder in [model_dir, *reversed(pred_roots(model_dir))]:
        for fname in _score_names(name, data, kind):
            if (folder / fname).exists():
                return folder / fname
        if kind in ("judge_acc", "mia", "generic"):
            found = [p for p in _judge_score_files(folder, name, data) if p.exists()]
            if found:
                return found[0]
    return None


def read_score(path: Path, data: str) -> float:
    """The paper's number (0-100) from a VLMEvalKit score file.

    * MME (``_score.csv``, one row: perception, reasoning, 14 categories of 0-200 each):
      ``(perception + reasoning) / 2800 * 100``, the paper's 0-100 normalisation (its InternVL3-8B
      vanilla 86.44 is 2420 / 28, Qwen2.5-VL-7B's 82.5 is 2310 / 28).
    * MCQ (MMBench, SEEDBench2_Plus, ScienceQA; ``_acc.csv``, one row per split, fractions):
      ``Overall * 100`` of the first split row.
    * OCRBench (``_score.json``): ``Final Score`` correct answers / count * 100 (= score / 10 on the
      1000-question set).
    * POPE (``_score.csv``): the ``Overall`` row's ``Overall`` column, the F1 score VLMEvalKit reports.
    * HallusionBench (``_score.csv``): mean of the ``Overall`` row's aAcc, fAcc and qAcc (VLMEvalKit's
      leaderboard figure).
    * MathVista / MathVision (``_<judge>_score.csv``): the ``Overall`` row's ``acc``.
    * MIA-Bench (``_<judge>_score.csv``, key/value rows): ``total_score * 100``.
    """
    import pandas as pd

    kind = dataset_spec(data).kind
    if path.suffix == ".json":
        d = json.loads(path.read_text())
        if "Final Score" in d:
            fs = d["Final Score"]
            return 100.0 * float(fs["sum"]) / float(fs["count"]) if float(fs.get("count") or 0) else float("nan")
        for key in ("Overall", "Average", "overall"):
            if key in d:
                return _percent(float(d[key]))
        raise ValueError(f"{path}: no known score key in {sorted(d)[:10]}")
    df = pd.read_csv(path)
    if kind == "mme" or "perception" in df.columns:
        row = df.iloc[0]
        return (float(row["perception"]) + float(row["reasoning"])) / MME_MAX * 100.0
    if kind == "mia" or (list(df.columns) == ["0", "1"]):
        kv = dict(zip(df.iloc[:, 0].astype(str), df.iloc[:, 1]))
        return _percent(float(kv["total_score"]))
    first = df.columns[0]
    overall = df[df[first].astype(str) == "Overall"] if first in ("split", "Task&Skill", "Subject") else df.iloc[:0]
    if kind == "hallusion" or {"aAcc", "fAcc", "qAcc"} <= set(df.columns):
        row = (overall if len(overall) else df).iloc[0]
        return (float(row["aAcc"]) + float(row["fAcc"]) + float(row["qAcc"])) / 3.0
    if kind == "judge_acc" or "acc" in df.columns and first in ("Task&Skill", "Subject"):
        row = (overall if len(overall) else df).iloc[0]
        return float(row["acc"])
    if kind == "pope":
        row = (overall if len(overall) else df).iloc[0]
        return float(row["Overall"])
    if "Overall" in df.columns:  # MCQ and generic accuracy tables (fractions)
        return _percent(float(df.iloc[0]["Overall"]))
    raise ValueError(f"{path}: cannot find the score (columns {list(df.columns)[:10]})")


def _percent(value: float) -> float:
    return value * 100.0 if value <= 1.0 else value


# ----------------------------------------------------------------------------- in-flight state
def rank_pickles(folder: Path, data: str) -> list[Path]:
    """VLMEvalKit's in-flight ``<rank><world_size>_<data>.pkl`` files in one prediction root."""
    pat = re.compile(r"^\d+_" + re.escape(data) + r"\.pkl$")
    return sorted(p for p in folder.glob("*.pkl") if pat.match(p.name)) if folder.is_dir() else []


def load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f)
        return obj if isinstance(obj, dict) else {}
    except (EOFError, pickle.UnpicklingError, OSError):  # a dump cut by a kill
        return {}


def current_pred_root(model_dir: Path) -> Path:
    """The prediction root VLMEvalKit would use now: ``T<today>_G<githash8>``.

    Mirrors ``vlmeval.smp.misc.timestr('day')`` and ``githash(digits=8)`` (``git rev-parse HEAD``
    run in the installed ``vlmeval`` package folder with a minimal environment; an empty hash
    outside a git work tree, ``unknown`` without git) without importing vlmeval (3-5 s). The sweep
    test checks the mirror against the folder a real run creates.
    """
    date = datetime.datetime.now().strftime("%Y%m%d")
    spec = importlib.util.find_spec("vlmeval")
    sha = "unknown"
    if spec is not None and spec.submodule_search_locations:
        env = {k: os.environ[k] for k in ("SYSTEMROOT", "PATH", "HOME") if k in os.environ}
        env.update(LANGUAGE="C", LANG="C", LC_ALL="C")
        try:
            out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=list(spec.submodule_search_locations)[0],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout
            sha = out.strip().decode("ascii")[:8]
        except OSError:
            sha = "unknown"
    return model_dir / f"T{date}_G{sha}"


def saved_predictions(model_dir: Path, name: str, data: str, world_size: int = 1) -> int:
    """How many predictions of the cell a run of ``world_size`` processes started now would not
    recompute: the current root's xlsx, else its in-flight pickles of that world size (VLMEvalKit
    reads no other; :func:`carry_forward` merges the others into them first)."""
    root = current_pred_root(model_dir)
    xlsx = root / f"{name}_{data}.xlsx"
    if xlsx.exists():
        import pandas as pd

        return len(pd.read_excel(xlsx, usecols=["index"]))
    done: dict = {}
    for rank in range(world_size):
        path = root / f"{rank}{world_size}_{data}.pkl"
        if path.exists():
            done.update(load_pickle(path))
    return len(done)


def carry_forward(model_dir: Path, name: str, data: str, world_size: int = 1) -> str:
    """Make an interrupted cell resumable whatever day, commit or number of processes it is now.

    VLMEvalKit resumes only inside the current prediction root ``T<day>_G<hash>``: the next day, or
    after any commit to the repository holding the venv, it starts from zero unless ``--reuse`` is
    passed, and even then it takes in-flight ``.pkl`` files only from a root of the same hash. It
    also reads only the pickles of its own world size (``<rank><world_size>_<data>.pkl``): a cell
    interrupted under ``--nproc 2`` and resumed with one process would start over. So, before a cell
    is (re)run, unless the current root holds ``<name>_<data>.xlsx`` or pickles of the coming world
    size that hold every prediction saved there (VLMEvalKit's own state): copy the newest older root's xlsx (all predictions; the
    evaluation is then redone without building the model), or else merge every saved prediction
    (older roots' pickles, oldest first, then the current root's, of any world size) into
    ``<rank><world_size>_<data>.pkl`` of the current root for every rank of the coming run
    (``01_<data>.pkl`` for one process; each rank keeps the predictions of its own shard).
    Nothing is moved or deleted. Returns a one-line summary.
    """
    current = current_pred_root(model_dir)
    xlsx_name = f"{name}_{data}.xlsx"
    targets = [f"{rank}{world_size}_{data}.pkl" for rank in range(world_size)]
    own = set(targets)
    here = rank_pickles(current, data)
    mine = {k for p in here if p.name in own for k in load_pickle(p)}
    if (current / xlsx_name).exists() or (mine and all(set(load_pickle(p)) <= mine for p in here if p.name not in own)):
        return f"resumes in {current.name} (VLMEvalKit's own state)"
    older = [r for r in pred_roots(model_dir) if r != current]
    for root in reversed(older):
        if (root / xlsx_name).exists():
            import shutil

            current.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / xlsx_name, current / xlsx_name)
            return f"copied all predictions {root.name}/{xlsx_name} -> {current.name}/"
    merged: dict = {}
    sources = []
    foreign = [p for p in here if p.name not in own]
    for path in [p for root in older for p in rank_pickles(root, data)] + foreign + [p for p in here if p.name in own]:
        part = load_pickle(path)  # oldest first: newer predictions win
        if part:
            merged.update(part)
            sources.append(f"{path.parent.name}/{path.name}")
    if not merged:
        return "nothing saved: starts from the first sample"
    current.mkdir(parents=True, exist_ok=True)
    for target in targets:
        with open(current / target, "wb") as f:
            pickle.dump(merged, f)
    return f"merged {len(merged)} saved predictions from {', '.join(sources)} -> {current.name}/{', '.join(targets)}"


def cell_status(model_dir: Path, name: str, data: str) -> str:
    """``done`` (a score file), ``partial`` (predictions saved in some root) or ``todo``."""
    if find_score_file(model_dir, name, data) is not None:
        return "done"
    for root in pred_roots(model_dir):
        if (root / f"{name}_{data}.xlsx").exists() or any(load_pickle(p) for p in rank_pickles(root, data)):
            return "partial"
    return "todo"


# ----------------------------------------------------------------------------- ledger
@dataclass
class Attempt:
    """One run of one cell: records ``[start, end)`` of ``prune_records.jsonl``, ``useful`` of them
    matching predictions that were kept (the rest were recomputed by the next attempt)."""

    data: str
    start: int
    end: int | None
    saved_before: int
    rc: int | None
    t_start: float
    t_end: float | None
    command: str
    useful: int | None = None

    @property
    def seconds(self) -> float | None:
        return None if self.t_end is None else self.t_end - self.t_start


def ledger_path(work: Path, name: str) -> Path:
    return work / SWEEP_DIR / name / "ledger.tsv"


def read_ledger(work: Path, name: str, n_records: int) -> dict[str, list[Attempt]]:
    """``{data: [attempt, ...]}`` with record ranges closed and ``useful`` counts filled in."""
    path = ledger_path(work, name)
    attempts: list[Attempt] = []
    if path.exists():
        for line in path.read_text().splitlines():
            f = line.split("\t")
            if f[0] == "start" and len(f) >= 5:
                attempts.append(Attempt(f[1], int(f[2]), None, int(f[3]), None, float(f[4]), None,
                                        f[5] if len(f) > 5 else ""))
            elif f[0] == "end" and len(f) >= 5:
                for a in reversed(attempts):
                    if a.data == f[1] and a.end is None:
                        a.end, a.rc, a.t_end = int(f[2]), int(f[3]), float(f[4])
                        break
    for i, a in enumerate(attempts):  # a killed attempt ends where the next one starts
        if a.end is None:
            a.end = attempts[i + 1].start if i + 1 < len(attempts) else n_records
    by_data: dict[str, list[Attempt]] = {}
    for a in attempts:
        by_data.setdefault(a.data, []).append(a)
    for runs in by_data.values():
        for a, nxt in zip(runs, runs[1:] + [None]):
            n = max(0, a.end - a.start)
            # The predictions kept from this attempt are those the next one found saved.
            a.useful = n if nxt is None else max(0, min(n, nxt.saved_before - a.saved_before))
    return by_data


def read_records(model_dir: Path) -> list[dict[str, Any] | None]:
    """``prune_records.jsonl`` as a list (``None`` for an unreadable line, so indexes stay line numbers)."""
    path = model_dir / "prune_records.jsonl"
    if not path.exists():
        return []
    out: list[dict[str, Any] | None] = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            out.append(None)
    return out


def cell_records(work: Path, name: str, data: str, datasets_in_folder: list[str]) -> tuple[list[list[dict]], str]:
    """The records of one cell, one list per attempt (warm-up is per process), and how they were
    attributed:

    * ``ledger`` (the sweep's): the lines of each attempt that its predictions kept (see
      :func:`read_ledger`), of this dataset;
    * ``dataset field`` (a plain runner's work dir, e.g. one runner with several ``--data``): the
      records naming this dataset (the adapter writes it in every record), split into runs by the
      sink's ``run`` id (or, in older records, where the sample numbering restarts); when a run
      recomputed samples an earlier one had done (a failed or killed run resumed), the earlier
      run's records beyond what was saved are dropped (:func:`final_runs`), so a cell never counts
      more records than it has predictions. Records of a dataset that has no cell (its run failed
      before a score) are attributed to nothing;
    * ``whole file`` (records without a dataset field, one dataset in the folder, no ledger);
    * ``unattributed`` (none of these: nothing is returned).
    """
    model_dir = work / name
    records = read_records(model_dir)
    ledger = read_ledger(work, name, len(records))
    if data in ledger:
        out = []
        for a in ledger[data]:
            part = [r for r in records[a.start : a.start + (a.useful or 0)] if r is not None and r.get("dataset") in (None, data)]
            if part:
                out.append(part)
        return out, "ledger"
    mine = [r for r in records if r is not None and r.get("dataset") == data]
    if mine:
        return final_runs(split_runs(mine), prediction_count(model_dir, name, data)), "dataset field"
    if not ledger and len(datasets_in_folder) == 1 and not any(r and r.get("dataset") for r in records):
        return [[r for r in records if r is not None]], "whole file"
    return [], "unattributed"


def split_runs(records: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Consecutive runner processes in one dataset's records, in file order. A process is a
    ``run`` id (:class:`utils.TimingSink`); the ranks of one ``torchrun`` attempt (one id each, their
    records interleaved) form one run. Records without ``run``: a new run starts where a rank's
    sample number does not follow its previous one (each process numbers its samples from 1)."""
    if all("run" in r for r in records):
        first: dict[str, int] = {}
        last: dict[str, int] = {}
        for i, r in enumerate(records):
            first.setdefault(r["run"], i)
            last[r["run"]] = i
        runs: list[list[dict[str, Any]]] = []
        end = -1
        for i, r in enumerate(records):
            if i == first[r["run"]] and i > end:  # a process that starts after every earlier one ended
                runs.append([])
            end = max(end, last[r["run"]])
            runs[-1].append(r)
        return runs
    runs, previous = [], {}
    for r in records:
        rank, sample = int(r.get("rank") or 0), r.get("sample")
        if not runs or (rank in previous and sample != previous[rank] + 1):
            runs.append([])
            previous = {}
        previous[rank] = sample
        runs[-1].append(r)
    return runs


def final_runs(runs: list[list[dict[str, Any]]], n_predictions: int | None) -> list[list[dict[str, Any]]]:
    """The records behind the cell's ``n_predictions`` predictions: the last run's, then, going back,
    each earlier run's first records up to the predictions the later runs did not recompute (a
    resumed run recomputes only what was not saved, in order; a run started afresh recomputes
    all). ``n_predictions`` None (unknown): every run whole."""
    if n_predictions is None:
        return [r for r in runs if r]
    out, left = [], n_predictions
    for run in reversed(runs):
        part = run[: max(0, left)]
        left -= len(part)
        if part:
            out.append(part)
    return out[::-1]


def prediction_count(model_dir: Path, name: str, data: str) -> int | None:
    """Rows of the cell's predictions file next to its score file (None when there is none)."""
    score = find_score_file(model_dir, name, data)
    xlsx = score.parent / f"{name}_{data}.xlsx" if score is not None else None
    if xlsx is None or not xlsx.exists():
        return None
    import pandas as pd

    try:
        return len(pd.read_excel(xlsx, usecols=["index"]))
    except Exception:  # noqa: BLE001 - an unreadable file: no trimming
        return None


def iter_model_dirs(work: Path) -> Iterator[Path]:
    """Model folders written by the harness (those with ``prune_config.json``)."""
    for p in sorted(work.iterdir()):
        if p.is_dir() and p.name != SWEEP_DIR and (p / "prune_config.json").exists():
            yield p
