"""Tests for tiny_data: the synthetic MME_tiny TSV and an offline vlmeval.run.main() round trip."""

import functools
import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tv_compat  # noqa: E402

tv_compat.ensure_torchvision()

import tiny_data  # noqa: E402

# Written out independently of tiny_data: the categories vlmeval's MME_rating sums.
OFFICIAL_MME_CATEGORIES = {
    "OCR", "artwork", "celebrity", "color", "count", "existence", "landmark", "position",
    "posters", "scene", "code_reasoning", "commonsense_reasoning", "numerical_calculation",
    "text_translation",
}


def _read(path):
    return pd.read_csv(path, sep="\t", keep_default_na=False)


def test_mme_tiny_format(tmp_path):
    path = tiny_data.write_mme_tiny(tmp_path, n_per_category=2, seed=0)
    assert path == tmp_path / "MME_tiny.tsv"
    df = _read(path)
    assert list(df.columns) == ["index", "image", "question", "answer", "category", "image_path"]
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


def test_mme_tiny_clears_stale_image_cache(tmp_path):
    stale = tmp_path / "images" / "MME_tiny" / "0.jpg"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    tiny_data.write_mme_tiny(tmp_path)
    assert not stale.parent.exists()


def test_vlmeval_run_main_dummy_yes(tmp_path, monkeypatch):
    lmu, work = tmp_path / "LMUData", tmp_path / "work"
    tiny_data.write_mme_tiny(lmu, n_per_category=2, seed=0)
    monkeypatch.setenv("LMUData", str(lmu))
    monkeypatch.delenv("MMEVAL_ROOT", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)

    import vlmeval.config
    import vlmeval.dataset.image_base
    import vlmeval.run
    from vlmeval.vlm.base import BaseModel

    class DummyYes(BaseModel):
        def generate_inner(self, message, dataset=None):
            assert [m["type"] for m in message] == ["image", "text"]
            return "Yes"

    def no_download(*args, **kwargs):
        raise AssertionError(f"vlmeval tried to download {args}")

    tiny_data.register_tiny_datasets()
    tiny_data.register_tiny_datasets()  # idempotent
    monkeypatch.setattr(vlmeval.dataset.image_base, "download_file", no_download)
    monkeypatch.setitem(vlmeval.config.supported_VLM, "dummy_yes", functools.partial(DummyYes))
    monkeypatch.setattr(sys, "argv", [
        "vlmeval", "--model", "dummy_yes", "--data", "MME_tiny", "--work-dir", str(work),
        "--judge", "exact_matching", "--api-nproc", "1",
    ])
    vlmeval.run.main()  # logs (does not raise) when a model x dataset pair fails

    scores = [p for p in work.glob("dummy_yes/T*/dummy_yes_MME_tiny_score.csv")]
    assert len(scores) == 1, sorted(str(p) for p in work.rglob("*"))
    score = pd.read_csv(scores[0]).iloc[0]
    assert score["perception"] == pytest.approx(500.0)
    assert score["reasoning"] == pytest.approx(200.0)
    for category in OFFICIAL_MME_CATEGORIES:  # acc 50 + acc+ 0 per category
        assert score[category] == pytest.approx(50.0), category

    aux = pd.read_excel(scores[0].with_name("dummy_yes_MME_tiny_auxmatch.xlsx"))
    assert len(aux) == 56
    assert (aux["extracted"] == "Yes").all()
    assert aux["score"].mean() == 0.5  # plain accuracy of an always-"Yes" model: exactly 50 %
    preds = pd.read_excel(scores[0].with_name("dummy_yes_MME_tiny.xlsx"))
    assert "image" not in preds.columns and (preds["prediction"] == "Yes").all()
