"""Calibrate a FitPrune schedule for a model and a budget, as the original's ``statistical_analysis``.

    python -m scripts.fitprune_calibrate --family llava --model llava-hf/llava-1.5-7b-hf \\
        --data $LMUData/MME.tsv --limit 20 --reduction 0.8

Prints the per-layer delete scheme and the ``INTRA_LLM_LAYER_SPECS`` that runs it
(:func:`methods.fitprune.fitprune_specs`). The procedure follows the original
(FitPrune ``LLaVA_1.5/llava/eval/statistical_analysis.py``):

1. Reference masses per sample and layer from an unpruned pass: W_cross = sum A[text, V] / n_text and
   W_self = sum A[V, V] / N_v (head max; ``fitprune_reference_masses``).
2. For a mass-loss fraction alpha, a layer-by-layer pass over all samples: at each layer, each
   criterion deletes the largest prefix of its ascending order that keeps the mass >= W(1 - alpha);
   the layer deletes the INTERSECTION (``fitprune_calibration_step``), after its attention; per-layer
   counts are floor-averaged over samples. The pass stops at the first layer where the projected
   FLOPs of the visual tokens reach (1 - reduction) x the unpruned ones (:func:`visual_flops`).
3. alpha is bisected on [0, 1] until the interval is <= 0.01 (``fitprune_bisect``); the scheme of
   the last mid-point is the result.

FLOPs (the original's formula, with LLaMA-7B's 4096 / 11008 / 32 replaced by the model's hidden
size d, MLP size m and layer count L; visual tokens only, multi-head attention): a layer with v
visual tokens costs 4 v d^2 + 2 v^2 d + 3 d m v. Tokens run through the model's own modules
(sdpa attention, the engine's ``attention_probs`` for the probabilities); positions are kept.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils import ensure_torchvision  # noqa: E402

ensure_torchvision()

import torch  # noqa: E402

import prune_engine  # noqa: E402

FAMILY_MODULES = {"qwen2_5_vl": "custom_qwenvl", "internvl": "custom_internvl", "llava": "custom_llava",
                  "llava_next": "custom_llava_next"}
logger = logging.getLogger("fitprune_calibrate")


def visual_flops(v: int, d: int, m: int) -> int:
    """One decoder layer's FLOPs for ``v`` visual tokens: q/k/v/o projections, scores and weighted
    sum, and the 3-matrix MLP (the original's per-layer term)."""
    return 4 * v * d * d + 2 * v * v * d + 3 * d * m * v


@dataclass
class _Sample:
    hidden: torch.Tensor  # [1, L, D] decoder input
    rope_pos: torch.Tensor  # position ids for rotary_emb (sequence on the last dim)
    layer_pos: torch.Tensor | None  # position ids passed to the layers
    start: int  # first visual token
    n_visual: int  # visual tokens left


class _Captured(Exception):
    pass


@torch.no_grad()
def decoder_inputs(family_module, model, inputs: dict[str, torch.Tensor]) -> _Sample:
    """The decoder's input embeddings and positions for one prompt (the model's own vision path)."""
    text = family_module.FAMILY.text_model(model)
    got: dict[str, Any] = {}

    def grab(module, args, kwargs):
        got.update(kwargs)
        raise _Captured

    handle = text.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**inputs)
    except _Captured:
        pass
    finally:
        handle.remove()
    embeds = got["inputs_embeds"]
    rope_pos, layer_pos = family_module.FAMILY.positions(text, got.get("position_ids"), embeds, 0)
    visual = torch.nonzero(inputs["input_ids"][0] == family_module.FAMILY.image_token_id(model)).flatten()
    if visual.numel() == 0 or int(visual[-1] - visual[0]) + 1 != visual.numel():
        raise ValueError("calibration needs exactly one contiguous run of image tokens per prompt")
    return _Sample(embeds, rope_pos, layer_pos, int(visual[0]), int(visual.numel()))


class Calibrator:
    def __init__(self, family_module, model, samples: list[_Sample]) -> None:
        self.family = family_module.FAMILY
        self.text = family_module.FAMILY.text_model(model)
        self.samples = samples
        cfg = self.text.config
        self.d, self.m, self.n_layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
        self.references = [self._references(s) for s in samples]

    def _split(self, attn: torch.Tensor, s: _Sample) -> tuple[torch.Tensor, torch.Tensor]:
        v = slice(s.start, s.start + s.n_visual)
        return attn[:, v, v], attn[:, s.start + s.n_visual :, v]

    def _layer(self, i: int, s: _Sample, hidden: torch.Tensor, rope_pos, layer_pos) -> tuple[torch.Tensor, torch.Tensor]:
        """``(attention probabilities [H, L, L], layer output [1, L, D])`` of layer ``i``."""
        layer = self.text.layers[i]
        cos, sin = self.text.rotary_emb(hidden, rope_pos)
        attn = prune_engine.attention_probs(self.family, layer, hidden, cos, sin)
        out = layer(hidden, attention_mask=None, position_embeddings=(cos, sin), position_ids=layer_pos)
        return attn, out

    @torch.no_grad()
    def _references(self, s: _Sample) -> list[tuple[float, float]]:
        from methods.fitprune import fitprune_reference_masses

        refs, hidden = [], s.hidden
        for i in range(self.n_layers):
            attn, hidden = self._layer(i, s, hidden, s.rope_pos, s.layer_pos)
            refs.append(fitprune_reference_masses(*self._split(attn, s)))
        return refs

    @torch.no_grad()
    def fit(self, alpha: float, reduction: float) -> tuple[bool, dict[int, int]]:
        """The original's ``fit_model``: ``(reached, scheme)`` for one alpha."""
        from methods.fitprune import fitprune_average_counts, fitprune_calibration_step

        d, m, n_layers = self.d, self.m, self.n_layers
        n_samples = len(self.samples)
        origin = statistics.mean(visual_flops(s.n_visual, d, m) * n_layers for s in self.samples)
        state = [(s.hidden, s.rope_pos, s.layer_pos, s.n_visual) for s in self.samples]
        totals = {i: 0 for i in range(n_layers)}
        used, reached = 0, False
        for i in range(n_layers):
            forecast = 0
            for _, _, _, v in state:
                used += 3 * v * d * d + 2 * v * v * d  # q/k/v projections and attention
                # this layer's o-proj + MLP, and every later layer whole
                forecast += v * d * d + 3 * m * d * v + visual_flops(v, d, m) * (n_layers - 1 - i)
            if (used + forecast) / n_samples <= origin * (1 - reduction):
                reached = True
                break
            for k, (s, (hidden, rope_pos, layer_pos, v)) in enumerate(zip(self.samples, state)):
                view = _Sample(hidden, rope_pos, layer_pos, s.start, v)
                attn, out = self._layer(i, view, hidden, rope_pos, layer_pos)
                w_cross, w_self = self.references[k][i]
                deleted = fitprune_calibration_step(*self._split(attn, view), w_cross, w_self, alpha)
                totals[i] += int(deleted.numel())
                keep = torch.ones(out.shape[1], dtype=torch.bool, device=out.device)
                keep[deleted + s.start] = False
                out, rope_pos = out[:, keep], rope_pos[..., keep]
                layer_pos = layer_pos[..., keep] if layer_pos is not None else None
                v -= int(deleted.numel())
                state[k] = (out, rope_pos, layer_pos, v)
                used += v * d * d + 3 * m * d * v  # o-proj + MLP of the survivors
        return reached, fitprune_average_counts(totals, n_samples)


def calibrate(family_module, model, messages, processor, device, reduction: float, width: float = 0.01):
    """``(alpha, scheme, n_visual)``: the bisected schedule for ``reduction`` of the visual FLOPs."""
    import vlm_adapter
    from methods.fitprune import fitprune_bisect

    samples = [decoder_inputs(family_module, model, vlm_adapter.build_inputs(processor, msg, device)) for msg in messages]
    cal = Calibrator(family_module, model, samples)
    alpha, scheme = fitprune_bisect(lambda a: cal.fit(a, reduction), width=width)
    n_visual = int(statistics.median(s.n_visual for s in samples))
    return alpha, dict(scheme), n_visual, cal.n_layers


def main(argv: list[str] | None = None) -> str:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True, choices=sorted(FAMILY_MODULES))
    parser.add_argument("--model", required=True, help="checkpoint folder or hub id")
    parser.add_argument("--data", required=True, type=Path, help="a VLMEvalKit TSV (e.g. $LMUData/MME.tsv)")
    parser.add_argument("--limit", type=int, default=20, help="calibration samples")
    parser.add_argument("--reduction", type=float, required=True, help="fraction of the visual FLOPs to remove, e.g. 0.8")
    parser.add_argument("--width", type=float, default=0.01, help="bisection stops at this alpha interval")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    if not 0 < args.reduction < 1:
        raise SystemExit("--reduction must be in (0, 1)")

    import vlm_adapter
    from methods.fitprune import fitprune_specs

    family = importlib.import_module(FAMILY_MODULES[args.family])
    device = vlm_adapter.pick_device(args.device)
    model, processor = vlm_adapter.load_pretrained(family, args.model, device)
    with tempfile.TemporaryDirectory() as tmp:
        messages = vlm_adapter.messages_from_tsv(args.data, args.limit, Path(tmp))
        alpha, scheme, n_visual, n_layers = calibrate(family, model, messages, processor, device, args.reduction, args.width)
    specs = fitprune_specs(scheme, n_visual, n_layers)
    logger.info("alpha = %.4f; scheme (deleted after each layer's attention): %s", alpha, {k: v for k, v in scheme.items() if v})
    logger.info('INTRA_LLM_LAYER_SPECS="%s"', specs)
    return specs


if __name__ == "__main__":
    main()
