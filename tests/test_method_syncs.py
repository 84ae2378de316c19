"""A method's own cost on a GPU is its kernel launches and, above all, its host syncs (``.item()``,
``int(t)``, ``.tolist()``, ``nonzero``, boolean-mask indexing, ...; ``scripts/op_count.py``): a greedy
loop with a sync per step costs milliseconds whatever its FLOPs. Every registered method (the
registry, so a new one is covered) runs the way the engine calls it, in a tiny model's prefill, at
two visual-token counts; each call of its function (and of its ViT merge, where it has one) is
counted with :class:`scripts.op_count.OpCounter`. Its host syncs per call must not grow with the
token count and must stay within :data:`ALLOWANCE` (0 unless a reason is written there).

``python tests/test_method_syncs.py [tokens]`` prints the per-method table of ``docs/methods.md``
(syncs and ops per call at ``tokens`` visual tokens a LLaVA-1.5 / Qwen2.5-VL image; default 576).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import methods  # noqa: E402
from families import FAMILIES, cfg  # noqa: E402
from scripts.op_count import OpCounter  # noqa: E402

# Host syncs a call of the method's function may dispatch, with the reason (methods not named: 0).
# Each is a small constant where the original's output size is data-dependent; none grows with N.
ALLOWANCE: dict[str, tuple[int, str]] = {
    "cdpruner_pre_llm": (3, "the DPP's valid picks (the original stops at the first gain <= 0: a data-dependent "
                            "count), plus 2 inside transformers' CLIP text tower encoding the instruction (once a prompt: "
                            "the last text's embeddings are reused)"),
    "dart_intra_llm": (1, "the pivots' absolute indices: their CPython set order is the original's iteration order"),
    "hiprune_pre_llm": (1, "the kept count: registers may re-pick buffers (data-dependent)"),
    "mustdrop": (1, "the adaptive kept count of the dual-attention filter"),
    "prumerge_pre_llm": (1, "the adaptive count: how many IQR outliers"),
    "prumerge_plus_pre_llm": (2, "the adaptive count (IQR outliers), then how many spatial samples are no outlier"),
    "vscan": (1, "the kept count (a global pick may be a local one again); per crop on LLaVA-NeXT, all crops at once"),
}
# The same for a method's ViT merge (its ViTMerge.fn, per vision pass).
VIT_MERGE_ALLOWANCE: dict[str, tuple[int, str]] = {
    "mustdrop": (2, "r (the windows above the threshold, the batch minimum) and the groups, which the "
                    "ViTMerge contract returns as Python lists"),
}

HYBRID_ARGS = {
    "sparsevlm": "layers=0/1/2",
    # 2x2 windows tile the tiny grids; merge_threshold=-1 merges every window (random weights leave
    # few windows above 0.8, which would hide a cost per merged window)
    "mustdrop": "layers=0/1/2,window=2,merge_threshold=-1",
    "vscan": "local_layer=0",  # the tiny 2-layer ViTs have no layer 5 / 7
}
METHOD_ARGS = {"hiprune_pre_llm": "object_layer=1"}
QUESTION = "Is there a red cube?\nAnswer the question using a single word or phrase."
# Per family, the visual tokens of the two prompts (one image each): LLaVA (14 * side)-px images of
# side^2 tokens, Qwen2.5-VL (1, 2 * side, 2 * side) patch grids, LLaVA-NeXT the tiny pinpoints' 1 x 2
# crops (32 tokens: base + 2 crops) and 2 x 2 crops (64: base + 4 crops).
# InternVL: 1 tile, or 2 crops and a thumbnail, of 16 tokens each.
SIZES = {"llava": (16, 36), "qwen2_5_vl": (16, 36), "llava_next": (32, 64), "internvl": (16, 48)}
LLAVA_NEXT_IMAGE = {32: (30, 100), 64: (480, 640)}  # (height, width) px


def _side(tokens: int) -> int:
    side = round(tokens**0.5)
    if side * side != tokens:
        raise ValueError(f"{tokens} visual tokens is not a square grid")
    return side


def _llava(tokens: int):
    """A tiny LLaVA whose CLIP takes (14 * side)-px images: side^2 visual tokens an image."""
    from transformers import LlavaForConditionalGeneration

    from synthetic import tiny_models as tm

    config = tm.tiny_llava_config()
    config.vision_config.image_size = 14 * _side(tokens)
    config.image_seq_length = tokens
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


def _llava_inputs(tokens: int) -> dict:
    from synthetic import tiny_models as tm

    inputs = tm.llava_inputs(images=1, tokens=tokens)
    px = 14 * _side(tokens)
    inputs["pixel_values"] = torch.randn(1, 3, px, px, generator=torch.Generator().manual_seed(0))
    return inputs


def _qwen_inputs(tokens: int) -> dict:
    from synthetic import tiny_models as tm

    side = 2 * _side(tokens)
    return tm.qwen_inputs(grids=((1, side, side),))


class Family:
    """One tiny model per (family, token count), built once, and the CDPruner CLIP that matches it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.models: dict = {}
        self.clips: dict = {}

    def get(self, family: str, tokens: int):
        """``(family module, model, inputs)`` of one image of ``tokens`` visual tokens."""
        from synthetic import tiny_models as tm

        key = (family, tokens)
        if key not in self.models:
            if family == "llava":
                self.models[key] = (FAMILIES["llava"].module, _llava(tokens), _llava_inputs(tokens))
            else:  # one model for every size
                model = next((m for (f, _), (_, m, _) in self.models.items() if f == family), None)
                model = model or FAMILIES[family].build(seed=0)
                if family == "qwen2_5_vl":
                    inputs = _qwen_inputs(tokens)
                elif family == "internvl":
                    inputs = tm.internvl_inputs(tiles=(tokens // tm.INTERNVL_TOKENS_PER_TILE,))
                else:
                    inputs = tm.llava_next_inputs(sizes=(LLAVA_NEXT_IMAGE[tokens],))
                self.models[key] = (FAMILIES[family].module, model, inputs)
        return self.models[key]

    def clip(self, family: str, tokens: int) -> str:
        """A tiny CLIP whose vision tower is that model's (CDPruner checks it), saved once."""
        from tiny_clip import save_tiny_clip

        model = self.get(family, tokens)[1]
        if id(model) not in self.clips:
            self.clips[id(model)] = save_tiny_clip(self.tmp / f"clip_{len(self.clips)}", model)
        return self.clips[id(model)]


def _source_has(name: str, *words: str) -> bool:
    """Whether the method's module mentions one of ``words`` (a path of its own for some input)."""
    import inspect

    source = inspect.getsource(inspect.getmodule(methods.get_method(name).fn))
    return any(word in source for word in words)


def families_of(name: str) -> list[str]:
    """LLaVA-1.5 (every method runs there), Qwen2.5-VL where the method runs on it, and where the
    method has a path of its own for them: LLaVA-NeXT (a per-crop path, whose syncs must not grow
    with the crops either) and InternVL (VisionZip's, HiPrune's, VScan's tile rules)."""
    m = methods.get_method(name)
    runs = [f for f in FAMILIES if m.families is None or f in m.families]
    own = {"llava_next": _source_has(name, "ctx.crops", "crop_rows", "select_per_crop"),
           "internvl": _source_has(name, '"internvl"')}
    return [f for f in ("llava", "qwen2_5_vl", "llava_next", "internvl") if f in runs and own.get(f, True)]


def _env(name: str, clip: str | None) -> dict:
    m = methods.get_method(name)
    ratio = 0.25
    if m.schedule is not None:
        env = dict(KEEP_RATIO=ratio, PRUNE_METHOD=name, PRUNE_ARGS=HYBRID_ARGS[name])
    elif m.stage == "pre_llm":
        env = dict(KEEP_RATIO=ratio, PRUNE_METHOD_PRE_LLM=name)
    else:
        env = dict(INTRA_LLM_LAYER_SPECS=f"2:{name}" + (f":{ratio}" if m.uses_ratio else ""))
    args = [METHOD_ARGS[name]] if name in METHOD_ARGS else []
    if name == "cdpruner_pre_llm":
        args.append(f"clip_model={clip}")
    if args and m.schedule is None:
        env["PRUNE_ARGS"] = ",".join(args)
    return env


def _counted(record: list, label: str, fn):
    def counted(*a, **k):
        with OpCounter() as ops:
            out = fn(*a, **k)
        record.append((label, ops.n_syncs, ops.n_ops, list(ops.syncs)))
        return out

    return counted


@torch.no_grad()
def measure(name: str, family: str, tokens: int, pool: Family) -> list[tuple[str, int, int, list[str]]]:
    """``(what, syncs, ops, sync names)`` per call of ``name``'s function (``"fn"``) and of its ViT
    merge (``"vit_merge"``) in one tiny-model prefill of one image of ``tokens`` visual tokens."""
    module, model, inputs = pool.get(family, tokens)
    clip = pool.clip(family, tokens) if name == "cdpruner_pre_llm" else None
    original = methods.get_method(name)
    record: list = []
    merge = original.vit_merge
    if merge is not None:
        merge = dataclasses.replace(merge, fn=_counted(record, "vit_merge", merge.fn))
    counted = dataclasses.replace(original, fn=_counted(record, "fn", original.fn), vit_merge=merge)
    methods._REGISTRY[name] = counted
    try:
        module.patch(model, cfg(**_env(name, clip)))
        model._prune_state.sample_info = {"text": QUESTION}
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    finally:
        methods._REGISTRY[name] = original
        module.unpatch(model)
    return record


def _worst(record, label: str) -> tuple[int, int]:
    calls = [(s, o) for what, s, o, _ in record if what == label]
    return (max(s for s, _ in calls), max(o for _, o in calls)) if calls else (0, 0)


CASES = [(m, f) for m in methods.names() for f in families_of(m)]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return Family(tmp_path_factory.mktemp("syncs"))


@pytest.mark.parametrize("name, family", CASES, ids=[f"{m}-{f}" for m, f in CASES])
def test_method_host_syncs_are_bounded(pool, name, family):
    small_n, large_n = SIZES[family]
    large = measure(name, family, large_n, pool)
    assert any(what == "fn" for what, *_ in large), f"{name} never ran on {family}"
    small = None
    for label, allowances in (("fn", ALLOWANCE), ("vit_merge", VIT_MERGE_ALLOWANCE)):
        allowed, why = allowances.get(name, (0, ""))
        s_large, _ = _worst(large, label)
        syncs = sorted({k for what, s, _, names in large if what == label and s == s_large for k in names})
        if s_large:  # only then can they have grown: the smaller prompt too
            small = small or measure(name, family, small_n, pool)
            s_small, _ = _worst(small, label)
            if s_large > s_small:  # again, warm: a first call's one-off work (a cache filled) is no growth
                large = measure(name, family, large_n, pool)
                s_large, _ = _worst(large, label)
            assert s_large <= s_small, (
                f"{name} ({label}) on {family}: host syncs grow with the token count: {s_small} at {small_n} "
                f"tokens, {s_large} at {large_n} ({syncs})")
        assert s_large <= allowed, (
            f"{name} ({label}) on {family}: {s_large} host syncs a call, {allowed} allowed"
            f"{' (' + why + ')' if why else ''}: {syncs}")


def table(tokens: int = 576) -> str:
    """The docs' table: per method and family, the worst call's host syncs and ops with one image of
    ``tokens`` visual tokens (LLaVA-NeXT: its largest tiny image, 64 tokens over 5 crops; InternVL: 3
    tiles, 48 tokens)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        pool = Family(Path(tmp))
        rows = ["| method | family | tokens | syncs / call | ops / call |", "|---|---|---:|---:|---:|"]
        for name, family in CASES:
            n = max(SIZES[family]) if family in ("llava_next", "internvl") else tokens
            record = measure(name, family, n, pool)
            for label in ("vit_merge", "fn"):
                if any(what == label for what, *_ in record):
                    s, o = _worst(record, label)
                    shown = name if label == "fn" else f"{name} (ViT merge)"
                    rows.append(f"| {shown} | {family} | {n} | {s} | {o} |")
    return "\n".join(rows)


if __name__ == "__main__":
    import logging

    from utils import ensure_torchvision

    ensure_torchvision()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    print(table(int(sys.argv[1]) if len(sys.argv) > 1 else 576))
