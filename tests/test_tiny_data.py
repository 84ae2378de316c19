"""Tests for tiny_data: the synthetic ``<REAL_NAME>_tiny`` TSVs and offline vlmeval.run.main() runs.

The expected formats below are written out independently of tiny_data, from the real dataset
classes and evaluate functions of vlmeval 26.3. All vlmeval runs happen in one module-scoped
fixture (two ``vlmeval.run.main()`` calls in this process), which the end-to-end tests share.
"""

import ast
import functools
import http.server
import json
import logging
import re
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils import ensure_torchvision  # noqa: E402

ensure_torchvision()

from synthetic import tiny_data  # noqa: E402
from scripts.tiny_sweep import StubJudge as _StubJudge  # noqa: E402  (a local stand-in for a judge)

# Written out independently of tiny_data: the categories vlmeval's MME_rating sums.
OFFICIAL_MME_CATEGORIES = {
    "OCR", "artwork", "celebrity", "color", "count", "existence", "landmark", "position",
    "posters", "scene", "code_reasoning", "commonsense_reasoning", "numerical_calculation",
    "text_translation",
}
# The six MMBench abilities (vlmeval's MMB_abbrs) and the abbreviations report_acc writes.
MMBENCH_ABILITIES = {
    "coarse_perception": "CP", "finegrained_perception (instance-level)": "FP-S",
    "finegrained_perception (cross-instance)": "FP-C", "logic_reasoning": "LR",
    "relation_reasoning": "RR", "attribute_reasoning": "AR",
}
OCRBENCH_CATEGORIES = {
    "Regular Text Recognition", "Irregular Text Recognition", "Artistic Text Recognition",
    "Handwriting Recognition", "Digit String Recognition", "Non-Semantic Text Recognition",
    "Scene Text-centric VQA", "Doc-oriented VQA", "Key Information Extraction",
    "Handwritten Mathematical Expression Recognition",
}

MCQ4 = ["A", "B", "C", "D"]
REAL_COLUMNS = {
    "MME": ["index", "image", "question", "answer", "category", "image_path"],
    "MMBench_DEV_EN": ["index", "question", "hint", *MCQ4, "answer", "category", "image", "source",
                       "l2-category", "comment", "split"],
    "MMBench_DEV_CN": ["index", "question", "hint", *MCQ4, "answer", "category", "image", "source",
                       "l2-category", "comment", "split"],
    "SEEDBench2_Plus": ["index", "image", "question", *MCQ4, "answer", "category"],
    "OCRBench": ["index", "image", "question", "answer", "category"],
    "MathVista_MINI": ["index", "image", "question", "answer", "question_type", "answer_type", "choices",
                       "answer_option", "task", "skills"],
    "MathVision_MINI": ["index", "image", "question", "answer", "choices", "category", "level"],
    "MIA-Bench": ["index", "image", "question", "num_of_component", "components", "component_weight",
                  "component_type"],
    "ScienceQA_VAL": ["index", "image", "question", "hint", *MCQ4, "E", "answer", "category", "split"],
    "ScienceQA_TEST": ["index", "image", "question", "hint", *MCQ4, "E", "answer", "category", "split"],
    "POPE": ["index", "image", "question", "answer", "category"],
    "HallusionBench": ["index", "image", "question", "answer", "category", "l2-category"],
}
TINY = [f"{name}_tiny" for name in REAL_COLUMNS]
MCQ = ["MMBench_DEV_EN_tiny", "MMBench_DEV_CN_tiny", "SEEDBench2_Plus_tiny", "ScienceQA_VAL_tiny",
       "ScienceQA_TEST_tiny"]
YORN = ["MME_tiny", "POPE_tiny", "HallusionBench_tiny"]
NEEDS_JUDGE = ["MathVista_MINI_tiny", "MathVision_MINI_tiny", "MIA-Bench_tiny"]


def _read(path):
    return pd.read_csv(path, sep="\t", keep_default_na=False)


# ---------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------

def test_every_paper_dataset_has_a_tiny_version():
    assert list(tiny_data.TINY_DATASETS) == TINY
    covered = [set(tiny_data.JUDGE_REQUIRED), set(tiny_data.JUDGE_OPTIONAL), set(tiny_data.NO_JUDGE)]
    for name in REAL_COLUMNS:  # each dataset is in exactly one judge class
        assert sum(name in c for c in covered) == 1, name
    assert set(tiny_data.JUDGE_REQUIRED) == {"MathVista_MINI", "MathVision_MINI", "MIA-Bench"}


@pytest.mark.parametrize("name", TINY)
def test_tiny_tsv_has_the_real_columns(tmp_path, name):
    path = tiny_data.write_tiny(name, tmp_path)
    assert path == tmp_path / f"{name}.tsv"
    assert path.stat().st_size < 40_000  # KBs
    df = _read(path)
    assert list(df.columns) == REAL_COLUMNS[name[: -len("_tiny")]]
    assert df["index"].astype(str).is_unique
    # Every row has an image: base64, or the index of an earlier row holding one (real convention).
    index = df["index"].astype(str).tolist()
    for i, image in enumerate(df["image"].astype(str)):
        assert len(image) > 64 or (image in index[:i] and len(df["image"].astype(str)[index.index(image)]) > 64)


def test_real_name_and_determinism(tmp_path):
    for name in TINY:
        a = tiny_data.write_tiny(name, tmp_path / "a", seed=3).read_bytes()
        b = tiny_data.write_tiny(name[: -len("_tiny")], tmp_path / "b", seed=3).read_bytes()
        c = tiny_data.write_tiny(name, tmp_path / "c", seed=4).read_bytes()
        assert a == b and a != c, name
    assert (tmp_path / "a" / "ScienceQA_VAL_tiny.tsv").read_bytes() != \
        (tmp_path / "a" / "ScienceQA_TEST_tiny.tsv").read_bytes().replace(b"\ttest", b"\tval")
    with pytest.raises(KeyError):
        tiny_data.write_tiny("NoSuchBench", tmp_path)
    with pytest.raises(ValueError):
        tiny_data.write_tiny("POPE", tmp_path, n=0)


def test_mme_tiny_format(tmp_path):
    path = tiny_data.write_mme_tiny(tmp_path, n_per_category=2, seed=0)
    assert path == tmp_path / "MME_tiny.tsv"
    df = _read(path)
    assert set(df["category"]) == OFFICIAL_MME_CATEGORIES
    assert len(df) == 14 * 2 * 2
    assert list(df["index"]) == list(range(len(df)))
    assert set(df["answer"]) == {"Yes", "No"}
    assert (df["answer"] == "Yes").sum() == len(df) // 2
    # Real MME structure: two questions per image (one Yes, one No); the second row stores the
    # first row's index instead of the base64 image.
    for _, pair in df.groupby("image_path"):
        assert len(pair) == 2
        assert sorted(pair["answer"]) == ["No", "Yes"]
        first, second = pair.iloc[0], pair.iloc[1]
        assert len(first["image"]) > 64
        assert second["image"] == str(first["index"])
        assert first["question"] != second["question"]


def test_mme_tiny_deterministic(tmp_path):
    a = tiny_data.write_mme_tiny(tmp_path / "a", seed=3).read_bytes()
    b = tiny_data.write_mme_tiny(tmp_path / "b", seed=3).read_bytes()
    c = tiny_data.write_mme_tiny(tmp_path / "c", seed=4).read_bytes()
    assert a == b
    assert a != c


def test_tiny_clears_stale_image_cache(tmp_path):
    for name in ("MME_tiny", "POPE_tiny"):
        stale = tmp_path / "images" / name / "0.jpg"
        stale.parent.mkdir(parents=True)
        stale.write_bytes(b"old")
    tiny_data.write_mme_tiny(tmp_path)
    tiny_data.write_tiny("POPE", tmp_path)
    assert not (tmp_path / "images" / "MME_tiny").exists()
    assert not (tmp_path / "images" / "POPE_tiny").exists()


@pytest.mark.parametrize("name", ["MMBench_DEV_EN_tiny", "MMBench_DEV_CN_tiny"])
def test_mmbench_tiny_circular_layout(tmp_path, name):
    df = _read(tiny_data.write_tiny(name, tmp_path, n=12))
    assert set(df["l2-category"]) == set(MMBENCH_ABILITIES)
    assert set(df["split"]) == {"dev"}
    assert set(df["answer"]) <= set(MCQ4)
    groups = df.groupby(df["index"] % 1_000_000)
    assert len(groups) == 12
    for g, rows in groups:
        options = [[x for x in row[MCQ4] if x != ""] for _, row in rows.iterrows()]
        k = len(options[0])
        assert 2 <= k <= 4 and len(rows) == k  # one row per rotation
        assert sorted(rows["index"]) == [j * 1_000_000 + g for j in range(k)]
        correct = {row[row["answer"]] for _, row in rows.iterrows()}
        assert len(correct) == 1  # the same option text is correct in every rotation
        assert all(sorted(o) == sorted(options[0]) for o in options)
        assert len({r["answer"] for _, r in rows.iterrows()}) == k  # ... under every letter
        assert (rows["image"].iloc[1:] == str(g)).all()
    if name.endswith("CN_tiny"):
        assert all(re.search(r"[\u4e00-\u9fff]", q) for q in df["question"])


def test_formats_of_the_other_datasets(tmp_path):
    scienceqa = _read(tiny_data.write_tiny("ScienceQA_VAL", tmp_path, n=20))
    assert set(scienceqa["split"]) == {"val"} and (scienceqa["E"] != "").any()
    assert set(_read(tiny_data.write_tiny("ScienceQA_TEST", tmp_path))["split"]) == {"test"}
    seed2 = _read(tiny_data.write_tiny("SEEDBench2_Plus", tmp_path))
    assert set(seed2["category"]) == {"chart", "map", "web"}

    ocr = _read(tiny_data.write_tiny("OCRBench", tmp_path))
    assert set(ocr["category"]) == OCRBENCH_CATEGORIES
    assert all(isinstance(ast.literal_eval(a), list) for a in ocr["answer"])

    vista = _read(tiny_data.write_tiny("MathVista_MINI", tmp_path))
    assert set(vista["question_type"]) == {"multi_choice", "free_form"}
    assert set(vista["answer_type"]) == {"text", "integer", "float"}
    for _, row in vista.iterrows():
        assert isinstance(ast.literal_eval(row["skills"]), list)
        assert row["question"].startswith("Hint: ")
        if row["question_type"] == "multi_choice":
            choices = ast.literal_eval(row["choices"])
            assert choices["ABCDE".index(row["answer_option"])] == row["answer"]
        else:
            assert row["choices"] == "" and row["answer_option"] == ""
            float(row["answer"])

    vision = _read(tiny_data.write_tiny("MathVision_MINI", tmp_path))
    for _, row in vision.iterrows():
        choices = ast.literal_eval(row["choices"])
        assert (row["answer"] in "ABCDE") if choices else float(row["answer"]) >= 0

    mia = _read(tiny_data.write_tiny("MIA-Bench", tmp_path))
    for _, row in mia.iterrows():
        types = row["component_type"][2:-2].split("', '")  # exactly how get_score_dict parses it
        assert types == ast.literal_eval(row["component_type"])
        assert len(types) == row["num_of_component"] == len(ast.literal_eval(row["components"]))
        assert sum(ast.literal_eval(row["component_weight"])) == 10

    pope = _read(tiny_data.write_tiny("POPE", tmp_path))
    subsets = pope["category"].str.split(",").explode()
    assert set(subsets) == {"adversarial", "popular", "random"}
    assert set(pope["answer"]) == {"Yes", "No"}

    hallu = _read(tiny_data.write_tiny("HallusionBench", tmp_path, n=3))
    assert set(hallu["category"]) == {"VD", "VS"}
    for _, row in hallu.iterrows():
        parts = row["index"].split("_")
        assert len(parts) == 6 and parts[0] == row["category"] and parts[1] == row["l2-category"]


def test_judge_notes(caplog, monkeypatch):
    for var in tiny_data.JUDGE_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    level, message = tiny_data.judge_note("MathVista_MINI_tiny", "exact_matching")
    assert level == logging.WARNING and "LLM judge" in message and "no exact-matching fallback" in message
    assert tiny_data.judge_note("MIA-Bench", "gpt-4o")[0] == logging.WARNING  # no key
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    assert tiny_data.judge_note("MIA-Bench", "gpt-4o")[0] == logging.INFO
    assert tiny_data.judge_note("MIA-Bench", "exact_matching")[0] == logging.WARNING
    monkeypatch.delenv("OPENAI_API_KEY")
    assert "yes/no" in tiny_data.judge_note("POPE", "exact_matching")[1]
    assert "no judge" in tiny_data.judge_note("OCRBench_tiny", None)[1]
    assert tiny_data.judge_note("TextVQA_VAL", None) is None
    with caplog.at_level(logging.INFO, logger="synthetic.tiny_data"):
        tiny_data.log_judge_notes(["MathVision_MINI", "MME"], None)
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.INFO]


# ---------------------------------------------------------------------------------------------
# End to end: vlmeval.run.main() on every tiny dataset, in this process
# ---------------------------------------------------------------------------------------------

def _oracle_answers(lmu):
    """dataset -> {index: the answer a perfect model gives}, read from the TSVs."""
    answers = {}
    for name in TINY:
        df = _read(lmu / f"{name}.tsv")
        if name.startswith("OCRBench"):
            values = [ast.literal_eval(a)[0] for a in df["answer"]]
        elif name.startswith("MathVista"):
            values = [o if t == "multi_choice" else a
                      for o, t, a in zip(df["answer_option"], df["question_type"], df["answer"])]
        elif name.startswith("MIA-Bench"):
            values = ["The dots are red."] * len(df)
        else:
            values = list(df["answer"].astype(str))
        answers[name] = dict(zip(df["index"].astype(str), values))
    return answers


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run main() once for models oracle + const on all tiny datasets with ``--judge exact_matching``,
    then once for oracle on the three judge datasets with the stub judge configured like a user's."""
    import vlmeval.config
    import vlmeval.dataset.image_base
    import vlmeval.run
    from vlmeval.vlm.base import BaseModel

    tmp = tmp_path_factory.mktemp("vlmeval")
    lmu, work = tmp / "LMUData", tmp / "work"
    written = tiny_data.write_all_tiny(lmu)
    assert list(written) == TINY
    answers = _oracle_answers(lmu)

    class Oracle(BaseModel):
        def generate_inner(self, message, dataset=None):
            images = [m["value"] for m in message if m["type"] == "image"]
            assert len(images) == 1 and message[-1]["type"] == "text"
            return answers[dataset][Path(images[0]).stem]

    class Const(BaseModel):
        def generate_inner(self, message, dataset=None):
            return "Yes" if dataset in YORN else "A"

    def no_download(*args, **kwargs):
        raise AssertionError(f"vlmeval tried to download {args}")

    _StubJudge.prompts.clear()  # the class is shared with scripts.tiny_sweep (other tests' sweeps)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StubJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    tiny_logger = logging.getLogger("synthetic.tiny_data")
    old_level = tiny_logger.level
    tiny_logger.setLevel(logging.INFO)
    tiny_logger.addHandler(handler)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMUData", str(lmu))
        for var in ("MMEVAL_ROOT", "WORLD_SIZE", "RANK", *tiny_data.JUDGE_ENV_VARS):
            mp.delenv(var, raising=False)
        mp.setattr(vlmeval.dataset.image_base, "download_file", no_download)
        mp.setitem(vlmeval.config.supported_VLM, "oracle", functools.partial(Oracle))
        mp.setitem(vlmeval.config.supported_VLM, "const", functools.partial(Const))
        assert tiny_data.register_tiny_datasets() == TINY
        tiny_data.register_tiny_datasets()  # idempotent
        mp.setattr(sys, "argv", ["vlmeval", "--model", "oracle", "const", "--data", *TINY,
                                 "--work-dir", str(work), "--judge", "exact_matching", "--api-nproc", "1"])
        vlmeval.run.main()  # logs (does not raise) when a model x dataset pair fails
        exact_records = list(records)
        # A user-configured judge: an OpenAI-compatible server given through the environment.
        mp.setenv("OPENAI_API_KEY", "sk-tiny-test")
        mp.setenv("OPENAI_API_BASE", f"http://127.0.0.1:{server.server_port}/v1/chat/completions")
        mp.setenv("NO_PROXY", "127.0.0.1")
        mp.setattr(sys, "argv", ["vlmeval", "--model", "oracle", "--data", *NEEDS_JUDGE,
                                 "--work-dir", str(work), "--judge", "gpt-4o-mini", "--api-nproc", "4"])
        vlmeval.run.main()
    tiny_logger.removeHandler(handler)
    tiny_logger.setLevel(old_level)
    server.shutdown()

    def files(model, pattern):
        return sorted(work.glob(f"{model}/T*/{model}_{pattern}"))

    return {"lmu": lmu, "files": files, "exact_records": exact_records, "records": records,
            "prompts": list(_StubJudge.prompts)}


def _one(runs, model, pattern):
    found = runs["files"](model, pattern)
    assert len(found) == 1, (pattern, found)
    return found[0]


def test_e2e_predictions_for_every_dataset(runs):
    for model in ("oracle", "const"):
        for name in TINY:
            preds = pd.read_excel(_one(runs, model, f"{name}.xlsx"))
            assert "image" not in preds.columns and len(preds) == len(_read(runs["lmu"] / f"{name}.tsv"))
            if model == "const":
                assert set(preds["prediction"]) == ({"Yes"} if name in YORN else {"A"})


def test_e2e_mme(runs):
    score = pd.read_csv(_one(runs, "oracle", "MME_tiny_score.csv")).iloc[0]
    assert score["perception"] == pytest.approx(2000.0) and score["reasoning"] == pytest.approx(800.0)
    score = pd.read_csv(_one(runs, "const", "MME_tiny_score.csv")).iloc[0]
    assert score["perception"] == pytest.approx(500.0)
    assert score["reasoning"] == pytest.approx(200.0)
    for category in OFFICIAL_MME_CATEGORIES:  # acc 50 + acc+ 0 per category
        assert score[category] == pytest.approx(50.0), category
    aux = pd.read_excel(_one(runs, "const", "MME_tiny_auxmatch.xlsx"))
    assert len(aux) == 56 and (aux["extracted"] == "Yes").all()
    assert aux["score"].mean() == 0.5  # plain accuracy of an always-"Yes" model: exactly 50 %


@pytest.mark.parametrize("name", MCQ)
def test_e2e_multiple_choice(runs, name):
    tsv = _read(runs["lmu"] / f"{name}.tsv")
    acc = pd.read_csv(_one(runs, "oracle", f"{name}_acc.csv"))
    assert len(acc) == 1 and (acc.drop(columns="split").iloc[0] == 1.0).all()  # report_acc: fractions
    assert set(tsv["category"]) <= set(acc.columns)
    const = pd.read_csv(_one(runs, "const", f"{name}_acc.csv")).iloc[0]
    if name.startswith("MMBench"):
        # circular: an always-"A" model fails every question (each has >= 2 rotations)
        assert set(MMBENCH_ABILITIES.values()) <= set(const.index)
        assert const["split"] == "dev" and (const.drop("split") == 0.0).all()
        assert set(pd.read_excel(_one(runs, "oracle", f"{name}_exact_matching_result.xlsx"))["index"]) == \
            set(tsv["index"][tsv["index"] < 1_000_000])
    else:
        assert const["Overall"] == pytest.approx((tsv["answer"] == "A").mean())
        for category, rows in tsv.groupby("category"):
            assert const[category] == pytest.approx((rows["answer"] == "A").mean()), category


def test_e2e_ocrbench(runs):
    score = json.loads(_one(runs, "oracle", "OCRBench_tiny_score.json").read_text())
    for category in OCRBENCH_CATEGORIES:
        assert score[category] == {"sum": 1, "count": 1}, category
    assert score["Final Score"] == {"sum": 10, "count": 10}
    assert score["Final Score Norm"]["sum"] == 1.0  # hits / 10: a percentage only for the real 1000
    const = json.loads(_one(runs, "const", "OCRBench_tiny_score.json").read_text())
    assert const["Final Score"] == {"sum": 0, "count": 10}


def test_e2e_pope(runs):
    tsv = _read(runs["lmu"] / "POPE_tiny.tsv")
    exploded = tsv.assign(category=tsv["category"].str.split(",")).explode("category")
    oracle = pd.read_csv(_one(runs, "oracle", "POPE_tiny_score.csv")).set_index("split")
    assert (oracle[["Overall", "acc", "precision", "recall"]] == 100.0).all().all()
    const = pd.read_csv(_one(runs, "const", "POPE_tiny_score.csv")).set_index("split")
    assert set(const.index) == {"Overall", "adversarial", "popular", "random"}
    for split in const.index:
        rows = exploded if split == "Overall" else exploded[exploded["category"] == split]
        p = (rows["answer"] == "Yes").mean()  # always "Yes": precision p, recall 1
        assert p == 0.5
        assert const.loc[split, "acc"] == pytest.approx(100 * p)
        assert const.loc[split, "precision"] == pytest.approx(100 * p)
        assert const.loc[split, "recall"] == pytest.approx(100.0)
        assert const.loc[split, "Overall"] == pytest.approx(100 * 2 * p / (p + 1))  # F1 = 66.67


def test_e2e_hallusionbench(runs):
    oracle = pd.read_csv(_one(runs, "oracle", "HallusionBench_tiny_score.csv")).set_index("split")
    assert {"Overall", "VD", "VS"} <= set(oracle.index)
    assert (oracle[["aAcc", "fAcc", "qAcc"]] == 100.0).all().all()
    const = pd.read_csv(_one(runs, "const", "HallusionBench_tiny_score.csv")).set_index("split")
    # every figure has a "No" question and every question is "No" on one of its two figures
    assert (const["aAcc"] == 50.0).all() and (const["fAcc"] == 0.0).all() and (const["qAcc"] == 0.0).all()


def test_e2e_judge_datasets_without_a_judge(runs):
    """exact_matching: vlmeval has no fallback; evaluation stops, no score file, a clear warning."""
    for model in ("oracle", "const"):
        for name in NEEDS_JUDGE:
            assert not runs["files"](model, f"{name}_exact_matching*"), name
    warned = {r.getMessage().split(":")[0] for r in runs["exact_records"] if r.levelno == logging.WARNING}
    assert warned == set(NEEDS_JUDGE)
    noted = {r.getMessage().split(":")[0] for r in runs["exact_records"]}
    assert noted == set(TINY)  # a log line at every evaluation


def test_e2e_judge_datasets_with_a_configured_judge(runs):
    judged = [r.getMessage() for r in runs["records"][len(runs["exact_records"]):]]
    assert all("scored with the LLM judge 'gpt-4o-mini'" in m for m in judged) and len(judged) == 3
    assert "Hello" not in runs["prompts"] and "hello" in runs["prompts"]  # liveness checks reached it

    vista = pd.read_csv(_one(runs, "oracle", "MathVista_MINI_tiny_gpt-4o-mini_score.csv")).set_index("Task&Skill")
    assert vista.loc["Overall", "tot"] == 5 and vista.loc["Overall", "acc"] == 100.0
    assert (vista["acc"] == 100.0).all() and (vista["prefetch_rate"] == 100.0).all()  # no extraction needed

    vision = pd.read_csv(_one(runs, "oracle", "MathVision_MINI_tiny_gpt-4o-mini_score.csv")).set_index("Subject")
    assert vision.loc["Overall", "tot"] == 4 and (vision["acc"] == 100.0).all()
    # vlmeval 26.3: for free-form rows the prefetch's timeout_decorator cannot run in the judge's
    # worker threads, so those rows went through the judge's extraction (the stub echoes the
    # response); multiple-choice rows were prefetched.
    tsv = _read(runs["lmu"] / "MathVision_MINI_tiny.tsv")
    free_form = tsv["choices"] == "[]"
    assert 0 < free_form.sum() < len(tsv)
    assert vision.loc["Overall", "prefetch"] == (~free_form).sum()
    assert sum("Extracted answer:" in p for p in runs["prompts"]) == free_form.sum()

    mia = pd.read_csv(_one(runs, "oracle", "MIA-Bench_tiny_gpt-4o-mini_score.csv"))
    scores = dict(zip(mia.iloc[:, 0], mia.iloc[:, 1]))
    # The stub grades every response "1/2 on component 1, 5/10 in total".
    first_types = {ast.literal_eval(t)[0] for t in _read(runs["lmu"] / "MIA-Bench_tiny.tsv")["component_type"]}
    assert set(scores) == first_types | {"total_score"}
    assert all(np.isclose(v, 0.5) for v in scores.values())
    assert sum("You need to grade" in p for p in runs["prompts"]) == 4
