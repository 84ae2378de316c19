"""Speed benchmark of every registered pruning method against vanilla (issue #12).

    python -m scripts.bench_speed                          # this machine's default run (CPU, fp32)
    python -m scripts.bench_speed --device cuda --dtype bfloat16 --attn sdpa   # GPU, full depth
    python -m scripts.bench_speed --write-docs             # also regenerate the tables in docs/ and README

For each model it builds random weights at the REAL width of the checkpoint (hidden size, heads,
MLP, vision tower, vocabulary), with fewer decoder / ViT layers where time or memory requires
(``--layers``; the output says which), feeds the visual-token count VLMEvalKit's protocol gives a
640x480 image (Qwen2.5-VL at ``min_pixels=1280*28*28``: 1302; InternVL3 with 6 tiles + thumbnail:
1792; LLaVA-1.5: 576; LLaVA-NeXT: 2304 + 36 newlines) and a short question, patches it with the
runners' own ``custom_<family>.patch(model, config)`` and the configurations ``PruneConfig.from_env``
reads, and measures side by side in one process (one warm-up + ``--repeats`` runs, median and
min-max):

1. the prefill (vision encoder, projector, decoder, last-token logits: what ``generate`` runs
   before its first token) of every method at every ratio, as a speed-up over vanilla (the
   unpatched model) next to the speed-up the FLOPs predict for that configuration
   (:func:`prefill_flops`: analytic, per layer, with the per-layer token counts the engine's record
   gives; the same reduced depth as the timed model);
2. the method call (what the engine's METHOD_TIME timer wraps: the method's inputs and the method,
   every image): its time as a fraction of the prefill, its dispatched operators and host syncs
   (:class:`scripts.op_count.OpCounter`);
3. the engine's own cost: operators and host syncs of the pruned prefill beyond the unpatched
   prefill's and the method's;
4. the patch with nothing configured against the unpatched model (interleaved runs);
5. decode tokens/s after the prefill (greedy steps on its cache) and the KV-cache bytes;
6. methods whose published layers lie deeper than the reduced decoder (the hybrids SparseVLM,
   MustDrop, VScan, and VTW) on a deeper build of the same width (``--deep-models``).

Writes ``<out>/bench_speed.json`` and ``<out>/bench_speed.md`` (default ``bench_results/``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils import ensure_torchvision  # noqa: E402

ensure_torchvision()

import torch  # noqa: E402

import methods  # noqa: E402
import prune_engine  # noqa: E402
from scripts.op_count import OpCounter  # noqa: E402
from utils import ConfigError, PruneConfig  # noqa: E402

logger = logging.getLogger("bench_speed")

RATIOS = (0.333, 0.222, 0.111)
# Targets of issue #12.
TARGET_SPEEDUP_FRACTION = 0.9  # measured speed-up >= 0.9 x the FLOPs prediction
TARGET_METHOD_FRACTION = 0.005  # method call < 0.5 % of the prefill
TARGET_ENGINE_SYNCS = 16  # host syncs the engine adds to a pruned prefill
TARGET_PATCH_OVERHEAD = 0.01  # patched, nothing configured, vs unpatched
SYNC_LOOP = 32  # one kind of sync this many times in one method call: a per-token loop
PROMPT_TEXT = (14, 24)
QUESTION = "What is the colour of the square? Answer with a single word."  # text tokens before / after the image: chat frame + a short question + answer format
DOCS_BEGIN, DOCS_END = "<!-- bench-speed:begin -->", "<!-- bench-speed:end -->"
README_BEGIN, README_END = "<!-- bench-speed-summary:begin -->", "<!-- bench-speed-summary:end -->"
# Methods that read an intermediate ViT layer, by a hyper-parameter: (its name, 1 if 1-based). On a
# reduced tower the layer is scaled to it (layer * reduced depth / real depth), and the row says so.
VIT_LAYER_PARAMS = {"hiprune_pre_llm": ("object_layer", 1), "vscan": ("local_layer", 0)}
README_METHODS = ("random_pre_llm", "divprune_pre_llm", "visionzip_pre_llm", "fastv_intra_llm")


# ----------------------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelSpec:
    """One checkpoint's geometry. ``text`` / ``vision``: the config.json numbers that decide compute
    (the checkpoint's, except the depth, which the benchmark sets); ``depth`` / ``vit_depth``: the
    real depths; ``cpu_layers``: ``(decoder, ViT)`` layers of this machine's default run."""

    name: str
    family: str  # Family.name (custom_<family>.FAMILY.name)
    checkpoint: str
    text: dict
    vision: dict
    depth: int
    vit_depth: int
    cpu_layers: tuple[int, int]
    tokens: str  # what the protocol gives (for the output)


_QWEN_VIT = dict(hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
                 temporal_patch_size=2, window_size=112, in_channels=3)
_INTERN_VIT = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, image_size=448, patch_size=14)
_CLIP_L336 = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, image_size=336, patch_size=14)
_VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, vocab_size=32064)
_QWEN25_7B = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4)

MODELS: dict[str, ModelSpec] = {s.name: s for s in (
    ModelSpec("qwen2.5-vl-3b", "qwen2_5_vl", "Qwen/Qwen2.5-VL-3B-Instruct",
              dict(hidden_size=2048, intermediate_size=11008, num_attention_heads=16, num_key_value_heads=2,
                   vocab_size=151936, tie_word_embeddings=True), _QWEN_VIT, 36, 32, (3, 1),
              "1302 (640x480 at min_pixels=1280*28*28)"),
    ModelSpec("qwen2.5-vl-7b", "qwen2_5_vl", "Qwen/Qwen2.5-VL-7B-Instruct",
              dict(_QWEN25_7B, vocab_size=152064, tie_word_embeddings=False), _QWEN_VIT, 28, 32, (3, 1),
              "1302 (640x480 at min_pixels=1280*28*28)"),
    ModelSpec("internvl3-1b", "internvl", "OpenGVLab/InternVL3-1B-hf",
              dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                   vocab_size=151674, tie_word_embeddings=True), _INTERN_VIT, 24, 24, (3, 1),
              "1792 (6 tiles + thumbnail, 256 a tile)"),
    ModelSpec("internvl3-8b", "internvl", "OpenGVLab/InternVL3-8B-hf",
              dict(_QWEN25_7B, vocab_size=151674, tie_word_embeddings=False), _INTERN_VIT, 28, 24, (3, 1),
              "1792 (6 tiles + thumbnail, 256 a tile)"),
    ModelSpec("llava-1.5-7b", "llava", "llava-hf/llava-1.5-7b-hf", _VICUNA_7B, _CLIP_L336, 32, 24, (3, 2),
              "576 (336 px)"),
    ModelSpec("llava-next-7b", "llava_next", "llava-hf/llava-v1.6-vicuna-7b-hf", _VICUNA_7B, _CLIP_L336, 32, 24, (3, 2),
              "2304 + 36 newlines (640x480: base + 2x2 crops)"),
)}
# This machine's default run fits 25 minutes with these two; Qwen2.5-VL-3B's prefill alone (its
# 5208-patch ViT layer and 1342-token decoder) takes ~20 s here: run it with --families qwen2.5-vl-3b.
CPU_MODELS = ("internvl3-1b", "llava-1.5-7b")
CPU_DEEP_MODELS = ("internvl3-1b",)  # the cheapest decoder: room for 17 layers in this machine's budget
INTERNVL_TILES = 7  # 6 tiles + thumbnail
QWEN_GRID = (1, 62, 84)  # 868 x 1176 px after smart_resize of 640x480 at min_pixels=1280*28*28: 31 x 42 tokens
LLAVA_NEXT_IMAGE = (480, 640)  # (height, width)
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def family_module(family: str):
    import custom_internvl
    import custom_llava
    import custom_llava_next
    import custom_qwenvl

    return {m.FAMILY.name: m for m in (custom_qwenvl, custom_internvl, custom_llava, custom_llava_next)}[family]


def _with_attn(cfg, attn: str):
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = attn
    return cfg


def real_config(spec: ModelSpec, layers: int, vit_layers: int, attn: str):
    """The checkpoint's configuration at its real width, ``layers`` decoder and ``vit_layers`` ViT layers."""
    from synthetic import tiny_models as tm

    text = dict(spec.text, num_hidden_layers=layers, max_position_embeddings=32768)
    if spec.family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        # The real tower's full-attention blocks (every 8th) that fit; else its last block.
        full = [i for i in (7, 15, 23, 31) if i < vit_layers] or [vit_layers - 1]
        cfg = Qwen2_5_VLConfig(
            text_config=dict(text, rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 24])),
            vision_config=dict(spec.vision, depth=vit_layers, out_hidden_size=spec.text["hidden_size"],
                               fullatt_block_indexes=full),
            image_token_id=tm.IMAGE_ID, video_token_id=tm.VIDEO_ID,
            vision_start_token_id=tm.VISION_START_ID, vision_end_token_id=tm.VISION_END_ID,
        )
    elif spec.family == "internvl":
        from transformers import InternVLConfig

        cfg = InternVLConfig(
            text_config=dict(text, model_type="qwen2", rope_parameters=dict(rope_type="default", rope_theta=1e6)),
            vision_config=dict(spec.vision, num_hidden_layers=vit_layers),
            image_token_id=tm.IMAGE_ID, image_seq_length=256, downsample_ratio=0.5,
            vision_feature_layer=-1, vision_feature_select_strategy="default",
        )
    else:
        from transformers import LlavaConfig, LlavaNextConfig

        extra = dict(image_grid_pinpoints=LLAVA_NEXT_PINPOINTS) if spec.family == "llava_next" else {}
        cls = LlavaNextConfig if spec.family == "llava_next" else LlavaConfig
        cfg = cls(
            text_config=dict(text, model_type="llama", pad_token_id=0, rms_norm_eps=1e-5),
            vision_config=dict(spec.vision, model_type="clip_vision_model", num_hidden_layers=vit_layers, projection_dim=768),
            image_token_index=tm.IMAGE_ID, image_seq_length=576, vision_feature_layer=-2,
            vision_feature_select_strategy="default", **extra,
        )
    return _with_attn(cfg, attn)


def tiny_config(family: str, layers: int, vit_layers: int, attn: str):
    """``--quick``: the tests' tiny configurations (synthetic/tiny_models.py), ``layers`` decoder layers."""
    from synthetic import tiny_models as tm

    build = {"qwen2_5_vl": tm.tiny_qwen_config, "internvl": tm.tiny_internvl_config,
             "llava": tm.tiny_llava_config, "llava_next": tm.tiny_llava_next_config}[family]
    return build(layers=layers, attn=attn)


def build_model(family: str, config, dtype: torch.dtype, device: str):
    from transformers import (InternVLForConditionalGeneration, LlavaForConditionalGeneration,
                              LlavaNextForConditionalGeneration, Qwen2_5_VLForConditionalGeneration)

    cls = {"qwen2_5_vl": Qwen2_5_VLForConditionalGeneration, "internvl": InternVLForConditionalGeneration,
           "llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration}[family]
    torch.manual_seed(0)
    with torch.device(device):
        model = cls._from_config(config, dtype=dtype)
    return model.eval()


def make_inputs(family: str, config, quick: bool, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One image and a short question, laid out as the family's processor lays them out."""
    from synthetic import tiny_models as tm

    g = torch.Generator().manual_seed(0)
    text = lambda n: torch.randint(10, 400, (n,), generator=g).tolist()  # noqa: E731
    pre, post = PROMPT_TEXT
    if family == "qwen2_5_vl":
        out = tm.qwen_inputs(grids=((1, 16, 16),) if quick else (QWEN_GRID,), text=PROMPT_TEXT)
    elif quick and family != "llava_next":
        out = {"internvl": lambda: tm.internvl_inputs(tiles=(INTERNVL_TILES,), text=PROMPT_TEXT),
               "llava": lambda: tm.llava_inputs(text=PROMPT_TEXT)}[family]()
    elif quick:
        out = tm.llava_next_inputs(sizes=((480, 640),), text=PROMPT_TEXT)
    elif family == "internvl":
        px = config.vision_config.image_size[0] if isinstance(config.vision_config.image_size, (list, tuple)) else config.vision_config.image_size
        n = INTERNVL_TILES * config.image_seq_length
        ids = text(pre) + [tm.VISION_START_ID] + [tm.IMAGE_ID] * n + [tm.VISION_END_ID] + text(post)
        out = {"input_ids": torch.tensor([ids]), "pixel_values": torch.randn(INTERNVL_TILES, 3, px, px, generator=g)}
    elif family == "llava":
        px = config.vision_config.image_size
        ids = text(pre) + [tm.IMAGE_ID] * config.image_seq_length + text(post)
        out = {"input_ids": torch.tensor([ids]), "pixel_values": torch.randn(1, 3, px, px, generator=g)}
    else:  # llava_next: base image + crops; placeholders from the family's own layout
        import custom_llava_next
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        px = config.vision_config.image_size
        _, placeholders = custom_llava_next.tokens_of(LLAVA_NEXT_IMAGE, config)
        items = image_size_to_num_patches(list(LLAVA_NEXT_IMAGE), config.image_grid_pinpoints, px)
        ids = text(pre) + [tm.IMAGE_ID] * placeholders + text(post)
        out = {"input_ids": torch.tensor([ids]), "pixel_values": torch.randn(1, items, 3, px, px, generator=g),
               "image_sizes": torch.tensor([LLAVA_NEXT_IMAGE])}
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in out.items()}


# ----------------------------------------------------------------------------- FLOPs
def decoder_layer_flops(n: int, hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int) -> int:
    """Multiply-adds x 2 of one decoder layer on ``n`` tokens without cache: q/k/v/o projections,
    causal attention (``n (n + 1) / 2`` query-key pairs, for the scores and the weighted sum) and a
    gated MLP (gate, up, down). Norms, RoPE, activations and biases are left out (elementwise)."""
    proj = 2 * n * hidden * head_dim * (2 * heads + 2 * kv_heads)
    attention = 2 * 2 * (n * (n + 1) // 2) * heads * head_dim
    mlp = 2 * n * 3 * hidden * intermediate
    return proj + attention + mlp


def vit_layer_flops(n: int, width: int, intermediate: int, attention_pairs: int, gated: bool) -> int:
    """One ViT layer on ``n`` tokens: qkv + output projections, ``attention_pairs`` query-key pairs
    (bidirectional, summed over attention windows), an MLP with two (or, ``gated``, three) matrices."""
    return 2 * n * 4 * width * width + 2 * 2 * attention_pairs * width + 2 * n * (3 if gated else 2) * width * intermediate


def vision_flops(family: str, config, inputs: dict[str, torch.Tensor]) -> dict[str, int]:
    """``{"vision": ..., "projector": ...}`` FLOPs of the vision encoder (patch embedding + layers)
    and the projector / merger for ``inputs``' images, from ``config``."""
    vc = config.vision_config
    if family == "qwen2_5_vl":
        c, layers = vc.hidden_size, vc.depth
        out = proj = 0
        for t, h, w in inputs["image_grid_thw"].tolist():
            p, m = t * h * w, vc.spatial_merge_size
            # Window attention: windows of window_size px, i.e. (window_size / patch / merge) merge units a side.
            unit = vc.window_size // vc.patch_size // m
            rows = [min(unit, h // m - i) for i in range(0, h // m, unit)]
            cols = [min(unit, w // m - j) for j in range(0, w // m, unit)]
            windowed = t * sum((r * c_ * m * m) ** 2 for r in rows for c_ in cols)
            for i in range(layers):
                pairs = t * (h * w) ** 2 if i in vc.fullatt_block_indexes else windowed
                out += vit_layer_flops(p, c, vc.intermediate_size, pairs, gated=True)
            embed = 2 * p * vc.in_channels * vc.temporal_patch_size * vc.patch_size**2 * c
            merger = 2 * (p // (m * m)) * (c * m * m) * (c * m * m + vc.out_hidden_size)
            out += embed
            proj += merger
        return {"vision": out, "projector": proj}
    text_hidden = config.text_config.hidden_size
    c, layers = vc.hidden_size, vc.num_hidden_layers
    size = vc.image_size[0] if isinstance(vc.image_size, (list, tuple)) else vc.image_size
    patch = vc.patch_size[0] if isinstance(vc.patch_size, (list, tuple)) else vc.patch_size
    patches = (size // patch) ** 2
    if family == "internvl":
        items = inputs["pixel_values"].shape[0]  # tiles
        tokens = patches // round(1 / config.downsample_ratio) ** 2  # after the pixel shuffle
        proj = 2 * items * tokens * (c * 4 * text_hidden + text_hidden * text_hidden)
    else:
        pv = inputs["pixel_values"]
        items = pv.shape[0] * (pv.shape[1] if pv.dim() == 5 else 1)  # LLaVA-NeXT: base image + crops
        tokens = patches
        proj = 2 * items * tokens * (c * text_hidden + text_hidden * text_hidden)
    n = patches + 1  # [CLS]
    per_item = 2 * patches * 3 * patch * patch * c + layers * vit_layer_flops(n, c, vc.intermediate_size, n * n, gated=False)
    return {"vision": items * per_item, "projector": proj}


def prefill_flops(family: str, config, inputs: dict[str, torch.Tensor], seq_per_layer: list[int]) -> dict[str, int]:
    """Analytic FLOPs of one prefill: vision encoder, projector, every decoder layer on its own
    sequence length ``seq_per_layer[i]`` (text + the visual tokens at its input), and the
    last-token logits. ViT-internal merges are not modelled (the encoder is counted unmerged)."""
    tc = config.text_config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    out = vision_flops(family, config, inputs)
    out["llm"] = sum(
        decoder_layer_flops(n, tc.hidden_size, tc.num_attention_heads, tc.num_key_value_heads, head_dim, tc.intermediate_size)
        for n in seq_per_layer
    )
    out["lm_head"] = 2 * tc.hidden_size * tc.vocab_size
    out["total"] = sum(out.values())
    return out


# ----------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": list(xs)}


class MethodRegions:
    """The regions the engine's method timer wraps (the ``Stopwatch`` a pruning event starts when
    METHOD_TIME is on: the method's inputs and the method, every image), seen by handing
    ``prune_engine`` a Stopwatch subclass: with ``count_ops``, an :class:`OpCounter` opened at
    ``start()`` and closed at ``stop()`` (``regions``); with ``clock``, the region's milliseconds on
    that clock (``ms``). PREFILL_TIME stays off, so every enabled Stopwatch is one method call."""

    def __init__(self, count_ops: bool = True, clock: Callable[[], float] | None = None) -> None:
        self.count_ops, self.clock = count_ops, clock
        self.regions: list[OpCounter] = []
        self.ms: list[float] = []
        self._open: list[OpCounter] = []

    def __enter__(self) -> "MethodRegions":
        base = self._base = prune_engine.Stopwatch
        outer = self

        class RegionStopwatch(base):
            def start(self):
                super().start()
                if self.enabled:
                    self._bench_t0 = outer.clock() if outer.clock else None
                    if outer.count_ops:
                        self._counter = OpCounter().__enter__()
                        outer._open.append(self._counter)
                return self

            def stop(self):
                counter = getattr(self, "_counter", None)
                if counter is not None:
                    counter.__exit__(None, None, None)
                    outer._open.remove(counter)
                    outer.regions.append(counter)
                    self._counter = None
                if getattr(self, "_bench_t0", None) is not None:
                    outer.ms.append((outer.clock() - self._bench_t0) * 1000.0)
                    self._bench_t0 = None
                super().stop()

        prune_engine.Stopwatch = RegionStopwatch
        return self

    def __exit__(self, *exc) -> None:
        prune_engine.Stopwatch = self._base
        for counter in reversed(self._open):  # a method that raised between start() and stop()
            counter.__exit__(None, None, None)
        self._open.clear()


@dataclass
class Bench:
    """One model build: runs prefills and decode steps on it."""

    model: Any
    module: Any
    inputs: dict[str, torch.Tensor]
    device: torch.device
    repeats: int
    decode_steps: int
    # time.perf_counter, or on a CPU with one thread time.process_time (see pick_clock)
    clock: Callable[[], float] = time.perf_counter
    records: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.module.patch(self.model)
        prune_engine.get_state(self.model).on_sample = self.records.append

    def set_config(self, cfg: PruneConfig | None) -> None:
        """``None``: the unpatched model; else the runners' patch with ``cfg``."""
        if cfg is None:
            self.module.unpatch(self.model)
            return
        self.module.patch(self.model, cfg)
        prune_engine.get_state(self.model).on_sample = self.records.append

    @torch.inference_mode()
    def prefill(self) -> Any:
        state = prune_engine.get_state(self.model)
        if state is not None:  # the question, as the VLMEvalKit adapter passes it (CDPruner reads it)
            state.sample_info = {"text": QUESTION}
        return self.model(**self.inputs, use_cache=True, logits_to_keep=1)

    def timed_prefill(self) -> tuple[float, Any]:
        _sync(self.device)
        t0 = self.clock()
        out = self.prefill()
        _sync(self.device)
        return (self.clock() - t0) * 1000.0, out

    @torch.inference_mode()
    def decode(self, out: Any) -> list[float]:
        """Greedy decode steps on ``out``'s cache; ms per step."""
        cache, times = out.past_key_values, []
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(self.decode_steps):
            _sync(self.device)
            t0 = self.clock()
            step = self.model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            _sync(self.device)
            times.append((self.clock() - t0) * 1000.0)
            cache, token = step.past_key_values, step.logits[:, -1:].argmax(-1)
        return times

    def counted_prefill(self) -> tuple[OpCounter, list[OpCounter], dict | None]:
        """The warm-up run: operators and syncs of the whole prefill and of each method call."""
        self.records.clear()
        with OpCounter() as total, MethodRegions() as regions:
            self.prefill()
        return total, regions.regions, (self.records[-1] if self.records else None)


def _sync_kinds(syncs: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in syncs:
        out[s] = out.get(s, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


class VisionTimer:
    """The vision encoder and projector's share of a prefill: the clock from the vision tower's
    forward pre-hook to the projector's forward hook (Qwen2.5-VL: the whole ``visual``, merger
    included), summed per prefill (``ms``, one entry per prefill)."""

    def __init__(self, bench: "Bench") -> None:
        base = bench.model.model
        first = getattr(base, "visual", None) or base.vision_tower
        last = getattr(base, "visual", None) or base.multi_modal_projector
        self.bench, self.modules, self.ms, self._t0 = bench, (first, last), [], None

    def _start(self, *_: Any) -> None:
        _sync(self.bench.device)
        self._t0 = self.bench.clock()

    def _stop(self, *_: Any) -> None:
        _sync(self.bench.device)
        self.ms.append((self.bench.clock() - self._t0) * 1000.0)

    def __enter__(self) -> "VisionTimer":
        self._hooks = [self.modules[0].register_forward_pre_hook(self._start), self.modules[1].register_forward_hook(self._stop)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._hooks:
            h.remove()


def measure_vanilla(bench: Bench, patch_check: bool = True) -> dict[str, Any]:
    """The unpatched model and (``patch_check``) the patch with nothing configured, interleaved run
    by run; the vision encoder's share of the unpatched prefill (on a GPU in runs of its own, since
    the timer synchronises)."""
    bench.set_config(None)
    with OpCounter() as ops:  # the warm-up
        bench.prefill()
    unpatched, patched, out = [], [], None
    apart = bench.device.type == "cuda"
    vision = VisionTimer(bench)
    for _ in range(bench.repeats):
        bench.set_config(None)
        with contextlib.nullcontext() if apart else vision:
            ms, out = bench.timed_prefill()
        unpatched.append(ms)
        if patch_check:
            bench.set_config(PruneConfig())
            patched.append(bench.timed_prefill()[0])
    bench.set_config(None)
    if apart:
        with vision:
            for _ in range(bench.repeats):
                bench.prefill()
    decode = bench.decode(out)
    n_prompt = int(bench.inputs["input_ids"].shape[1])
    return {
        "prefill_ms": _stats(unpatched),
        "vision_ms": _stats(vision.ms),
        "patched_off_ms": _stats(patched) if patched else None,
        "patch_overhead": statistics.median(patched) / statistics.median(unpatched) - 1.0 if patched else None,
        "ops": ops.n_ops,
        "syncs": ops.n_syncs,
        "sync_kinds": _sync_kinds(ops.syncs),
        "decode_ms": _stats(decode) if decode else None,
        "kv_cache_bytes": prune_engine._cache_bytes(out.past_key_values),
        "n_prompt": n_prompt,
    }


def method_configs(family: str, names: list[str], ratios: tuple[float, ...]) -> list[tuple[str, float, PruneConfig | None, str]]:
    """``(method, ratio, config or None, why not)`` for every method applicable to ``family``, read
    the way the runners read it: ``PRUNE_METHOD=<name> KEEP_RATIO=<r>``."""
    out = []
    for name in names:
        m = methods.get_method(name)
        if m.families is not None and family not in m.families:
            continue
        for r in ratios:
            try:
                out.append((name, r, PruneConfig.from_env({"PRUNE_METHOD": name, "KEEP_RATIO": str(r)}), ""))
            except ConfigError as e:
                out.append((name, r, None, str(e)))
    return out


def fit_vit_layers(cfg: PruneConfig, family: str, vit_layers: int, real_vit_depth: int) -> tuple[PruneConfig, str]:
    """``cfg`` with the ViT-layer hyper-parameters of :data:`VIT_LAYER_PARAMS` scaled to a reduced
    tower where the published layer does not exist in it, and a note saying what changed."""
    notes = []
    for name in cfg.method_names:
        if name not in VIT_LAYER_PARAMS:
            continue
        m = methods.get_method(name)
        layers = [x for v in m.layers_for(family, cfg.args_for(name)).values() for x in v]
        if all(x < vit_layers for x in layers):
            continue
        param, base = VIT_LAYER_PARAMS[name]
        published = layers[0]  # the first layer its vit_layers gives is the one the parameter sets
        scaled = min(vit_layers - 1, published * vit_layers // real_vit_depth) + base
        args = {**cfg.method_args, name: {**cfg.args_for(name), param: scaled}}
        cfg = dataclasses.replace(cfg, method_args=args)
        notes.append(f"{param}={scaled} (published: {published + base} of {real_vit_depth} ViT layers)")
    return cfg, "; ".join(notes)


def needed_depth(cfg: PruneConfig, real_depth: int) -> int:
    """Decoder layers a configuration needs to prune at its published layers (a hybrid's middle
    layer taken on the real depth)."""
    layers = [s.layer for s in cfg.for_model(real_depth).intra]
    return max(layers) + 1 if layers else 1


def measure_method(bench: Bench, family: str, model_cfg, cfg: PruneConfig, vanilla: dict, clip_dir: str | None) -> dict[str, Any]:
    if clip_dir and "cdpruner_pre_llm" in cfg.method_names:
        cfg = dataclasses.replace(cfg, method_args={**cfg.method_args, "cdpruner_pre_llm": {"clip_model": clip_dir}})
    timed_cfg = dataclasses.replace(cfg, time_method=True, time_prefill=False)
    bench.set_config(timed_cfg)
    total, regions, record = bench.counted_prefill()  # the warm-up
    if record is None:
        raise RuntimeError("the pruned prefill wrote no record")
    if not regions and any(e["stage"] != "post_prefill" for e in record["events"]):
        raise RuntimeError("the engine's method timer was not seen (prune_engine no longer times a pruning event with "
                           "utils.Stopwatch): scripts/bench_speed.py MethodRegions must follow it")
    # On a GPU the method timer synchronises once per event: time the prefill without it, then the
    # method calls apart, from the engine's timer (CUDA events). On a CPU the regions the engine's
    # timer wraps are timed on the benchmark's clock in the same runs.
    apart = bench.device.type == "cuda"
    if apart:
        bench.set_config(dataclasses.replace(cfg, time_method=False, time_prefill=False))
    prefill, method_ms, out = [], [], None
    for _ in range(bench.repeats):
        bench.records.clear()
        if apart:
            ms, out = bench.timed_prefill()
        else:
            with MethodRegions(count_ops=False, clock=bench.clock) as timers:
                ms, out = bench.timed_prefill()
            method_ms.append(sum(timers.ms))
        prefill.append(ms)
    decode = bench.decode(out)
    kv = prune_engine._cache_bytes(out.past_key_values)
    del out
    if apart:
        bench.set_config(timed_cfg)
        for _ in range(bench.repeats):
            bench.records.clear()
            bench.prefill()
            method_ms.append(_method_ms(bench.records[-1]))

    n_prompt, n_visual = record["n_prompt"], record["n_visual"]
    seq = [n_prompt - n_visual + v for v in record["visual_per_layer"]]
    flops = prefill_flops(family, model_cfg, bench.inputs, seq)
    method_ops = sum(r.n_ops for r in regions)
    method_syncs = [s for r in regions for s in r.syncs]
    engine_ops = total.n_ops - vanilla["ops"] - method_ops
    engine_syncs = total.n_syncs - vanilla["syncs"] - len(method_syncs)
    speedup = vanilla["prefill_ms"]["median"] / statistics.median(prefill)
    predicted = vanilla["flops"]["total"] / flops["total"]
    calibrated = calibrated_speedup(vanilla, flops)
    method_fraction = statistics.median(method_ms) / statistics.median(prefill)
    kinds = _sync_kinds(method_syncs)
    events = [e for e in record["events"] if e["stage"] != "post_prefill"]
    row = {
        "prefill_ms": _stats(prefill),
        "speedup": speedup,
        "predicted_speedup": predicted,
        "speedup_vs_prediction": speedup / predicted,
        "calibrated_speedup": calibrated,
        "flops": flops,
        "method_ms": _stats(method_ms),
        "method_fraction": method_fraction,
        "method_calls": len(regions),
        "method_ops": method_ops,
        "method_syncs": len(method_syncs),
        "method_sync_kinds": kinds,
        "engine_ops": engine_ops,
        "engine_syncs": engine_syncs,
        "engine_sync_kinds": _diff_kinds(_sync_kinds(total.syncs), vanilla["sync_kinds"], kinds),
        "decode_ms": _stats(decode) if decode else None,
        "kv_cache_bytes": kv,
        "visual_per_layer": record["visual_per_layer"],
        "n_visual": n_visual,
        "n_visual_final": record["n_visual_final"],
        "events": [{k: e[k] for k in ("stage", "layer", "method", "n_in", "n_keep", "ms", "note")} for e in events],
        "vit_merge": any(e["stage"] == "vision" for e in events),
    }
    row["misses"] = misses(row, family)
    row["targets_met"] = not row["misses"]
    return row


def calibrated_speedup(vanilla: dict, flops: dict) -> float | None:
    """The speed-up predicted with the vision encoder's MEASURED time instead of its FLOPs: vanilla's
    vision + projector time, plus the rest of vanilla's time scaled by the decoder's (and logits')
    FLOPs. Where the vision encoder runs at a lower FLOP rate than the decoder, the FLOPs prediction
    overstates what pruning the decoder's tokens can give; this one does not."""
    v = vanilla.get("vision_ms")
    if not v:
        return None
    t, tv = vanilla["prefill_ms"]["median"], v["median"]
    rest = lambda f: f["llm"] + f["lm_head"]  # noqa: E731
    return t / (tv + (t - tv) * rest(flops) / rest(vanilla["flops"]))


def _method_ms(record: dict) -> float:
    """The method calls of one prefill: the engine's METHOD_TIME timers, summed over its events."""
    return sum(e.get("ms") or 0.0 for e in record["events"])


def _diff_kinds(total: dict[str, int], *minus: dict[str, int]) -> dict[str, int]:
    out = dict(total)
    for m in minus:
        for k, v in m.items():
            out[k] = out.get(k, 0) - v
    return {k: v for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v}


def baseline_for(row: dict, rows: list[dict]) -> dict | None:
    """The random method of ``row``'s stage at the same ratio with the same decoder FLOPs (the same
    visual tokens per layer, to 1 %): the configuration that differs from ``row`` only by what the
    method computes. None for itself, hybrids and where none matches."""
    stages = {e["stage"] for e in row["events"]} - {"vision"}
    if len(stages) != 1 or methods.get_method(row["method"]).schedule is not None:
        return None
    name = f"random_{stages.pop()}"
    for r in rows:
        if (r["method"] == name != row["method"] and "error" not in r and r["ratio"] == row["ratio"]
                and abs(r["flops"]["llm"] / row["flops"]["llm"] - 1) < 0.01):
            return r
    return None


def misses(row: dict, family: str | None = None, baseline: dict | None = None) -> list[str]:
    """Which targets a row misses, each with the measured reason (the reports recompute them from
    the saved figures, so a saved run renders with the current wording). ``baseline``: its
    :func:`baseline_for`, whose prefill says what the method's work adds."""
    out = []
    if row["speedup_vs_prediction"] < TARGET_SPEEDUP_FRACTION:
        why = f"speed-up {row['speedup']:.2f}x is {row['speedup_vs_prediction']:.2f} of the predicted {row['predicted_speedup']:.2f}x"
        if baseline is not None:
            extra = row["prefill_ms"]["median"] - baseline["prefill_ms"]["median"]
            why += (f"; `{baseline['method']}` (same tokens per layer, no scores) reaches "
                    f"{baseline['speedup_vs_prediction']:.2f}; this method's prefill takes {extra:+.0f} ms more than it, "
                    f"its method call {row['method_ms']['median']:.0f} ms")
        vit_needs = sorted({n for name in {e["method"] for e in row["events"]}
                            for n in methods.get_method(name).needs_for(family) if n.startswith("vit_")}) if family else []
        cal = row.get("calibrated_speedup")
        if row["method_fraction"] >= 0.05:
            why += f" (method call {100 * row['method_fraction']:.1f} % of the prefill)"
        elif cal and row["speedup"] >= TARGET_SPEEDUP_FRACTION * cal:
            why += (f" (the vision encoder runs at a lower FLOP rate than the decoder: with its measured time the "
                    f"prediction is {cal:.2f}x, of which this is {row['speedup'] / cal:.2f})")
        elif vit_needs:
            why += (f" (its ViT inputs {', '.join(vit_needs)} are computed by hooks in the vision pass, outside the "
                    f"method timer: {row['engine_ops']} ops beyond vanilla's and the method's)")
        elif row["vit_merge"]:
            why += (" (its ViT merge runs in the vision pass, outside the method timer; the prediction counts the "
                    "encoder unmerged)")
        else:
            why += f" (method {100 * row['method_fraction']:.1f} %, engine {row['engine_ops']} ops / {row['engine_syncs']} syncs)"
        out.append(why)
    if row["method_fraction"] >= TARGET_METHOD_FRACTION:
        out.append(f"method {100 * row['method_fraction']:.2f} % of the prefill ({row['method_ms']['median']:.1f} ms, "
                   f"{row['method_ops']} ops, {row['method_syncs']} syncs)")
    loops = {k: v for k, v in row["method_sync_kinds"].items() if v >= SYNC_LOOP}
    if loops:
        out.append("per-token sync loop: " + ", ".join(f"{k} x{v}" for k, v in loops.items()))
    if row["engine_syncs"] > TARGET_ENGINE_SYNCS:
        top = ", ".join(f"{k} x{v}" for k, v in list(row["engine_sync_kinds"].items())[:3])
        out.append(f"engine adds {row['engine_syncs']} syncs ({top})")
    return out


def bench_model(spec: ModelSpec, args, layers: int, vit_layers: int, names: list[str], ratios: tuple[float, ...],
                deep: bool) -> dict[str, Any]:
    """One model: the main build at ``layers`` decoder layers; with ``deep``, the methods whose
    published layers need more on a second build at the depth they need."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    # A hybrid's middle-layer event at the real model's middle layer (its published layer).
    configs = [(n, r, c if c is None else c.for_model(spec.depth), w) for n, r, c, w in method_configs(spec.family, names, ratios)]
    main = [c for c in configs if c[2] is None or needed_depth(c[2], spec.depth) <= layers]
    deeper = [c for c in configs if c[2] is not None and needed_depth(c[2], spec.depth) > layers]
    result = {"model": spec.name, "family": spec.family, "checkpoint": spec.checkpoint, "tokens": spec.tokens,
              "real_depth": spec.depth, "real_vit_depth": spec.vit_depth, "builds": []}
    groups = [(layers, main)]
    if deeper:
        depth = max(needed_depth(c[2], spec.depth) for c in deeper)
        if deep and depth <= spec.depth:
            groups.append((depth, deeper))
        else:
            result["not_run"] = [
                {"method": n, "ratio": r, "why": f"prunes at layer {needed_depth(c, spec.depth) - 1}: needs "
                 f"{needed_depth(c, spec.depth)} decoder layers (this build: {layers}; run with --deep-models {spec.name})"}
                for n, r, c, _ in deeper]
    for k, (depth, group) in enumerate(groups):  # the patch itself is measured on the first build only
        result["builds"].append(bench_build(spec, args, depth, vit_layers, group, device, dtype, patch_check=k == 0))
    return result


def pick_clock(device: str) -> tuple[Callable[[], float], str]:
    """The benchmark's clock: on a GPU the wall clock (with synchronisations); on a CPU with one torch
    thread the process's CPU time, which other jobs on a shared machine do not inflate (it equals
    the wall time of an idle machine for single-threaded work); else the wall clock."""
    if device == "cpu" and torch.get_num_threads() == 1:
        return time.process_time, "process CPU time (one thread)"
    return time.perf_counter, "wall clock" + (" (synchronised)" if device != "cpu" else "")


def bench_build(spec: ModelSpec, args, layers: int, vit_layers: int, group, device, dtype,
                patch_check: bool = True) -> dict[str, Any]:
    t0 = time.perf_counter()
    cfg = (tiny_config(spec.family, layers, vit_layers, args.attn) if args.quick
           else real_config(spec, layers, vit_layers, args.attn))
    model = build_model(spec.family, cfg, dtype, args.device)
    inputs = make_inputs(spec.family, cfg, args.quick, args.device, dtype)
    bench = Bench(model, family_module(spec.family), inputs, device, args.repeats, args.decode_steps,
                  clock=pick_clock(args.device)[0])
    vit = cfg.vision_config
    build = {
        "layers": layers,
        "vit_layers": getattr(vit, "depth", None) or vit.num_hidden_layers,
        "hidden_size": cfg.text_config.hidden_size,
        "vit_hidden_size": vit.hidden_size,
        "n_prompt": int(inputs["input_ids"].shape[1]),
        "rows": [],
    }
    logger.info("%s: %d decoder / %d ViT layers, %d prompt tokens (built in %.0f s)", spec.name, layers,
                build["vit_layers"], build["n_prompt"], time.perf_counter() - t0)
    vanilla = measure_vanilla(bench, patch_check)
    n_prompt = vanilla["n_prompt"]
    vanilla["flops"] = prefill_flops(spec.family, cfg, inputs, [n_prompt] * layers)
    build["vanilla"] = vanilla
    logger.info("  vanilla %.0f ms%s", vanilla["prefill_ms"]["median"], "" if not patch_check else
                f" (patched, nothing configured: {100 * vanilla['patch_overhead']:+.1f} %)")
    clip_dir = None
    with tempfile.TemporaryDirectory() as tmp:
        for name, ratio, pcfg, why in group:
            row: dict[str, Any] = {"method": name, "ratio": ratio}
            if pcfg is None:
                row["error"] = why
            else:
                try:
                    if name == "cdpruner_pre_llm" and clip_dir is None:
                        clip_dir = _clip_checkpoint(Path(tmp), model)
                    pcfg, note = fit_vit_layers(pcfg, spec.family, build["vit_layers"], spec.vit_depth)
                    if note:
                        row["vit_layer_args"] = note
                    row.update(measure_method(bench, spec.family, cfg, pcfg, vanilla, clip_dir))
                    logger.info("  %-24s %.3f: %.0f ms, %.2fx (predicted %.2fx), method %.2f %%, %d/%d method/engine syncs",
                                name, ratio, row["prefill_ms"]["median"], row["speedup"], row["predicted_speedup"],
                                100 * row["method_fraction"], row["method_syncs"], row["engine_syncs"])
                except Exception as e:  # noqa: BLE001 - one failing method must not end the run; the table says why
                    logger.warning("  %s %.3f failed: %s", name, ratio, e)
                    row["error"] = f"{type(e).__name__}: {e}"
            build["rows"].append(row)
    bench.set_config(None)
    build["n_visual"] = next((r["n_visual"] for r in build["rows"] if "n_visual" in r), None)
    build["seconds"] = time.perf_counter() - t0
    del bench, model
    gc.collect()  # the patched model holds reference cycles (its engine state points back at it)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return build


def _clip_checkpoint(folder: Path, llava_model) -> str:
    """CDPruner reads a CLIP text tower and projection (PRUNE_ARGS clip_model): a random one whose
    vision tower is the benchmark model's (the method checks that), as its tests build it."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_clip import save_tiny_clip

    return save_tiny_clip(folder / "clip", llava_model)


# ----------------------------------------------------------------------------- report
def _ms(s: dict | None) -> str:
    if not s:
        return ""
    return f"{s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f})" if s["median"] >= 100 else \
        f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})"


def _flops(x: int) -> str:
    return f"{x / 1e9:.0f} GFLOPs" if x >= 1e10 else f"{x / 1e9:.2f} GFLOPs"


def _mib(b: int | None) -> str:
    return "" if b is None else f"{b / 2**20:.1f}"


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; torch {meta['torch']}, transformers {meta['transformers']}; "
        f"{meta['device']}, {meta['dtype']}, attention {meta['attn']}; times on the {meta.get('clock', 'wall clock')}; "
        f"{meta['repeats']} timed runs after one "
        f"warm-up, median (min-max); run time {meta['seconds'] / 60:.1f} min; {meta['date']}"
        + (f"; 1-minute load average {meta['load_average'][0]:g} before, {meta['load_average'][1]:g} after."
           if "load_average" in meta else "."),
        "",
        *misses_summary(result),
        "",
    ]
    for m in result["models"]:
        for b in m["builds"]:
            v = b["vanilla"]
            reduced = []
            if b["layers"] < m["real_depth"]:
                reduced.append(f"{b['layers']} of {m['real_depth']} decoder layers")
            if b["vit_layers"] < m["real_vit_depth"]:
                reduced.append(f"{b['vit_layers']} of {m['real_vit_depth']} ViT layers")
            lines += [
                f"### {m['model']} ({m['checkpoint']}): {b['layers']} decoder / {b['vit_layers']} ViT layers",
                "",
                (f"Real width (hidden {b['hidden_size']}, ViT {b['vit_hidden_size']}), REDUCED depth: "
                 f"{', '.join(reduced)}; the FLOPs prediction uses the same reduced model." if reduced and not meta["quick"]
                 else "Tiny widths (--quick): structure only, the figures mean nothing." if meta["quick"]
                 else f"Real width and depth."),
                f"Visual tokens: {b['n_visual'] if meta['quick'] else m['tokens']}; prompt {b['n_prompt']} tokens. "
                f"Vanilla (unpatched) prefill {_ms(v['prefill_ms'])} ms, {_flops(v['flops']['total'])} (vision "
                f"{_flops(v['flops']['vision'])}, projector {_flops(v['flops']['projector'])}, decoder "
                f"{_flops(v['flops']['llm'])}), {v['ops']} ops, "
                + (f"vision encoder + projector {_ms(v['vision_ms'])} ms = "
                   f"{100 * v['vision_ms']['median'] / v['prefill_ms']['median']:.0f} % of the time for "
                   f"{100 * (v['flops']['vision'] + v['flops']['projector']) / v['flops']['total']:.0f} % of the FLOPs, "
                   if v.get("vision_ms") else "") +
                f"{v['syncs']} host syncs; decode {1000 / v['decode_ms']['median']:.2f} tokens/s, KV cache "
                f"{_mib(v['kv_cache_bytes'])} MiB." if v.get("decode_ms") else "",
                f"Patch with nothing configured: {_ms(v['patched_off_ms'])} ms, {100 * v['patch_overhead']:+.1f} % "
                f"against unpatched (target within {100 * TARGET_PATCH_OVERHEAD:.0f} %: "
                f"{'met' if abs(v['patch_overhead']) <= TARGET_PATCH_OVERHEAD else 'MISSED'})."
                if v["patch_overhead"] is not None else "Patch with nothing configured: measured on the first build.",
                "",
                "| method | kept | prefill ms | speed-up | predicted | meas./pred. | pred. with measured ViT | method ms "
                "| method % | method ops / syncs | engine ops / syncs | decode tok/s | KV MiB | visual tokens per layer | targets |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for r in b["rows"]:
                if "error" in r:
                    lines.append(f"| `{r['method']}` | {r['ratio']:g} | | | | | | | | | | | | | not run: {_cell(r['error'])} |")
                    continue
                tok = _per_layer(r["visual_per_layer"])
                missed = misses(r, m["family"], baseline_for(r, b["rows"]))
                target = "met" if not missed else "MISSED: " + "; ".join(missed)
                if r.get("vit_layer_args"):
                    target += f" (reduced ViT: {r['vit_layer_args']})"
                lines.append(
                    f"| `{r['method']}` | {r['ratio']:g} | {_ms(r['prefill_ms'])} | {r['speedup']:.2f}x | "
                    f"{r['predicted_speedup']:.2f}x | {r['speedup_vs_prediction']:.2f} | "
                    f"{'' if not r.get('calibrated_speedup') else format(r['calibrated_speedup'], '.2f') + 'x'} | {_ms(r['method_ms'])} | "
                    f"{100 * r['method_fraction']:.2f} | {r['method_ops']} / {r['method_syncs']} | "
                    f"{r['engine_ops']} / {r['engine_syncs']} | "
                    f"{1000 / r['decode_ms']['median']:.2f} | {_mib(r['kv_cache_bytes'])} | {tok} | {_cell(target)} |"
                )
            lines.append("")
        for n in m.get("not_run", []):
            lines.append(f"- `{n['method']}` {n['ratio']:g}: not run, {n['why']}")
        if m.get("not_run"):
            lines.append("")
    return "\n".join(lines)


MISS_KINDS = (  # (how the miss starts, what it means, its short name)
    ("speed-up", "speed-up below 0.9 of the prediction", "speed-up"),
    ("method ", "method call >= 0.5 % of the prefill", "method %"),
    ("per-token sync loop", "a per-token sync loop in the method", "sync loop"),
    ("engine adds", f"engine adds more than {TARGET_ENGINE_SYNCS} syncs", "engine syncs"),
)


def misses_summary(result: dict[str, Any]) -> list[str]:
    """A few lines: how many rows meet every target, and which rows miss what."""
    rows = [(m["model"], {**r, "misses": misses(r, m["family"], baseline_for(r, b["rows"]))})
            for m in result["models"] for b in m["builds"] for r in b["rows"] if "error" not in r]
    failed = [(m["model"], r) for m in result["models"] for b in m["builds"] for r in b["rows"] if "error" in r]
    out = [f"**Targets:** {sum(not r['misses'] for _, r in rows)} of {len(rows)} measured configurations meet all four "
           f"(speed-up >= {TARGET_SPEEDUP_FRACTION} of the prediction, method < {100 * TARGET_METHOD_FRACTION:g} % of "
           f"the prefill, no per-token sync loop, engine <= {TARGET_ENGINE_SYNCS} syncs)"
           + (f"; {len(failed)} did not run ({', '.join(sorted({'`' + r['method'] + '`' for _, r in failed}))}: see their rows)."
              if failed else ".")]
    for prefix, label, _ in MISS_KINDS:
        hit = sorted({f"`{r['method']}` ({model} {r['ratio']:g})" for model, r in rows
                      if any(x.startswith(prefix) for x in r["misses"])})
        if hit:
            out.append(f"- {label}: {len(hit)}: {', '.join(hit)}")
    for m in result["models"]:
        v = m["builds"][0]["vanilla"]
        if v.get("patch_overhead") is not None and abs(v["patch_overhead"]) > TARGET_PATCH_OVERHEAD:
            out.append(f"- patch with nothing configured beyond 1 % of unpatched: {m['model']} "
                       f"{100 * v['patch_overhead']:+.1f} % (median of {len(v['prefill_ms']['runs'])} alternated runs)")
    return out


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


def _per_layer(counts: list[int]) -> str:
    """``576, 576, 64`` -> ``576 x2, 64``."""
    out: list[str] = []
    for c in counts:
        if out and out[-1][0] == c:
            out[-1][1] += 1
        else:
            out.append([c, 1])
    return ", ".join(f"{c}" + (f" x{k}" if k > 1 else "") for c, k in out)


def summary_table(result: dict[str, Any], ratio: float = 0.111) -> str:
    """The README's compact table: per model, a few representative methods at ``ratio``."""
    lines = ["| model (decoder / ViT layers) | method | speed-up measured / predicted | method % of prefill | engine syncs | targets |",
             "|---|---|---|---|---|---|"]
    for m in result["models"]:
        b = m["builds"][0]
        rows = {r["method"]: {**r, "misses": misses(r, m["family"], baseline_for(r, b["rows"]))}
                for r in b["rows"] if "error" not in r and abs(r["ratio"] - ratio) < 1e-9}
        for name in README_METHODS:
            r = rows.get(name)
            if r is None:
                continue
            lines.append(
                f"| {m['model']} ({b['layers']} / {b['vit_layers']}) | `{name}` | {r['speedup']:.2f}x / "
                f"{r['predicted_speedup']:.2f}x | {100 * r['method_fraction']:.2f} | {r['engine_syncs']} | "
                f"{'met' if not r['misses'] else 'missed: ' + ', '.join(short for p, _, short in MISS_KINDS if any(x.startswith(p) for x in r['misses']))} |"
            )
    return "\n".join(lines)


def replace_between(path: Path, begin: str, end: str, body: str) -> None:
    text = path.read_text()
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        raise SystemExit(f"{path}: markers {begin} ... {end} not found")
    path.write_text(text[: i + len(begin)] + "\n" + body.rstrip("\n") + "\n" + text[j:])


# ----------------------------------------------------------------------------- main
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    if torch.cuda.is_available():
        out += f", {torch.cuda.get_device_name()}"
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=None,
                   help=f"models or families, comma-separated ({', '.join(MODELS)}; a family name takes its models). "
                        f"Default: {', '.join(CPU_MODELS)} on cpu, all on cuda")
    p.add_argument("--methods", default=None, help="registered methods, comma-separated (default: all)")
    p.add_argument("--ratios", default=None,
                   help="kept ratios, comma-separated (default: 0.333,0.222,0.111 on cuda; 0.111 on cpu, for time)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (default 3)")
    p.add_argument("--layers", default=None,
                   help="decoder layers, or DECODER:VIT (default: each model's real depth on cuda; 3 decoder and "
                        "1-2 ViT layers on cpu)")
    p.add_argument("--deep-models", default=None,
                   help="models on which methods pruning deeper than --layers (hybrids, VTW) run on a deeper build "
                        f"(default: {', '.join(CPU_DEEP_MODELS)} on cpu; 'none' to skip)")
    p.add_argument("--decode-steps", type=int, default=None, help="greedy decode steps timed after the prefill (default 4 cpu, 16 cuda)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default on cpu: 1, timed on the process's CPU clock, which other jobs "
                        "on a shared machine do not inflate; with more, the wall clock)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--out", default="bench_results", help="folder of bench_speed.json / bench_speed.md")
    p.add_argument("--quick", action="store_true", help="tiny widths (the test): structure only")
    p.add_argument("--from-json", default=None, metavar="FILE[,FILE...]",
                   help="write the Markdown (and with --write-docs the docs) from saved bench_speed.json files, one "
                        "section per run, run nothing")
    p.add_argument("--write-docs", action="store_true",
                   help="regenerate the table in docs/performance.md and the summary in README.md between their markers")
    return p.parse_args(argv)


def select_models(arg: str | None, device: str) -> list[ModelSpec]:
    if arg is None:
        return [MODELS[n] for n in (CPU_MODELS if device == "cpu" else MODELS)]
    out = []
    for item in arg.split(","):
        item = item.strip()
        found = [MODELS[item]] if item in MODELS else [s for s in MODELS.values() if s.family == item]
        if not found:
            raise SystemExit(f"--families: unknown {item!r} (models: {', '.join(MODELS)}; families: "
                             f"{', '.join(sorted({s.family for s in MODELS.values()}))})")
        out += [s for s in found if s not in out]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.from_json:
        runs = [json.loads(Path(f).read_text()) for f in args.from_json.split(",")]
        write_reports(runs, Path(args.out), args.write_docs, json_too=False)
        return runs[0] if len(runs) == 1 else {"runs": runs}
    t0 = time.perf_counter()
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    load_before = os.getloadavg()
    cpu = args.device == "cpu"
    models = select_models(args.families, args.device)
    if args.quick and args.families is None:
        models = [MODELS["qwen2.5-vl-3b"], MODELS["llava-1.5-7b"]]
    names = methods.names() if args.methods is None else [methods.get_method(n.strip()).name for n in args.methods.split(",")]
    ratios = tuple(float(r) for r in args.ratios.split(",")) if args.ratios else ((0.111,) if cpu else RATIOS)
    if args.decode_steps is None:
        args.decode_steps = 4 if cpu else 16
    deep_arg = args.deep_models if args.deep_models is not None else (",".join(CPU_DEEP_MODELS) if cpu else "all")
    if args.quick and args.deep_models is None:
        deep_arg = "all"
    deep = {s.name for s in MODELS.values()} if deep_arg == "all" else set() if deep_arg == "none" else {
        s.name for s in select_models(deep_arg, args.device)}
    result: dict[str, Any] = {"models": []}
    for spec in models:
        if args.layers:
            parts = [int(x) for x in args.layers.split(":")]
            layers, vit_layers = parts[0], (parts[1] if len(parts) > 1 else (spec.cpu_layers[1] if cpu else spec.vit_depth))
        elif args.quick:
            layers, vit_layers = 3, 2
        else:
            layers, vit_layers = spec.cpu_layers if cpu else (spec.depth, spec.vit_depth)
        result["models"].append(bench_model(spec, args, layers, vit_layers, names, ratios, spec.name in deep))
    import transformers

    result["meta"] = {
        "command": "python -m scripts.bench_speed" + ("" if argv is None and len(sys.argv) <= 1 else " " + " ".join(argv if argv is not None else sys.argv[1:])),
        "machine": machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": args.device,
        "dtype": args.dtype,
        "attn": args.attn,
        "repeats": args.repeats,
        "clock": pick_clock(args.device)[1],
        "ratios": list(ratios),
        "quick": args.quick,
        "prompt_text_tokens": list(PROMPT_TEXT),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": time.perf_counter() - t0,
        # Other jobs on the machine slow the runs down unevenly: the 1-minute load before and after.
        "load_average": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "targets": {"speedup_vs_prediction": TARGET_SPEEDUP_FRACTION, "method_fraction": TARGET_METHOD_FRACTION,
                    "engine_syncs": TARGET_ENGINE_SYNCS, "patch_overhead": TARGET_PATCH_OVERHEAD,
                    "sync_loop": SYNC_LOOP},
    }
    write_reports([result], Path(args.out), args.write_docs)
    return result


def write_reports(runs: list[dict[str, Any]], out: Path, write_docs: bool, json_too: bool = True) -> None:
    """The Markdown of one run, or of several (``--from-json a.json,b.json``: each with its command),
    into ``out`` and, with ``write_docs``, between the markers of docs/performance.md and README.md."""
    out.mkdir(parents=True, exist_ok=True)
    if json_too:
        (out / "bench_speed.json").write_text(json.dumps(runs[0], indent=1))
    md = "\n\n".join(markdown(r) for r in runs)
    (out / "bench_speed.md").write_text(md + "\n")
    if write_docs:
        replace_between(ROOT / "docs" / "performance.md", DOCS_BEGIN, DOCS_END, md)
        table = summary_table(runs[0]) + "".join("\n" + summary_table(r).split("\n", 2)[2] for r in runs[1:])
        replace_between(ROOT / "README.md", README_BEGIN, README_END, table)
    logger.info("wrote %s (%s min run)", out / "bench_speed.md", " + ".join(f"{r['meta']['seconds'] / 60:.1f}" for r in runs))


if __name__ == "__main__":
    main()
