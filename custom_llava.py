"""LLaVA-1.5 (7B) on the shared pruning engine, through transformers'
``LlavaForConditionalGeneration`` (checkpoint ``llava-hf/llava-1.5-7b-hf``).

What this family contributes (everything else is :mod:`prune_engine`):
  * the decoder is LLaMA (``model.model.language_model``) with plain 1-D ``[B, L]`` position
    ids (``LlamaModel.forward``), so the engine's default :meth:`Family.positions` applies;
  * the visual tokens are the ``<image>`` tokens (``config.image_token_id``, 32000 in the real
    checkpoint): ``LlavaProcessor`` expands each ``<image>`` to one token per CLIP patch, and
    ``LlavaModel.get_image_features`` takes the penultimate CLIP layer
    (``vision_feature_layer=-2``) and drops CLS (``vision_feature_select_strategy="default"``).
    CLIP ViT-L/14 at 336 px: 24 x 24 = 576 tokens an image, grid ``(1, 24, 24)``,
    ``ctx.token_index = row * 24 + col``.

:meth:`LlavaFamily.image_layout` reads the image count and size from ``pixel_values``
``[n_images, 3, H, W]``: ``(H // patch) * (W // patch)`` tokens each on a
``(1, H // patch, W // patch)`` grid. With ``vision_feature_select_strategy="full"`` CLS is kept
as each image's first token (``h * w + 1`` tokens) and the grid is ``None``. Without
``pixel_values`` (e.g. features passed as ``mm_encoder_outputs``) the layout is "unknown" and the
engine treats each run of image tokens as one image. Each image keeps ``budget(576, KEEP_RATIO)``.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

import prune_engine
from utils import PruneConfig, TimingSink


class LlavaFamily(prune_engine.Family):
    name = "llava"

    def image_layout(self, model: nn.Module, kwargs: Mapping[str, Any]) -> list[tuple[int, tuple[int, int, int] | None]]:
        """``[(n_tokens, (1, h, w) or None), ...]``, one entry per image of ``pixel_values``.

        The count follows ``LlavaProcessor.replace_image_token`` and
        ``LlavaModel.get_image_features`` (transformers 5.23.0): ``(H // patch) * (W // patch)``
        patch tokens plus CLS, CLS dropped by the "default" strategy; changed: read from the
        ``pixel_values`` shape (no processor, no vision tower run).
        """
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None or pixel_values.dim() != 4:
            return []
        patch_size = model.config.vision_config.patch_size
        h, w = pixel_values.shape[-2] // patch_size, pixel_values.shape[-1] // patch_size
        strategy = kwargs.get("vision_feature_select_strategy") or model.config.vision_feature_select_strategy
        entry = (h * w, (1, h, w)) if strategy == "default" else (h * w + 1, None)
        return [entry] * pixel_values.shape[0]


FAMILY = LlavaFamily()


def patch(model: nn.Module, config: PruneConfig | None = None, sink: TimingSink | None = None) -> nn.Module:
    """Attach the pruning engine to a ``LlavaForConditionalGeneration`` (idempotent)."""
    return prune_engine.patch(model, FAMILY, config, sink)


def unpatch(model: nn.Module) -> nn.Module:
    return prune_engine.unpatch(model)
