"""Configuration (read from the environment in exactly one place) and timers.

Environment variables (all optional; nothing set means no pruning):

=========================  ===============================================================
``KEEP_RATIO``             fraction of an image's visual tokens kept by the pre-LLM method,
                           and the default ratio of intra-LLM layers; in (0, 1].
``PRUNE_METHOD_PRE_LLM``   a method registered for ``stage="pre_llm"``.
``PRUNE_METHOD_INTRA_LLM`` a method registered for ``stage="intra_llm"``; applied at its
                           original layer (``default_layer``, 2 for most) with ``KEEP_RATIO``
                           when ``INTRA_LLM_LAYER_SPECS`` is not set.
``PRUNE_METHOD``           the seed README's single name: routed to the stage it is
                           registered for.
``INTRA_LLM_LAYER_SPECS``  ``"layer:method[:ratio];..."`` (``;`` or ``,``). ``ratio`` is the
                           fraction of the ORIGINAL visual tokens still present from that
                           layer on (default ``KEEP_RATIO``); it must shrink with depth and be
                           below the pre-LLM ratio when both stages prune.
``PRUNE_ARGS``             ``"name=value,..."``: hyper-parameters, checked against the
                           keyword-only arguments of the configured methods.
``PRUNE_SEED``             seed of the generator random methods draw from (default 0).
``METHOD_TIME``            ``1/true/yes`` (or ``0/false/no``): time every pruning event.
``PREFILL_TIME``           the same, for the whole first forward pass.
=========================  ===============================================================

Budget: an image with ``N`` visual tokens keeps ``max(1, floor(N * r + 0.5))`` at ratio ``r``
(:func:`methods.budget`), per image.

Hybrid methods (registered with a ``schedule``: ``sparsevlm``, ``mustdrop``, ``vscan``) named alone by
``PRUNE_METHOD`` / ``PRUNE_METHOD_INTRA_LLM`` expand into one intra-LLM event per pruning layer of
the original, with the budgets or thresholds their schedule derives from ``KEEP_RATIO`` (each
method documents that mapping); ``PRUNE_ARGS`` can change the layers and override the mapping. A
hybrid with a pre-LLM stage (``vscan``) also takes the pre-LLM slot, at the ratio its schedule
gives that stage; an event at :data:`methods.MIDDLE_LAYER` lands on the decoder's middle layer when
the configuration is applied to a model (:meth:`PruneConfig.for_model`; the tag says ``Lmid``).
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

import methods

logger = logging.getLogger(__name__)

KNOWN_VARS = (
    "KEEP_RATIO",
    "PRUNE_METHOD",
    "PRUNE_METHOD_PRE_LLM",
    "PRUNE_METHOD_INTRA_LLM",
    "INTRA_LLM_LAYER_SPECS",
    "PRUNE_ARGS",
    "PRUNE_SEED",
    "METHOD_TIME",
    "PREFILL_TIME",
)
# Any other variable with one of these prefixes is a typo of ours (e.g. the seed's KEEP_RADIO).
_CHECKED_PREFIXES = ("KEEP_", "PRUNE_", "INTRA_LLM", "PRE_LLM")
_DEFAULT_INTRA_LAYER = 2


class ConfigError(ValueError):
    """A pruning configuration that cannot run; the message says how to fix it."""


@dataclass(frozen=True)
class LayerSpec:
    """Prune with ``method`` at the input of decoder layer ``layer`` down to ``ratio`` of the
    original visual tokens."""

    layer: int
    method: str
    ratio: float | None  # None for a method that decides its own count (``uses_ratio=False``)


@dataclass(frozen=True)
class PruneConfig:
    pre_method: str | None = None
    keep_ratio: float | None = None
    intra: tuple[LayerSpec, ...] = ()
    method_args: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    seed: int = 0
    time_method: bool = False
    time_prefill: bool = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "PruneConfig":
        """Parse and validate the pruning variables of ``env`` (the only reader of the environment)."""
        _check_names(env)
        get = lambda k: (env.get(k) or "").strip() or None  # noqa: E731 (empty means unset)

        keep_ratio = _parse_ratio("KEEP_RATIO", get("KEEP_RATIO")) if get("KEEP_RATIO") else None
        pre = get("PRUNE_METHOD_PRE_LLM")
        intra_method = get("PRUNE_METHOD_INTRA_LLM")
        if get("PRUNE_METHOD"):
            name = get("PRUNE_METHOD")
            stage = methods.get_method(name).stage
            slot = "PRUNE_METHOD_PRE_LLM" if stage == "pre_llm" else "PRUNE_METHOD_INTRA_LLM"
            current = pre if stage == "pre_llm" else intra_method
            if current and current != name:
                raise ConfigError(f"PRUNE_METHOD={name} and {slot}={current} disagree: set only one of them")
            if stage == "pre_llm":
                pre = name
            else:
                intra_method = name
        if pre:
            _check_stage(pre, "pre_llm", "PRUNE_METHOD_PRE_LLM")

        specs_text = get("INTRA_LLM_LAYER_SPECS")
        if specs_text and intra_method:
            raise ConfigError(
                f"both INTRA_LLM_LAYER_SPECS and an intra-LLM method ({intra_method}) are set: put the method "
                f"in the specs (e.g. INTRA_LLM_LAYER_SPECS='{_DEFAULT_INTRA_LAYER}:{intra_method}') and unset the other"
            )
        if specs_text:
            intra = _parse_specs(specs_text, keep_ratio)
        elif intra_method:
            _check_stage(intra_method, "intra_llm", "PRUNE_METHOD_INTRA_LLM")
            m = methods.get_method(intra_method)
            if (m.uses_ratio or m.schedule is not None) and keep_ratio is None:
                raise ConfigError(f"{intra_method} needs a ratio: set KEEP_RATIO (e.g. KEEP_RATIO=0.333)")
            # A hybrid (m.schedule) is expanded into its events below, once PRUNE_ARGS is read.
            intra = (LayerSpec(m.default_layer, intra_method, keep_ratio if m.uses_ratio else None),)
        else:
            intra = ()

        if pre and keep_ratio is None:
            raise ConfigError(f"{pre} needs a ratio: set KEEP_RATIO (e.g. KEEP_RATIO=0.333)")
        if not pre and not intra and keep_ratio is not None:
            raise ConfigError(
                "KEEP_RATIO is set but no method is: set PRUNE_METHOD_PRE_LLM, PRUNE_METHOD_INTRA_LLM, "
                "PRUNE_METHOD or INTRA_LLM_LAYER_SPECS (or unset KEEP_RATIO for the unpruned model)"
            )

        seed_text = get("PRUNE_SEED") or "0"
        try:
            seed = int(seed_text)
        except ValueError:
            raise ConfigError(f"PRUNE_SEED={seed_text!r} is not an integer") from None

        cfg = cls(
            pre_method=pre,
            keep_ratio=keep_ratio,
            intra=intra,
            method_args={},
            seed=seed,
            time_method=parse_bool("METHOD_TIME", env.get("METHOD_TIME")),
            time_prefill=parse_bool("PREFILL_TIME", env.get("PREFILL_TIME")),
        )
        args = get("PRUNE_ARGS")
        if args:
            object.__setattr__(cfg, "method_args", cfg._parse_args(args))
        if intra_method and methods.get_method(intra_method).schedule is not None:
            cfg._expand_schedule(intra_method)
        cfg._check_ratios()
        return cfg

    # ------------------------------------------------------------------ derived views
    @property
    def active(self) -> bool:
        return bool(self.pre_method or self.intra)

    @property
    def method_names(self) -> list[str]:
        names = [self.pre_method] if self.pre_method else []
        return names + [s.method for s in self.intra if s.method not in names]

    def args_for(self, method: str) -> dict[str, Any]:
        return dict(self.method_args.get(method, {}))

    def for_model(self, num_layers: int) -> "PruneConfig":
        """This configuration on a decoder of ``num_layers`` layers: events a hybrid's schedule placed at
        :data:`methods.MIDDLE_LAYER` get the middle layer ``num_layers // 2`` (the configuration read
        from the environment does not know the model). Returns ``self`` when nothing changes."""
        if not any(s.layer == methods.MIDDLE_LAYER for s in self.intra):
            return self
        intra = tuple(
            LayerSpec(num_layers // 2, s.method, s.ratio) if s.layer == methods.MIDDLE_LAYER else s for s in self.intra
        )
        return replace(self, intra=intra)

    def validate_for(self, num_layers: int, family: str | None = None) -> None:
        """Checks that need the model: layer range, methods that need a previous layer, families."""
        for spec in self.intra:
            if not 0 <= spec.layer < num_layers:
                raise ConfigError(
                    f"INTRA_LLM_LAYER_SPECS: layer {spec.layer} is out of range for this model's "
                    f"{num_layers}-layer decoder (valid: 0..{num_layers - 1})"
                )
            m = methods.get_method(spec.method)
            if spec.layer == 0 and "last_query_attention_prev" in m.needs:
                raise ConfigError(
                    f"{spec.method} reads the previous layer's attention, so it cannot prune at layer 0: use layer >= 1"
                )
        for name in self.method_names:
            m = methods.get_method(name)
            if family and m.families is not None and family not in m.families:
                reason = m.refusal_for(family)
                why = f": {reason}" if reason else ""
                raise ConfigError(f"{name} does not apply to {family} (it supports {', '.join(m.families)}){why}")

    def tag(self) -> str:
        """A short, filesystem-safe name of this configuration ('' when nothing is pruned).

        Part of the VLMEvalKit model name, so two configurations never share cached predictions.
        """
        if not self.active:
            return ""
        parts = []
        if self.pre_method:
            parts.append(f"{self.pre_method}-r{self.keep_ratio:g}")
        parts += [
            f"L{'mid' if s.layer == methods.MIDDLE_LAYER else s.layer}-{s.method}" + ("" if s.ratio is None else f"-r{s.ratio:g}")
            for s in self.intra
        ]
        for method, args in sorted(self.method_args.items()):
            parts += [f"{method}.{k}={v}" for k, v in sorted(args.items())]
        if any(_is_random(m) for m in self.method_names):
            parts.append(f"seed{self.seed}")
        return "__".join(parts).replace("/", "-").replace(" ", "")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["intra"] = [asdict(s) for s in self.intra]
        d["method_args"] = {k: dict(v) for k, v in self.method_args.items()}
        return d

    # ------------------------------------------------------------------ helpers
    def _expand_schedule(self, name: str) -> None:
        """A hybrid method named alone: its events (layers, ratios) and the hyper-parameters that
        ``KEEP_RATIO`` selects, from its registered ``schedule`` (PRUNE_ARGS override them)."""
        m = methods.get_method(name)
        given = self.args_for(name)
        try:
            events, args = m.schedule(self.keep_ratio, {**m.params, **given})
        except ValueError as e:
            raise ConfigError(f"{name}: {e}") from None
        if not events:
            raise ConfigError(f"{name} at KEEP_RATIO={self.keep_ratio:g} prunes nothing")
        args = {**m.check_args({k: v for k, v in args.items() if m.params.get(k) != v}), **given}
        pre = [ratio for layer, ratio in events if layer is None]
        if pre:  # a hybrid with a pre-LLM stage (m.pre_stage): it takes the pre-LLM slot
            if self.pre_method and self.pre_method != name:
                raise ConfigError(
                    f"{name} has its own pre-LLM stage: unset PRUNE_METHOD_PRE_LLM={self.pre_method} (or run the "
                    f"two methods apart)"
                )
            object.__setattr__(self, "pre_method", name)
            object.__setattr__(self, "keep_ratio", pre[0])
        events = [(layer, ratio) for layer, ratio in events if layer is not None]
        object.__setattr__(self, "intra", tuple(LayerSpec(layer, name, ratio) for layer, ratio in events))
        object.__setattr__(self, "method_args", {**self.method_args, name: args} if args else dict(self.method_args))

    def _check_ratios(self) -> None:
        previous, where = (self.keep_ratio, "the pre-LLM KEEP_RATIO") if self.pre_method else (None, "")
        for spec in self.intra:
            if spec.ratio is None:  # the method decides its count
                continue
            if previous is not None and spec.ratio >= previous:
                suggestion = f"{spec.layer}:{spec.method}:{previous * spec.ratio:.4g}"
                raise ConfigError(
                    f"INTRA_LLM_LAYER_SPECS: layer {spec.layer} keeps {spec.ratio:g} of the ORIGINAL visual tokens, "
                    f"but only {previous:g} survive {where}; ratios are fractions of the original count and must "
                    f"shrink with depth. To keep {spec.ratio:g} of the survivors, write '{suggestion}'"
                )
            previous, where = spec.ratio, f"layer {spec.layer}"

    def _parse_args(self, text: str) -> dict[str, dict[str, Any]]:
        configured = [methods.get_method(n) for n in self.method_names]
        if not configured:
            raise ConfigError("PRUNE_ARGS is set but no pruning method is configured")
        out: dict[str, dict[str, Any]] = {m.name: {} for m in configured}
        for item in filter(None, (p.strip() for p in text.split(","))):
            if "=" not in item:
                raise ConfigError(f"PRUNE_ARGS: {item!r} is not name=value (e.g. PRUNE_ARGS='seed=1,alpha=0.5')")
            key, value = (s.strip() for s in item.split("=", 1))
            owners = [m for m in configured if key in m.params]
            if not owners:
                known = sorted({p for m in configured for p in m.params})
                close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise ConfigError(
                    f"PRUNE_ARGS: no configured method ({', '.join(m.name for m in configured)}) takes {key!r}.{hint} "
                    f"They take: {', '.join(known) or 'no hyper-parameters'}"
                )
            for m in owners:
                try:
                    out[m.name].update(m.check_args({key: value}))
                except ValueError as e:
                    raise ConfigError(f"PRUNE_ARGS: {e}") from None
        return {k: v for k, v in out.items() if v}


def parse_bool(name: str, value: str | None) -> bool:
    """``1/true/yes`` -> True, ``0/false/no`` or unset -> False (any case); anything else is an error."""
    if value is None or value.strip() == "":
        return False
    low = value.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={value!r} is not a boolean: use 1/true/yes or 0/false/no")


def _parse_ratio(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a number: use a fraction in (0, 1], e.g. 0.333") from None
    if not 0.0 < value <= 1.0:
        hint = f" (did you mean {value / 100:g}?)" if 1.0 < value <= 100.0 else ""
        raise ConfigError(f"{name}={text} is not in (0, 1]: it is the fraction of visual tokens kept{hint}")
    return value


def _check_stage(name: str, stage: str, var: str) -> None:
    m = methods.get_method(name)
    if m.stage != stage:
        other = "PRUNE_METHOD_PRE_LLM" if m.stage == "pre_llm" else "PRUNE_METHOD_INTRA_LLM or INTRA_LLM_LAYER_SPECS"
        raise ConfigError(f"{var}={name}: {name} is a {m.stage} method; set it through {other}")


def _parse_specs(text: str, keep_ratio: float | None) -> tuple[LayerSpec, ...]:
    specs: list[LayerSpec] = []
    for item in filter(None, (p.strip() for p in text.replace(",", ";").split(";"))):
        parts = [p.strip() for p in item.split(":")]
        if len(parts) not in (2, 3) or not all(parts):
            raise ConfigError(
                f"INTRA_LLM_LAYER_SPECS: {item!r} is not 'layer:method[:ratio]' (e.g. '2:fastv_intra_llm:0.5')"
            )
        try:
            layer = int(parts[0])
        except ValueError:
            raise ConfigError(f"INTRA_LLM_LAYER_SPECS: layer {parts[0]!r} in {item!r} is not an integer") from None
        if layer < 0:
            raise ConfigError(f"INTRA_LLM_LAYER_SPECS: layer {layer} in {item!r} is negative (layers count from 0)")
        _check_stage(parts[1], "intra_llm", "INTRA_LLM_LAYER_SPECS")
        if not methods.get_method(parts[1]).uses_ratio:
            if len(parts) == 3:
                raise ConfigError(
                    f"INTRA_LLM_LAYER_SPECS: {parts[1]} decides how many tokens it keeps and takes no ratio: "
                    f"write '{parts[0]}:{parts[1]}'"
                )
            ratio = None
        elif len(parts) == 3:
            ratio = _parse_ratio(f"INTRA_LLM_LAYER_SPECS ratio in {item!r}", parts[2])
        elif keep_ratio is not None:
            ratio = keep_ratio
        else:
            raise ConfigError(f"INTRA_LLM_LAYER_SPECS: {item!r} has no ratio and KEEP_RATIO is not set")
        specs.append(LayerSpec(layer, parts[1], ratio))
    layers = [s.layer for s in specs]
    if len(set(layers)) != len(layers):
        raise ConfigError(f"INTRA_LLM_LAYER_SPECS: a layer appears twice in {text!r}")
    if layers != sorted(layers):
        raise ConfigError(f"INTRA_LLM_LAYER_SPECS: list the layers in increasing order ({text!r})")
    if not specs:
        raise ConfigError("INTRA_LLM_LAYER_SPECS is set but empty")
    return tuple(specs)


def _check_names(env: Mapping[str, str]) -> None:
    for name in env:
        if name in KNOWN_VARS:
            continue
        close = difflib.get_close_matches(name, KNOWN_VARS, n=1, cutoff=0.8)
        if name.startswith(_CHECKED_PREFIXES) or difflib.get_close_matches(name, KNOWN_VARS, n=1, cutoff=0.85):
            hint = f"did you mean {close[0]}?" if close else f"known variables: {', '.join(KNOWN_VARS)}"
            raise ConfigError(f"unknown pruning variable {name}: {hint} (unset {name} to continue)")


def _is_random(name: str) -> bool:
    return name.startswith("random_")


# ---------------------------------------------------------------------- timing
class Stopwatch:
    """Times a block: CUDA events on a CUDA device (read after a sync), ``perf_counter`` otherwise.

    Use ``with Stopwatch(device) as sw: ...`` then ``sw.ms``. ``start()``/``stop()`` allow a start and
    an end in two different hooks.
    """

    def __init__(self, device: torch.device | str | None = None, enabled: bool = True) -> None:
        self.enabled = enabled
        self.cuda = enabled and torch.device(device or "cpu").type == "cuda"
        self._ms: float | None = None

    def start(self) -> "Stopwatch":
        if self.enabled:
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()  # the prefill's peak memory is read against this
                self._start, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                self._start.record()
            else:
                self._t0 = time.perf_counter()
        return self

    def stop(self) -> None:
        if not self.enabled:
            return
        if self.cuda:
            self._end.record()
            self._ms = None  # read lazily: synchronising here would stall the pipeline
        else:
            self._ms = (time.perf_counter() - self._t0) * 1000.0

    @property
    def ms(self) -> float | None:
        if not self.enabled:
            return None
        if self.cuda and self._ms is None:
            self._end.synchronize()
            self._ms = float(self._start.elapsed_time(self._end))
        return self._ms

    def __enter__(self) -> "Stopwatch":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line atomically: several processes (torchrun ranks) never interleave a line."""
    data = (line.rstrip("\n") + "\n").encode()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, data)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@dataclass
class TimingSink:
    """Where timings go. ``text_dir``: the seed's files (``method_times_<method>.txt``,
    ``prefill_times.txt``); ``jsonl``: one record per sample (see :meth:`write_sample`).

    Line format of the text files, tab-separated, first field the milliseconds so that
    ``float(line.split()[0])`` reads it:
      method_times_<method>.txt: ``ms  stage  layer(- for pre-LLM)  n_in  n_keep  rank``
      prefill_times.txt:         ``ms  n_prompt_tokens  n_visual_tokens  n_visual_kept_final  rank``
    """

    text_dir: Path | None = Path(".")
    jsonl: Path | None = None
    rank: int = field(default_factory=lambda: int(os.environ.get("RANK", "0") or 0))

    def write_sample(self, record: Mapping[str, Any], cfg: PruneConfig) -> None:
        events = record.get("events", [])
        if self.text_dir is not None:
            if cfg.time_method:
                for e in events:
                    if e.get("ms") is not None:
                        layer = "-" if e["layer"] is None else e["layer"]
                        append_line(
                            Path(self.text_dir) / f"method_times_{e['method']}.txt",
                            f"{e['ms']:.4f}\t{e['stage']}\t{layer}\t{e['n_in']}\t{e['n_keep']}\t{self.rank}",
                        )
            if cfg.time_prefill and record.get("prefill_ms") is not None:
                append_line(
                    Path(self.text_dir) / "prefill_times.txt",
                    f"{record['prefill_ms']:.4f}\t{record['n_prompt']}\t{record['n_visual']}\t"
                    f"{record['n_visual_final']}\t{self.rank}",
                )
        if self.jsonl is not None:
            append_line(self.jsonl, json.dumps({**record, "rank": self.rank}))


@contextlib.contextmanager
def maybe_timed(enabled: bool, device: torch.device) -> Iterator[Stopwatch]:
    sw = Stopwatch(device, enabled)
    with sw:
        yield sw


# ---------------------------------------------------------------------- environment: torchvision on a CPU torch
# Make ``import torchvision`` work on a CPU-only torch with PyPI's CUDA torchvision wheel.
#
# On these machines torchvision's compiled extension (``torchvision/_C.so``, a CUDA build) fails to
# load silently; ``torchvision/_meta_registrations.py`` then registers fake kernels for
# ``torchvision::nms`` / ``torchvision::qnms`` and ``import torchvision`` raises
# ``RuntimeError: operator torchvision::nms does not exist``. That breaks ``import vlmeval``,
# ``import timm`` and several ``transformers`` imports.
#
# The fix: define the torchvision operator *schemas* (no kernels) before torchvision is imported.
# The pure-Python parts (transforms, models, HF fast image processors) then work; calling a compiled
# op (nms, roi_align, ...) raises because no kernel is registered. When the real extension loads
# (CUDA torch on a GPU machine) this module does nothing.
#
# Usage: ``from utils import ensure_torchvision; ensure_torchvision()`` before anything imports torchvision.

# Schemas as declared by torchvision 0.28's C++ sources (csrc/ops/*.cpp, TORCH_LIBRARY_FRAGMENT),
# cross-checked against the strings in the installed _C.so. Only nms and qnms are strictly
# needed for the import (they get unconditional register_fake calls); the others are declared so
# that the "torchvision" namespace looks complete to code that inspects it.
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "box_iou_rotated(Tensor boxes1, Tensor boxes2) -> Tensor",
    "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor",
    "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "qroi_align(Tensor input, Tensor rois, float input_scale, int input_zero_point, "
    "float rois_scale, int rois_zero_point, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor",
    "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width) -> (Tensor, Tensor)",
    "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, "
    "SymInt height, SymInt width) -> Tensor",
    "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, int sampling_ratio) -> (Tensor, Tensor)",
    "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor channel_mapping, "
    "float spatial_scale, SymInt pooled_height, SymInt pooled_width, int sampling_ratio, "
    "SymInt batch_size, SymInt channels, SymInt height, SymInt width) -> Tensor",
    "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width) -> (Tensor, Tensor)",
    "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor channel_mapping, "
    "float spatial_scale, SymInt pooled_height, SymInt pooled_width, SymInt batch_size, "
    "SymInt channels, SymInt height, SymInt width) -> Tensor",
    "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, "
    "SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, "
    "SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) -> Tensor",
    "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, "
    "Tensor mask, Tensor bias, SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, "
    "SymInt dilation_h, SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)

# The Library object must stay referenced for the whole process: when it is garbage-collected,
# torch removes the definitions it made.
_LIB: torch.library.Library | None = None


def ensure_torchvision() -> bool:
    """Make ``import torchvision`` succeed. Idempotent.

    Returns True when torchvision's compiled ops are real, False when schema stubs were installed
    (compiled torchvision ops will raise if called).
    """
    global _LIB
    if _LIB is not None:
        return False
    try:
        import torchvision.extension

        # Import works: either the real extension loaded, or someone defined the stubs already.
        return torchvision.extension._has_ops()
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        first_error = exc
    # The failed import left half-initialised torchvision modules behind; drop them so the next
    # import starts from scratch.
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        lib.define(schema)
    _LIB = lib
    import torchvision  # noqa: F401  (must succeed now)

    logger.info(
        "torchvision compiled ops unavailable (%s); installed %d schema stubs",
        first_error,
        len(_SCHEMAS),
    )
    return False
