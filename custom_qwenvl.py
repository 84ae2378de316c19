"""Qwen2.5-VL (3B / 7B) on the shared pruning engine.

What this family contributes (everything else is :mod:`prune_engine`):
  * the visual tokens are the ``<|image_pad|>`` runs; image ``i`` has
    ``t*h*w / merge**2`` of them on a ``(t, h/merge, w/merge)`` grid (``image_grid_thw``);
  * the decoder takes Qwen's 3-D M-RoPE position ids (``[3, B, L]``, or ``[4, B, L]`` with a
    leading text row as ``generate`` prepares them); pruned tokens keep their three coordinates.

Pre-LLM pruning acts on the vision merger's output as it enters the decoder (the merged
``[N, D]`` visual tokens are exactly the image rows of ``inputs_embeds``); video tokens are never
pruned.

VLMEvalKit protocol (:mod:`vlm_adapter`): ``Qwen2VLChat`` runs as is (its prompts, its
``qwen_vl_utils`` resizing with the config's ``min_pixels`` / ``max_pixels``, its generation
keywords); our model answers its ``generate(**inputs, **generate_kwargs)`` unchanged.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

import prune_engine
from transformers import Qwen2_5_VLForConditionalGeneration as MODEL_CLASS  # noqa: N812 (after prune_engine: CPU torchvision fix)
from utils import PruneConfig, TimingSink
from vlm_adapter import LoadedModel, ModelShim

# The names users type (VLMEvalKit's) -> Hugging Face checkpoints.
CHECKPOINTS = {
    "Qwen2.5-VL-3B-Instruct": "Qwen/Qwen2.5-VL-3B-Instruct",
    "Qwen2.5-VL-7B-Instruct": "Qwen/Qwen2.5-VL-7B-Instruct",
}


# The VLMEvalKit model whose protocol a checkpoint folder gets unless --vlmeval-model says otherwise.
VLMEVAL_DEFAULT = "Qwen2.5-VL-7B-Instruct"


def vlmeval_shim(loaded: LoadedModel) -> ModelShim:
    return ModelShim(loaded)  # HF-native on both sides: generate passes through


def vlmeval_loaders(loaded: LoadedModel, shim: ModelShim) -> list[tuple[Any, str, Any]]:
    """What ``Qwen2VLChat.__init__`` loads (vlmeval 26.3, vlm/qwen2_vl/model.py), answered with
    what we loaded: its processor, its model (``.cuda().eval()`` on the shim), and the GPU-memory
    probe it asserts on."""
    import transformers
    import vlmeval.vlm.qwen2_vl.model as wrapper

    return [
        (transformers.AutoProcessor, "from_pretrained", lambda *a, **k: loaded.processor),
        (transformers.Qwen2_5_VLForConditionalGeneration, "from_pretrained", lambda *a, **k: shim),
        (wrapper, "get_gpu_memory", lambda *a, **k: [1]),
    ]


class QwenVLFamily(prune_engine.Family):
    name = "qwen2_5_vl"

    def image_layout(self, model: nn.Module, kwargs: Mapping[str, Any]) -> list[tuple[int, tuple[int, int, int] | None]]:
        thw = kwargs.get("image_grid_thw")
        if thw is None:
            return []
        m = model.config.vision_config.spatial_merge_size
        return [(t * h * w // (m * m), (t, h // m, w // m)) for t, h, w in thw.tolist()]

    def positions(
        self, text_model: nn.Module, position_ids: torch.Tensor | None, inputs_embeds: torch.Tensor, past_len: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Copied from Qwen2_5_VLTextModel.forward (transformers 5.23.0), unchanged: 3-D ids for
        # the rotary embedding, and the optional leading text row for the layers (FA2 packing).
        if position_ids is None:
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_len
            position_ids = position_ids.view(1, 1, -1).expand(3, inputs_embeds.shape[0], -1)
        elif position_ids.ndim == 2:
            position_ids = position_ids[None, ...].expand(3, position_ids.shape[0], -1)
        if position_ids.ndim == 3 and position_ids.shape[0] == 4:
            return position_ids[1:], position_ids[0]
        return position_ids, None


FAMILY = QwenVLFamily()


def patch(model: nn.Module, config: PruneConfig | None = None, sink: TimingSink | None = None) -> nn.Module:
    """Attach the pruning engine to a ``Qwen2_5_VLForConditionalGeneration`` (idempotent)."""
    return prune_engine.patch(model, FAMILY, config, sink)


def unpatch(model: nn.Module) -> nn.Module:
    return prune_engine.unpatch(model)
