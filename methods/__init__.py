"""The registry of visual-token pruning methods.

A method is a pure function: a :class:`PruneContext` and a token budget in, the indices of the
tokens to keep out. Every ``*.py`` file in this folder is imported on first use, so adding a
method is one new file::

    from methods import register_prune, PruneContext

    @register_prune("my_method_pre_llm", stage="pre_llm")
    def my_method(ctx: PruneContext, keep: int, *, alpha: float = 0.5) -> torch.Tensor:
        '''One line: what it keeps. Paper: <link>.'''
        scores = ctx.features.norm(dim=-1)          # ctx.features: [N, D]
        return scores.topk(keep).indices            # [keep]; the engine sorts them

Keyword-only parameters with defaults are the method's hyper-parameters; users set them with
``PRUNE_ARGS="alpha=0.3"`` (checked against this signature). Their valid values are declared on the
parameter itself and checked before any model loads (``PRUNE_ARGS``, a hybrid's schedule and the
defaults alike; a value outside them stops the run with the fix)::

    def my_method(ctx, keep, *, alpha: Annotated[float, Range(gt=0, le=1)] = 0.5,
                  mode: Annotated[str, OneOf("avg", "max")] = "avg") -> torch.Tensor: ...

Inputs beyond the features (e.g. the attention of the last prompt token) are declared with
``needs=(...)`` and read as ``ctx["last_query_attention_prev"]``; the engine computes them only for
methods that declare them.

A method returns either ``indices`` (LongTensor ``[keep]``, into ``ctx.features``) or
``(indices, features)`` when it merges tokens: ``features`` (``[keep, D]``, in the same order as
``indices``) then replace the kept tokens' features. The engine checks the return (1-D, unique, in
range, exactly ``keep`` entries unless the method is registered with ``exact_count=False``) and
sorts it, so methods need not. A method that also creates tokens (SparseVLM's recycled clusters)
returns a :class:`Selection` with ``added``. A hybrid (one name, several layers) is registered with
a ``schedule`` (see :func:`register_prune`).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import pkgutil
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Mapping, NamedTuple

import torch

__all__ = [
    "PruneContext",
    "PruneMethod",
    "register_prune",
    "get_method",
    "names",
    "all_methods",
    "budget",
    "crop_budgets",
    "crop_rows",
    "select_per_crop",
    "Crops",
    "check_selection",
    "check_output",
    "Selection",
    "ViTMerge",
    "ViTLayerMerge",
    "ViTMergeSkipped",
    "STAGES",
    "MIDDLE_LAYER",
    "NEEDS",
    "UnknownMethodError",
    "Range",
    "OneOf",
    "needs_previous_layer",
]

STAGES = ("pre_llm", "intra_llm")
# A schedule's event layer meaning "the decoder's middle layer" (num_layers // 2), resolved per model.
MIDDLE_LAYER = -1

# What a method may ask the engine for, and at which stages it exists. Shapes are per image.
NEEDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "last_query_attention_prev": (
        "[H, N] softmax attention of the last prompt token over the whole sequence at the PREVIOUS "
        "decoder layer (its own queries/keys, RoPE applied), columns of this image's visual tokens. "
        "FastV's input.",
        ("intra_llm",),
    ),
    "last_query_attention_self": (
        "[H, N] the same, computed with THIS layer's input_layernorm/q_proj/k_proj on the layer's "
        "input (look-ahead; PyramidDrop's input).",
        ("intra_llm",),
    ),
    "prev_keys": (
        "[N, KV*hd] this image's keys at the PREVIOUS decoder layer (k_proj on its normed input, RoPE "
        "applied, heads flattened). DART's input.",
        ("intra_llm",),
    ),
    "prev_attention_visual": (
        "[H, N, N] the PREVIOUS layer's attention probabilities (causal, its own q/k) among this "
        "image's tokens: rows and columns the visual tokens. FitPrune's input.",
        ("intra_llm",),
    ),
    "prev_attention_text": (
        "[H, T, N] the same, rows = the T tokens after this image, columns = its visual tokens.",
        ("intra_llm",),
    ),
    "prev_text_keys": ("[T, KV*hd] the same for the text after this image.", ("intra_llm",)),
    "final_normed_features": (
        "[N, D] ctx.features through the decoder's final norm (DART's cosine input).",
        ("intra_llm",),
    ),
    "final_normed_text": ("[T, D] the text after this image through the decoder's final norm.", ("intra_llm",)),
    "n_vit_tokens": (
        "int: how many patch tokens this image's ViT output has: n_orig, or fewer after a ViT-internal "
        "merge (a method registered with vit_merge, e.g. MustDrop's window merge). MustDrop's key-set size.",
        ("pre_llm", "intra_llm"),
    ),
    "sequence_index": ("[N] where these tokens sit in the CURRENT (already pruned) sequence.", ("pre_llm", "intra_llm")),
    "vit_cls_attention": (
        "[H, N] the ViT's [CLS] attention over this image's patches at the feature layer (LLaVA: the "
        "layer of hidden_states[-2]), from that layer's own q/k during the one vision pass. Families "
        "whose ViT has no [CLS] token cannot provide it.",
        ("pre_llm",),
    ),
    "vit_features": ("[N, C] the ViT's feature-layer patch features (before the projector).", ("pre_llm",)),
    "vit_cls_feature": (
        "[C] the [CLS] row of the same feature-layer output (LLaVA: hidden_states[-2][:, 0]), before "
        "the projector. VisionZip's first output token.",
        ("pre_llm",),
    ),
    "vit_feature_keys": (
        "[1 + N, hd] the feature layer's own keys ([CLS] first, then this image's patches): k_proj on "
        "its layer-normed input, split into H heads of hd, averaged over heads, unscaled. VisionZip's "
        "`metric` (layers[-2] in LLaVA).",
        ("pre_llm",),
    ),
    "vit_last_queries": (
        "[1 + N, C] output of the LAST ViT layer's self_attn.q_proj ([CLS] first, then this image's "
        "patches): bias included, no head split, no scaling. LLaVA: CLIP layer 23 of 24, the layer "
        "PruMerge hooks (it runs although its output is not the feature layer's).",
        ("pre_llm",),
    ),
    "vit_last_keys": ("[1 + N, C] the same for the last ViT layer's self_attn.k_proj.", ("pre_llm",)),
    "vit_projector": (
        "callable [K, C] -> [K, D]: the model's multimodal projector (LLaVA: multi_modal_projector), "
        "for methods that merge ViT-space features (vit_features) before projecting them, as the "
        "originals do; its output replaces the kept tokens' features.",
        ("pre_llm",),
    ),
    "vit_post_layernorm": (
        "callable [K, C] -> [K, C]: the vision tower's own final LayerNorm (LLaVA: CLIP's "
        "post_layernorm), which CLIP applies before its visual_projection (CDPruner's image embeddings).",
        ("pre_llm",),
    ),
    "instruction_text": (
        "str: the prompt's text as the caller set it in model._prune_state.sample_info['text'] before "
        "generate (the VLMEvalKit adapter: the message's text parts joined with newlines). The same "
        "string for every image; a clear error when it is missing. CDPruner's instruction.",
        ("pre_llm", "intra_llm"),
    ),
    "text_features": (
        "[T, D] the states of the text tokens after this image (question + assistant prefix), at "
        "the same point as ctx.features.",
        ("pre_llm", "intra_llm"),
    ),
    "vit_last_cls_attention": (
        "[H, N] the [CLS] row of the LAST ViT layer's attention probabilities over this image's "
        "patches (LLaVA: CLIP layer 23, from its own q/k), columns of the current survivors. "
        "MustDrop's key set. OPTIONAL: None on families whose ViT inputs are not captured "
        "(Qwen2.5-VL has no [CLS]; InternViT is not hooked), and the method must handle that.",
        ("pre_llm", "intra_llm"),
    ),
    "input_visual": (
        "[N0, D] this image's visual tokens as they entered decoder layer 0 (after any pre-LLM cut): "
        "the same tensor at every event of the prefill. SparseVLM's rater input.",
        ("intra_llm",),
    ),
    "input_text_only": (
        "[T, D] the tokens after this image that are no image's visual tokens, as they entered "
        "decoder layer 0 (for one image: the question + assistant prefix). Text is never pruned, so "
        "the same T rows as prev_attention_text_only at every later layer.",
        ("intra_llm",),
    ),
    "prev_attention_text_only": (
        "[H, T, N] the PREVIOUS layer's attention probabilities (causal, its own q/k), rows = the T "
        "tokens of input_text_only, columns = this image's current visual tokens (recycled ones "
        "included). SparseVLM's input.",
        ("intra_llm",),
    ),
    "last_query_attention_self_norope": (
        "[H, N] as last_query_attention_self, but q and k WITHOUT the rotary embedding (VScan's Qwen2.5-VL "
        "scoring: the original's mRoPE line is commented out).",
        ("intra_llm",),
    ),
    # Layered ViT needs: {layer: tensor} for the ViT layers the method names with register_prune's
    # ``vit_layers`` (0-based block indices, negative from the end), computed during the one vision pass
    # from each layer's own q/k (no eager re-run, no output_attentions).
    "vit_attention_received": (
        "{layer: [H, N]} the attention each of this image's tokens RECEIVES in that ViT layer: the layer's "
        "softmax probabilities (its own q/k and mask), summed over the query rows, per head. LLaVA (CLIP): "
        "rows [CLS] + patches, columns the patches. Qwen2.5-VL: rows this image's patches under the block's "
        "own mask (window or full), then the mean over each 2x2 merge unit, in the merger's (LLM) token "
        "order. InternVL: per tile, rows [CLS] + patches, [CLS] column dropped, mean over each pixel-shuffle "
        "unit, the image's tiles concatenated in token order.",
        ("pre_llm",),
    ),
    "vit_cls_rows": (
        "{layer: [H, N]} the [CLS] row of that ViT layer's attention probabilities over this image's patches "
        "(LLaVA: ``attentions[layer][:, :, 0, 1:]``). Only ViTs whose [CLS] token reaches the patches' grid.",
        ("pre_llm",),
    ),
    "vit_unit_keys": (
        "{layer: [N, hd]} that ViT layer's keys (Qwen2.5-VL: after its rotary embedding; InternVL: after "
        "k_norm; [CLS] dropped), averaged over heads and over each merge / pixel-shuffle unit, in LLM token "
        "order. VisionZip's Qwen ``attn_key``.",
        ("pre_llm",),
    ),
}


class UnknownMethodError(ValueError):
    """A method name that is not registered (the message lists the close names)."""


def needs_previous_layer(needs: tuple[str, ...]) -> list[str]:
    """The needs among ``needs`` that read the PREVIOUS decoder layer (so cannot exist at layer 0)."""
    return [n for n in needs if n.startswith(("prev_", "last_query_attention_prev"))]


# ----------------------------------------------------------------------------- hyper-parameter constraints
@dataclass(frozen=True)
class Range:
    """Bounds of a numeric hyper-parameter, declared on the parameter:
    ``temperature: Annotated[float, Range(gt=0)] = 0.03``. On a tuple parameter every element
    must satisfy them (``layers: Annotated[tuple, Range(ge=0)] = (2, 6)``)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def describe(self) -> str:
        low = f"[{self.ge:g}" if self.ge is not None else f"({self.gt:g}" if self.gt is not None else None
        high = f"{self.le:g}]" if self.le is not None else f"{self.lt:g})" if self.lt is not None else None
        if low and high:
            return f"in {low}, {high}"
        if low:
            return f"{'>=' if self.ge is not None else '>'} {low[1:]}"
        if high:
            return f"{'<=' if self.le is not None else '<'} {high[:-1]}"
        return "a number"

    def ok(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return False
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))


@dataclass(frozen=True)
class OneOf:
    """The values a hyper-parameter may take: ``mode: Annotated[str, OneOf("avg", "max")] = "avg"``
    (on a tuple parameter: every element)."""

    choices: tuple[Any, ...]

    def __init__(self, *choices: Any) -> None:
        object.__setattr__(self, "choices", choices)

    def describe(self) -> str:
        return "one of " + ", ".join(repr(c) for c in self.choices)

    def ok(self, value: Any) -> bool:
        return value in self.choices


Constraint = Range | OneOf


def _declared_constraints(name: str, fn: Callable[..., Any], params: Mapping[str, Any]) -> dict[str, tuple[Constraint, ...]]:
    """``{parameter: constraints}`` from ``Annotated[type, Range(...) | OneOf(...), ...]`` annotations
    of the keyword-only hyper-parameters (string annotations are evaluated in ``fn``'s module)."""
    out: dict[str, tuple[Constraint, ...]] = {}
    for p in inspect.signature(fn).parameters.values():
        if p.name not in params or p.annotation is p.empty:
            continue
        annotation = p.annotation
        if isinstance(annotation, str):
            if "Annotated" not in annotation:
                continue
            try:
                annotation = eval(annotation, fn.__globals__)  # noqa: S307 - the method's own source
            except Exception as e:  # noqa: BLE001
                raise TypeError(f"{name}: cannot evaluate the annotation of {p.name!r} ({annotation}): {e}") from None
        if typing.get_origin(annotation) is not Annotated:
            continue
        found = tuple(m for m in annotation.__metadata__ if isinstance(m, (Range, OneOf)))
        if found:
            out[p.name] = found
    return out


def _show(value: Any) -> str:
    """A hyper-parameter value as PRUNE_ARGS writes it (tuples as ``a/b/c``)."""
    if isinstance(value, (tuple, list)):
        return "/".join(_show(v) for v in value) or "()"
    return f"{value:g}" if isinstance(value, float) else str(value) if isinstance(value, int) else repr(value)


def _violation(method: str, key: str, value: Any, default: Any, constraints: tuple[Constraint, ...]) -> str | None:
    """What is wrong with ``key=value`` (None when every constraint holds); the message names the fix."""
    many = isinstance(value, (tuple, list))
    for c in constraints:
        bad = [v for v in (value if many else (value,)) if not c.ok(v)]
        if bad:
            subject = f"each element must be {c.describe()} ({_show(bad[0])} is not)" if many else f"it must be {c.describe()}"
            return (f"{method}: {key}={_show(value)} is not valid: {subject}. Set PRUNE_ARGS='{key}=...' to a valid "
                    f"value, or leave {key} out for its default ({_show(default)})")
    return None


@dataclass(frozen=True)
class PruneContext:
    """Everything a method may read about one image's visual tokens at one pruning event.

    Attributes:
        features: ``[N, D]`` the visual tokens entering this stage (pre-LLM: the projector /
            merger output; intra-LLM: the hidden states of the surviving visual tokens at the input
            of ``layer``).
        stage: ``"pre_llm"`` or ``"intra_llm"``.
        layer: decoder layer index for intra-LLM events, ``None`` for pre-LLM.
        positions: ``[N]`` absolute positions of these tokens in the original (unpruned) prompt.
        token_index: ``[N]`` index of each token in its image's original token order
            (``0..n_orig-1``; with ``grid`` it locates the token in the image).
        n_orig: how many visual tokens this image had before any pruning.
        grid: ``(t, h, w)`` of the image's original token grid (tiles are ``t`` for InternVL),
            or ``None`` when unknown.
        image_index: which image of the prompt (0-based).
        generator: the seeded CPU generator random methods draw from (``PRUNE_SEED``).
        extras: the declared needs (see :data:`NEEDS`), read with ``ctx[name]``.
        family: the model family (``Family.name``: ``"llava"``, ``"qwen2_5_vl"``, ``"internvl"``), for
            methods whose original computes differently per model (VisionZip, HiPrune, VScan).
        ratio: the event's keep ratio (a fraction of ``n_orig``; ``None`` for a method that decides its
            own count), for originals that derive their counts from the ratio with their own rounding
            (``keep`` is ``budget(n_orig, ratio)``).
        crops: the image's crop structure where the family has one (LLaVA-NeXT's base image and
            high-resolution crops, :class:`Crops`), for methods whose originals select per crop;
            ``None`` elsewhere.
    """

    features: torch.Tensor
    stage: str
    layer: int | None
    positions: torch.Tensor
    token_index: torch.Tensor
    n_orig: int
    grid: tuple[int, int, int] | None = None
    image_index: int = 0
    generator: torch.Generator | None = None
    extras: Mapping[str, Any] = field(default_factory=dict)
    family: str = ""
    ratio: float | None = None
    crops: "Crops | None" = None

    @property
    def n(self) -> int:
        return self.features.shape[0]

    def __getitem__(self, name: str) -> Any:
        try:
            return self.extras[name]
        except KeyError:
            raise KeyError(
                f"{name!r} was not computed for this method: declare it in "
                f"@register_prune(..., needs=({name!r},)). Available needs: {sorted(NEEDS)}"
            ) from None


@dataclass(frozen=True)
class PruneMethod:
    """A registry entry. ``params`` are the keyword-only hyper-parameters and their defaults."""

    name: str
    stage: str
    fn: Callable[..., Any]
    needs: tuple[str, ...] = ()
    exact_count: bool = True
    params: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""
    paper: str = ""
    deviation: str = ""
    families: tuple[str, ...] | None = None  # None: every family
    uses_ratio: bool = True  # False: the method decides how many tokens it keeps (no ratio in specs)
    default_layer: int = 2  # where PRUNE_METHOD_INTRA_LLM applies it without layer specs
    # Hybrid methods: (keep_ratio, args) -> ((spec layer, ratio or None), ...), args to use; one
    # name then expands into several intra-LLM events (see register_prune).
    schedule: Callable[[float | None, Mapping[str, Any]], tuple[tuple[tuple[int, float | None], ...], dict[str, Any]]] | None = None
    trim_cache: bool = False  # after the prefill, caches from its first event's layer - 1 on keep only the final survivors
    vit_merge: "ViTMerge | ViTLayerMerge | None" = None  # a merge inside the vision encoder (a "vision" event before the LLM)
    # Why the method does not apply to the families outside ``families`` (shown in the error): one
    # reason for all of them, or family -> reason (see :meth:`refusal_for`).
    refusal: str | Mapping[str, str] = ""
    # Per-family needs (``needs`` is then their union): family -> needs.
    family_needs: Mapping[str, tuple[str, ...]] | None = None
    # (family, args) -> {layered ViT need: (layer, ...)}: the ViT layers its ``vit_*`` needs refer to.
    vit_layers: Callable[[str, Mapping[str, Any]], Mapping[str, tuple[int, ...]]] | None = None
    pre_stage: bool = False  # a hybrid whose schedule also has a pre-LLM event (layer None)
    # The valid values of hyper-parameters, declared with them (``Annotated[float, Range(gt=0)]``).
    constraints: Mapping[str, tuple[Constraint, ...]] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.fn) or ""
        return doc.splitlines()[0] if doc else ""

    def refusal_for(self, family: str) -> str:
        """Why the method does not apply to ``family`` ('' when no reason was registered)."""
        if isinstance(self.refusal, Mapping):
            return self.refusal.get(family, self.refusal.get("*", ""))
        return self.refusal

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages its events run at (a hybrid with ``pre_stage``: both)."""
        return ("pre_llm", self.stage) if self.pre_stage and self.stage != "pre_llm" else (self.stage,)

    def needs_for(self, family: str | None = None, stage: str | None = None) -> tuple[str, ...]:
        """Its needs on ``family`` (all families' union when None), those that exist at ``stage``
        (every stage when None): what the engine computes for one of its events."""
        needs = self.needs if family is None or self.family_needs is None else self.family_needs.get(family, ())
        return tuple(n for n in needs if stage is None or stage in NEEDS[n][1])

    def layers_for(self, family: str, args: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        """``{need: (ViT layer, ...)}`` of its layered ViT needs on ``family`` with hyper-parameters
        ``args`` (defaults filled in): which layers the family's vision capture must hook."""
        if self.vit_layers is None:
            return {}
        return {k: tuple(int(x) for x in v) for k, v in self.vit_layers(family, {**self.params, **args}).items()}

    def check_args(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """Validate and coerce ``args`` (strings from the environment allowed) to the defaults' types,
        then check each value against the constraints declared with its parameter (:class:`Range`,
        :class:`OneOf`). Raises ``ValueError`` with a message that names the fix."""
        out: dict[str, Any] = {}
        for key, value in args.items():
            if key not in self.params:
                close = difflib.get_close_matches(key, list(self.params), n=3, cutoff=0.5)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                known = ", ".join(f"{k}={v!r}" for k, v in self.params.items()) or "none"
                raise ValueError(
                    f"{self.name} has no hyper-parameter {key!r}.{hint} Its hyper-parameters: {known}."
                )
            out[key] = _coerce(self.name, key, value, self.params[key])
            problem = _violation(self.name, key, out[key], self.params[key], self.constraints.get(key, ()))
            if problem:
                raise ValueError(problem)
        return out


_REGISTRY: dict[str, PruneMethod] = {}
_discovered = False


def register_prune(
    name: str,
    *,
    stage: str,
    needs: tuple[str, ...] | Mapping[str, tuple[str, ...]] = (),
    exact_count: bool = True,
    source: str = "",
    paper: str = "",
    deviation: str = "",
    families: tuple[str, ...] | None = None,
    uses_ratio: bool = True,
    default_layer: int = 2,
    schedule: Callable[..., Any] | None = None,
    trim_cache: bool = False,
    vit_merge: "ViTMerge | ViTLayerMerge | None" = None,
    refusal: str | Mapping[str, str] = "",
    vit_layers: Callable[[str, Mapping[str, Any]], Mapping[str, tuple[int, ...]]] | None = None,
    pre_stage: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn(ctx, keep, *, hyper=default, ...)`` under ``name`` for ``stage``.

    The valid values of a hyper-parameter are declared on it with ``typing.Annotated`` and
    :class:`Range` / :class:`OneOf` (``temperature: Annotated[float, Range(gt=0)] = 0.03``);
    :meth:`PruneMethod.check_args` then refuses anything else before a model loads, and a default
    that breaks its own declaration fails here.

    Args:
        name: the name users type (``PRUNE_METHOD=name``); keeps the ``_pre_llm`` /
            ``_intra_llm`` suffix convention.
        stage: ``"pre_llm"`` or ``"intra_llm"``.
        needs: inputs beyond the features, from :data:`NEEDS`; or a mapping family -> needs for a
            method whose original computes differently per model (the engine then computes, on each
            family, only that family's needs; ``PruneMethod.needs`` is their union).
        exact_count: False for methods whose kept count is adaptive (the trace reports it).
        source / paper: the original repository and paper (shown in the README table).
        deviation: one line on how this port differs from UniPruneBench's, if it does.
        families: the model families it applies to (``None``: all).
        uses_ratio: False for a method that decides its own count (VTW withdraws every visual
            token): it is configured without a ratio and receives ``keep`` = the current count.
        default_layer: the original's pruning layer, used when ``PRUNE_METHOD_INTRA_LLM`` names it
            without ``INTRA_LLM_LAYER_SPECS``.
        schedule: for a method that prunes at several layers from one name (SparseVLM,
            MustDrop): ``schedule(keep_ratio, args) -> (((layer, ratio or None), ...), args)``;
            ``PRUNE_METHOD=name`` then expands into one intra-LLM event per entry (the original's
            layers and budgets for that ``KEEP_RATIO``), and the returned args (the hyper-parameters
            that ``KEEP_RATIO`` selects, PRUNE_ARGS winning) go to every event. A layer may be
            :data:`MIDDLE_LAYER` (the decoder's middle layer, ``num_layers // 2``, resolved when the
            configuration is applied to a model: VScan's 16 of 32 / 14 of 28), and with
            ``pre_stage`` one entry may be ``(None, ratio)``: the pre-LLM event.
        trim_cache: after the prefill, the KV caches of every layer from (first event layer - 1)
            on keep only the visual tokens that survive the last event (MustDrop's cache policy);
            the trace shows it as a ``post_prefill`` event.
        vit_merge: a :class:`ViTMerge`: the method also merges tokens INSIDE the vision encoder
            (MustDrop's window merge), so the later ViT layers run on fewer tokens; the engine cuts
            the image's placeholders down to the merged count before the LLM (a ``vision`` event).
            Families that cannot run it skip it with a ``vision`` trace note. A
            :class:`ViTLayerMerge` merges at every ViT layer up to the feature layer instead (ToMe).
        refusal: the reason the method does not apply outside ``families``, appended to the
            configuration error; or a mapping family -> reason (key ``"*"``: every other family).
        vit_layers: ``(family, args) -> {need: (layer, ...)}`` for the layered ViT needs
            (``vit_attention_received``, ``vit_cls_rows``, ``vit_unit_keys``): which ViT layers
            (0-based, negative from the end) the family's capture hooks; ``args`` are the
            hyper-parameters (defaults filled in). The method reads ``ctx[need][layer]``.
        pre_stage: for a hybrid (``schedule``): its schedule also returns a pre-LLM event
            (``(None, ratio)``), so ``PRUNE_METHOD=name`` also runs it at the decoder's input with
            ``ctx.stage == "pre_llm"`` (VScan's ViT-space stage); its needs may then be of either stage.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r} (method {name!r})")
    if pre_stage and schedule is None:
        raise ValueError(f"{name}: pre_stage is for hybrids (register a schedule)")
    stages = {stage, "pre_llm"} if pre_stage else {stage}
    family_needs = None
    if isinstance(needs, Mapping):
        family_needs = {f: tuple(v) for f, v in needs.items()}
        needs = tuple(dict.fromkeys(n for v in family_needs.values() for n in v))
    for need in needs:
        if need not in NEEDS:
            raise ValueError(f"{name}: unknown need {need!r}; known needs: {sorted(NEEDS)}")
        if not stages & set(NEEDS[need][1]):
            raise ValueError(f"{name}: need {need!r} does not exist at stage {stage!r}")

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        params = _hyper_parameters(name, fn)
        constraints = _declared_constraints(name, fn, params)
        for key, declared in constraints.items():  # a default that breaks its own declaration is a bug
            problem = _violation(name, key, params[key], params[key], declared)
            if problem:
                raise TypeError(f"the default breaks the declared constraint: {problem}")
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            other = _REGISTRY[name].fn
            raise ValueError(
                f"method name {name!r} registered twice: {other.__module__}.{other.__qualname__} "
                f"and {fn.__module__}.{fn.__qualname__}"
            )
        _REGISTRY[name] = PruneMethod(
            name=name,
            stage=stage,
            fn=fn,
            needs=tuple(needs),
            exact_count=exact_count and uses_ratio,
            params=params,
            source=source,
            paper=paper,
            deviation=deviation,
            families=families,
            uses_ratio=uses_ratio,
            default_layer=default_layer,
            schedule=schedule,
            trim_cache=trim_cache,
            vit_merge=vit_merge,
            refusal=refusal,
            family_needs=family_needs,
            vit_layers=vit_layers,
            pre_stage=pre_stage,
            constraints=constraints,
        )
        return fn

    return decorator


def _hyper_parameters(name: str, fn: Callable[..., Any]) -> dict[str, Any]:
    params = list(inspect.signature(fn).parameters.values())
    if len(params) < 2 or any(p.kind is not p.POSITIONAL_OR_KEYWORD for p in params[:2]):
        raise TypeError(f"{name}: a method's signature is fn(ctx, keep, *, hyper=default, ...)")
    hyper = {}
    for p in params[2:]:
        if p.kind is not p.KEYWORD_ONLY or p.default is p.empty:
            raise TypeError(f"{name}: hyper-parameter {p.name!r} must be keyword-only with a default")
        hyper[p.name] = p.default
    return hyper


def _coerce(method: str, key: str, value: Any, default: Any) -> Any:
    if not isinstance(value, str) or isinstance(default, str):
        return value
    try:
        if isinstance(default, bool):
            low = value.strip().lower()
            if low in ("1", "true", "yes"):
                return True
            if low in ("0", "false", "no"):
                return False
            raise ValueError(value)
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, (tuple, list)):
            inner = type(default[0]) if default else float
            return tuple(inner(v) for v in value.replace("/", " ").split())
    except ValueError:
        raise ValueError(
            f"{method}: {key}={value!r} is not a {type(default).__name__} (default {default!r})"
        ) from None
    return value


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def all_methods() -> dict[str, PruneMethod]:
    _discover()
    return dict(_REGISTRY)


def names(stage: str | None = None) -> list[str]:
    return sorted(n for n, m in all_methods().items() if stage is None or m.stage == stage)


def get_method(name: str) -> PruneMethod:
    methods = all_methods()
    if name in methods:
        return methods[name]
    close = difflib.get_close_matches(name, list(methods), n=3, cutoff=0.6)
    close += [m for m in sorted(methods) if m.startswith(name) and m not in close][: 3 - len(close)]
    hint = f" did you mean {' or '.join(close)}?" if close else ""
    raise UnknownMethodError(f"unknown pruning method {name!r}.{hint} Registered: {', '.join(sorted(methods))}")


def budget(n: int, ratio: float) -> int:
    """Tokens kept out of ``n`` at ``ratio``: ``max(1, floor(n * ratio + 0.5))`` (round half up).

    The one budget rule of the harness, used for every method and stage. Half-up rounding (not
    Python's banker's ``round``) so that equal ratios never keep fewer tokens on even counts.
    A tiny epsilon absorbs float error (``0.1 * 30`` is ``3.0000000000000004``).
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"keep ratio must be in (0, 1], got {ratio}")
    return max(1, min(n, math.floor(n * ratio + 0.5 + 1e-9)))


def crop_budgets(sizes: "list[int] | tuple[int, ...]", keep: int) -> list[int]:
    """``keep`` tokens split over crops of ``sizes`` tokens, in proportion to their sizes.

    Largest remainder: crop ``c`` gets ``floor(keep * s_c / S)``, then the crops with the largest
    remainders ``keep * s_c mod S`` one more each (ties: the earlier crop) until the split sums to
    ``keep`` (``S = sum(sizes)``, ``0 <= keep <= S``); never more than a crop holds. For crops of
    equal size this is the originals' T per crop (``keep = T * crops``); e.g. 320 over five
    576-token crops is 64 each, LLaVA-NeXT's 5 x 64 at ``KEEP_RATIO`` 0.111.
    """
    total = sum(sizes)
    if not 0 <= keep <= total:
        raise ValueError(f"cannot keep {keep} of {total} tokens")
    if total == 0:
        return [0] * len(sizes)
    out = [keep * s // total for s in sizes]
    by_remainder = sorted(range(len(sizes)), key=lambda c: (-(keep * sizes[c] % total), c))
    for c in by_remainder[: keep - sum(out)]:
        out[c] += 1
    return out


@dataclass(frozen=True)
class Crops:
    """The crop structure of one LLaVA-NeXT image (``ctx.crops``), for methods whose originals select
    per crop (``docs/llava_next.md``).

    The image's visual tokens (``ctx.token_index`` order; the row-end newline tokens are not visual
    tokens) are the base image's ``side x side`` patches (row-major), then the high-resolution
    crops stitched into one ``(rows * side) x (cols * side)`` grid, cut to its unpadded ``window``,
    row-major over that window. Crop 0 is the base image, crop ``1 + r * cols + c`` the
    high-resolution crop at row ``r``, column ``c`` (the order of the crops in ``pixel_values`` and
    in the ViT batch).

    Attributes:
        side: tokens per crop side (CLIP-L/14 at 336 px: 24).
        grid: ``(rows, cols)`` of high-resolution crops.
        window: ``(top, bottom, left, right)``: the unpadded part of the stitched grid, in tokens
            (rows ``top..bottom-1``, columns ``left..right-1``).
        crop: ``[N]`` the crop of each token.
        patch: ``[N]`` each token's patch in its crop's own ``side x side`` ViT grid (row-major).
        members: per crop, ``[n_c]`` its tokens (indices into the image's tokens, ascending).
        sizes: per crop, ``n_c`` (a crop cut by the unpadding has fewer than ``side**2``).
    """

    side: int
    grid: tuple[int, int]
    window: tuple[int, int, int, int]
    crop: torch.Tensor
    patch: torch.Tensor
    members: tuple[torch.Tensor, ...]
    sizes: tuple[int, ...]

    @property
    def n_crops(self) -> int:
        return len(self.sizes)

    @property
    def vit_index(self) -> torch.Tensor:
        """``[N]`` each token's row in its image's ViT patches flattened crop by crop
        (``crop * side**2 + patch``)."""
        return self.crop * self.side**2 + self.patch

    def to(self, device: torch.device) -> "Crops":
        return Crops(self.side, self.grid, self.window, self.crop.to(device), self.patch.to(device),
                     tuple(m.to(device) for m in self.members), self.sizes)


def crop_rows(ctx: PruneContext) -> list[torch.Tensor]:
    """Per crop of ``ctx.crops``, the rows of ``ctx.features`` that belong to it, ascending. Before any
    cut of the image (pre-LLM) these are ``Crops.members`` (no host sync); after one, one sync for
    all the crops (their sizes)."""
    crops = ctx.crops
    if crops is None:
        raise ValueError("crop_rows needs ctx.crops (a family with crops: LLaVA-NeXT)")
    if ctx.n == ctx.n_orig:  # nothing cut yet: token_index is 0..N-1
        return list(crops.members)
    owner = crops.crop.to(ctx.token_index.device)[ctx.token_index]
    sizes = torch.bincount(owner, minlength=crops.n_crops).tolist()  # the one host sync
    return list(torch.sort(owner, stable=True).indices.split(sizes))  # each crop's rows, ascending


def select_per_crop(
    ctx: PruneContext, keep: int, select: Callable[[int, torch.Tensor, int], torch.Tensor]
) -> torch.Tensor:
    """``keep`` tokens chosen crop by crop, for methods whose originals select per crop on LLaVA-NeXT.

    ``keep`` is split over the crops by :func:`crop_budgets` (in proportion to their tokens);
    ``select(c, rows, t)`` picks ``t`` of crop ``c``'s ``rows`` (``[n_c]`` rows of ``ctx.features``)
    and returns them as positions into ``rows`` (``[t]``). Crops whose share is 0 are skipped.
    Returns ``[keep]`` rows of ``ctx.features`` (crop by crop; the engine sorts them)."""
    rows = crop_rows(ctx)
    budgets = crop_budgets([int(r.numel()) for r in rows], keep)
    picks = [r[select(c, r, t)] for c, (r, t) in enumerate(zip(rows, budgets)) if t > 0]
    return torch.cat(picks) if picks else torch.zeros(0, dtype=torch.long, device=ctx.features.device)


class Selection(NamedTuple):
    """A method's return when it also creates tokens (SparseVLM's recycled clusters).

    ``indices`` ``[k]`` and ``features`` ``[k, D]`` (or None) as for a plain return; ``added``
    ``[c, D]``: new visual tokens the engine inserts right after this image's last kept token, in
    this order. They count as this image's visual tokens in later events (``ctx.token_index`` ``>=
    n_orig``, no grid location) and take the position ids of the image's last original token.
    """

    indices: torch.Tensor
    features: torch.Tensor | None = None
    added: torch.Tensor | None = None


class ViTMergeSkipped(Exception):
    """Raised by a :class:`ViTMerge` function that does not apply to this input (e.g. a patch grid
    its windows do not tile): the ViT then runs unmerged and the trace's ``vision`` event says why."""


@dataclass(frozen=True)
class ViTMerge:
    """A token merge inside the vision encoder, declared with ``register_prune(..., vit_merge=)``.

    ``fn(x, args) -> (merged, groups)`` runs on the OUTPUT of ViT layer ``layer`` (0-based), where
    ``x`` is ``[B, 1 + N, C]`` ([CLS] first, then the ``N`` patches of each of the ``B`` images of
    the forward) and ``args`` the method's hyper-parameters (defaults, then what the config sets).
    It returns ``merged`` ``[B, 1 + N', C]`` ([CLS] first; one ``N'`` for the whole batch, which
    the ViT's later layers receive) and ``groups``: per image, per output patch, the original patch
    indices it stands for (every patch in exactly one group). It may raise :class:`ViTMergeSkipped`.

    The engine then (``prune_engine``, stage ``vision``) turns each image's ``N`` placeholders
    into ``N'`` tokens before the LLM: a merged token takes the slot (prompt position) of the
    LAST (largest) patch of its group, a group of one keeps its patch's slot; the LLM sees them in
    slot order with their slots' position ids, and the projector output of the merged features.
    """

    layer: int
    fn: Callable[[torch.Tensor, Mapping[str, Any]], tuple[torch.Tensor, list[list[list[int]]]]]


@dataclass(frozen=True)
class ViTLayerMerge:
    """A token merge at EVERY layer of the vision encoder up to its feature layer, between each
    layer's attention (with its residual) and its MLP, declared with ``register_prune(...,
    vit_merge=)`` (ToMe, as LightCompress applies it to CLIP).

    ``schedule(n_patches, n_layers, keep_ratio, args) -> (r_0, ..., r_{n_layers-1})``: how many
    tokens each of the ``n_layers`` merging layers removes, called once per vision pass (``N`` and
    ``n_layers`` from the family, ``keep_ratio`` the configuration's ``KEEP_RATIO``).

    ``fn(x, metric, r, args) -> (merged, dest)`` at a layer whose ``r > 0``: ``x`` ``[B, 1 + T, C]``
    ([CLS] first, the ``T`` current tokens of each of the ``B`` images), ``metric`` ``[B, 1 + T, c]``
    (that layer's keys, averaged over heads); ``merged`` ``[B, 1 + T - r, C]`` ([CLS] first) and
    ``dest`` ``[B, 1 + T]`` (long): the column of ``merged`` each input token went to (``dest[:, 0]
    == 0``). The engine composes the ``dest`` maps on the device (each original patch's column
    after the last layer) and, as for :class:`ViTMerge`, cuts each image's placeholders to the
    merged count before the LLM, a merged token taking the slot of its group's LAST patch.
    """

    schedule: Callable[[int, int, float | None, Mapping[str, Any]], tuple[int, ...]]
    fn: Callable[[torch.Tensor, torch.Tensor, int, Mapping[str, Any]], tuple[torch.Tensor, torch.Tensor]]


def check_output(
    method: PruneMethod, out: Any, n: int, keep: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """:func:`check_selection` for any return, :class:`Selection` included: ``(indices, features, added)``."""
    added = None
    if isinstance(out, Selection):
        out, added = (out.indices if out.features is None else (out.indices, out.features)), out.added
        if added is not None and (not isinstance(added, torch.Tensor) or added.dim() != 2):
            raise ValueError(f"{method.name} returned added tokens of shape {_describe(added)}; expected [c, D]")
    idx, feats = check_selection(method, out, n, keep)
    return idx, feats, added


def check_selection(method: PruneMethod, out: Any, n: int, keep: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate a method's return and sort it. Returns ``(indices [k], features [k, D] or None)``."""
    feats = None
    if isinstance(out, tuple):
        if len(out) != 2:
            raise TypeError(f"{method.name} returned a tuple of {len(out)}; expected (indices, features)")
        out, feats = out
    if not isinstance(out, torch.Tensor) or out.dim() != 1 or out.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{method.name} must return a 1-D integer tensor of indices, got {_describe(out)}")
    idx = out.long()
    k = idx.numel()
    if method.exact_count and k != keep:
        raise ValueError(f"{method.name} returned {k} indices for a budget of {keep}")
    if not method.exact_count and not 0 <= k <= n:
        raise ValueError(f"{method.name} returned {k} indices out of {n} tokens")
    order = torch.argsort(idx)
    idx = idx[order]
    if k:  # range and duplicates in one read (one host sync, not three)
        dup = (idx[1:] == idx[:-1]).any() if k > 1 else torch.zeros((), dtype=torch.bool, device=idx.device)
        lo, hi, has_dup = torch.stack((idx[0], idx[-1], dup.long())).tolist()
        if lo < 0 or hi >= n:
            raise ValueError(f"{method.name} returned an index outside [0, {n})")
        if has_dup:
            raise ValueError(f"{method.name} returned duplicate indices")
    if feats is not None:
        if not isinstance(feats, torch.Tensor) or feats.dim() != 2 or feats.shape[0] != k:
            raise ValueError(f"{method.name} returned merged features of shape {_describe(feats)}; expected [{k}, D]")
        feats = feats[order.to(feats.device)]
    return idx, feats


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"Tensor{tuple(x.shape)} {x.dtype}"
    return type(x).__name__
