"""Configuration (read from the environment in exactly one place), the checks a run makes before it
loads a model (:func:`check_before_loading`), and timers.

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
import re
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

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
# Family.name -> the runner of that family (for messages that name the fix).
FAMILY_RUNNERS = {
    "qwen2_5_vl": "run_qwenvl2_5.py", "internvl": "run_internvl3.py", "llava": "run_llava.py",
    "llava_next": "run_llava_next.py",
}


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
        """The checks that need the model's shape, callable before it loads (``num_layers`` from its
        ``config.json``, see :func:`check_checkpoint`; ``family`` the runner's ``Family.name``):
        every pruning layer inside the decoder, no method that reads the previous layer at layer 0,
        every method applicable to the family. Raises :class:`ConfigError` naming the fix."""
        for spec in self.intra:
            m = methods.get_method(spec.method)
            if not 0 <= spec.layer < num_layers:
                if m.schedule is not None:  # a hybrid's layers come from PRUNE_ARGS layers (0-based outputs)
                    layers = sorted({s.layer - 1 for s in self.intra if s.method == spec.method})
                    raise ConfigError(
                        f"{spec.method} prunes the output of layers {'/'.join(map(str, layers))}: out of range for this "
                        f"model's {num_layers}-layer decoder (0..{num_layers - 1}); set PRUNE_ARGS='layers=...' with "
                        f"every layer <= {num_layers - 2} (a layer's output is pruned at the next layer's input)"
                    )
                raise ConfigError(
                    f"INTRA_LLM_LAYER_SPECS: layer {spec.layer} is out of range for this model's "
                    f"{num_layers}-layer decoder (valid: 0..{num_layers - 1})"
                )
            previous = methods.needs_previous_layer(m.needs)
            if spec.layer == 0 and previous:
                raise ConfigError(
                    f"{spec.method} reads the previous layer ({', '.join(previous)}), so it cannot prune at layer 0: "
                    f"use layer >= 1 (e.g. INTRA_LLM_LAYER_SPECS='1:{spec.method}"
                    + ("" if spec.ratio is None else f":{spec.ratio:g}") + "')"
                )
        for name in self.method_names:
            m = methods.get_method(name)
            if family and m.families is not None and family not in m.families:
                supported = ", ".join(m.families)
                runners = " or ".join(FAMILY_RUNNERS.get(f, f) for f in m.families)
                others = sorted(n for n, o in methods.all_methods().items()
                                if o.stage == m.stage and o.schedule is None and (o.families is None or family in o.families))
                raise ConfigError(
                    f"{name} does not apply to {family}: it supports {supported} only. Use {runners} with "
                    f"a {supported} checkpoint, or another {m.stage} method for {family} ({', '.join(others[:4])}, ...)"
                    + (f". Why: {m.refusal_for(family)}" if m.refusal_for(family) else "")
                )

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
            raise ConfigError(
                f"INTRA_LLM_LAYER_SPECS: layer {layer} in {item!r} is negative: decoder layers count from 0 "
                "(0 = the first layer's input; Python-style negative indices are not accepted)"
            )
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


# ---------------------------------------------------------------------- checks before loading a model
# Everything about a run that can be checked without building the model, so that a mistake stops
# the runner (or the sweep's plan) in seconds with the fix, instead of after a load or halfway
# through VLMEvalKit: the checkpoint folder (:func:`check_checkpoint`), the dataset names
# (:func:`check_datasets`), and the configuration against the checkpoint's depth and family
# (:meth:`PruneConfig.validate_for`). :func:`check_before_loading` runs all three.

# config.json model types this harness does not run, and what to use instead.
_OTHER_MODEL_TYPES = {
    "internvl_chat": "the remote-code InternVL checkpoint (e.g. OpenGVLab/InternVL3-8B); this harness runs the "
                     "HF-native conversion: use OpenGVLab/InternVL3-<size>-hf with run_internvl3.py",
    "qwen2_vl": "a Qwen2-VL checkpoint; this harness runs Qwen2.5-VL (run_qwenvl2_5.py)",
    "llava_onevision": "a LLaVA-OneVision checkpoint; this harness runs LLaVA-1.5 (run_llava.py) and LLaVA-NeXT "
                       "(run_llava_next.py)",
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be loaded as asked (missing, incomplete, another family's)."""


class CheckpointNotLocal(CheckpointError):
    """A Hugging Face hub id that is neither a local folder nor in the local Hugging Face cache (with
    ``download=False``): nothing about it can be checked without the network."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What :func:`check_checkpoint` found: ``path`` (the local folder; a hub id's cached snapshot),
    ``model_type`` (``config.json``), ``num_layers`` (the decoder's depth,
    ``text_config.num_hidden_layers`` with the architecture's default where ``config.json`` omits
    it, as llava-hf's does), ``weights`` (the weight files checked; empty when they are still to be
    downloaded) and ``config`` (``config.json`` as read)."""

    path: str
    model_type: str
    num_layers: int
    weights: tuple[str, ...]
    config: Mapping[str, Any]


def check_checkpoint(
    path_or_hub_id: str, family_name: str, expected_model_types: Iterable[str], *, download: bool = False
) -> CheckpointInfo:
    """Check a checkpoint without loading it; raise :class:`CheckpointError` naming the fix.

    ``path_or_hub_id``: a local folder, or a Hugging Face hub id (``Qwen/Qwen2.5-VL-7B-Instruct``),
    which is resolved through the local Hugging Face cache without the network. Not cached:
    :class:`CheckpointNotLocal`, unless ``download`` (then only ``config.json`` is fetched, and the
    weights, which ``from_pretrained`` downloads later, are not checked). ``family_name`` is the
    runner's ``Family.name`` (for messages), ``expected_model_types`` the ``config.json``
    ``model_type`` values its model class loads (``MODEL_CLASS.config_class.model_type``).

    Checked: the folder exists; ``config.json`` is present, readable JSON with the expected
    ``model_type`` (another family's says which runner to use) and understood by transformers;
    weights are present (``*.safetensors`` / ``*.bin``, or an index whose shards all exist), each
    safetensors file's header read and its size compared with it (a truncated copy is caught
    without reading the tensors), each zip ``.bin`` complete; a tokenizer file is present.
    """
    expected = tuple(expected_model_types)
    runner = FAMILY_RUNNERS.get(family_name, "the runner")
    folder, cached = _checkpoint_folder(str(path_or_hub_id), download)
    config_file = folder / "config.json"
    if not config_file.is_file():
        present = sorted(p.name for p in folder.iterdir())[:8] if folder.is_dir() else []
        raise CheckpointError(
            f"{path_or_hub_id}: no config.json in {folder} ("
            + (f"it holds {', '.join(present)}" if present else "the folder is empty")
            + "). A Hugging Face checkpoint folder has config.json next to its weights: point --model / "
            "--model-path at the complete checkpoint (the folder save_pretrained wrote)"
        )
    try:
        config = json.loads(config_file.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{config_file} cannot be read as JSON ({e}): the checkpoint is damaged; copy it again") from None
    model_type = config.get("model_type")
    if model_type not in expected:
        if model_type in FAMILY_RUNNERS:
            what = f"this is a {model_type} checkpoint; use {FAMILY_RUNNERS[model_type]}"
        elif model_type in _OTHER_MODEL_TYPES:
            what = f"this is {_OTHER_MODEL_TYPES[model_type]}"
        else:
            what = f"model_type {model_type!r} is none of the families this harness runs ({', '.join(FAMILY_RUNNERS)})"
        raise CheckpointError(
            f"{path_or_hub_id}: {runner} runs {family_name} checkpoints (config.json model_type "
            f"{' or '.join(map(repr, expected))}), but {what}"
        )
    num_layers = _decoder_depth(folder, config)
    weights = () if (download and not cached and not _has_weights(folder)) else _check_weights(folder, str(path_or_hub_id))
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES) and not (download and not cached):
        raise CheckpointError(
            f"{path_or_hub_id}: no tokenizer in {folder} (none of {', '.join(_TOKENIZER_FILES)}): the processor "
            "cannot be built; copy the checkpoint's tokenizer files (save them with processor.save_pretrained)"
        )
    return CheckpointInfo(str(folder), model_type, num_layers, weights, config)


def _checkpoint_folder(name: str, download: bool) -> tuple[Path, bool]:
    """``(local folder, whether it was local or cached)``."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{name} is a file; --model / --model-path take a checkpoint FOLDER (with config.json)")
        return path.resolve(), True
    if not _HUB_ID.match(name):
        raise CheckpointError(f"no checkpoint folder {name} (it does not exist): check the path given to --model / --model-path")
    from huggingface_hub import constants, try_to_load_from_cache

    found = try_to_load_from_cache(name, "config.json")
    if isinstance(found, str):
        return Path(found).parent, True
    where = constants.HF_HUB_CACHE
    if not download:
        raise CheckpointNotLocal(
            f"{name} is neither a local folder nor a model in the Hugging Face cache ({where}). Download it first "
            f"(huggingface-cli download {name}), or pass a local copy with --model-path DIR; if {name} was meant "
            "as a path, it does not exist"
        )
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(name, "config.json")).parent, False
    except Exception as e:  # noqa: BLE001 - offline, unknown repository, gated, network: one message
        raise CheckpointError(
            f"{name}: its config.json cannot be fetched from the Hugging Face Hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Check the name, the network (HF_HUB_OFFLINE, a token "
            "for gated models), or pass a local copy with --model-path DIR"
        ) from None


def _decoder_depth(folder: Path, config: Mapping[str, Any]) -> int:
    text = config.get("text_config") or {}
    if isinstance(text.get("num_hidden_layers"), int):
        return int(text["num_hidden_layers"])
    try:  # config.json omits it (llava-hf): the architecture's default, as from_pretrained fills it in
        from transformers import AutoConfig

        return int(AutoConfig.from_pretrained(folder).get_text_config().num_hidden_layers)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{folder / 'config.json'}: transformers cannot read it ({e}); the checkpoint is damaged or too new") from None


def _has_weights(folder: Path) -> bool:
    return any((folder / f).exists() for f in _INDEX_FILES) or any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def _check_weights(folder: Path, name: str) -> tuple[str, ...]:
    files: list[Path] = []
    for index_name in _INDEX_FILES:
        index = folder / index_name
        if index.exists():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as e:
                raise CheckpointError(f"{index} is not a readable weight index ({e}): copy the checkpoint again") from None
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointError(
                    f"{name}: {index_name} lists {len(shards)} weight shards but {len(missing)} are missing from "
                    f"{folder} ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): finish copying the checkpoint"
                )
            files = [folder / s for s in shards]
            break
    else:
        files = sorted(folder.glob("*.safetensors")) or sorted(
            p for p in folder.glob("*.bin") if p.name not in ("training_args.bin",)
        )
    if not files:
        raise CheckpointError(
            f"{name}: no weights in {folder} (no *.safetensors, *.bin or weight index next to config.json): "
            "copy the weight files too, or point --model / --model-path at the complete checkpoint"
        )
    for f in files:
        problem = _safetensors_problem(f) if f.suffix == ".safetensors" else _bin_problem(f)
        if problem:
            raise CheckpointError(f"{name}: weight file {f} is damaged: {problem}. Copy it again (or re-download)")
    return tuple(str(f) for f in files)


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header with each tensor's byte range,
    then the data: its size must be exactly what the header describes (read only the header)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{size} bytes, too short for a safetensors header (truncated)"
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > 1 << 30:
            return f"its header claims {n} bytes but the file has {size} (truncated or not safetensors)"
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            return f"unreadable safetensors header ({e})"
    expected = 8 + n + end
    if size < expected:
        return f"truncated: {size} bytes, its header describes {expected}"
    if size > expected:
        return f"{size - expected} bytes beyond what its header describes"
    return None


def _bin_problem(path: Path) -> str | None:
    """A torch ``.bin`` saved as a zip archive must have its end-of-archive record (a cut copy has
    none); legacy pickles cannot be checked without loading them."""
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    if is_zip and not zipfile.is_zipfile(path):
        return "truncated (the zip archive has no end record)"
    return None


def check_datasets(names: Iterable[str], lmu_root: str | os.PathLike | None = None) -> None:
    """Check ``--data`` names against VLMEvalKit's datasets, the locally registered ones (tiny and
    proxy, :func:`vlm_adapter.register_local_datasets`) and ``$LMUData/<name>.tsv`` (VLMEvalKit runs
    any such file as a custom dataset); raise :class:`ConfigError` listing every unknown name with
    the closest known ones. Imports vlmeval (seconds), unless ``lmu_root`` (VLMEvalKit's data
    folder) is given and holds ``<name>.tsv`` for every name."""
    names = list(names)
    if lmu_root is not None:
        names = [n for n in names if not (Path(lmu_root) / f"{n}.tsv").is_file()]
    if not names:
        return
    import vlm_adapter  # noqa: F401 - lazily: vlm_adapter imports this module
    from vlmeval.dataset import DATASET_CLASSES
    from vlmeval.smp import LMUDataRoot

    vlm_adapter.register_local_datasets()
    known: set[str] = set()
    for cls in DATASET_CLASSES:
        known.update(cls.supported_datasets())
    try:
        from vlmeval.dataset.video_dataset_config import supported_video_datasets

        known.update(supported_video_datasets)
    except ImportError:
        pass
    root = Path(LMUDataRoot())
    local = {p.stem for p in root.glob("*.tsv")} if root.is_dir() else set()
    problems = []
    for name in names:
        if name in known or name in local:
            continue
        close = difflib.get_close_matches(name, sorted(known | local), n=3, cutoff=0.6)
        problems.append(f"{name!r}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
    if problems:
        many = len(problems) > 1
        raise ConfigError(
            f"--data: unknown dataset{'s' if many else ''} {', '.join(problems)}: VLMEvalKit has no dataset of "
            f"{'these names' if many else 'that name'} and there is no {root}/<name>.tsv (LMUData={root}). "
            "VLMEvalKit's names: python -c \"from vlmeval.dataset import SUPPORTED_DATASETS; print(SUPPORTED_DATASETS)\""
        )


def check_before_loading(
    config: PruneConfig,
    checkpoint: str,
    family_name: str,
    expected_model_types: Iterable[str],
    datasets: Iterable[str] = (),
    *,
    download: bool = False,
) -> CheckpointInfo:
    """:func:`check_checkpoint`, then ``config.validate_for`` with its depth and the family, then
    :func:`check_datasets`; returns the checkpoint's :class:`CheckpointInfo`. Raises
    :class:`ConfigError` (:class:`CheckpointError`, :class:`CheckpointNotLocal`) naming the fix."""
    info = check_checkpoint(checkpoint, family_name, expected_model_types, download=download)
    config.validate_for(info.num_layers, family_name)
    check_datasets(datasets)
    return info


# ---------------------------------------------------------------------- timing
class Stopwatch:
    """Times a block: CUDA events on a CUDA device (read after a sync), ``perf_counter`` otherwise.

    Use ``with Stopwatch(device) as sw: ...`` then ``sw.ms``. ``start()``/``stop()`` allow a start and
    an end in two different hooks.
    """

    def __init__(self, device: torch.device | str | None = None, enabled: bool = True, *, peak_memory: bool = False) -> None:
        self.enabled = enabled
        self.cuda = enabled and torch.device(device or "cpu").type == "cuda"
        # Only the prefill's stopwatch resets CUDA's peak-memory counter: a method's stopwatch, started
        # in the middle of the prefill, would otherwise cut the prefill's peak to what came after it.
        self.peak_memory = peak_memory
        self._ms: float | None = None

    def start(self) -> "Stopwatch":
        if self.enabled:
            if self.cuda and self.peak_memory:
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
    ``float(line.split()[0])`` reads it, last field the configuration that wrote the line:
      method_times_<method>.txt: ``ms  stage  layer(- for pre-LLM)  n_in  n_keep  rank  label``
      prefill_times.txt:         ``ms  n_prompt_tokens  n_visual_tokens  n_visual_kept_final  rank  label``
    ``label`` says which run wrote the line, so runners appending in one directory stay separable:
    the ``label`` given, else the name of the folder ``jsonl`` is in (the runner writes
    ``<work-dir>/<model name>/prune_records.jsonl``, so it is the VLMEvalKit model name
    ``<model>__<configuration tag>``), else the configuration's tag (``vanilla`` unpruned).

    Each JSONL record gets ``rank`` and ``run``: an id of this sink, i.e. of one runner process
    and configuration (every torchrun rank has its own), so that the records of separate runs
    appended to one file can be told apart (:func:`scripts._common.cell_records`).
    """

    text_dir: Path | None = Path(".")
    jsonl: Path | None = None
    rank: int = field(default_factory=lambda: int(os.environ.get("RANK", "0") or 0))
    label: str | None = None
    run: str = field(default_factory=lambda: f"{os.getpid()}-{time.time_ns():x}")

    def label_for(self, cfg: PruneConfig) -> str:
        if self.label:
            return self.label
        if self.jsonl is not None:
            return Path(self.jsonl).resolve().parent.name
        return cfg.tag() or "vanilla"

    def write_sample(self, record: Mapping[str, Any], cfg: PruneConfig) -> None:
        events = record.get("events", [])
        if self.text_dir is not None:
            label = self.label_for(cfg)
            if cfg.time_method:
                for e in events:
                    if e.get("ms") is not None:
                        layer = "-" if e["layer"] is None else e["layer"]
                        append_line(
                            Path(self.text_dir) / f"method_times_{e['method']}.txt",
                            f"{e['ms']:.4f}\t{e['stage']}\t{layer}\t{e['n_in']}\t{e['n_keep']}\t{self.rank}\t{label}",
                        )
            if cfg.time_prefill and record.get("prefill_ms") is not None:
                append_line(
                    Path(self.text_dir) / "prefill_times.txt",
                    f"{record['prefill_ms']:.4f}\t{record['n_prompt']}\t{record['n_visual']}\t"
                    f"{record['n_visual_final']}\t{self.rank}\t{label}",
                )
        if self.jsonl is not None:
            append_line(self.jsonl, json.dumps({**record, "rank": self.rank, "run": self.run}))


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
