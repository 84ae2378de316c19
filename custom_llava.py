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

ViT-internal merges are wired here only: ``methods.ViTMerge`` (MustDrop's window merge,
:meth:`LlavaFamily.install_vit_merge`) on one CLIP layer's output, ``methods.ViTLayerMerge`` (ToMe,
:meth:`LlavaFamily.install_vit_layer_merge`) between attention and MLP of every CLIP layer up to
the feature layer; the later CLIP layers run on the merged sequence.

VLMEvalKit protocol (:mod:`vlm_adapter`): ``LLaVA`` (``llava_v1.5_7b``) runs as is with the
original LLaVA package (PyPI ``llava-torch``): its Vicuna system prompt and ``USER: ... ASSISTANT:``
frame, its multiple-choice prompt, ``process_images`` with ``image_aspect_ratio="pad"`` (padded to a
square with the mean colour), ``tokenizer_image_token`` (one ``IMAGE_TOKEN_INDEX`` per image), the
``</s>`` keyword stop and its generation keywords. :class:`LlavaOriginalShim` turns the original
model's ``generate(input_ids, images=...)`` into the HF-native call.
"""

from __future__ import annotations

import types
from typing import Any, Mapping

import torch
from torch import nn

import prune_engine
from transformers import LlavaForConditionalGeneration as MODEL_CLASS  # noqa: N812 (after prune_engine: CPU torchvision fix)
from utils import PruneConfig, TimingSink
from vlm_adapter import LoadedModel, ModelShim

# The names users type (VLMEvalKit's) -> Hugging Face checkpoints.
CHECKPOINTS = {
    "llava_v1.5_7b": "llava-hf/llava-1.5-7b-hf",
}


# The VLMEvalKit model whose protocol a checkpoint folder gets unless --vlmeval-model says otherwise.
VLMEVAL_DEFAULT = "llava_v1.5_7b"


class LlavaOriginalShim(ModelShim):
    """The original LLaVA model's ``generate(input_ids, images=..., **kwargs)``, which VLMEvalKit's
    ``LLaVA.generate_inner`` calls, on the HF-native ``LlavaForConditionalGeneration``.

    The original inserts an image's CLIP features (``(H / patch) * (W / patch)`` tokens, CLS dropped)
    where ``input_ids`` holds ``IMAGE_TOKEN_INDEX``, and generates from embeddings, so it returns the
    new tokens only. Here each ``IMAGE_TOKEN_INDEX`` becomes that many ``config.image_token_id``
    tokens (the HF-native model embeds the same features at the same places), and the prompt part of
    the output is dropped."""

    def generate(self, input_ids: torch.Tensor, images: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        from llava.constants import IMAGE_TOKEN_INDEX

        if input_ids.shape[0] != 1:
            raise ValueError("one prompt at a time")
        ids = input_ids[0].to(self.device)
        where = torch.nonzero(ids == IMAGE_TOKEN_INDEX).flatten()
        n_images = 0 if images is None else images.shape[0]
        if where.numel() != n_images:
            raise ValueError(f"{where.numel()} image tokens in the prompt for {n_images} images")
        if n_images:
            patch = self.config.vision_config.patch_size
            per_image = (images.shape[-2] // patch) * (images.shape[-1] // patch)
            if self.config.vision_feature_select_strategy != "default":
                per_image += 1  # "full" keeps CLS
            # Each marker becomes per_image image tokens: repeat it, then rename.
            repeats = torch.ones_like(ids)
            repeats[where] = per_image
            ids = ids.repeat_interleave(repeats)
            ids[ids == IMAGE_TOKEN_INDEX] = self.config.image_token_id
        ids = ids[None]
        out = self.call_model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=images, **kwargs)
        return out[:, ids.shape[1] :]


def vlmeval_shim(loaded: LoadedModel) -> ModelShim:
    return LlavaOriginalShim(loaded)


def vlmeval_loaders(loaded: LoadedModel, shim: ModelShim) -> list[tuple[Any, str, Any]]:
    """What ``LLaVA.__init__`` loads (vlmeval 26.3, vlm/llava/llava.py): the original package's
    ``load_pretrained_model`` -> (tokenizer, model, image processor, context length), answered with
    what we loaded (``.cuda()`` on the shim)."""
    import llava.model.builder as builder

    return [(builder, "load_pretrained_model",
             lambda *a, **k: (loaded.processor.tokenizer, shim, loaded.processor.image_processor, 2048))]


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

    def capture_vision(self, model: nn.Module, store: dict[str, Any], wanted: Mapping[str, tuple[int, ...]]) -> list[Any]:
        """Hooks on the CLIP layers the ``wanted`` needs name; one vision pass serves the model and
        the methods, and only what is wanted is computed.

        Per image (leading dimension = image): ``vit_cls_attention`` ``[H, N]``: the [CLS] row of the
        feature layer's (``hidden_states[vision_feature_layer]``) attention probabilities, from its
        own ``q_proj``/``k_proj`` on its (layer-normed) input, so it equals
        ``attentions[-2][:, :, 0, 1:]`` of an eager pass, without one; ``vit_feature_keys``
        ``[1+N, hd]``: that ``k_proj`` output split into heads and averaged over them (VisionZip's
        ``metric``); ``vit_features`` ``[N, C]`` / ``vit_cls_feature`` ``[C]``: the feature layer's
        output without / only CLS (the projector receives the former); ``vit_last_queries`` /
        ``vit_last_keys`` ``[1+N, C]``: the outputs of the LAST layer's ``q_proj`` / ``k_proj``
        modules, as PruMerge's forward hooks read them (CLIP-L: layer 23, which runs although the
        features come from layer 22). ``vit_projector``: ``multi_modal_projector``;
        ``vit_post_layernorm``: the tower's own ``post_layernorm`` (CDPruner's CLIP image embeddings); neither is per image.
        Layered (``{layer: [n_images, H, N]}``, CLIP layer ``layer`` = ``attentions[layer]``):
        ``vit_attention_received`` (the probabilities summed over all 1+N query rows, [CLS] column
        dropped: HiPrune's "global attention" times 1+N) and ``vit_cls_rows`` (the [CLS] row, VScan).
        """
        layer_sel = model.config.vision_feature_layer
        strategy = model.config.vision_feature_select_strategy
        if not isinstance(layer_sel, int) or strategy != "default":
            raise ValueError(
                "ViT [CLS] inputs need one vision_feature_layer and vision_feature_select_strategy='default' "
                f"(got {layer_sel!r}, {strategy!r})"
            )
        tower = model.model.vision_tower
        layers = getattr(tower, "vision_model", tower).encoder.layers  # 5.x: CLIPVisionModel owns the encoder
        # hidden_states[0] is the embedding output, hidden_states[k] the output of layer k-1.
        layer = layers[len(layers) + layer_sel if layer_sel < 0 else layer_sel - 1]
        hooks = []

        def cls_attention(module: nn.Module, args: tuple, kwargs: dict) -> None:
            h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # [B, 1+N, C]
            b, n, _ = h.shape
            q = module.q_proj(h[:, :1]).view(b, 1, -1, module.head_dim).transpose(1, 2)  # [B, H, 1, hd]
            k = module.k_proj(h).view(b, n, -1, module.head_dim).transpose(1, 2)  # [B, H, 1+N, hd]
            probs = ((q @ k.transpose(-1, -2)).float() * module.scale).softmax(dim=-1)  # [B, H, 1, 1+N]
            store["vit_cls_attention"] = probs[:, :, 0, 1:]  # per image [H, N]
            store["vit_feature_keys"] = k.mean(dim=1)  # [B, 1+N, hd]

        def features(module: nn.Module, args: tuple, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output  # [B, 1+N, C]
            store["vit_features"] = out[:, 1:]
            store["vit_cls_feature"] = out[:, 0]

        def saver(name: str):
            return lambda module, args, output: store.__setitem__(name, output)  # [B, 1+N, C]

        store["vit_projector"] = model.model.multi_modal_projector
        if "vit_post_layernorm" in wanted:
            store["vit_post_layernorm"] = getattr(tower, "vision_model", tower).post_layernorm
        last = layers[-1].self_attn

        def last_cls_attention(module: nn.Module, args: tuple, output: Any) -> None:
            # vit_last_cls_attention [B, H, N] (MustDrop's key set): the [CLS] row of the LAST
            # layer's attention probabilities, from the q/k its projections just produced (above).
            q, k = store["vit_last_queries"], store["vit_last_keys"]  # [B, 1+N, C]
            b, n, _ = k.shape
            q = q[:, :1].view(b, 1, -1, module.head_dim).transpose(1, 2)  # [B, H, 1, hd]
            k = k.view(b, n, -1, module.head_dim).transpose(1, 2)  # [B, H, 1+N, hd]
            probs = ((q @ k.transpose(-1, -2)).float() * module.scale).softmax(dim=-1)
            store["vit_last_cls_attention"] = probs[:, :, 0, 1:]

        def layered(l: int, received: bool, cls_rows: bool):
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                # CLIP layer l's attention probabilities from its own q/k (no mask in the CLIP tower).
                h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # [B, 1+N, C]
                b, n, _ = h.shape
                q = module.q_proj(h).view(b, n, -1, module.head_dim).transpose(1, 2)  # [B, H, 1+N, hd]
                k = module.k_proj(h).view(b, n, -1, module.head_dim).transpose(1, 2)
                probs = ((q @ k.transpose(-1, -2)).float() * module.scale).softmax(dim=-1)  # [B, H, 1+N, 1+N]
                if received:
                    store.setdefault("vit_attention_received", {})[l] = probs.sum(dim=-2)[..., 1:]  # [B, H, N]
                if cls_rows:
                    store.setdefault("vit_cls_rows", {})[l] = probs[:, :, 0, 1:]  # [B, H, N]

            return hook

        with torch.no_grad():
            if {"vit_cls_attention", "vit_feature_keys"} & set(wanted):
                hooks.append(layer.self_attn.register_forward_pre_hook(cls_attention, with_kwargs=True))
            if {"vit_features", "vit_cls_feature"} & set(wanted):
                hooks.append(layer.register_forward_hook(features))
            if {"vit_last_queries", "vit_last_keys", "vit_last_cls_attention"} & set(wanted):
                hooks += [
                    last.q_proj.register_forward_hook(saver("vit_last_queries")),
                    last.k_proj.register_forward_hook(saver("vit_last_keys")),
                ]
                if "vit_last_cls_attention" in wanted:
                    hooks.append(last.register_forward_hook(last_cls_attention))
            received, cls_rows = wanted.get("vit_attention_received", ()), wanted.get("vit_cls_rows", ())
            for l in dict.fromkeys(received + cls_rows):
                module = prune_engine.vit_layer(layers, l).self_attn
                hooks.append(module.register_forward_pre_hook(layered(l, l in received, l in cls_rows), with_kwargs=True))
        return hooks

    def install_vit_merge(self, model: nn.Module, layer: int, apply: Any) -> list[Any]:
        """A forward hook on CLIP layer ``layer`` that replaces its output by ``apply``'s (the
        merged ``[B, 1 + N', C]``), so the later CLIP layers, ``hidden_states[vision_feature_layer]``
        (the features the projector receives) and the capture hooks above all see the merged
        sequence, as in MustDrop's ``CLIPVisionModelAcc.custom_forward``. Prepended, so it runs
        before the hidden-state recorder of transformers and before :meth:`capture_vision`'s hooks
        on the same layer. The feature layer must come after the merge."""
        layer_sel = model.config.vision_feature_layer
        if not isinstance(layer_sel, int) or model.config.vision_feature_select_strategy != "default":
            raise ValueError("a ViT merge needs one vision_feature_layer and vision_feature_select_strategy='default'")
        tower = model.model.vision_tower
        layers = getattr(tower, "vision_model", tower).encoder.layers
        feature = len(layers) + 1 + layer_sel if layer_sel < 0 else layer_sel  # index into hidden_states
        if not 0 <= layer < len(layers) or feature <= layer:
            raise ValueError(f"a merge after CLIP layer {layer} cannot reach the feature layer (hidden_states[{layer_sel}])")

        def merge(module: nn.Module, args: tuple, output: Any) -> Any:
            out = output[0] if isinstance(output, tuple) else output  # [B, 1+N, C]
            merged = apply(out)
            if merged is None:
                return None
            return (merged, *output[1:]) if isinstance(output, tuple) else merged

        return [layers[layer].register_forward_hook(merge, prepend=True)]

    def install_vit_layer_merge(self, model: nn.Module, apply: Any) -> list[Any]:
        """ToMe's place in CLIP: in every layer whose output reaches the feature layer
        (``hidden_states[vision_feature_layer]``; CLIP-L with -2: layers 0..22), the merge runs
        between the attention block (residual added) and the MLP, on the layer's keys averaged over
        heads (a forward hook on ``self_attn.k_proj``, the keys the attention itself uses). Later
        layers do not run it (their output never reaches the projector). Each such layer gets an
        instance ``forward`` (:func:`_merging_layer_forward`); the handles' ``remove()`` restores
        the class forward and drops the key hooks."""
        layer_sel = model.config.vision_feature_layer
        if not isinstance(layer_sel, int) or model.config.vision_feature_select_strategy != "default":
            raise ValueError("a ViT merge needs one vision_feature_layer and vision_feature_select_strategy='default'")
        tower = model.model.vision_tower
        layers = getattr(tower, "vision_model", tower).encoder.layers
        feature = len(layers) + 1 + layer_sel if layer_sel < 0 else layer_sel  # index into hidden_states
        if feature < 1:
            raise ValueError(f"no CLIP layer runs before the feature layer (hidden_states[{layer_sel}])")
        n = feature  # hidden_states[k] is the output of layer k - 1: layers 0..feature-1 merge
        handles: list[Any] = []
        for i in range(n):
            keys: dict[str, torch.Tensor] = {}
            layer = layers[i]
            handles.append(layer.self_attn.k_proj.register_forward_hook(lambda m, a, o, keys=keys: keys.__setitem__("k", o)))
            layer.forward = types.MethodType(_merging_layer_forward(apply, i, n, keys), layer)
            handles.append(_InstanceForward(layer))
        return handles


class _InstanceForward:
    """Handle that removes a module's instance-level ``forward`` (the class forward applies again)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)


def _merging_layer_forward(apply: Any, i: int, n: int, keys: dict[str, torch.Tensor]):
    """``CLIPEncoderLayer.forward`` with a token merge between attention and MLP.

    Copied from ``transformers.models.clip.modeling_clip.CLIPEncoderLayer.forward`` (transformers
    5.23.0) with one modification, fenced: after the attention residual, ``apply(i, n, x, metric)``
    may return a shorter sequence (ToMe's place, as LightCompress's ``tome_CLIPEncoderLayer_forward``);
    ``metric`` ``[B, 1 + T, head_dim]`` is this layer's ``k_proj`` output split into heads and
    averaged over them (LightCompress: ``key_states.mean(1)``)."""

    def forward(self: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs: Any) -> torch.Tensor:
        residual = hidden_states

        hidden_states = self.layer_norm1(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            **kwargs,
        )
        hidden_states = residual + hidden_states

        # ---- change: merge tokens here, on this layer's head-mean keys ----
        b, t, _ = hidden_states.shape
        metric = keys.pop("k").view(b, t, -1, self.self_attn.head_dim).mean(dim=2)  # [B, 1+T, hd]
        merged = apply(i, n, hidden_states, metric)
        if merged is not None:
            hidden_states = merged
        # ---- end ----

        residual = hidden_states
        hidden_states = self.layer_norm2(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states

        return hidden_states

    return forward


FAMILY = LlavaFamily()


def patch(model: nn.Module, config: PruneConfig | None = None, sink: TimingSink | None = None) -> nn.Module:
    """Attach the pruning engine to a ``LlavaForConditionalGeneration`` (idempotent)."""
    return prune_engine.patch(model, FAMILY, config, sink)


def unpatch(model: nn.Module) -> nn.Module:
    return prune_engine.unpatch(model)
