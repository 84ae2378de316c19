"""LLaVA-NeXT (LLaVA-1.6: Vicuna-7B, Mistral-7B) on the shared pruning engine, through transformers'
``LlavaNextForConditionalGeneration`` (checkpoints ``llava-hf/llava-v1.6-vicuna-7b-hf``,
``llava-hf/llava-v1.6-mistral-7b-hf``). The design, and every method's treatment, is in
``docs/llava_next.md``.

What this family contributes (everything else is :mod:`prune_engine`; the CLIP captures are
:class:`custom_llava.LlavaFamily`'s, which this family extends):

* the decoder is LLaMA (Vicuna) or Mistral with plain 1-D position ids, so the engine's default
  :meth:`prune_engine.Family.positions` applies. A Mistral decoder with ``sliding_window`` set is
  refused by the engine (llava-hf's Mistral checkpoint, from Mistral-7B-Instruct-v0.2, should have
  none; not checked here: ``docs/llava_next.md``);
* the visual tokens (:meth:`LlavaNextFamily.image_layout`, from ``image_sizes`` alone, once per
  prefill). "anyres" turns an image into a base image (resized to 336 px) plus ``rows x cols``
  high-resolution crops of 336 px (``image_grid_pinpoints``); CLIP runs on each as one batch item,
  24 x 24 patch features each ([CLS] dropped). ``LlavaNextModel.pack_image_features`` lays an
  image's LLM tokens out as: the base image's 576 tokens (row-major), then the crops stitched into
  one ``(24 * rows) x (24 * cols)`` grid, cut to the unpadded window (``unpad_image``: the rows or
  columns of padding the processor added to fit the aspect ratio), row-major, with the learned
  ``image_newline`` token after every row of that grid. Every one of them is an ``<image>``
  placeholder in ``input_ids``;
* **newline tokens** are never pruned and count in no budget: they are
  :class:`prune_engine.ImageLayout` markers, not visual tokens. An image has
  ``N = 576 + rows' * cols'`` visual tokens and ``rows'`` markers. Why: a newline token carries no
  image content (one learned vector, the same at every row end); it is layout, like the
  ``<img>``/``</img>`` or vision-start tokens of the other families, which are never pruned
  either; the originals that prune LLaVA-NeXT before the LLM either keep every newline (G-Prune,
  whose original is written for LLaVA-NeXT; FasterVLM's, VisPruner's, CDPruner's and VScan's
  ``spatial_unpad`` branches set the newline column of their masks to True) or have none (they
  force ``mm_patch_merge_type='spatial'``). Methods whose originals treat the image as one span
  (DivPrune's LLaVA-1.6 path; PDrop-style intra-LLM code: newlines among the candidates) differ there;
* **base image vs crops**: the engine's budget unit is the image, ``budget(N, KEEP_RATIO)`` over all
  its visual tokens. Methods whose originals select per crop read the crop structure from
  ``ctx.crops`` (:class:`methods.Crops`: each token's crop and its patch in that crop's 24 x 24
  CLIP grid) and split the image's budget over the crops in proportion to their token counts
  (:func:`methods.crop_budgets`);
* the **CLIP mapping** (:meth:`LlavaNextFamily.vit_image`, ``vit_split_cls``, ``vit_cls``): the
  CLIP captures come per ViT item (every crop of every image, in ``pixel_values`` order); an
  image's share is gathered from its crops into its LLM token order (``Crops.vit_index``), so a
  method reads ``vit_cls_attention`` ``[H, N]``, ``vit_features`` ``[N, C]``, ... aligned with
  ``ctx.features`` as on LLaVA-1.5. [CLS] rows come one per crop (``vit_cls_feature`` ``[crops, C]``,
  ``vit_feature_keys`` ``[crops + N, hd]``: the crops' [CLS] rows first);
* ViT-internal merges (MustDrop's window merge, ToMe's per-layer merge) are not wired: a merged
  crop no longer has the 24 x 24 patches that the stitching and unpadding index (the engine skips
  the merge with a ``vision`` note; MustDrop's other stages and ToMe's adaptation run).

VLMEvalKit protocol (:mod:`vlm_adapter`): ``LLaVA_Next`` (``llava_next_vicuna_7b``,
``llava_next_mistral_7b``) is HF-native: its ``__init__`` loads ``LlavaNextProcessor`` and
``LlavaNextForConditionalGeneration``, its ``generate_inner`` builds the prompt with the
processor's chat template (all images first, then the texts), calls ``generate`` and decodes the
whole output (special tokens kept: it passes ``skip_special_token``), and ``output_process`` keeps
what follows ``ASSISTANT:`` (``[/INST]`` for Mistral) up to ``</s>``. The generic
:class:`vlm_adapter.ModelShim` passes its ``generate`` through; the processor it is handed is ours
behind :class:`TextFirstProcessor` (the wrapper calls ``processor(prompt, images)``, an order only
transformers 4.x accepted).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

import methods
import prune_engine
from custom_llava import LlavaFamily
from transformers import LlavaNextForConditionalGeneration as MODEL_CLASS  # noqa: N812 (after prune_engine: CPU torchvision fix)
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape
from utils import PruneConfig, TimingSink
from vlm_adapter import LoadedModel, ModelShim

# The names users type (VLMEvalKit's) -> Hugging Face checkpoints.
CHECKPOINTS = {
    "llava_next_vicuna_7b": "llava-hf/llava-v1.6-vicuna-7b-hf",
    "llava_next_mistral_7b": "llava-hf/llava-v1.6-mistral-7b-hf",
}

# The VLMEvalKit model whose protocol a checkpoint folder gets unless --vlmeval-model says otherwise.
VLMEVAL_DEFAULT = "llava_next_vicuna_7b"


class TextFirstProcessor:
    """The processor ``LLaVA_Next`` holds: ours, called the way transformers 4.x took the wrapper's call.

    ``LLaVA_Next.generate_inner`` calls ``processor(prompt, images, return_tensors="pt")``. transformers
    4.x processors took a text-first positional call as text and images (their
    ``_validate_images_text_input_order`` swapped it); transformers 5.23's read the first positional
    argument as the images and fail on the prompt string. This proxy restores the 4.x reading of that
    one call (a string, or a list of strings, first: ``text=``, then ``images=``) and hands every other
    call and attribute (``apply_chat_template``, ``decode``, ``tokenizer``, ...) to the processor."""

    def __init__(self, processor: Any) -> None:
        self._processor = processor

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        first = args[0] if args else None
        if isinstance(first, str) or (isinstance(first, list) and first and all(isinstance(t, str) for t in first)):
            images = args[1] if len(args) > 1 else kwargs.pop("images", None)
            return self._processor(*args[2:], text=first, images=images, **kwargs)
        return self._processor(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._processor, name)


def vlmeval_shim(loaded: LoadedModel) -> ModelShim:
    return ModelShim(loaded)  # HF-native on both sides: generate passes through


def vlmeval_loaders(loaded: LoadedModel, shim: ModelShim) -> list[tuple[Any, str, Any]]:
    """What ``LLaVA_Next.__init__`` loads (vlmeval 26.3, vlm/llava/llava.py, the non-interleave,
    non-34B path): ``LlavaNextProcessor.from_pretrained`` (our processor, behind
    :class:`TextFirstProcessor`) and ``LlavaNextForConditionalGeneration.from_pretrained`` (fp16,
    ``.eval().cuda()`` on the shim), answered with what we loaded."""
    import transformers

    return [
        (transformers.LlavaNextProcessor, "from_pretrained", lambda *a, **k: TextFirstProcessor(loaded.processor)),
        (transformers.LlavaNextForConditionalGeneration, "from_pretrained", lambda *a, **k: shim),
    ]


def anyres_layout(image_size: tuple[int, int], pinpoints: list, crop_px: int, side: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """``((rows, cols), (top, bottom, left, right))`` of one image: its grid of high-resolution crops
    and the unpadded window of the stitched ``(rows * side) x (cols * side)`` token grid.

    ``image_size`` is ``(height, width)`` in pixels (``image_sizes``), ``crop_px`` the vision tower's
    input size, ``side`` its patches a side. The crop grid is transformers' own
    ``get_anyres_image_grid_shape``; the window follows ``unpad_image`` (transformers 5.23.0):
    compare the image's aspect ratio with the stitched grid's; the side that fits keeps all its
    tokens, the other keeps ``int(round(size * scale, 7))`` of them, the padding split evenly
    (``(current - new) // 2`` cut at each end). Changed: computed from the sizes, on no tensor.
    """
    rows, cols = get_anyres_image_grid_shape(list(image_size), pinpoints, crop_px)
    height, width = image_size
    grid_h, grid_w = rows * side, cols * side
    if width / height > grid_w / grid_h:  # wider than the grid: padding rows above and below
        pad = (grid_h - int(round(height * (grid_w / width), 7))) // 2
        return (rows, cols), (pad, grid_h - pad, 0, grid_w)
    pad = (grid_w - int(round(width * (grid_h / height), 7))) // 2  # taller: padding columns
    return (rows, cols), (0, grid_h, pad, grid_w - pad)


def image_entry(image_size: tuple[int, int], pinpoints: list, crop_px: int, side: int) -> prune_engine.ImageLayout:
    """One image's :class:`prune_engine.ImageLayout`: its ``N = side**2 + h * w`` visual tokens among
    ``side**2 + h * (w + 1)`` placeholders (``h x w`` the unpadded window; a newline after each of its
    rows), and its :class:`methods.Crops`. Vectorised (CPU tensors, no per-token loop)."""
    (rows, cols), (top, bottom, left, right) = anyres_layout(image_size, pinpoints, crop_px, side)
    h, w = bottom - top, right - left
    base = side * side
    # Placeholders: base tokens, then each window row's w tokens and its newline (offset w in the row).
    row_offsets = base + torch.arange(h).unsqueeze(1) * (w + 1) + torch.arange(w)  # [h, w]
    visual = torch.cat([torch.arange(base), row_offsets.flatten()])
    # The crop and in-crop patch of each window token: stitched row Y, column X.
    y = (top + torch.arange(h)).unsqueeze(1).expand(h, w)
    x = (left + torch.arange(w)).unsqueeze(0).expand(h, w)
    crop = torch.cat([torch.zeros(base, dtype=torch.long), (1 + (y // side) * cols + x // side).flatten()])
    patch = torch.cat([torch.arange(base), ((y % side) * side + x % side).flatten()])
    order = torch.argsort(crop, stable=True)  # tokens grouped by crop, ascending within each
    sizes = torch.bincount(crop, minlength=1 + rows * cols).tolist()
    members = tuple(order.split(sizes))
    crops = methods.Crops(side, (rows, cols), (top, bottom, left, right), crop, patch, members, tuple(sizes))
    return prune_engine.ImageLayout(n=base + h * w, grid=None, placeholders=base + h * (w + 1), visual=visual, crops=crops)


class LlavaNextFamily(LlavaFamily):
    """LLaVA-NeXT: :class:`custom_llava.LlavaFamily`'s CLIP captures, this family's layout and CLIP mapping."""

    name = "llava_next"

    def image_layout(self, model: nn.Module, kwargs: Mapping[str, Any]) -> list[prune_engine.ImageLayout]:
        """One :class:`prune_engine.ImageLayout` per row of ``image_sizes`` (``[n_images, 2]``,
        height and width in pixels), in prompt order (:func:`image_entry`). One host sync (the sizes).

        Raises when images come without ``image_sizes`` (the newline tokens could not be told from
        visual tokens) and for ``vision_feature_select_strategy="full"`` (its [CLS] rows break
        LLaVA-NeXT's 24 x 24 stitching in transformers itself)."""
        sizes = kwargs.get("image_sizes")
        if sizes is None:
            raise ValueError("LLaVA-NeXT: pruning needs image_sizes (as the processor returns it) to locate the newline tokens")
        strategy = kwargs.get("vision_feature_select_strategy") or model.config.vision_feature_select_strategy
        if strategy != "default":
            raise ValueError(f"LLaVA-NeXT: pruning needs vision_feature_select_strategy='default', got {strategy!r}")
        vc = model.config.vision_config
        side = vc.image_size // vc.patch_size
        pinpoints = model.config.image_grid_pinpoints
        return [image_entry(tuple(s), pinpoints, vc.image_size, side) for s in sizes.tolist()]

    def _items(self, img: int, segments: list[Any]) -> tuple[int, methods.Crops]:
        """Where image ``img``'s ViT items start (all crops of the images before it come first) and its crops."""
        start = sum(seg.crops.n_crops for seg in segments[:img])
        return start, segments[img].crops

    def vit_image(self, items: Any, img: int, segments: list[Any], dim: int = -1) -> torch.Tensor:
        """Image ``img``'s tokens of a per-item ViT tensor ``items`` (``[items, ..., P, ...]``, the
        patch axis ``dim`` of the per-item tensor, ``P = side**2``), in its LLM token order: its crops'
        patches stitched crop by crop, then gathered at ``Crops.vit_index`` (base patches, then the
        unpadded window's tokens; crops' padding patches dropped)."""
        start, crops = self._items(img, segments)
        x = items[start : start + crops.n_crops]  # [k, *per_item]
        d = dim if dim >= 0 else x.dim() - 1 + dim  # the patch axis of the per-item tensor
        x = x.movedim(0, d).flatten(d, d + 1)  # [..., k * P, ...]: crop-major
        return x.index_select(d, crops.vit_index.to(x.device))

    def vit_split_cls(self, items: torch.Tensor, img: int, segments: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cls [crops, C], patches [N, C])`` of ``items`` ``[items, 1 + P, C]``: each crop's [CLS]
        row, in crop order, and the patches in the image's token order."""
        start, crops = self._items(img, segments)
        x = items[start : start + crops.n_crops]
        return x[:, 0], x[:, 1:].flatten(0, 1).index_select(0, crops.vit_index.to(x.device))

    def vit_cls(self, items: torch.Tensor, img: int, segments: list[Any]) -> torch.Tensor:
        """``[crops, C]``: the [CLS] rows of image ``img``'s crops (``items`` ``[items, C]``)."""
        start, crops = self._items(img, segments)
        return items[start : start + crops.n_crops]

    def install_vit_merge(self, model: nn.Module, layer: int, apply: Any) -> list[Any]:
        raise NotImplementedError(_NO_VIT_MERGE)

    def install_vit_layer_merge(self, model: nn.Module, apply: Any) -> list[Any]:
        raise NotImplementedError(_NO_VIT_MERGE)


_NO_VIT_MERGE = (
    "LLaVA-NeXT: a ViT-internal merge leaves a crop without the 24 x 24 patches that its stitching and "
    "unpadding index, so it is not wired"
)


def tokens_of(image_size: tuple[int, int], config: Any) -> tuple[int, int]:
    """``(visual tokens, placeholders)`` of one image of ``image_size`` (height, width) under ``config``
    (a ``LlavaNextConfig``): what the records say and what the processor writes."""
    vc = config.vision_config
    entry = image_entry(image_size, config.image_grid_pinpoints, vc.image_size, vc.image_size // vc.patch_size)
    return entry.n, entry.span


FAMILY = LlavaNextFamily()


def patch(model: nn.Module, config: PruneConfig | None = None, sink: TimingSink | None = None) -> nn.Module:
    """Attach the pruning engine to a ``LlavaNextForConditionalGeneration`` (idempotent)."""
    return prune_engine.patch(model, FAMILY, config, sink)


def unpatch(model: nn.Module) -> nn.Module:
    return prune_engine.unpatch(model)

