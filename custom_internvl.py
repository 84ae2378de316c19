"""InternVL3 (1B to 78B, the `-hf` checkpoints) on the shared pruning engine, through transformers' HF-native
``InternVLForConditionalGeneration`` (e.g. ``OpenGVLab/InternVL3-1B-hf`` / ``-8B-hf``; see ``CHECKPOINTS``).

What this family contributes (everything else is :mod:`prune_engine`):
  * the decoder is Qwen2 (``model.model.language_model``); its position ids are the plain 1-D
    ``[B, L]`` ids of ``Qwen2Model.forward``, so the engine's default :meth:`Family.positions`
    applies unchanged;
  * the visual tokens are the runs of the image context token (``config.image_token_id``,
    ``<IMG_CONTEXT>``); image ``i`` is one run of ``n_tiles_i * tokens_per_tile`` tokens.

Tiles and the budget
--------------------
Dynamic tiling turns an image into ``n`` 448-px crops plus a global thumbnail (the LAST tile; an
image that fits one tile gets no thumbnail, so ``n_tiles`` is 1 or at least 3). Each tile
gives ``(448 / 14)**2 * downsample_ratio**2 = 256`` tokens (``tokens_per_tile``; computed here from
``pixel_values``' tile size, the vision patch size and ``config.downsample_ratio``). The pruning
budget is per IMAGE, over all its tiles together: an image with ``N = n_tiles * 256`` tokens keeps
``budget(N, KEEP_RATIO)`` of them, as ONE segment, and a method may keep more tokens of one tile
than of another (the thumbnail competes with the crops).

Where the tile counts come from: ``InternVLProcessor`` pops the image processor's ``num_patches``
(tiles per image) and passes only the flat ``pixel_values`` ``[sum(n_tiles), 3, 448, 448]`` to
the model; ``InternVLModel.forward`` has no per-image tile argument (its ``image_sizes`` is
accepted and ignored). So per-image tile counts are NOT available at forward time. They are
inferred, exactly for processor-built prompts: the processor writes every image as
``<img>`` + ``<IMG_CONTEXT>`` x (256 * n_tiles) + ``</img>``, so each maximal run of context tokens
is one image and ``n_tiles = run_length // tokens_per_tile``. :meth:`InternVLFamily.image_layout`
returns ``(n_tokens, grid)`` per run with ``grid = (n_tiles, side, side)`` (``side = 16`` for the
real model; ``ctx.token_index = tile * side**2 + row * side + col``, row-major within a tile as
``InternVLModel.pixel_shuffle`` orders them). Fallbacks, documented limits:
  * two images whose context runs touch (a hand-built prompt without ``<img>``/``</img>``) are
    read as one image, so they share one budget;
  * a run whose length is not a multiple of ``tokens_per_tile`` gets ``grid=None``;
  * when ``input_ids`` reaches the model positionally (not as a keyword) the layout is "unknown"
    and the engine's own run splitting applies (same segments, ``grid=None``);
  * video frames use the same context token (``Frame1: <img>...</img>``): each frame is pruned as
    a 1-tile image (the Qwen family leaves video alone; InternVL's frames cannot be told apart
    from images at forward time).

Pre-LLM pruning acts on the projector's output as it enters the decoder (the ``[N, D]`` rows of
``inputs_embeds`` at the context tokens).

ViT inputs (:meth:`InternVLFamily.capture_vision`): InternViT runs each tile as one sequence,
[CLS] + 32x32 patches (the real model), with full attention; the [CLS] token is dropped and the
patches are pixel-shuffled 2x2 into the tile's 16x16 LLM tokens. A layer's attention received and
keys are captured per tile and averaged over each pixel-shuffle unit, so they score LLM tokens;
:meth:`InternVLFamily.vit_image` puts an image's tiles together in token order.

VLMEvalKit protocol (:mod:`vlm_adapter`): ``InternVLChat`` (version V2.0) runs as is: its custom
prompts, ``set_max_num`` / ``load_image`` tiling and ``reorganize_prompt``, its generation keywords.
It calls the ORIGINAL checkpoint's remote-code ``model.chat(...)``, which the HF-native class
lacks: :class:`InternVLChatShim` does what that method does (template ``internvl2_5`` with its
system message, ``<image>`` -> ``<img>`` + ``<IMG_CONTEXT>`` x 256 x tiles + ``</img>``, the
``<|im_end|>`` stop, decoding) on the HF-native model.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

import prune_engine
from transformers import InternVLForConditionalGeneration as MODEL_CLASS  # noqa: N812 (after prune_engine: CPU torchvision fix)
from utils import PruneConfig, TimingSink
from vlm_adapter import LoadedModel, ModelShim

# The names users type (VLMEvalKit's) -> Hugging Face checkpoints (the HF-native "-hf" conversions;
# none was found for VLMEvalKit's InternVL3-9B, whose decoder is InternLM3).
CHECKPOINTS = {
    "InternVL3-1B": "OpenGVLab/InternVL3-1B-hf",
    "InternVL3-2B": "OpenGVLab/InternVL3-2B-hf",
    "InternVL3-8B": "OpenGVLab/InternVL3-8B-hf",
    "InternVL3-14B": "OpenGVLab/InternVL3-14B-hf",
    "InternVL3-38B": "OpenGVLab/InternVL3-38B-hf",
    "InternVL3-78B": "OpenGVLab/InternVL3-78B-hf",
}


# The VLMEvalKit model whose protocol a checkpoint folder gets unless --vlmeval-model says otherwise.
VLMEVAL_DEFAULT = "InternVL3-8B"

# The conversation template of InternVL3's remote code (``config.template == "internvl2_5"`` in
# every InternVL3 checkpoint; OpenGVLab/InternVL internvl_chat/internvl/conversation.py): ChatML
# turns after this system message, which ``InternVLChatModel`` uses unless its config sets
# ``system_message``.
INTERNVL2_5_SYSTEM_MESSAGE = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)


class InternVLChatShim(ModelShim):
    """The original InternVL3 model's ``chat`` (remote code, ``modeling_internvl_chat.py``), which
    VLMEvalKit's ``InternVLChat.generate_v2`` calls, on the HF-native model.

    As the original: a question without ``<image>`` gets ``<image>\n`` in front when there are pixel
    values; the prompt is ``<|im_start|>system\n{system_message}<|im_end|>\n<|im_start|>user\n
    {question}<|im_end|>\n<|im_start|>assistant\n``; each ``<image>`` in turn becomes ``<img>`` +
    ``<IMG_CONTEXT>`` x (tokens a tile x that image's tiles) + ``</img>``; generation stops at
    ``<|im_end|>``; the answer is the new tokens decoded without special tokens, cut at
    ``<|im_end|>``, stripped. The HF-native model embeds the same tiles the same way (the
    conversion only renames weights); its ``generate`` returns the prompt too, which is dropped."""

    system_message = INTERNVL2_5_SYSTEM_MESSAGE

    @property
    def num_image_token(self) -> int:
        cfg = self.config
        size, patch = cfg.vision_config.image_size, cfg.vision_config.patch_size
        side = (size[0] if isinstance(size, (list, tuple)) else size) // (patch[0] if isinstance(patch, (list, tuple)) else patch)
        return int(side * side * cfg.downsample_ratio**2)

    def chat(
        self, tokenizer: Any, pixel_values: torch.Tensor | None, question: str, generation_config: dict[str, Any],
        history: Any = None, return_history: bool = False, num_patches_list: list[int] | None = None,
        IMG_START_TOKEN: str = "<img>", IMG_END_TOKEN: str = "</img>", IMG_CONTEXT_TOKEN: str = "<IMG_CONTEXT>",  # noqa: N803
        verbose: bool = False,
    ) -> Any:
        if history:
            raise NotImplementedError("multi-turn chat is not part of the pruning protocol")
        if pixel_values is not None and "<image>" not in question:
            question = "<image>\n" + question
        if num_patches_list is None:
            num_patches_list = [pixel_values.shape[0]] if pixel_values is not None else []
        if pixel_values is not None and len(pixel_values) != sum(num_patches_list):
            raise ValueError(f"{len(pixel_values)} tiles but num_patches_list sums to {sum(num_patches_list)}")
        sep = "<|im_end|>"
        query = (f"<|im_start|>system\n{self.system_message}{sep}\n<|im_start|>user\n{question}{sep}\n"
                 "<|im_start|>assistant\n")
        for n in num_patches_list:
            query = query.replace("<image>", IMG_START_TOKEN + IMG_CONTEXT_TOKEN * self.num_image_token * n + IMG_END_TOKEN, 1)
        inputs = tokenizer(query, return_tensors="pt")
        image_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        if image_token_id != self.config.image_token_id:
            raise ValueError(f"{IMG_CONTEXT_TOKEN} is token {image_token_id} but the model's image_token_id is {self.config.image_token_id}")
        config = {**generation_config, "eos_token_id": tokenizer.convert_tokens_to_ids(sep)}
        input_ids = inputs["input_ids"].to(self.device)
        out = self.call_model(input_ids=input_ids, attention_mask=inputs["attention_mask"].to(self.device),
                              pixel_values=None if pixel_values is None else pixel_values.to(self.device), **config)
        response = tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)[0]
        response = response.split(sep)[0].strip()
        return (response, [(question, response)]) if return_history else response


def vlmeval_shim(loaded: LoadedModel) -> ModelShim:
    return InternVLChatShim(loaded)


def vlmeval_loaders(loaded: LoadedModel, shim: ModelShim) -> list[tuple[Any, str, Any]]:
    """What ``InternVLChat.__init__`` loads (vlmeval 26.3, vlm/internvl/internvl_chat.py), answered
    with what we loaded: the tokenizer (``AutoTokenizer``, slow in VLMEvalKit; the same vocabulary)
    and the model (``AutoModel`` with remote code; ``.eval().cuda()`` on the shim)."""
    import vlmeval.vlm.internvl.internvl_chat as wrapper

    return [
        (wrapper.AutoTokenizer, "from_pretrained", lambda *a, **k: loaded.processor.tokenizer),
        (wrapper.AutoModel, "from_pretrained", lambda *a, **k: shim),
    ]


def image_runs(is_image: torch.Tensor) -> list[int]:
    """Lengths of the maximal runs of ``True`` in ``is_image`` ``[L]`` (bool), in order (the
    same rule as the engine's fallback in ``prune_engine._find_segments``)."""
    where = torch.nonzero(is_image).flatten()
    if where.numel() == 0:
        return []
    breaks = torch.nonzero(where[1:] != where[:-1] + 1).flatten() + 1
    bounds = [0] + breaks.tolist() + [where.numel()]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


class InternVLFamily(prune_engine.Family):
    name = "internvl"

    def tile_grid(self, model: nn.Module, pixel_values: torch.Tensor | None) -> tuple[int, int]:
        """``(side_h, side_w)``: a tile's token grid after pixel shuffle (16 x 16 for 448-px tiles).

        From ``pixel_values`` ``[T, 3, H, W]`` when given (what the vision tower sees), else from
        ``vision_config.image_size``. The arithmetic follows ``InternVLModel.get_image_features``
        and ``InternVLModel.pixel_shuffle`` (transformers 5.23.0): ``H / patch`` patch tokens a side
        (CLS dropped), times ``downsample_ratio``; changed: computed from shapes alone, without
        running the vision tower.
        """
        vc = model.config.vision_config
        size = tuple(pixel_values.shape[-2:]) if pixel_values is not None else tuple(vc.image_size)
        ph, pw = vc.patch_size
        r = model.config.downsample_ratio
        return int(size[0] // ph * r), int(size[1] // pw * r)

    def image_layout(self, model: nn.Module, kwargs: Mapping[str, Any]) -> list[tuple[int, tuple[int, int, int] | None]]:
        """``[(n_tokens, (n_tiles, side_h, side_w) or None), ...]``: one entry per run of context tokens."""
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            return []  # the engine splits runs itself (grid unknown)
        h, w = self.tile_grid(model, kwargs.get("pixel_values"))
        per_tile = h * w
        layout: list[tuple[int, tuple[int, int, int] | None]] = []
        for n in image_runs(input_ids[0] == self.image_token_id(model)):
            tiles, rest = divmod(n, per_tile)
            layout.append((n, (tiles, h, w) if per_tile and tiles and not rest else None))
        return layout

    def capture_vision(self, model: nn.Module, store: dict[str, Any], wanted: Mapping[str, tuple[int, ...]]) -> list[Any]:
        """Hooks on the InternViT layers the ``wanted`` needs name
        (``model.model.vision_tower.encoder.layer[layer].attention``, whose input is the layer's
        ``layernorm_before`` output ``[tiles, 1 + P, C]``). The hook recomputes q and k as
        ``InternVLVisionAttention.forward`` does (transformers 5.23.0: ``q_proj``/``k_proj``, then
        ``q_norm``/``k_norm``, heads split; InternViT has no mask and no rotary embedding) and stores,
        per tile (``[tiles, ...]``):

        * ``vit_attention_received`` ``{layer: [tiles, H, P / s^2]}``: the fp32 softmax probabilities
          summed over all 1 + P query rows, the [CLS] column dropped, then averaged over each
          pixel-shuffle unit (``s x s`` patches, ``s = 1 / downsample_ratio``) in the tile's token order
          (``InternVLModel.pixel_shuffle``: token ``(i, j)`` is patches rows ``s*i..``, columns ``s*j..``);
        * ``vit_unit_keys`` ``{layer: [tiles, P / s^2, hd]}``: the keys (after ``k_norm``, [CLS] dropped)
          averaged over heads and over each unit.

        [CLS] needs are not captured: InternVL drops the [CLS] token before the pixel shuffle, so it has
        no counterpart among the LLM tokens.
        """
        received, keys = wanted.get("vit_attention_received", ()), wanted.get("vit_unit_keys", ())
        if not (received or keys):
            return []
        layers = model.model.vision_tower.encoder.layer
        s = round(1 / model.config.downsample_ratio)

        def units(x: torch.Tensor) -> torch.Tensor:
            # [..., P, d] patches (row-major) -> [..., P / s^2, d]: the mean over each pixel-shuffle unit.
            side = math.isqrt(x.shape[-2])
            x = x.reshape(*x.shape[:-2], side // s, s, side // s, s, x.shape[-1])
            return x.mean(dim=(-4, -2)).flatten(-3, -2)

        def layered(l: int):
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # [T, 1+P, C]
                t, n, _ = h.shape
                k = module.k_norm(module.k_proj(h)).view(t, n, module.num_heads, module.head_dim).transpose(1, 2)
                if l in received:
                    q = module.q_norm(module.q_proj(h)).view(t, n, module.num_heads, module.head_dim).transpose(1, 2)
                    # Tile by tile (row blocks inside), so memory stays O(H * block * (1 + P)).
                    got = torch.stack([prune_engine.received_attention(q[i], k[i], module.scale) for i in range(t)])
                    got = got[..., 1:]  # [T, H, P]: the [CLS] column dropped
                    store.setdefault("vit_attention_received", {})[l] = units(got.unsqueeze(-1)).squeeze(-1)
                if l in keys:
                    store.setdefault("vit_unit_keys", {})[l] = units(k.float().mean(dim=1)[:, 1:])  # [T, P/s^2, hd]

            return hook

        return [
            prune_engine.vit_layer(layers, l).attention.register_forward_pre_hook(layered(l), with_kwargs=True)
            for l in dict.fromkeys(received + keys)
        ]

    def vit_image(self, items: Any, img: int, segments: list[Any], dim: int = -1) -> torch.Tensor:
        """Image ``img``'s tiles of a per-tile tensor ``items`` (``[tiles, ...]``), concatenated along
        the token axis ``dim`` of the per-image result: image ``img`` owns the tiles after those of
        the images before it (``n_orig / tokens_per_tile`` each), in ``pixel_values`` order."""
        per_tile = items.shape[1 + dim if dim >= 0 else dim]
        start = sum(seg.n_orig // per_tile for seg in segments[:img])
        count = segments[img].n_orig // per_tile
        return torch.cat(list(items[start : start + count]), dim=dim)


FAMILY = InternVLFamily()


def patch(model: nn.Module, config: PruneConfig | None = None, sink: TimingSink | None = None) -> nn.Module:
    """Attach the pruning engine to an ``InternVLForConditionalGeneration`` (idempotent)."""
    return prune_engine.patch(model, FAMILY, config, sink)


def unpatch(model: nn.Module) -> nn.Module:
    return prune_engine.unpatch(model)
