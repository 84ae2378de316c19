"""The pruning engine, shared by every model family.

One decoder loop cuts the sequence, the rotary embeddings, the position ids, the masks and (by
construction) the KV cache, for pre-LLM pruning (at the decoder's input) and intra-LLM pruning
(at the input of chosen layers). A family file (``custom_qwenvl.py``, ...) only says where the
visual tokens are and how the family's decoder builds its position ids; see :class:`Family`.

How it attaches to a model (:func:`patch`), per model instance, nothing at import time:
  * the decoder (``model.model.language_model``) gets an instance-level ``forward`` that runs
    :func:`_decoder_forward`; with no pruning configured, or on a prompt whose cache was never
    pruned, it calls the original transformers forward, so outputs are exactly the library's;
  * a forward pre-hook / hook pair on the top-level model finds the image spans in ``input_ids``
    before each prefill, times the prefill and files the sample's record afterwards.

Guarantees (each is a test in ``tests/test_engine.py``):
  * Kept tokens keep their original positions (Qwen's 3-D M-RoPE ids included); decoding
    continues from the unpruned length, as the unpatched model would.
  * Prefill logits and every decode step equal those of the unpatched model run without cache on
    the same sequence with the dropped tokens removed at the same layer.
  * Layers below an intra-LLM cut keep the full KV cache, layers from the cut on keep only the
    survivors; masks are built per layer from that layer's own cache length.

Batch size 1 is the protocol (as in the UniPruneBench paper): a larger batch, or padding, raises.
Several images in one prompt are pruned per image: each keeps ``budget(N_i, ratio)`` of its own
``N_i`` tokens; the text between images is never visual. A family may mark some of an image's
placeholders as no visual tokens (:class:`ImageLayout` markers: LLaVA-NeXT's row-end newline
tokens): they are never pruned, count in no budget, and "the text after the image" starts after
them; an image's crops reach methods as ``ctx.crops``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

from utils import ensure_torchvision

ensure_torchvision()  # before transformers imports torchvision

import torch
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast

import methods
from utils import PruneConfig, Stopwatch, TimingSink

logger = logging.getLogger(__name__)

TESTED_TRANSFORMERS = "5.23.0"


# ----------------------------------------------------------------------------- family interface
class Family:
    """What the engine needs to know about a model family. Subclasses live in ``custom_*.py``."""

    name: str = ""

    def text_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack (has ``embed_tokens``, ``layers``, ``norm``, ``rotary_emb``)."""
        return model.model.language_model

    def image_token_id(self, model: nn.Module) -> int:
        return int(model.config.image_token_id)

    def image_layout(self, model: nn.Module, kwargs: Mapping[str, Any]) -> list["tuple[int, tuple[int, int, int] | None] | ImageLayout"]:
        """``[(n_tokens, grid (t, h, w) or None), ...]`` per image of this forward, in prompt order; an
        entry may be an :class:`ImageLayout` instead, for images whose placeholders are not all
        visual tokens (LLaVA-NeXT's row-end newline tokens) or that have crops.

        An empty list means "unknown": the engine then treats each run of image tokens as one image.
        """
        return []

    def positions(
        self, text_model: nn.Module, position_ids: torch.Tensor | None, inputs_embeds: torch.Tensor, past_len: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(rope_positions, layer_position_ids)`` as the family's decoder forward builds them.

        ``rope_positions`` goes to ``rotary_emb`` and ``layer_position_ids`` to every layer; both
        have the sequence on their last dimension. Default: LLaMA / Qwen2 (copied from
        ``LlamaModel.forward``, transformers 5.23.0, unchanged).
        """
        if position_ids is None:
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_len
            position_ids = position_ids.unsqueeze(0)
        return position_ids, position_ids

    def capture_vision(self, model: nn.Module, store: dict[str, Any], wanted: Mapping[str, tuple[int, ...]]) -> list[Any]:
        """Register hooks that fill ``store`` with the ViT inputs the configured methods need during
        the one vision pass of a prefill; return the hook handles (removed after the prefill).

        ``wanted``: need -> ViT layers (0-based, negative from the end; ``()`` for the needs that name
        no layer), only ``vit_*`` entries of :data:`methods.NEEDS`. Plain needs are stored batched
        over the ViT's items (images; tiles or crops where an image has several): e.g.
        ``vit_cls_attention`` ``[n_items, H, N]``; ``vit_projector`` as is. Layered needs
        (``vit_attention_received``, ``vit_cls_rows``, ``vit_unit_keys``) are stored as
        ``{layer: per-item tensors}`` with the layers as requested. :meth:`vit_image` gives one image's
        rows. A family captures what it can and leaves the rest out (an optional need is then None,
        a required one an error)."""
        raise NotImplementedError(f"{self.name} provides no ViT [CLS] inputs (its vision encoder has no [CLS] token)")

    def vit_image(self, items: Any, img: int, segments: list["_Segment"], dim: int = -1) -> torch.Tensor:
        """Image ``img``'s share of a captured per-item ViT tensor ``items`` (indexable by ViT item),
        in the image's token order along ``dim`` (the token axis of the result). Default: one ViT
        item an image (LLaVA-1.5, Qwen2.5-VL). Families whose images span several items override it
        (InternVL's tiles, concatenated; LLaVA-NeXT's base image and crops, mapped to its LLM tokens)."""
        return items[img]

    def vit_split_cls(self, items: torch.Tensor, img: int, segments: list["_Segment"]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cls [n_cls, ...], patches [N, ...])`` of image ``img`` from a per-item tensor whose token
        axis (first after the item axis) holds [CLS] first (``vit_feature_keys``, ``vit_last_queries``,
        ``vit_last_keys``), the patches in the image's token order. Default: one item an image, one
        [CLS] row."""
        x = items[img]
        return x[:1], x[1:]

    def vit_cls(self, items: torch.Tensor, img: int, segments: list["_Segment"]) -> torch.Tensor:
        """Image ``img``'s rows of a per-item [CLS] tensor (``vit_cls_feature`` ``[items, C]``): ``[C]``
        for one item an image (default); families with several items an image return ``[n_cls, C]``."""
        return items[img]

    def install_vit_merge(self, model: nn.Module, layer: int, apply: Callable[[torch.Tensor], torch.Tensor | None]) -> list[Any]:
        """Hook ``apply`` onto the OUTPUT of ViT layer ``layer`` (0-based) for the one vision pass of
        a prefill, so that every later ViT layer runs on what it returns (``[B, 1 + N', C]``,
        [CLS] first), or on the unchanged output when it returns None; return the hook handles.
        Families whose vision encoder cannot run a merge raise NotImplementedError (the engine then
        skips the merge with a ``vision`` trace note)."""
        raise NotImplementedError(f"{self.name}: ViT-internal token merges are not wired for this vision encoder")

    def install_vit_layer_merge(
        self, model: nn.Module, apply: Callable[[int, int, torch.Tensor, torch.Tensor], torch.Tensor | None]
    ) -> list[Any]:
        """For a :class:`methods.ViTLayerMerge`: in each of the ``n`` ViT layers whose output reaches
        the feature layer, call ``apply(i, n, x, metric)`` between the attention (residual added)
        and the MLP, with ``x`` ``[B, 1 + T, C]`` and ``metric`` ``[B, 1 + T, c]`` (that layer's
        keys, averaged over heads); the MLP and the later layers run on what it returns (or on
        ``x`` when None). Return handles whose ``remove()`` restores the layers. Families whose
        vision encoder cannot run such merges raise NotImplementedError (the merge is then skipped
        with a ``vision`` trace note)."""
        raise NotImplementedError(f"{self.name}: per-layer ViT token merges are not wired for this vision encoder")

    def apply_rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE on ``x`` ``[B, H, L, hd]`` with ``cos``/``sin`` ``[B, L, hd]`` (the families' layout)."""
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin


def vit_layer(layers: Any, index: int) -> nn.Module:
    """``layers[index]`` of a vision tower (0-based, negative from the end), or an error that says
    which layers exist (a method's ViT-layer hyper-parameter set for a deeper tower)."""
    if not -len(layers) <= index < len(layers):
        raise ValueError(
            f"ViT layer {index} does not exist in this {len(layers)}-layer vision tower (valid: 0..{len(layers) - 1} "
            f"or -{len(layers)}..-1): set the method's ViT-layer hyper-parameter in PRUNE_ARGS"
        )
    return layers[index]


@torch.no_grad()
def received_attention(q: torch.Tensor, k: torch.Tensor, scale: float, block: int = 1024) -> torch.Tensor:
    """``[H, n]``: the attention each key receives, ``softmax(q k^T * scale)`` (fp32, over the keys)
    summed over the query rows, for ``q``, ``k`` ``[H, n, hd]`` of one attention chunk (no mask
    inside it). Rows are processed ``block`` at a time, so memory stays ``O(H * block * n)``."""
    out = q.new_zeros(q.shape[0], k.shape[1], dtype=torch.float32)
    for start in range(0, q.shape[1], block):
        scores = (q[:, start : start + block] @ k.transpose(-1, -2)).float() * scale  # [H, b, n]
        out += scores.softmax(dim=-1).sum(dim=1)
    return out


@dataclass(frozen=True)
class ImageLayout:
    """One image's placeholders in the prompt, for :meth:`Family.image_layout`.

    ``n`` visual tokens (the tokens methods see, prune and budget) among ``placeholders`` image
    tokens (default ``n``); ``visual`` ``[n]``: their offsets among the placeholders, ascending
    (None: all). The other placeholders (``markers``: LLaVA-NeXT's row-end newline tokens) are never
    pruned, count in no budget and are not "text after the image" either; ``crops``: the image's crop
    structure, given to methods as ``ctx.crops``."""

    n: int
    grid: tuple[int, int, int] | None = None
    placeholders: int | None = None
    visual: torch.Tensor | None = None
    crops: "methods.Crops | None" = None

    @property
    def span(self) -> int:
        return self.n if self.placeholders is None else self.placeholders


# ----------------------------------------------------------------------------- per-model state
@dataclass
class Event:
    stage: str
    layer: int | None
    method: str
    n_in: int
    n_keep: int
    # The surviving prompt indices, ascending. During the prefill a device tensor of every survivor's
    # id (added tokens' included), read with the others in ONE transfer after it (_resolve_trace).
    kept: list[int] | torch.Tensor
    images: list[tuple[int, int]]
    ms: float | None = None
    merged: int = 0  # tokens a method created (recycled clusters) among the survivors; not in ``kept``
    # ``vision`` events (a ViT-internal merge, cut before the LLM; layer None): which ViT layer
    # was merged, or why the merge was skipped (then n_keep == n_in)
    note: str = ""
    # The method's timer while the prefill runs (read after it: a CUDA timer's read syncs).
    stopwatch: Stopwatch | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "stopwatch"}


@dataclass
class _Segment:
    """One image's visual tokens, tracked through the cuts of a prefill."""

    n_orig: int
    grid: tuple[int, int, int] | None
    # [n_orig + n_added] ids of its tokens in the prompt table: indices in the unpruned prompt,
    # then ids >= n_prompt for the tokens its method added (recycled clusters)
    orig_seq: torch.Tensor
    alive: torch.Tensor  # [n_current] indices into orig_seq of the survivors, in sequence order
    end: int = -1  # prompt index of the image's last placeholder (a visual token, or a marker)
    markers: int = 0  # placeholders that are no visual tokens (never pruned; see ImageLayout)
    marker_seq: torch.Tensor | None = None  # [markers] their prompt indices
    crops: "methods.Crops | None" = None


@dataclass
class _Prefill:
    """The bookkeeping of one prefill, set by the top-level pre-hook, read by the decoder loop."""

    segments: list[_Segment]
    n_prompt: int
    stopwatch: Stopwatch
    # Ids >= n_prompt (tokens added by a method) -> the prompt index whose positions they take: one
    # device tensor per addition (never read back on the host).
    added_source: list[torch.Tensor] = field(default_factory=list)
    input0: tuple[torch.Tensor, torch.Tensor] | None = None  # (hidden [1, L0, D], ids [L0]) entering layer 0
    layer_ids: list[torch.Tensor] = field(default_factory=list)  # per layer: the ids its input (and cache) holds
    layer_visual: list[int] = field(default_factory=list)  # per layer: visual tokens at its input
    alive0: list[int] = field(default_factory=list)  # per image: its tokens at layer 0's input

    @property
    def n_table(self) -> int:
        return self.n_prompt + sum(int(a.numel()) for a in self.added_source)

    def position_source(self, ids: torch.Tensor) -> torch.Tensor:
        """``[L]`` prompt indices whose position ids / rotary embeddings the tokens ``ids`` use."""
        if not self.added_source:
            return ids
        table = torch.cat([torch.arange(self.n_prompt, device=ids.device)] + [a.to(ids.device) for a in self.added_source])
        return table[ids]

    def survivor_ids(self) -> torch.Tensor:
        """``[n]`` every image's surviving ids, ascending (added tokens' last: ids >= n_prompt), on the
        device: an :class:`Event`'s ``kept`` until :func:`_resolve_trace`."""
        return torch.cat([s.orig_seq[s.alive] for s in self.segments]).sort().values

    def alive(self) -> list[int]:
        """Per image, its tokens in the current sequence (added ones included): shapes, no sync."""
        return [int(s.alive.numel()) for s in self.segments]

    def text_start(self, img: int, alive: list[int]) -> int:
        """Where the text after image ``img`` starts in a sequence holding ``alive[j]`` tokens of each
        image ``j``, from host counts (no read of a device value): the prompt tokens up to its last
        placeholder (``end``), less the visual tokens of images ``0..img``, plus those that are left
        (added ones included). That is after its last visual token or, for an image with markers
        (LLaVA-NeXT: its last row's newline token, never pruned), after its last placeholder."""
        segs = self.segments[: img + 1]
        return self.segments[img].end + 1 - sum(s.n_orig for s in segs) + sum(alive[: img + 1])

    def n_text_after(self, img: int, alive: list[int], length: int) -> int:
        """How many of a ``length``-token sequence (holding ``alive[j]`` tokens of each image) are text
        after image ``img``: from its text start to the end, less the later images' tokens and markers."""
        later = range(img + 1, len(self.segments))
        return length - self.text_start(img, alive) - sum(alive[j] + self.segments[j].markers for j in later)

    def visual_ids(self, device: torch.device, markers: bool = False) -> torch.Tensor:
        """``[n_table]`` bool: which ids are visual tokens (any image's, added ones included); with
        ``markers``, the images' markers too (every placeholder)."""
        out = torch.zeros(self.n_table, dtype=torch.bool, device=device)
        for s in self.segments:
            out[s.orig_seq] = True
            if markers and s.marker_seq is not None:
                out[s.marker_seq] = True
        return out


@dataclass
class _Early:
    """``generate`` encodes images before its first forward (transformers 5.x ``mm_encoder_outputs``)
    and drops ``pixel_values`` / ``image_grid_thw`` from that forward's arguments: the encoder
    wrapper keeps them, starts the prefill clock and the ViT capture before the vision pass."""

    kwargs: dict[str, Any]
    stopwatch: Stopwatch


@dataclass
class PruneState:
    family: Family
    config: PruneConfig
    sink: TimingSink | None = None
    generator: torch.Generator = field(default_factory=torch.Generator)
    trace: list[Event] = field(default_factory=list)
    prefill: _Prefill | None = None
    cache_pruned: bool = False
    next_positions: torch.Tensor | None = None  # position ids of the next token, as last passed
    samples: int = 0
    hooks: list[Any] = field(default_factory=list)
    vision: dict[str, Any] = field(default_factory=dict)  # filled by Family.capture_vision during a prefill
    vision_hooks: list[Any] = field(default_factory=list)
    early: "_Early | None" = None  # a vision pass that ran before the first forward (generate)
    original_forward: Callable[..., Any] | None = None
    on_sample: Callable[[dict[str, Any]], None] | None = None
    sample_info: dict[str, Any] = field(default_factory=dict)  # merged into the next record (dataset, images)

    def configure(self, config: PruneConfig, num_layers: int) -> None:
        config = config.for_model(num_layers)  # schedule events at the decoder's middle layer get their layer
        config.validate_for(num_layers, self.family.name)
        for name in config.method_names:
            m = methods.get_method(name)
            m.check_args(config.args_for(name))
        self.config = config
        self.generator = torch.Generator().manual_seed(config.seed)


def get_state(model: nn.Module) -> PruneState | None:
    return getattr(model, "_prune_state", None)


# ----------------------------------------------------------------------------- patch / unpatch
def patch(model: nn.Module, family: Family, config: PruneConfig | None = None, sink: TimingSink | None = None) -> nn.Module:
    """Attach the engine to ``model`` (idempotent) and apply ``config`` (default: no pruning)."""
    _check_transformers()
    state = get_state(model)
    text = family.text_model(model)
    if state is None:
        state = PruneState(family=family, config=PruneConfig())
        state.original_forward = text.forward
        text.forward = types.MethodType(_make_decoder_forward(state), text)
        base = model.model
        base.get_image_features = _make_encoder_wrapper(state, model, base.get_image_features)
        state.hooks = [
            model.register_forward_pre_hook(_make_pre_hook(state), with_kwargs=True),
            model.register_forward_hook(_make_post_hook(state), with_kwargs=True),
        ]
        model._prune_state = state
    state.configure(config or PruneConfig(), len(text.layers))
    if sink is not None:
        state.sink = sink
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Remove everything :func:`patch` added; the model is then the library's again."""
    state = get_state(model)
    if state is None:
        return model
    for h in state.hooks:
        h.remove()
    text = state.family.text_model(model)
    if "forward" in text.__dict__:
        del text.forward
    model.model.__dict__.pop("get_image_features", None)
    del model._prune_state
    model.__dict__.pop("prune_trace", None)
    return model


@contextlib.contextmanager
def pruning(model: nn.Module, config: PruneConfig) -> Iterator[nn.Module]:
    """Run a block with ``config`` on an already patched model; the previous config comes back after."""
    state = get_state(model)
    if state is None:
        raise RuntimeError("pruning() needs a patched model: call custom_<family>.patch(model) first")
    previous = state.config
    state.configure(config, len(state.family.text_model(model).layers))
    try:
        yield model
    finally:
        state.configure(previous, len(state.family.text_model(model).layers))


def _check_transformers() -> None:
    import transformers

    if transformers.__version__ != TESTED_TRANSFORMERS:
        logger.warning(
            "transformers %s: the decoder loop was copied from %s; run the exactness tests before trusting results",
            transformers.__version__,
            TESTED_TRANSFORMERS,
        )


# ----------------------------------------------------------------------------- top-level hooks
def _past_length(cache: Any) -> int:
    return cache.get_seq_length() if cache is not None else 0


def _make_pre_hook(state: PruneState):
    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        cfg = state.config
        if not (cfg.active or cfg.time_prefill):
            return args, kwargs
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        past = kwargs.get("past_key_values")
        if _past_length(past) == 0:
            # A new prompt: forget the last one's cache bookkeeping. Unpruned runs with
            # PREFILL_TIME get the same record (and timing) as pruned ones, for side-by-side ratios.
            state.cache_pruned, state.next_positions, state.prefill = False, None, None
            state.trace = module.prune_trace = []
            early, state.early = state.early, None
            if early is not None:  # generate: the images were encoded already
                kwargs_for_layout = {**early.kwargs, **{k: v for k, v in kwargs.items() if v is not None}}
            else:
                kwargs_for_layout = kwargs
            if input_ids is None:
                if cfg.active and kwargs.get("pixel_values") is not None:
                    raise ValueError("pruning needs input_ids to locate the image tokens (got inputs_embeds only)")
                return args, kwargs
            if cfg.active:
                _check_batch(input_ids.shape[0])
            segments = _find_segments(state, module, input_ids, kwargs_for_layout) if input_ids.shape[0] == 1 else []
            sw = early.stopwatch if early is not None else Stopwatch(input_ids.device, cfg.time_prefill, peak_memory=True).start()
            if early is None and segments and _needs_vit(cfg, state.family.name):
                _start_vision_capture(state, module)
            state.prefill = _Prefill(segments=segments, n_prompt=input_ids.shape[1], stopwatch=sw)
        elif state.cache_pruned and kwargs.get("position_ids") is None:
            # After a pruned prefill the cache is shorter than the prompt, so a model that derives
            # positions from the cache length would restart too early: continue from the unpruned length.
            q = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).shape[1]
            kwargs["position_ids"] = state.next_positions + torch.arange(q, device=state.next_positions.device)
        return args, kwargs

    return pre_hook


def _needs_vit(cfg: PruneConfig, family: str) -> bool:
    return cfg.active and any(
        methods.get_method(m).vit_merge is not None or any(n.startswith("vit_") for n in methods.get_method(m).needs_for(family))
        for m in cfg.method_names
    )


def _vit_wanted(state: PruneState) -> dict[str, tuple[int, ...]]:
    """need -> ViT layers: the ``vit_*`` needs of the configured methods on this family, with the
    layers their ``vit_layers`` name (the union over methods, in first-seen order)."""
    wanted: dict[str, tuple[int, ...]] = {}
    for name in state.config.method_names:
        m = methods.get_method(name)
        layers = m.layers_for(state.family.name, state.config.args_for(name))
        for need in m.needs_for(state.family.name):
            if need.startswith("vit_"):
                wanted[need] = tuple(dict.fromkeys(wanted.get(need, ()) + layers.get(need, ())))
    return wanted


def _vit_merger(cfg: PruneConfig) -> tuple[str, "methods.ViTMerge"] | None:
    """``(method name, its ViTMerge)`` of the configured method that merges inside the ViT, if any."""
    found = [(m, methods.get_method(m).vit_merge) for m in dict.fromkeys(cfg.method_names) if methods.get_method(m).vit_merge is not None]
    if len(found) > 1:
        raise ValueError(f"at most one method may merge inside the ViT, got {[m for m, _ in found]}")
    return found[0] if found else None


def _start_vision_capture(state: PruneState, model: nn.Module) -> None:
    state.vision = {}
    wanted = _vit_wanted(state)
    try:
        state.vision_hooks = state.family.capture_vision(model, state.vision, wanted) if wanted else []
    except NotImplementedError:
        if not set(wanted) <= OPTIONAL_VIT_NEEDS:
            raise
        state.vision_hooks = []  # only optional ViT inputs: the methods get None
    merger = _vit_merger(state.config)
    if merger is None:
        return
    name, merge = merger
    args = {**methods.get_method(name).params, **state.config.args_for(name)}
    if isinstance(merge, methods.ViTLayerMerge):
        _install_layer_merge(state, model, name, merge, args)
        return

    def apply(x: torch.Tensor) -> torch.Tensor | None:
        # Runs inside the ViT: the merged sequence goes on to the next ViT layer; the groups are
        # kept for the encoder wrapper (placeholders) and the ``vision`` event (the cut).
        try:
            merged, groups = merge.fn(x, args)
        except methods.ViTMergeSkipped as e:
            state.vision["vit_merge_note"] = f"ViT merge skipped: {e}"
            return None
        state.vision["vit_merge_groups"] = groups
        state.vision["vit_merge_note"] = f"merged at the output of ViT layer {merge.layer}"
        return merged

    try:
        state.vision_hooks += state.family.install_vit_merge(model, merge.layer, apply)
    except NotImplementedError as e:
        state.vision["vit_merge_note"] = f"ViT merge skipped: {e}"
        if not getattr(state, "_warned_vit_merge", False):
            logger.warning("%s: %s; its other stages run as usual", name, e)
            state._warned_vit_merge = True


def _install_layer_merge(state: PruneState, model: nn.Module, name: str, merge: "methods.ViTLayerMerge", args: dict) -> None:
    """Wire a :class:`methods.ViTLayerMerge` into the family's ViT layers for this vision pass.
    ``state.vision["vit_merge_dest"]`` ``[B, N]`` follows each original patch to its column among
    the merged patches (composed on the device, layer by layer); ``vit_merge_n`` is ``N'``."""
    run: dict[str, Any] = {}

    def apply(i: int, n_layers: int, x: torch.Tensor, metric: torch.Tensor) -> torch.Tensor | None:
        if i == 0:  # a new vision pass: the schedule for this N
            n = x.shape[1] - 1
            run["r"] = tuple(int(r) for r in merge.schedule(n, n_layers, state.config.keep_ratio, args))
            if len(run["r"]) != n_layers:
                raise ValueError(f"{name}: the schedule gave {len(run['r'])} layers, the ViT merges at {n_layers}")
            state.vision["vit_merge_dest"] = torch.arange(n, device=x.device).expand(x.shape[0], n)
            state.vision["vit_merge_n"] = n
            state.vision["vit_merge_note"] = (
                f"merged in ViT layers 0..{n_layers - 1} (tokens removed per layer: {', '.join(map(str, run['r']))})"
            )
        r = run["r"][i]
        if r <= 0:
            return None
        merged, dest = merge.fn(x, metric, r, args)
        # Each original patch's column: its current column (0-based among the patches) mapped through
        # this layer's dest, whose column 0 is [CLS].
        cols = state.vision["vit_merge_dest"]
        state.vision["vit_merge_dest"] = dest[:, 1:].gather(1, cols) - 1
        state.vision["vit_merge_n"] = merged.shape[1] - 1
        return merged

    try:
        state.vision_hooks += state.family.install_vit_layer_merge(model, apply)
    except NotImplementedError as e:
        state.vision["vit_merge_note"] = f"ViT merge skipped: {e}"
        if not getattr(state, "_warned_vit_merge", False):
            logger.warning("%s: %s; its other stages run as usual", name, e)
            state._warned_vit_merge = True


def _expand_vit_merge(state: PruneState, out: Any) -> Any:
    """After a ViT merge (``state.vision["vit_merge_groups"]``, or ``vit_merge_dest`` for a per-layer
    merge): ``out.pooler_output`` holds ``N'`` projected tokens an image, but the prompt has one
    placeholder per original patch, and the model checks the counts. Give back ``N`` rows an
    image, each patch's row being its group's merged token (only the group's slot, its last
    patch, survives the ``vision`` cut), and keep
    what the cut and the ViT needs read: ``vit_merge_features`` (per image ``[N', D]``) and
    ``vit_merge_cols`` (per image ``[N]``: each patch's column in the merged ViT sequence)."""
    groups, dest = state.vision.get("vit_merge_groups"), state.vision.get("vit_merge_dest")
    if (groups is None and dest is None) or "vit_merge_cols" in state.vision:
        return out
    if not hasattr(out, "pooler_output"):
        raise TypeError("a ViT merge needs get_image_features to return a ModelOutput (return_dict=True)")
    feats = list(out.pooler_output)
    n_merged = len(groups) if groups is not None else dest.shape[0]
    if len(feats) != n_merged:
        raise ValueError(f"{len(feats)} images of features but {n_merged} merged images")
    cols = []
    if dest is not None:  # a per-layer merge: the columns were composed on the device
        for f, col in zip(feats, dest):
            if f.shape[0] != state.vision["vit_merge_n"]:
                raise ValueError(f"{f.shape[0]} projected tokens for {state.vision['vit_merge_n']} merged tokens")
            cols.append(col.to(f.device))
    for f, g in zip(feats, groups or ()):
        if f.shape[0] != len(g):
            raise ValueError(f"{f.shape[0]} projected tokens for {len(g)} merged groups")
        # The groups are host lists: flatten them on the host, then ONE scatter (not one op a group).
        members = [m for members in g for m in members]
        group = [j for j, members in enumerate(g) for _ in members]
        col = torch.empty(len(members), dtype=torch.long)
        col[torch.tensor(members, dtype=torch.long)] = torch.tensor(group, dtype=torch.long)
        cols.append(col.to(f.device))
    state.vision["vit_merge_features"], state.vision["vit_merge_cols"] = feats, cols
    out.pooler_output = [f[c] for f, c in zip(feats, cols)]
    return out


# ViT inputs a method may be given as None where the family cannot capture them (see methods.NEEDS).
OPTIONAL_VIT_NEEDS = frozenset({"vit_last_cls_attention"})
# ViT inputs stored per requested layer ({layer: per-item tensors}; see Family.capture_vision).
LAYERED_VIT_NEEDS = frozenset({"vit_attention_received", "vit_cls_rows", "vit_unit_keys"})


def _make_encoder_wrapper(state: PruneState, model: nn.Module, original: Callable[..., Any]):
    """Wraps the base model's ``get_image_features`` (instance attribute): when it runs outside a
    forward (``generate`` encodes images first), start the prefill clock and the ViT capture now and
    keep the image arguments for the layout. ``functools.wraps`` keeps the signature, which
    ``generate`` inspects to choose the encoder's arguments."""

    @functools.wraps(original)
    def get_image_features(*args: Any, **kwargs: Any) -> Any:
        cfg = state.config
        if state.prefill is None and (cfg.active or cfg.time_prefill):
            pixels = kwargs.get("pixel_values", args[0] if args else None)
            device = pixels.device if isinstance(pixels, torch.Tensor) else None
            state.early = _Early(kwargs=dict(kwargs), stopwatch=Stopwatch(device, cfg.time_prefill, peak_memory=True).start())
            if _needs_vit(cfg, state.family.name):
                _start_vision_capture(state, model)
        return _expand_vit_merge(state, original(*args, **kwargs))

    return get_image_features


def _make_post_hook(state: PruneState):
    def post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        prefill, state.prefill = state.prefill, None
        for h in state.vision_hooks:
            h.remove()
        state.vision_hooks, state.vision = [], {}
        if prefill is None:
            return output
        state.samples += 1
        prefill.stopwatch.stop()
        starts = _resolve_trace(state.trace, prefill)  # after the prefill's clock
        ms = prefill.stopwatch.ms
        n_visual = sum(s.n_orig for s in prefill.segments)
        cache = getattr(output, "past_key_values", None)
        record = {
            "sample": state.samples,
            **state.sample_info,
            "prefill_ms": ms,
            "n_prompt": prefill.n_prompt,
            "n_visual": n_visual,
            "n_visual_final": sum(prefill.alive()),
            # Visual tokens at each decoder layer's input, and their mean over the layers (the
            # "average kept tokens" of methods whose count changes with depth; recycled included).
            "visual_per_layer": list(prefill.layer_visual),
            "avg_visual": sum(prefill.layer_visual) / len(prefill.layer_visual) if prefill.layer_visual else n_visual,
            # Where each image sits in the unpruned prompt, and its token grid (overlays); images
            # with markers (LLaVA-NeXT's newline tokens, never pruned) say how many.
            "image_spans": [
                {"start": start, "n": s.n_orig, "grid": list(s.grid) if s.grid else None,
                 **({"markers": s.markers} if s.markers else {})}
                for s, start in zip(prefill.segments, starts)
            ],
            "kv_cache_bytes": _cache_bytes(cache),
            "peak_memory_bytes": _peak_memory(prefill.stopwatch),
            "events": [e.as_dict() for e in state.trace],
        }
        state.sample_info = {}
        if state.sink is not None:
            state.sink.write_sample(record, state.config)
        if state.on_sample is not None:
            state.on_sample(record)
        return output

    return post_hook


def _cache_bytes(cache: Any) -> int | None:
    """Bytes held by a DynamicCache after the prefill (every layer's keys and values)."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return None
    return sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values) if t is not None)


def _peak_memory(stopwatch: Stopwatch) -> int | None:
    """Peak CUDA memory since the prefill started (None on CPU)."""
    return int(torch.cuda.max_memory_allocated()) if stopwatch.cuda else None


def _check_batch(batch: int) -> None:
    if batch != 1:
        raise ValueError(
            f"token pruning runs one prompt at a time (batch size 1, the UniPruneBench protocol); got a batch of {batch}"
        )


def _find_segments(state: PruneState, model: nn.Module, input_ids: torch.Tensor, kwargs: Mapping[str, Any]) -> list[_Segment]:
    is_image = input_ids[0] == state.family.image_token_id(model)
    where = torch.nonzero(is_image).flatten()
    if where.numel() == 0:
        return []
    layout = state.family.image_layout(model, kwargs)
    if not layout:  # unknown: every run of consecutive image tokens is an image
        breaks = torch.nonzero(where[1:] != where[:-1] + 1).flatten() + 1
        sizes = torch.diff(torch.cat([where.new_tensor([0]), breaks, where.new_tensor([where.numel()])])).tolist()
        layout = [(n, None) for n in sizes]
    layout = [e if isinstance(e, ImageLayout) else ImageLayout(*e) for e in layout]
    if sum(e.span for e in layout) != where.numel():
        raise ValueError(
            f"{where.numel()} image tokens in the prompt but the images account for {sum(e.span for e in layout)}"
        )
    ends = where[torch.tensor([e.span for e in layout]).cumsum(0).to(where.device) - 1].tolist()  # one sync
    segments, start = [], 0
    for e, end in zip(layout, ends):
        span = where[start : start + e.span]
        seq, marker_seq = span, None
        if e.visual is not None:  # the offsets are the family's (CPU): no device sync
            is_marker = torch.ones(e.span, dtype=torch.bool)
            is_marker[e.visual.cpu()] = False
            offsets = _true_indices(is_marker, e.span - e.n)
            seq = span.index_select(0, e.visual.to(span.device))
            marker_seq = span.index_select(0, offsets.to(span.device))
        crops = e.crops.to(seq.device) if e.crops is not None else None
        segments.append(_Segment(n_orig=e.n, grid=e.grid, orig_seq=seq, alive=torch.arange(e.n, device=seq.device),
                                 end=end, markers=e.span - e.n, marker_seq=marker_seq, crops=crops))
        start += e.span
    return segments


# ----------------------------------------------------------------------------- the decoder loop
def _make_decoder_forward(state: PruneState):
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> BaseModelOutputWithPast:
        prunes_now = state.prefill is not None and bool(state.prefill.segments)
        if not state.config.active or not (prunes_now or state.cache_pruned):
            return state.original_forward(*args, **kwargs)
        return _decoder_forward(self, state, *args, **kwargs)

    return forward


def _decoder_forward(
    text: nn.Module,
    state: PruneState,
    input_ids: torch.LongTensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    past_key_values: Any = None,
    inputs_embeds: torch.Tensor | None = None,
    use_cache: bool | None = None,
    **kwargs: Any,
) -> BaseModelOutputWithPast:
    """The decoder forward with pruning.

    Copied from ``Qwen2_5_VLTextModel.forward`` / ``LlamaModel.forward`` / ``Qwen2Model.forward``
    (transformers 5.23.0; identical apart from position handling, which :meth:`Family.positions`
    carries) with these modifications, each fenced ``# ---- change ---- / # ---- end ----``:
      1. batch 1 without padding only; masks are built per layer from that layer's cache length;
      2. pre-LLM pruning before layer 0 and intra-LLM pruning at the input of configured layers,
         cutting hidden states, rotary embeddings and position ids together;
      3. the position ids of the next token are remembered for decoding after a pruned prefill,
         and methods registered with ``trim_cache`` trim the caches (:func:`_trim_caches`).
    Besides, before layer 0 a method registered with ``vit_merge`` gets a ``vision`` event (the
    cut of the placeholders its ViT merge removed), part of change 2.
    """
    if (input_ids is None) ^ (inputs_embeds is not None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if inputs_embeds is None:
        inputs_embeds = text.embed_tokens(input_ids)
    if use_cache and past_key_values is None:
        past_key_values = DynamicCache(config=text.config)

    # ---- change 1: batch 1, no padding, no sliding window, no captured outputs ----
    _check_batch(inputs_embeds.shape[0])
    if isinstance(attention_mask, dict) or (attention_mask is not None and attention_mask.dim() != 2):
        raise ValueError("pruning builds its own masks: pass a 2-D attention mask (or none)")
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("pruning does not support padded prompts (batch size 1 needs no padding)")
    if _sliding_window(text.config):
        raise NotImplementedError(
            "pruning does not support sliding-window attention layers (a Mistral decoder with sliding_window set; "
            "LLaVA-NeXT-Mistral's checkpoint has none)"
        )
    for flag in ("output_attentions", "output_hidden_states"):
        if kwargs.pop(flag, False):
            raise ValueError(f"{flag} is not available while pruning (sequence lengths differ between layers)")
    # ---- end ----

    past_len = _past_length(past_key_values)
    rope_pos, layer_pos = state.family.positions(text, position_ids, inputs_embeds, past_len)
    hidden = inputs_embeds
    cos, sin = text.rotary_emb(hidden, rope_pos)

    # ---- change 2: the pruning schedule of this forward (only a prefill with images prunes) ----
    prefill = state.prefill if state.prefill is not None and state.prefill.segments else None
    plan: dict[int, list[tuple[str, float | None, str]]] = {}
    if prefill is not None:
        if past_len:
            raise NotImplementedError("pruning a prompt that continues an existing cache is not supported")
        cfg = state.config
        merger = _vit_merger(cfg)
        if merger is not None and "vit_merge_note" in state.vision:  # the ViT merge ran (or was skipped)
            plan.setdefault(0, []).append(("vision", None, merger[0]))
        if cfg.pre_method:
            plan.setdefault(0, []).append(("pre_llm", cfg.keep_ratio, cfg.pre_method))
        for spec in cfg.intra:
            plan.setdefault(spec.layer, []).append(("intra_llm", spec.ratio, spec.method))
        seq_index = torch.arange(hidden.shape[1], device=hidden.device)  # [L'] -> id in the prompt table
        # Positions of the unpruned prompt: every cut selects from these by the tokens' ids.
        full_pos = (cos, sin, rope_pos, layer_pos)
    prev_input: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    # ---- end ----

    impl = text.config._attn_implementation
    for i, layer in enumerate(text.layers[: text.config.num_hidden_layers]):
        # ---- change 2 (cont.): cut at this layer's input ----
        for stage, ratio, name in plan.get(i, ()):
            cut = _prune_step(state, text, prefill, seq_index, hidden, cos, sin, prev_input, stage, i, ratio, name)
            if cut is not None:
                seq_index, hidden = cut
                src = prefill.position_source(seq_index)  # added tokens take their image's last position
                cos, sin = full_pos[0].index_select(-2, src), full_pos[1].index_select(-2, src)
                rope_pos = full_pos[2].index_select(-1, src)
                layer_pos = full_pos[3].index_select(-1, src) if full_pos[3] is not None else None
        if prefill is not None:
            prev_input = (hidden, cos, sin)
            if i == 0:
                prefill.input0, prefill.alive0 = (hidden, seq_index), prefill.alive()
            prefill.layer_ids.append(seq_index)
            prefill.layer_visual.append(sum(prefill.alive()))
        # ---- end ----
        # ---- change 1 (cont.): this layer's mask from its own cache length ----
        q_len = hidden.shape[1]
        kv_len = q_len + (past_key_values.get_seq_length(i) if past_key_values is not None else 0)
        mask = _causal_mask(q_len, kv_len, impl, hidden)
        # ---- end ----
        hidden = layer(
            hidden,
            attention_mask=mask,
            position_embeddings=(cos, sin),
            position_ids=layer_pos,
            past_key_values=past_key_values,
            use_cache=use_cache,
            **kwargs,
        )

    hidden = text.norm(hidden)

    # ---- change 3: remember where decoding continues (and trim caches for methods that ask) ----
    if prefill is not None:
        state.cache_pruned = True
        if use_cache and past_key_values is not None:
            _trim_caches(state, prefill, past_key_values, seq_index)
    # In the format this forward received (the top-level model passes it through unchanged).
    state.next_positions = (position_ids if position_ids is not None else rope_pos)[..., -1:] + 1
    # ---- end ----
    return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=past_key_values)


def _sliding_window(config: Any) -> bool:
    """Whether the decoder attends within a sliding window: its ``layer_types`` say so (Qwen2,
    Gemma), or, for decoders without ``layer_types`` (Mistral), ``sliding_window`` is set."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return "sliding_attention" in layer_types
    return getattr(config, "sliding_window", None) is not None


def _causal_mask(q_len: int, kv_len: int, impl: str, like: torch.Tensor) -> torch.Tensor | None:
    """The mask of ``q_len`` queries that end a ``kv_len``-long (per-layer) key sequence.

    ``None`` where the kernel's own causal flag is exact: sdpa / flash with ``q_len == kv_len``
    (no cache yet) and any implementation for a single query (it sees every cached key).
    """
    if q_len == 1 or (q_len == kv_len and impl != "eager"):
        return None
    allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=like.device).tril(kv_len - q_len)
    if impl == "eager":
        mask = torch.zeros(q_len, kv_len, dtype=like.dtype, device=like.device)
        return mask.masked_fill(~allowed, torch.finfo(like.dtype).min)[None, None]
    if impl == "sdpa":
        return allowed[None, None]
    raise NotImplementedError(f"pruning with attn_implementation={impl!r} needs q_len == kv_len or a single query")


# ----------------------------------------------------------------------------- one pruning event
def _prune_step(
    state: PruneState,
    text: nn.Module,
    prefill: _Prefill,
    seq_index: torch.Tensor,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    prev_input: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    stage: str,
    layer: int,
    ratio: float | None,
    name: str,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Run ``name`` on every image; returns ``(ids of the new sequence [L'], hidden [1, L', D])``
    (ids into the prompt table, see :class:`_Prefill`) or None when nothing changes."""
    method = methods.get_method(name)
    args = state.config.args_for(name)
    if stage == "vision":  # a ViT-internal merge: cut to its groups' slots (see methods.ViTMerge)
        if "vit_merge_cols" not in state.vision:  # skipped: the trace says why, nothing is cut
            n = prefill.alive()
            state.trace.append(Event(stage, None, name, sum(n), sum(n), prefill.survivor_ids(), [(k, k) for k in n], note=state.vision["vit_merge_note"]))
            return None
        cols, feats = state.vision["vit_merge_cols"], state.vision["vit_merge_features"]

        def select(ctx: methods.PruneContext, keep: int) -> methods.Selection:
            # Each group's slot is its last patch (the largest patch index in its column of
            # ``cols``); ctx rows are the image's tokens (none cut yet).
            col = cols[ctx.image_index]  # [N] each patch's merged column
            device = col.device
            row = torch.full((ctx.n_orig,), -1, dtype=torch.long, device=device)
            row[ctx.token_index.to(device)] = torch.arange(ctx.n, device=device)
            slots = torch.full((feats[ctx.image_index].shape[0],), -1, dtype=torch.long, device=device)
            slots = slots.scatter_reduce(0, col, torch.arange(col.numel(), device=device), reduce="amax")
            if bool((row[slots] < 0).any()):
                raise RuntimeError("the vision cut must come before any other cut of the image")
            return methods.Selection(row[slots], feats[ctx.image_index])

    # Where each image's survivors sit in the current sequence.
    pos_in_seq = torch.full((prefill.n_table,), -1, dtype=torch.long, device=hidden.device)
    pos_in_seq[seq_index] = torch.arange(len(seq_index), device=hidden.device)
    local = [pos_in_seq[s.orig_seq[s.alive]] for s in prefill.segments]
    if ratio is None:  # the method decides its own count (VTW): it gets the current count as keep
        budgets = [int(s.alive.numel()) for s in prefill.segments]
        if not any(budgets):
            return None
    else:
        budgets = [min(int(s.alive.numel()), methods.budget(s.n_orig, ratio)) for s in prefill.segments]
        if all(k == s.alive.numel() for k, s in zip(budgets, prefill.segments)):
            return None  # nothing to cut (ratio 1, or the survivors already fit)

    sw = Stopwatch(hidden.device, state.config.time_method).start()
    needs = method.needs_for(state.family.name, stage)
    shared = {} if stage == "vision" else _compute_needs(needs, state, text, layer, hidden, cos, sin, prev_input, seq_index)
    keep_seq = torch.ones(hidden.shape[1], dtype=torch.bool, device=hidden.device)
    n_left = hidden.shape[1]  # True entries of keep_seq, counted on the host (the method's k is a shape)
    new_hidden = hidden
    images = []
    inserts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (after: 0-d sequence index, ids [c], features [c, D])
    for img, (seg, idx, keep) in enumerate(zip(prefill.segments, local, budgets)):
        n = int(idx.numel())
        if n == 0 or (ratio is not None and keep >= n):
            images.append((n, n))
            continue
        extras = {k: v(idx, img, seg) if callable(v) else v for k, v in shared.items()}
        ctx = methods.PruneContext(
            features=hidden[0, idx],
            stage=stage,
            layer=layer if stage == "intra_llm" else None,
            positions=prefill.position_source(seq_index[idx]),
            token_index=seg.alive,
            n_orig=seg.n_orig,
            grid=seg.grid,
            image_index=img,
            generator=state.generator,
            extras=extras,
            family=state.family.name,
            ratio=ratio,
            crops=seg.crops,
        )
        out = select(ctx, keep) if stage == "vision" else method.fn(ctx, keep, **args)
        kept, merged, added = methods.check_output(method, out, n, keep)
        kept = kept.to(idx.device)
        rows = idx[kept]  # [k] sequence indices of the kept tokens
        if merged is not None:
            if new_hidden is hidden:
                new_hidden = hidden.clone()
            new_hidden[0, rows] = merged.to(hidden.dtype)
        # Drop the image's tokens, then take its kept ones back: index writes, no boolean mask (sync).
        keep_seq[idx] = False
        keep_seq[rows] = True
        n_left -= n - int(kept.numel())
        seg.alive = seg.alive[kept]
        c = 0 if added is None else int(added.shape[0])
        if c:
            # New tokens: ids after the table's end, inserted after the image's last kept token
            # (or where its first token was, if none is kept), positioned as its last original token.
            ids = torch.arange(prefill.n_table, prefill.n_table + c, device=idx.device)
            prefill.added_source.append(seg.orig_seq[seg.n_orig - 1].expand(c))
            after = rows.max() if kept.numel() else idx.min() - 1  # 0-d, stays on the device
            inserts.append((after, ids, added.to(hidden.dtype)))
            seg.alive = torch.cat([seg.alive, torch.arange(len(seg.orig_seq), len(seg.orig_seq) + c, device=idx.device)])
            seg.orig_seq = torch.cat([seg.orig_seq, ids])
        images.append((n, int(kept.numel()) + c))
    sw.stop()

    kept_seq = _true_indices(keep_seq, n_left)
    new_ids, new_hidden = seq_index[kept_seq], new_hidden.index_select(1, kept_seq)
    if inserts:
        # Order: each kept token at its old sequence index, inserted tokens just after theirs.
        order = [kept_seq.double()] + [after + torch.arange(1, len(ids) + 1, device=ids.device).double() / (len(ids) + 1) for after, ids, _ in inserts]
        perm = torch.argsort(torch.cat(order))
        new_ids = torch.cat([new_ids] + [ids for _, ids, _ in inserts])[perm]
        new_hidden = torch.cat([new_hidden] + [f[None] for _, _, f in inserts], dim=1)[:, perm]
    state.trace.append(
        Event(
            stage=stage,
            layer=layer if stage == "intra_llm" else None,
            method=name,
            n_in=sum(n for n, _ in images),
            n_keep=sum(k for _, k in images),
            kept=prefill.survivor_ids(),  # kept, merged and ms are read after the prefill (_resolve_trace)
            images=images,
            stopwatch=sw,
            note=state.vision.get("vit_merge_note", "") if stage == "vision" else "",
        )
    )
    return new_ids, new_hidden


def _trim_caches(state: PruneState, prefill: _Prefill, cache: Any, final_ids: torch.Tensor) -> None:
    """MustDrop's cache policy, for methods registered with ``trim_cache``: after the prefill, the
    caches of every layer from (the method's first event layer - 1) on keep only the tokens of the
    final sequence ``final_ids`` (the layers before keep all theirs). Recorded as a
    ``post_prefill`` event."""
    firsts = [s.layer for s in state.config.intra if methods.get_method(s.method).trim_cache]
    if not firsts or not any(e.stage == "intra_llm" for e in state.trace):
        return
    start = max(min(firsts) - 1, 0)
    final = torch.zeros(prefill.n_table, dtype=torch.bool, device=final_ids.device)
    final[final_ids] = True
    visual = prefill.visual_ids(final_ids.device)
    layer_ids = prefill.layer_ids[start:]
    if not layer_ids:
        return
    # Per layer, how many of its tokens stay, its visual tokens and those that stay: ONE read for all
    # layers (the cut sizes and the event's counts).
    stay = [final[ids] for ids in layer_ids]
    counts = torch.stack([torch.stack([f.sum(), visual[ids].sum(), (f & visual[ids]).sum()]) for f, ids in zip(stay, layer_ids)])
    n_in = n_keep = 0
    for j, (f, ids, (n_stay, n_vis, n_vis_stay)) in enumerate(zip(stay, layer_ids, counts.tolist()), start=start):
        if n_stay == ids.numel():
            continue
        sel = _true_indices(f, n_stay)
        layer_cache = cache.layers[j]
        layer_cache.keys = layer_cache.keys.index_select(-2, sel)
        layer_cache.values = layer_cache.values.index_select(-2, sel)
        n_in, n_keep = max(n_in, n_vis), n_vis_stay
    if n_in:
        n = prefill.alive()
        state.trace.append(
            Event(
                stage="post_prefill",
                layer=start,
                method=",".join(dict.fromkeys(s.method for s in state.config.intra if methods.get_method(s.method).trim_cache)),
                n_in=n_in,
                n_keep=n_keep,
                kept=prefill.survivor_ids(),
                images=[(k, k) for k in n],
            )
        )


def _true_indices(mask: torch.Tensor, count: int) -> torch.Tensor:
    """``[count]``: the ascending indices of the True entries of the 1-D ``mask``, whose number the
    caller knows on the host. What ``torch.nonzero(mask).flatten()`` gives, without its read of the
    count (a host sync): each True entry is scattered to its rank (cumsum), the others to a spare slot."""
    rank = torch.where(mask, mask.long().cumsum(0) - 1, count)
    out = torch.empty(count + 1, dtype=torch.long, device=mask.device)
    return out.scatter_(0, rank, torch.arange(mask.numel(), device=mask.device))[:count]


def _resolve_trace(trace: list[Event], prefill: _Prefill) -> list[int]:
    """After the prefill: the events' pending ``kept`` (device tensors of survivor ids) become lists
    of prompt indices, ``merged`` their survivors that methods created, ``ms`` their timers' reads;
    returns the images' start indices (for the record). Everything comes over in ONE device-to-host
    transfer (the one host sync of the record)."""
    pending = [e for e in trace if isinstance(e.kept, torch.Tensor)]
    parts = [e.kept for e in pending] + [s.orig_seq[:1] for s in prefill.segments]
    values = torch.cat([p.to(parts[0].device) for p in parts]).tolist() if parts else []
    at = 0
    for e in pending:
        ids, at = values[at : at + e.kept.numel()], at + e.kept.numel()
        e.kept = [p for p in ids if p < prefill.n_prompt]  # ascending; added tokens' ids come last
        e.merged = e.n_keep - len(e.kept)
    for e in trace:
        if e.stopwatch is not None:
            e.ms, e.stopwatch = e.stopwatch.ms, None
    return values[at:]


# ----------------------------------------------------------------------------- method inputs
def _compute_needs(
    needs: tuple[str, ...],
    state: PruneState,
    text: nn.Module,
    layer: int,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    prev_input: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    seq_index: torch.Tensor | None = None,
) -> dict[str, Any]:
    """The inputs ``needs`` asks for; per-image ones are callables of ``(sequence indices, image
    index, segment)`` of that image. ``seq_index`` ``[L]``: the current tokens' ids (see
    :class:`_Prefill`)."""
    out: dict[str, Any] = {}
    full_attention: torch.Tensor | None = None
    family, segments = state.family, state.prefill.segments if state.prefill is not None else []
    # Where the text after each image starts in the current sequence, counted on the host before
    # this event cuts anything (no sync; see _Prefill.text_start).
    alive = state.prefill.alive() if state.prefill is not None else []
    starts = [state.prefill.text_start(i, alive) for i in range(len(segments))]

    def text_start(idx: torch.Tensor, img: int) -> int:
        return starts[img]

    for need in needs:
        if need.startswith(("last_query_attention_prev", "prev_")) and prev_input is None:
            raise ValueError(f"{need} needs a previous layer (prune at layer >= 1)")
        if need in OPTIONAL_VIT_NEEDS:
            # Per image, columns of the survivors; None where the family captured nothing.
            v = state.vision.get(need)
            out[need] = None if v is None else (
                lambda idx, img, seg, v=v: family.vit_image(v, img, segments, -1)[:, _vit_cols(state, img, seg)]
            )
            continue
        if need == "instruction_text":
            text = state.sample_info.get("text")
            if not isinstance(text, str):
                raise ValueError(
                    "instruction_text: this method reads the prompt's question, but no text was given: set "
                    "model._prune_state.sample_info['text'] before generate (the VLMEvalKit adapter sets it "
                    "to the message's text parts joined with newlines)"
                )
            out[need] = text
            continue
        if need == "n_vit_tokens":
            cols = state.vision.get("vit_merge_cols")
            # After a ViT merge, the image's merged tokens (each holds at least one of its patches, so
            # this is max(cols[img]) + 1): a shape, not a read of the columns.
            feats = state.vision.get("vit_merge_features")
            out[need] = lambda idx, img, seg, c=cols, f=feats: seg.n_orig if c is None else int(f[img].shape[0])
            continue
        if need in ("input_visual", "input_text_only", "prev_attention_text_only"):
            prefill = state.prefill
            visual = prefill.visual_ids(hidden.device, markers=True)  # no image's placeholder is text
            h0, ids0, alive0 = (*prefill.input0, prefill.alive0) if prefill.input0 is not None else (hidden, seq_index, alive)

            def text_rows(ids: torch.Tensor, img: int, seg: _Segment, counts: list[int], visual: torch.Tensor = visual) -> torch.Tensor:
                # Rows of ``ids`` that are text after this image: no image's token (nor marker), later
                # in the prompt; as many as the host counts say (no nonzero).
                return _true_indices(~visual[ids] & (ids > seg.end), prefill.n_text_after(img, counts, ids.numel()))

            if need == "input_visual":  # the rows of ids0 that are this image's (alive0[img] of them)
                out[need] = lambda idx, img, seg, h=h0, ids=ids0: h[0, _true_indices(torch.isin(ids, seg.orig_seq), alive0[img])]
            elif need == "input_text_only":
                out[need] = lambda idx, img, seg, h=h0, ids=ids0: h[0, text_rows(ids, img, seg, alive0)]
            else:
                if full_attention is None:
                    full_attention = attention_probs(state.family, text.layers[layer - 1], *prev_input)
                out[need] = lambda idx, img, seg, a=full_attention: a[:, text_rows(seq_index, img, seg, alive)][:, :, idx]
            continue
        if need == "last_query_attention_prev":
            attn = last_query_attention(state.family, text.layers[layer - 1], *prev_input)
            out[need] = lambda idx, *_, a=attn: a[:, idx]
        elif need == "last_query_attention_self":
            attn = last_query_attention(state.family, text.layers[layer], hidden, cos, sin)
            out[need] = lambda idx, *_, a=attn: a[:, idx]
        elif need == "last_query_attention_self_norope":
            attn = last_query_attention(state.family, text.layers[layer], hidden, cos, sin, rope=False)
            out[need] = lambda idx, *_, a=attn: a[:, idx]
        elif need in LAYERED_VIT_NEEDS:
            if need not in state.vision:
                raise RuntimeError(f"{need} was not captured during the vision pass")
            # Per image: {layer: its rows}, at the survivors' columns ([H, N]) or rows ([N, hd]).
            def layered(idx, img, seg, v=state.vision[need], dim=0 if need == "vit_unit_keys" else -1):
                cols, rows = _vit_cols(state, img, seg), {}
                for l, items in v.items():
                    x = state.family.vit_image(items, img, state.prefill.segments, dim)
                    rows[l] = x.index_select(dim, cols.to(x.device))
                return rows

            out[need] = layered
        elif need in ("prev_keys", "prev_text_keys"):
            keys = layer_keys(state.family, text.layers[layer - 1], *prev_input)[0]  # [L, KV*hd]
            out[need] = (lambda idx, *_, k=keys: k[idx]) if need == "prev_keys" else (lambda idx, img, seg, k=keys: k[text_start(idx, img) :])
        elif need in ("prev_attention_visual", "prev_attention_text"):
            if full_attention is None:  # shared by the two needs
                full_attention = attention_probs(state.family, text.layers[layer - 1], *prev_input)
            attn = full_attention  # [H, L, L]
            if need == "prev_attention_visual":
                out[need] = lambda idx, *_, a=attn: a[:, idx][:, :, idx]
            else:
                out[need] = lambda idx, img, seg, a=attn: a[:, text_start(idx, img) :][:, :, idx]
        elif need == "final_normed_features":
            out[need] = lambda idx, *_, h=hidden: text.norm(h[0, idx])
        elif need == "final_normed_text":
            out[need] = lambda idx, img, seg, h=hidden: text.norm(h[0, text_start(idx, img) :])
        elif need == "sequence_index":
            out[need] = lambda idx, *_: idx
        elif need in (
            "vit_cls_attention", "vit_features", "vit_cls_feature", "vit_feature_keys", "vit_last_queries",
            "vit_last_keys", "vit_projector", "vit_post_layernorm",
        ):
            if need not in state.vision:
                raise RuntimeError(f"{need} was not captured during the vision pass")
            # Per image, the survivors (pre-LLM runs first, so all of them): rows of [N, C],
            # columns of [H, N]; [1 + N, .] tensors keep their [CLS] row(s) first. The family maps
            # its ViT items to the image's tokens (Family.vit_image / vit_split_cls / vit_cls).
            v = state.vision[need]
            if need == "vit_features":
                out[need] = lambda idx, img, seg, v=v: family.vit_image(v, img, segments, 0)[_vit_cols(state, img, seg)]
            elif need == "vit_cls_attention":
                out[need] = lambda idx, img, seg, v=v: family.vit_image(v, img, segments, -1)[:, _vit_cols(state, img, seg)]
            elif need == "vit_cls_feature":
                out[need] = lambda idx, img, seg, v=v: family.vit_cls(v, img, segments)
            elif need in ("vit_projector", "vit_post_layernorm"):
                out[need] = lambda *_, p=v: p  # a callable itself: not evaluated per image
            else:
                def with_cls(idx, img, seg, v=v):
                    cls, patches = family.vit_split_cls(v, img, segments)
                    return torch.cat([cls, patches[_vit_cols(state, img, seg).to(patches.device)]])

                out[need] = with_cls
        elif need == "text_features":
            # "Text" is every token after the image (question + assistant prefix), as in METHODS.md.
            out[need] = lambda idx, img, seg, h=hidden: h[0, text_start(idx, img) :]
        else:  # registry validation makes this unreachable
            raise KeyError(need)
    return out


def _vit_cols(state: PruneState, img: int, seg: _Segment) -> torch.Tensor:
    """Where image ``img``'s survivors sit among the ViT's patch tokens (columns of the captured
    ``vit_*`` tensors): their token indices, or after a ViT merge their groups' columns."""
    cols = state.vision.get("vit_merge_cols")
    return seg.alive if cols is None else cols[img][seg.alive]


@torch.no_grad()
def attention_probs(family: Family, layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``[H, L, L]``: ``layer``'s causal softmax attention probabilities (fp32) for its input
    ``hidden`` ``[1, L, D]``, from its own q/k and RoPE: what eager attention returns, without an
    eager pass of the layer. O(L^2) memory: only for methods that need whole rows (FitPrune)."""
    attn = layer.self_attn
    hd, n = attn.head_dim, hidden.shape[1]
    x = layer.input_layernorm(hidden)
    q = family.apply_rotary(attn.q_proj(x).view(1, n, -1, hd).transpose(1, 2), cos, sin)  # [1, H, L, hd]
    k = layer_keys(family, layer, hidden, cos, sin).view(1, n, -1, hd).transpose(1, 2)  # [1, KV, L, hd]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)).float()[0] * attn.scaling  # [H, L, L]
    future = torch.ones(n, n, dtype=torch.bool, device=hidden.device).triu(1)
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1)


@torch.no_grad()
def layer_keys(family: Family, layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``[1, L, KV*hd]``: ``layer``'s keys for its input ``hidden`` ``[1, L, D]`` (input_layernorm,
    k_proj, RoPE), heads flattened: what the layer writes to its KV cache."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    k = attn.k_proj(x).view(1, x.shape[1], -1, attn.head_dim).transpose(1, 2)  # [1, KV, L, hd]
    return family.apply_rotary(k, cos, sin).transpose(1, 2).flatten(2)


@torch.no_grad()
def last_query_attention(
    family: Family, layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope: bool = True
) -> torch.Tensor:
    """``[H, L]``: softmax attention of the last token over all ``L`` tokens, from ``layer``'s own
    ``input_layernorm``, ``q_proj``/``k_proj`` and RoPE: the last row of the attention
    probabilities eager attention would return for that layer. ``hidden`` is ``[1, L, D]``, the
    layer's input. ``rope=False``: q and k without the rotary embedding (VScan's Qwen scoring).
    """
    attn = layer.self_attn
    hd = attn.head_dim
    x = layer.input_layernorm(hidden[:, -1:])
    q = attn.q_proj(x).view(1, 1, -1, hd).transpose(1, 2)  # [1, H, 1, hd]
    if rope:
        q = family.apply_rotary(q, cos[:, -1:], sin[:, -1:])
        k = layer_keys(family, layer, hidden, cos, sin)
    else:
        k = attn.k_proj(layer.input_layernorm(hidden))
    k = k.view(1, hidden.shape[1], -1, hd).transpose(1, 2)  # [1, KV, L, hd]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # GQA: each KV head serves a group
    scores = (q @ k.transpose(-1, -2)).float() * attn.scaling  # [1, H, 1, L]
    return scores.softmax(dim=-1)[0, :, 0]
