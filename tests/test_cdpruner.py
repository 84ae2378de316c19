"""CDPruner (``methods/cdpruner.py``): the relevance, the DPP and the rank rule on hand-made tensors,
the greedy against a brute-force log-det greedy, no host sync in the loop, the CLIP text tower's
chunks, and the engine on LLaVA (inputs equal the unpatched model's, logits equal the no-cache
reference), with its errors and refusals."""

from __future__ import annotations

import math

import pytest
import torch

from families import FAMILIES, cfg, check_pruned_decode
from methods.cdpruner import (
    INSTRUCTION_SUFFIXES,
    cdpruner_relevance,
    cdpruner_select,
    dpp_greedy,
    load_clip,
    strip_instruction,
)
from scripts.op_count import OpCounter
from tiny_clip import CHUNK, save_tiny_clip

SEED = 6
QUESTION = "Is there a red cube left of the sphere?\nAnswer the question using a single word or phrase."


def test_answer_format_instructions_are_stripped():
    assert strip_instruction(QUESTION) == "Is there a red cube left of the sphere?"
    mcq = "Question: What is it?\nOptions:\nA. cat\nB. dog\nPlease select the correct answer from the options above. \n"
    assert strip_instruction(mcq) == "Question: What is it?\nOptions:\nA. cat\nB. dog\n"
    sqa = "Which is a mammal?\nA. cat\nB. fish\nAnswer with the option's letter from the given choices directly."
    assert strip_instruction(sqa) == "Which is a mammal?\nA. cat\nB. fish"
    assert strip_instruction("Is it a cat? Please answer yes or no.") == "Is it a cat? Please answer yes or no."
    assert len(INSTRUCTION_SUFFIXES) == 4


def test_relevance_is_the_negated_mean_cosine_min_max_scaled_over_all_crops():
    # Two crops of two tokens; two text chunks along x and y. Mean cosines: (1, 0) -> 0.5,
    # (0, 1) -> 0.5, (1, 1) -> 0.7071, (-1, 0) -> -0.5. Negated: -0.5, -0.5, -0.7071, 0.5: min
    # -0.7071, range 1.2071 over BOTH crops. So the token most aligned with the text scores LOWEST
    # (the original's sign), and crop 1's (-1, 0) highest: (0.5 + 0.7071 + 1e-6) / 1.2071.
    image = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [-1.0, 0.0]]])
    text = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # norms do not matter
    rel = cdpruner_relevance(image, text)
    lo, span = -math.sqrt(0.5), 0.5 + math.sqrt(0.5)
    expected = torch.tensor([[-0.5 - lo, -0.5 - lo], [0.0, 0.5 - lo]]) + 1e-6
    torch.testing.assert_close(rel, expected / span)


def test_dpp_on_a_hand_made_kernel_stops_at_the_rank():
    # Features x0 = e1, x1 = e2, x2 = e1 (a duplicate of x0), x3 = e3; relevance q = (1/2, 3/4, 1, 1/4):
    # L = q_i q_j <x_i, x_j> (all dyadic, exact in fp32). Greedy MAP (Chen et al.'s Cholesky form):
    # gains start at q^2 = (1/4, 9/16, 1, 1/16): pick 2; e = L[2] = (1/2, 0, 1, 0) leaves token 0 the
    # gain 1/4 - 1/4 = 0 exactly (it repeats x2). Pick 1 (9/16), then 3 (1/16). The 4th pick has gain
    # 0: the original takes sqrt(0) and gets NaN; here it is invalid and the greedy keeps 3 < T.
    x = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0], [0, 0, 1.0]])
    q = torch.tensor([0.5, 0.75, 1.0, 0.25])
    kernel = (q[:, None] * (x @ x.T) * q[None, :])[None]
    picks, valid = dpp_greedy(kernel, 4)
    assert picks.tolist() == [[2, 1, 3, 0]] and valid.tolist() == [[True, True, True, False]]
    picks, valid = dpp_greedy(kernel, 2)
    assert picks.tolist() == [[2, 1]] and bool(valid.all())


def _brute_greedy(kernel: torch.Tensor, keep: int) -> list[int]:
    """Greedy MAP by determinants, written out: each step adds the token maximising det(L_S)."""
    chosen: list[int] = []
    for _ in range(keep):
        best = max(
            (j for j in range(kernel.shape[0]) if j not in chosen),
            key=lambda j: float(torch.det(kernel[chosen + [j]][:, chosen + [j]].double())),
        )
        chosen.append(best)
    return chosen


@pytest.mark.parametrize("seed", range(3))
def test_greedy_equals_the_brute_force_greedy_and_batches_over_crops(seed):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(2, 10, 6, generator=g)  # two crops, full rank 6
    image, text = torch.randn(2, 10, 4, generator=g), torch.randn(3, 4, generator=g)
    picks, valid = cdpruner_select(feats, image, text, 5)
    assert bool(valid.all())
    x = feats / feats.norm(dim=-1, keepdim=True)
    rel = cdpruner_relevance(image, text)
    for b in range(2):  # each crop its own DPP on the shared relevance scale
        kernel = rel[b, :, None] * (x[b] @ x[b].T) * rel[b, None, :]
        assert picks[b].tolist() == _brute_greedy(kernel, 5)


def test_no_host_sync_in_the_selection():
    g = torch.Generator().manual_seed(0)
    feats, image, text = torch.randn(1, 24, 8, generator=g), torch.randn(1, 24, 4, generator=g), torch.randn(2, 4, generator=g)
    with OpCounter() as ops:
        cdpruner_select(feats, image, text, 12)
    assert ops.syncs == []


# ----------------------------------------------------------------------------- the engine on LLaVA
@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny CLIP whose vision tower is the tiny LLaVA's at SEED."""
    return save_tiny_clip(tmp_path_factory.mktemp("clip"), FAMILIES["llava"].build(seed=SEED))


@torch.no_grad()
def _expected(model, inputs, clip_dir, text, keep) -> list[int]:
    """The selection from the UNPATCHED model's tensors and the CLIP loaded independently, with
    the original's chunking written out."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    tower = model.model.vision_tower
    hidden = tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]  # [B, 16, C]
    projected = model.model.multi_modal_projector(hidden)
    projection = CLIPVisionModelWithProjection.from_pretrained(clip_dir).visual_projection
    image_embeds = projection(tower.post_layernorm(hidden).float())
    tok = AutoTokenizer.from_pretrained(clip_dir)
    enc = tok(text=text, return_tensors="pt")
    n = enc["input_ids"].shape[1]
    pad = -n % CHUNK
    ids = torch.cat([enc["input_ids"], torch.zeros(1, pad, dtype=torch.long)], 1).view(-1, CHUNK)
    mask = torch.cat([enc["attention_mask"], torch.zeros(1, pad, dtype=torch.long)], 1).view(-1, CHUNK)
    assert ids.shape[0] == math.ceil(n / CHUNK) > 1  # several chunks
    text_embeds = CLIPTextModelWithProjection.from_pretrained(clip_dir)(input_ids=ids, attention_mask=mask).text_embeds
    image = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
    kept = []
    for b in range(hidden.shape[0]):  # one image at a time (relevance scaled per image)
        picks, valid = cdpruner_select(projected[b : b + 1], image_embeds[b : b + 1], text_embeds, keep)
        kept += image[16 * b + picks[0][valid[0]]].tolist()
    return sorted(kept)


@torch.no_grad()
def test_engine_selection_equals_the_unpatched_tensors_and_the_reference(clip_dir, monkeypatch):
    import dataclasses

    import methods

    spec = FAMILIES["llava"]
    inputs = spec.inputs("2img", seed=SEED)
    model = spec.build(seed=SEED)
    expected = _expected(model, inputs, clip_dir, strip_instruction(QUESTION), keep=6)
    eager = spec.build(seed=SEED, attn="eager")
    hidden = eager.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
    real, seen = methods.get_method("cdpruner_pre_llm"), []

    def spy(ctx, keep, **args):  # the real method, its contexts recorded
        seen.append(ctx)
        return real.fn(ctx, keep, **args)

    monkeypatch.setitem(methods._REGISTRY, "cdpruner_pre_llm", dataclasses.replace(real, fn=spy))
    spec.module.patch(model, cfg(KEEP_RATIO=6 / 16, PRUNE_METHOD_PRE_LLM="cdpruner_pre_llm", PRUNE_ARGS=f"clip_model={clip_dir}"))
    model._prune_state.sample_info = {"text": QUESTION}
    prefill = model(**inputs).logits[0]
    (event,) = model.prune_trace
    assert event.kept == expected and event.images == [(16, 6), (16, 6)]
    # The captured inputs: the unpatched eager CLIP's feature layer, the tower's own post_layernorm,
    # the question as given.
    assert len(seen) == 2
    for b, ctx in enumerate(seen):
        torch.testing.assert_close(ctx["vit_features"], hidden[b])
        assert ctx["vit_post_layernorm"] is model.model.vision_tower.post_layernorm
        assert ctx["instruction_text"] == QUESTION
    clip = load_clip(clip_dir, "cpu")
    assert clip._last[0] == strip_instruction(QUESTION)  # the text tower saw the stripped question
    model._prune_state.sample_info = {"text": QUESTION}  # the next prefill (greedy decode) reads it again
    check_pruned_decode(spec.module, spec.ref, model, inputs, prefill)


@torch.no_grad()
def test_errors_without_text_or_with_another_clip(clip_dir, tmp_path):
    spec = FAMILIES["llava"]
    inputs = spec.inputs("1img", seed=SEED)
    model = spec.build(seed=SEED)
    spec.module.patch(model, cfg(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="cdpruner_pre_llm", PRUNE_ARGS=f"clip_model={clip_dir}"))
    with pytest.raises(ValueError, match=r"sample_info\['text'\]"):
        model(**inputs)
    # Another vision tower. Random-init LayerNorms are all ones / zeros, so give it the learnt-looking
    # post_layernorm a trained CLIP has (the weight the check compares).
    another = spec.build(seed=SEED + 1)
    another.model.vision_tower.post_layernorm.weight.add_(0.1 * torch.randn(32, generator=torch.Generator().manual_seed(0)))
    other = save_tiny_clip(tmp_path / "other", another)
    spec.module.patch(model, cfg(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="cdpruner_pre_llm", PRUNE_ARGS=f"clip_model={other}"))
    model._prune_state.sample_info = {"text": QUESTION}
    with pytest.raises(ValueError, match="is not this model's vision tower"):
        model(**inputs)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "internvl"])
def test_refused_without_a_clip_aligned_vit(family):
    spec = FAMILIES[family]
    with pytest.raises(ValueError, match="cdpruner_pre_llm does not apply to .* supports llava.*CLIP"):
        spec.module.patch(spec.build(), cfg(KEEP_RATIO=0.5, PRUNE_METHOD_PRE_LLM="cdpruner_pre_llm"))
