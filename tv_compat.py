"""Make ``import torchvision`` work on a CPU-only torch with PyPI's CUDA torchvision wheel.

On these machines torchvision's compiled extension (``torchvision/_C.so``, a CUDA build) fails to
load silently; ``torchvision/_meta_registrations.py`` then registers fake kernels for
``torchvision::nms`` / ``torchvision::qnms`` and ``import torchvision`` raises
``RuntimeError: operator torchvision::nms does not exist``. That breaks ``import vlmeval``,
``import timm`` and several ``transformers`` imports.

The fix: define the torchvision operator *schemas* (no kernels) before torchvision is imported.
The pure-Python parts (transforms, models, HF fast image processors) then work; calling a compiled
op (nms, roi_align, ...) raises because no kernel is registered. When the real extension loads
(CUDA torch on a GPU machine) this module does nothing.

Usage: ``import tv_compat; tv_compat.ensure_torchvision()`` before anything imports torchvision.
"""

from __future__ import annotations

import logging
import sys

import torch

logger = logging.getLogger(__name__)

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
