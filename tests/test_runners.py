"""The four families' runners and tiny checkpoints, end to end.

* Each ``run_*.py`` evaluates its family's tiny checkpoint on ``MME_tiny`` (one image per
  category: 28 samples) through VLMEvalKit with one pruning configuration and the default protocol
  (VLMEvalKit's wrapper of the family's reference model), and writes the score file,
  ``prune_config.json`` and ``prune_records.jsonl`` with the protocol and the expected visual-token
  counts (Qwen2.5-VL: a 112-px image upscaled to min_pixels=1280*28*28, 36 x 36 = 1296 tokens;
  InternVL3: one 448-px tile; LLaVA: the padded square; LLaVA-NeXT: the base image and 2 x 2 crops of
  56 px, 16 + 64 visual tokens, its 8 newline tokens in no count) and kept counts. The four runs are
  started together (one torch thread each, separate data and work folders) to keep the file cheap.
* Each tiny checkpoint loads through ``vlm_adapter.load_pretrained`` (the real-checkpoint path)
  and the unchanged ``generate_inner`` answers a message with one image path and a text.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import custom_internvl
import custom_llava
import custom_llava_next
import custom_qwenvl
from synthetic import tiny_checkpoints
from synthetic import tiny_data
from methods import budget
from utils import PruneConfig

ROOT = Path(__file__).resolve().parents[1]

# family key -> (runner script, family module, checkpoint writer)
FAMILIES = {
    "qwen2_5_vl": ("run_qwenvl2_5.py", custom_qwenvl, tiny_checkpoints.save_tiny_qwen),
    "internvl3": ("run_internvl3.py", custom_internvl, tiny_checkpoints.save_tiny_internvl),
    "llava": ("run_llava.py", custom_llava, tiny_checkpoints.save_tiny_llava),
    "llava_next": ("run_llava_next.py", custom_llava_next, tiny_checkpoints.save_tiny_llava_next),
}

# One configuration exercising both stages: 16 visual tokens an MME_tiny image (112 px) in the
# tiny InternVL3 and LLaVA -> 4 kept before the decoder -> 2 from layer 2 on (budgets of N_VISUAL).
ENV = {"KEEP_RATIO": "0.25", "PRUNE_METHOD_PRE_LLM": "divprune_pre_llm",
       "INTRA_LLM_LAYER_SPECS": "2:fastv_intra_llm:0.125", "PREFILL_TIME": "1"}
CONFIG = PruneConfig.from_env(ENV)
N_SAMPLES = 28  # 14 categories x 1 image x 2 questions
# an MME_tiny image (112 px) under VLMEvalKit's protocol: visual tokens, and LLaVA-NeXT's newline tokens
N_VISUAL = {"qwen2_5_vl": 1296, "internvl3": 16, "llava": 16, "llava_next": 80}
MARKERS = {"llava_next": 8}  # 2 x 2 crops stitched into 8 x 8 tokens, nothing unpadded: a newline per row
REFERENCE = {"qwen2_5_vl": "Qwen2.5-VL-7B-Instruct", "internvl3": "InternVL3-8B", "llava": "llava_v1.5_7b",
             "llava_next": "llava_next_vicuna_7b"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_ckpts")
    return {key: save(root / f"tiny-{key}") for key, (_, _, save) in FAMILIES.items()}


@pytest.fixture(scope="module")
def runs(checkpoints, tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Start the four runners at once; return ``{family: (its folder, the finished process)}``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("KEEP_", "PRUNE_", "INTRA_LLM"))}
    procs = {}
    for key, (script, _, _) in FAMILIES.items():
        folder = tmp_path_factory.mktemp(f"run_{key}")
        tiny_data.write_mme_tiny(folder / "lmu", n_per_category=1)
        env = {**base, **ENV, "LMUData": str(folder / "lmu"), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, str(ROOT / script), "--model", str(checkpoints[key]), "--data", "MME_tiny",
               "--work-dir", "work", "--max-new-tokens", "2"]
        log = (folder / "run.log").open("w")
        procs[key] = (folder, subprocess.Popen(cmd, env=env, cwd=folder, stdout=log, stderr=subprocess.STDOUT), log)
    done = {}
    for key, (folder, proc, log) in procs.items():
        proc.wait(timeout=600)
        log.close()
        done[key] = (folder, proc)
    return done


@pytest.mark.parametrize("family", list(FAMILIES))
def test_runner_end_to_end_on_the_tiny_checkpoint(family, runs, checkpoints):
    folder, proc = runs[family]
    log = (folder / "run.log").read_text()
    assert proc.returncode == 0, log[-3000:]
    import vlm_adapter

    protocol = vlm_adapter.Protocol("vlmeval", REFERENCE[family], 2)
    name = vlm_adapter.model_name(checkpoints[family].name, CONFIG, protocol)
    assert name == f"{checkpoints[family].name}__vlmeval-{REFERENCE[family]}__mnt2__{CONFIG.tag()}"
    out = folder / "work" / name
    assert (out / f"{name}_MME_tiny_score.csv").exists(), (sorted(p.name for p in out.iterdir()), log[-3000:])
    saved = json.loads((out / "prune_config.json").read_text())
    assert saved["pre_method"] == "divprune_pre_llm"
    assert saved["protocol"] == {"name": "vlmeval", "reference": REFERENCE[family], "max_new_tokens": 2}
    records = [json.loads(line) for line in (out / "prune_records.jsonl").read_text().splitlines()]
    assert len(records) == N_SAMPLES
    n = N_VISUAL[family]
    pre, intra = budget(n, 0.25), budget(n, 0.125)
    for r in records:
        assert r["protocol"] == f"vlmeval:{REFERENCE[family]}+mnt2"
        assert [s["n"] for s in r["image_spans"]] == [n]  # visual tokens per image before pruning
        assert [s.get("markers", 0) for s in r["image_spans"]] == [MARKERS.get(family, 0)]
        assert (r["n_visual"], r["n_visual_final"]) == (n, intra)
        assert [(e["stage"], e["layer"], e["n_in"], e["n_keep"]) for e in r["events"]] == [
            ("pre_llm", None, n, pre), ("intra_llm", 2, pre, intra)
        ]
    assert len((folder / "prefill_times.txt").read_text().splitlines()) == N_SAMPLES


def test_runner_names_resolve_to_hf_checkpoints():
    import vlm_adapter

    assert vlm_adapter.resolve_checkpoint(custom_internvl, "InternVL3-8B", None) == ("InternVL3-8B", "OpenGVLab/InternVL3-8B-hf")
    assert vlm_adapter.resolve_checkpoint(custom_internvl, "InternVL3-1B", None) == ("InternVL3-1B", "OpenGVLab/InternVL3-1B-hf")
    assert vlm_adapter.resolve_checkpoint(custom_llava, "llava_v1.5_7b", None) == ("llava_v1.5_7b", "llava-hf/llava-1.5-7b-hf")
    assert vlm_adapter.resolve_checkpoint(custom_llava_next, "llava_next_vicuna_7b", None) == (
        "llava_next_vicuna_7b", "llava-hf/llava-v1.6-vicuna-7b-hf")
    assert vlm_adapter.resolve_checkpoint(custom_llava_next, "llava_next_mistral_7b", None) == (
        "llava_next_mistral_7b", "llava-hf/llava-v1.6-mistral-7b-hf")
    with pytest.raises(SystemExit, match="llava_v1.5_7b"):
        vlm_adapter.resolve_checkpoint(custom_llava, "llava_v1.5_9b", None)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("images")
    paths = {}
    for name, size in (("square", (112, 112)), ("wide", (224, 112))):
        img = Image.new("RGB", size, (240, 240, 240))
        img.paste((200, 30, 30), (10, 10, 60, 60))
        paths[name] = str(root / f"{name}.png")
        img.save(paths[name])
    return paths


def _adapter(family: str, checkpoints, env: dict[str, str] | None = None, protocol: str = "chat_template"):
    import vlm_adapter

    _, module, _ = FAMILIES[family]
    options = vlm_adapter.RunOptions(max_new_tokens=3, device="cpu", protocol=protocol)
    return vlm_adapter.build_model(module, str(checkpoints[family]), PruneConfig.from_env(env or {}),
                                   vlm_adapter.resolve_protocol(module, checkpoints[family].name, options), options)


@pytest.mark.parametrize("protocol", ["vlmeval", "chat_template"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_saved_checkpoint_loads_and_generate_inner_answers(family, protocol, checkpoints, images):
    import vlm_adapter

    _, module, _ = FAMILIES[family]
    model, processor = vlm_adapter.load_pretrained(module, str(checkpoints[family]), vlm_adapter.pick_device("cpu"))
    assert isinstance(model, module.MODEL_CLASS)
    assert processor.chat_template
    adapter = _adapter(family, checkpoints, protocol=protocol)
    message = [{"type": "image", "value": images["square"]}, {"type": "text", "value": "Is there a red square? Please answer yes or no."}]
    answer = adapter.generate_inner(message, dataset="MME_tiny")
    assert isinstance(answer, str)


def test_internvl_processor_tiles_a_wide_image_and_the_budget_covers_all_tiles(checkpoints, images):
    adapter = _adapter("internvl3", checkpoints, {"KEEP_RATIO": "0.25", "PRUNE_METHOD_PRE_LLM": "random_pre_llm"})
    processor = adapter.processor
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}],
        tokenize=False, add_generation_prompt=True,
    )
    inputs = processor(text=[prompt], images=[Image.open(images["wide"]).convert("RGB")], return_tensors="pt")
    assert inputs["pixel_values"].shape[0] == 3  # 2x1 crops + the thumbnail
    assert int((inputs["input_ids"] == adapter.model.config.image_token_id).sum()) == 3 * 16
    message = [{"type": "image", "value": images["wide"]}, {"type": "text", "value": "Describe."}]
    assert isinstance(adapter.generate_inner(message), str)
    (event,) = adapter.model.prune_trace
    assert (event.n_in, event.n_keep, [tuple(i) for i in event.images]) == (48, 12, [(48, 12)])
