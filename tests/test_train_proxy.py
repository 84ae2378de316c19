"""The proxy training script: its label mask, and a two-step run per family that writes a checkpoint
the harness loads (the real training takes ~20 minutes and runs offline, never here)."""

from __future__ import annotations

import json

import pytest
import torch

from synthetic import proxy_data as P
from scripts import train_proxy as T


def test_answer_labels_cover_each_answer_and_its_end_token_only():
    marker, stops = [7, 8], [9]
    ids = torch.tensor([[1, 7, 8, 5, 9, 2, 7, 8, 6, 4, 9, 0, 0]])
    #                    0  1  2  3  4  5  6  7  8  9 10 11 12
    # answers after each [7, 8]: position 3 (+ stop at 4) and positions 8-9 (+ stop at 10)
    labels = T.answer_labels(ids, marker, stops)
    expected = torch.full_like(ids, -100)
    expected[0, [3, 4, 8, 9, 10]] = ids[0, [3, 4, 8, 9, 10]]
    assert torch.equal(labels, expected)


def test_training_scenes_never_reach_the_held_out_ones_and_bad_budgets_are_refused():
    top = P.EVAL_SEED_BASE // T.SEEDS_PER_RUN - 1  # the highest seed allowed
    steps, batch = T.FIRST_STAGE_SCENES // 25, 25  # the largest stage allowed
    T.check_budget(top, steps, batch)
    assert T.scene_seeds(top, True, steps - 1, batch)[-1] == P.EVAL_SEED_BASE - 1 < P.eval_scenes(1)[0].seed
    assert T.scene_seeds(0, False, steps - 1, batch)[-1] < T.scene_seeds(0, True, 0, batch)[0]  # stages apart
    assert T.scene_seeds(1, False, 0, batch)[0] > T.scene_seeds(0, True, steps - 1, batch)[-1]  # seeds apart
    for bad, fix in (((top + 1, 10, 2), "--seed"), ((-1, 10, 2), "--seed"), ((0, steps + 1, batch), "--init"),
                     ((0, 0, 2), "--steps")):
        with pytest.raises(ValueError, match=fix):
            T.check_budget(*bad)


@pytest.mark.parametrize("argv, message", [
    (["--seed", "10"], "held-out"), (["--steps", "0"], "must be >= 1"), (["--init", "/nonexistent"], "no proxy checkpoint"),
    (["--eval-n", "0"], "--eval-n"),
])
def test_bad_arguments_stop_with_the_fix(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        T.main(["--family", "llava", "--out", str(tmp_path), *argv])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("family", sorted(T.BUILDERS))
def test_a_short_run_writes_a_checkpoint_the_harness_loads(family, tmp_path):
    out = tmp_path / family
    T.main(["--family", family, "--out", str(out), "--steps", "2", "--batch", "2", "--eval-n", "2", "--threads", "1"])
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps"] == 2 and set(log["heldout_accuracy"]) == set(P.TYPES)
    model, processor = T.load(family, out)
    assert next(model.parameters()).dtype == torch.float32
    # the conversation format: the answers, and only they, are labelled
    scene = P.random_scene(0)
    qs = list(P.questions(scene).values())
    text = T.chat_text(processor, [(q.prompt(), q.target) for q in qs])
    ids = processor(text=[text], images=[P.render(scene)], return_tensors="pt")["input_ids"]
    labels = T.answer_labels(ids, T.answer_marker(processor), list(model.generation_config.eos_token_id))
    tokens = processor.tokenizer.convert_ids_to_tokens(ids[0][labels[0] != -100])
    assert tokens[0::2] == [q.target for q in qs]
    assert set(tokens[1::2]) == {processor.tokenizer.convert_ids_to_tokens(model.generation_config.eos_token_id[0])}
    assert processor.tokenizer.unk_token_id not in ids[0].tolist()
