"""One entry per model family, for the parametrised engine tests (``tests/test_engine.py``).

A :class:`FamilySpec` says how to build the family's tiny random model, how to build its inputs
for the three prompt variants the tests use, which reference helper (``tests/reference.py``)
reproduces its embeddings and positions, and how the library's own forward takes position ids.
Adding a family to the shared tests is one entry in :data:`FAMILIES`.

Prompt variants (``spec.inputs(variant, seed)``):
  * ``"1img"``: one image (the default prompt of the single-image tests);
  * ``"2img"``: two images separated by text;
  * ``"trace"``: two images of different sizes where the family allows it, whose per-image token
    counts and budgets are spelled out in ``spec.trace_images``.

Visual tokens are what ``spec.ref.visual_mask`` marks: every image placeholder, except LLaVA-NeXT's
row-end newline tokens (never pruned, never counted).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch
from torch import nn

import custom_internvl
import custom_llava
import custom_llava_next
import custom_qwenvl
from synthetic import tiny_models as tm
from reference import InternVLRef, LlavaNextRef, LlavaRef, QwenRef, reference_logits
from utils import PruneConfig

ATOL = 1e-4  # fp32 logits of the engine vs the reference
NEW_TOKENS = 4


@dataclass(frozen=True)
class FamilySpec:
    """How the shared tests drive one family.

    Attributes:
        name: the test id (and the family's ``Family.name``).
        module: the family file (``patch`` / ``unpatch`` / ``FAMILY``).
        build: ``build(seed=0, attn="sdpa") -> model`` (eval mode, fp32).
        variants: variant name -> keyword arguments of ``make_inputs``.
        make_inputs: the tiny_models input builder (``seed=`` plus the variant's arguments).
        ref: the reference helper class (``embed`` / ``positions`` / ``visual_mask``).
        library_position_ids: ``(pos, sel) -> position_ids`` for the library's own forward on the
            pruned sequence ``sel`` ``[L']``, given the reference positions ``pos`` of the full one.
        trace_images: per image of the ``"trace"`` prompt, ``(N, budget(N, 0.5), budget(N, 0.25))``.
        trace_grids: per image of the ``"trace"`` prompt, the ``ctx.grid`` a method receives.
    """

    name: str
    module: ModuleType
    build: Callable[..., nn.Module]
    variants: dict[str, dict]
    make_inputs: Callable[..., dict[str, torch.Tensor]]
    ref: type
    library_position_ids: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    trace_images: tuple[tuple[int, int, int], ...]
    trace_grids: tuple[tuple[int, int, int] | None, ...]

    def inputs(self, variant: str = "1img", seed: int = 0) -> dict[str, torch.Tensor]:
        return self.make_inputs(seed=seed, **self.variants[variant])

    def __repr__(self) -> str:  # the pytest id
        return self.name


def _qwen_position_ids(pos3: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    # Qwen2.5-VL takes [4, B, L']: a text row, then t/h/w. Any increasing text row works; the test
    # passes an explicit mask so that the gaps are not read as packed sequences.
    return torch.cat([sel.view(1, 1, -1), pos3[..., sel]])


def _plain_position_ids(pos: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    return pos[..., sel]  # [1, L']: the kept tokens' original positions


FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in (
        FamilySpec(
            name="qwen2_5_vl",
            module=custom_qwenvl,
            build=tm.tiny_qwen,
            variants={
                "1img": dict(grids=((1, 8, 8),)),  # 16 tokens
                "2img": dict(grids=((1, 8, 4), (1, 4, 8))),  # 8 + 8
                "trace": dict(grids=((1, 8, 8), (1, 4, 4))),  # 16 + 4
            },
            make_inputs=tm.qwen_inputs,
            ref=QwenRef,
            library_position_ids=_qwen_position_ids,
            trace_images=((16, 8, 4), (4, 2, 1)),
            trace_grids=((1, 4, 4), (1, 2, 2)),  # (t, h/2, w/2)
        ),
        FamilySpec(
            name="internvl",
            module=custom_internvl,
            build=tm.tiny_internvl,
            variants={
                "1img": dict(tiles=(3,)),  # 2 crops + thumbnail: 48 tokens
                "2img": dict(tiles=(4, 3)),  # 64 + 48
                "trace": dict(tiles=(3, 1)),  # 48 + 16 (a 1-tile image has no thumbnail)
            },
            make_inputs=tm.internvl_inputs,
            ref=InternVLRef,
            library_position_ids=_plain_position_ids,
            trace_images=((48, 24, 12), (16, 8, 4)),  # ONE budget per image, over all its tiles
            trace_grids=((3, 4, 4), (1, 4, 4)),  # (tiles, side, side)
        ),
        FamilySpec(
            name="llava",
            module=custom_llava,
            build=tm.tiny_llava,
            variants={
                "1img": dict(images=1),  # 16 tokens
                "2img": dict(images=2),  # 16 + 16
                "trace": dict(images=2),
            },
            make_inputs=tm.llava_inputs,
            ref=LlavaRef,
            library_position_ids=_plain_position_ids,
            trace_images=((16, 8, 4), (16, 8, 4)),
            trace_grids=((1, 4, 4), (1, 4, 4)),  # (1, H/patch, W/patch)
        ),
        FamilySpec(
            name="llava_next",
            module=custom_llava_next,
            build=tm.tiny_llava_next,
            variants={
                # 30 x 100 px: 1 x 2 crops of 4 x 4, stitched 4 x 8, unpadded to rows 1-2: 16 + 16
                # visual tokens and 2 newline tokens (never pruned)
                "1img": dict(sizes=((30, 100),)),
                "2img": dict(sizes=((30, 100), (60, 50))),  # 32 + 32 (60 x 50: 2 x 1 crops, 4 x 4 unpadded; 4 newlines)
                "trace": dict(sizes=((480, 640), (30, 100))),  # 64 (2 x 2 crops, 6 x 8 unpadded) + 32
            },
            make_inputs=tm.llava_next_inputs,
            ref=LlavaNextRef,
            library_position_ids=_plain_position_ids,
            trace_images=((64, 32, 16), (32, 16, 8)),  # ONE budget per image over base + crops, newlines not counted
            trace_grids=(None, None),  # no single grid: ctx.crops
        ),
    )
}


def spy_on(monkeypatch, name: str, select: Callable | None = None) -> list:
    """Replace registered method ``name`` for one test by a spy that records every
    :class:`methods.PruneContext` it receives and keeps ``select(ctx, keep)`` (default: the first
    ``keep`` tokens, in the image's original token order; ``select`` also receives the configured
    hyper-parameters as keywords). Returns the list of recorded contexts.
    ``monkeypatch`` restores the registry afterwards."""
    import dataclasses

    import methods

    seen: list = []
    original = methods.get_method(name)

    def spy(ctx, keep, **args):  # args: the method's configured hyper-parameters, passed on to select
        seen.append(ctx)
        if select is not None:
            return select(ctx, keep, **args)
        return torch.argsort(ctx.token_index)[:keep]

    monkeypatch.setitem(methods._REGISTRY, name, dataclasses.replace(original, fn=spy))
    return seen


# ----------------------------------------------------------------------------- shared helpers
def cfg(**env) -> PruneConfig:
    """A :class:`PruneConfig` from environment-style settings (values stringified)."""
    return PruneConfig.from_env({k: str(v) for k, v in env.items()})


@torch.no_grad()
def greedy(model, inputs, n=NEW_TOKENS):
    """``(sequences [1, L+n], step logits [n, V])`` of greedy ``generate``."""
    out = model.generate(
        **inputs, max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    return out.sequences, torch.stack(out.logits, dim=1)[0]


@torch.no_grad()
def check_pruned_decode(module, ref, model, inputs, prefill_logits=None) -> None:
    """Greedy-decode the patched ``model``, then check that run (its trace's drops, every step, and
    ``prefill_logits`` when given) against the unpatched reference; the model is re-patched with
    no configuration afterwards."""
    from reference import drops_from_trace

    seq, steps = greedy(model, inputs)
    drops = drops_from_trace(model.prune_trace)
    module.unpatch(model)
    try:
        check_against_reference(ref, model, inputs, seq, steps, drops, prefill_logits)
    finally:
        module.patch(model)


@torch.no_grad()
def check_against_reference(ref, model, inputs, seq, steps, drops, prefill_logits=None) -> None:
    """The UNPATCHED ``model``'s reference (``tests/reference.py``) against a pruned run.

    ``seq`` ``[1, L+n]`` and ``steps`` ``[n, V]`` come from :func:`greedy` on the patched model,
    ``drops`` from its trace; ``prefill_logits`` ``[L', V]`` (every surviving position of the
    prompt) when the prefill's selection is the greedy run's own, else the first step stands in.
    """
    n_prompt = inputs["input_ids"].shape[1]
    ref_logits, _ = reference_logits(ref, model, inputs, seq[:, :n_prompt], drops)
    if prefill_logits is None:
        torch.testing.assert_close(steps[0], ref_logits[-1], atol=ATOL, rtol=0)
    else:
        torch.testing.assert_close(prefill_logits, ref_logits, atol=ATOL, rtol=0)
    # Every decode step: the unpatched model without cache on the whole sequence so far.
    for s in range(1, steps.shape[0]):
        ref_logits, _ = reference_logits(ref, model, inputs, seq[:, : n_prompt + s], drops)
        torch.testing.assert_close(steps[s], ref_logits[-1], atol=ATOL, rtol=0)
