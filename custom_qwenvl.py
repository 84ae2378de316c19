"""Qwen2.5-VL (3B / 7B) on the shared pruning engine.

What this family contributes (everything else is :mod:`prune_engine`):
  * the visual tokens are the ``<|image_pad|>`` runs; image ``i`` has
    ``t*h*w / merge**2`` of them on a ``(t, h/merge, w/merge)`` grid (``image_grid_thw``);
  * the decoder takes Qwen's 3-D M-RoPE position ids (``[3, B, L]``, or ``[4, B, L]`` with a
    leading text row as ``generate`` prepares them); pruned tokens keep their three coordinates.

Pre-LLM pruning acts on the vision merger's output as it enters the decoder (the merged
``[N, D]`` visual tokens are exactly the image rows of ``inputs_embeds``); video tokens are never
pruned.

ViT inputs (:meth:`QwenVLFamily.capture_vision`): the vision tower has no [CLS] token; it can give
the attention each merged token RECEIVES in a block and the block's keys averaged over each 2x2
merge unit (VisionZip's, HiPrune's and VScan's Qwen scoring), from the block's own q/k during the
one vision pass, under the block's own mask (windows, or per image for the full-attention blocks
7/15/23/31 of the real tower).

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
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
from transformers.vision_utils import get_vision_window_index
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

    def capture_vision(self, model: nn.Module, store: dict[str, Any], wanted: Mapping[str, tuple[int, ...]]) -> list[Any]:
        """Hooks on the vision blocks the ``wanted`` needs name (``model.model.visual.blocks[layer]``).

        Inside the tower the patches run in WINDOW order (``get_vision_window_index`` groups each 2x2
        merge unit's 4 patches and orders the units window by window); the merger's output is put
        back in raster order with ``argsort(window_index)``. A block's attention module receives its
        normed input, ``cu_seqlens`` (the window boundaries, or the image boundaries in a
        full-attention block) and the rotary ``position_embeddings``; the hook recomputes q and k as
        ``Qwen2_5_VLVisionAttention.forward`` does (transformers 5.23.0: ``qkv``, split, rotary) and
        stores, per image in token (merger) order:

        * ``vit_attention_received`` ``{layer: [H, N]}``: per chunk of ``cu_seqlens`` (the chunks the
          model itself attends within: windows, or whole images), the fp32 softmax probabilities
          summed over the chunk's query rows, then the mean over each merge unit's 4 patches
          (VisionZip's / HiPrune's ``attn.sum(queries)`` then ``view(-1, 4).mean``, per head);
        * ``vit_unit_keys`` ``{layer: [N, hd]}``: the post-rotary keys averaged over heads and over
          each merge unit (VisionZip's ``attn_key``).

        Other ViT needs ([CLS] ones) are not captured (the tower has no [CLS] token). Only the first
        vision pass of a forward is captured: the images'; a video's pass, which would come after,
        is left alone (video tokens are never pruned).
        """
        received, keys = wanted.get("vit_attention_received", ()), wanted.get("vit_unit_keys", ())
        if not (received or keys):
            return []
        visual = model.model.visual
        unit = visual.spatial_merge_size**2
        info: dict[str, Any] = {"passes": 0}

        def layout(module: nn.Module, args: tuple, kwargs: dict) -> None:
            info["passes"] += 1
            if info["passes"] == 1:
                grid_thw = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
                window_index, _ = get_vision_window_index(
                    grid_thw, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
                    patch_size=visual.patch_size,
                )
                info["reverse"] = torch.argsort(window_index)  # window order -> raster (merger) order
                info["sizes"] = (grid_thw.prod(-1) // unit).tolist()  # merged tokens per image

        def layered(l: int):
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                if info["passes"] != 1:
                    return
                h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # [S, C], window order
                s = h.shape[0]
                q, k, _ = module.qkv(h).reshape(s, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # [S, H, hd]
                q, k = apply_rotary_pos_emb_vision(q, k, *kwargs["position_embeddings"])
                reverse = info["reverse"].to(h.device)
                if l in received:
                    q, kh = q.transpose(0, 1), k.transpose(0, 1)  # [H, S, hd]
                    got = torch.zeros(q.shape[0], s, dtype=torch.float32, device=h.device)
                    bounds = kwargs["cu_seqlens"].tolist()  # one sync, as the model's own non-flash path
                    for a, b in zip(bounds[:-1], bounds[1:]):
                        if b > a:
                            got[:, a:b] = prune_engine.received_attention(q[:, a:b], kh[:, a:b], module.scaling)
                    got = got.view(got.shape[0], s // unit, unit).mean(dim=-1)[:, reverse]  # [H, S/unit], raster
                    store.setdefault("vit_attention_received", {})[l] = list(got.split(info["sizes"], dim=-1))
                if l in keys:
                    unit_keys = k.float().mean(dim=1).view(s // unit, unit, -1).mean(dim=1)[reverse]  # [S/unit, hd]
                    store.setdefault("vit_unit_keys", {})[l] = list(unit_keys.split(info["sizes"], dim=0))

            return hook

        hooks = [visual.register_forward_pre_hook(layout, with_kwargs=True)]
        for l in dict.fromkeys(received + keys):
            attn = prune_engine.vit_layer(visual.blocks, l).attn
            hooks.append(attn.register_forward_pre_hook(layered(l), with_kwargs=True))
        return hooks


FAMILY = QwenVLFamily()


def patch(model: nn.Module, config: PruneConfig | None = None, sink: TimingSink | None = None) -> nn.Module:
    """Attach the pruning engine to a ``Qwen2_5_VLForConditionalGeneration`` (idempotent)."""
    return prune_engine.patch(model, FAMILY, config, sink)


def unpatch(model: nn.Module) -> nn.Module:
    return prune_engine.unpatch(model)
