"""CDPruner: instruction-conditioned diversity by a conditional DPP over the projected tokens (Zhang et al., NeurIPS 2025).

Registered as ``cdpruner_pre_llm`` for LLaVA (:func:`cdpruner`). Original: Theia-4869/CDPruner
@9541616, ``llava/model/llava_arch.py :: encode_images`` (the selection) and
``llava/model/multimodal_encoder/clip_encoder.py :: forward, load_text_tower`` (its inputs); the
question text comes from ``llava/eval/model_vqa_loader.py`` / ``model_vqa_science.py`` /
``model_vqa_mmbench.py`` (``texts=question``). Paper: https://arxiv.org/abs/2506.10967.

What the original computes for one LLaVA-1.5 image (T = ``visual_token_num``):

* ``X`` = the projected tokens (``mm_projector`` output, ``[N, D]``); ``S = X̂ X̂ᵀ`` in fp32;
* image embeddings ``E = visual_projection(post_layernorm(h))`` (``h`` the feature layer's patches,
  ``hidden_states[-2][:, 1:]``; ``post_layernorm`` the tower's own, ``visual_projection`` from
  ``CLIPVisionModelWithProjection`` of the same CLIP checkpoint, in fp32);
* text embeddings ``t_m`` = ``CLIPTextModelWithProjection(...).text_embeds`` of the question, cut
  into chunks of the text tower's 77 positions (the tokenized question incl. BOS/EOS, padded with
  id 0 and mask 0 to a multiple of 77, one row a chunk);
* relevance ``q_i = -mean_m cos(E_i, t_m)`` (NEGATED), min-max scaled over all crops together:
  ``(q - min + 1e-6) / (max - min)``;
* kernel ``L = diag(q) S diag(q)``; greedy MAP of the DPP by the incremental Cholesky update
  (Chen et al. 2018): T times, pick ``j = argmax d²``, ``e = (L[j] - cᵀ c[:, j]) / sqrt(d²_j)``,
  ``d² -= e²``, ``d²_j = -inf``; the picks become a mask (spatial order).

:func:`cdpruner_select` is that selection on explicit tensors, batched over crops ``[B, N, .]``
(LLaVA-NeXT's base image + crops: one DPP each, T each, relevance scaled over all of them).

Where its inputs come from in the harness:

* ``ctx.features`` (pre-LLM: the projector output) and ``vit_features`` / ``vit_post_layernorm``
  (captured during the one vision pass).
* The question: the ``instruction_text`` need, i.e. ``model._prune_state.sample_info["text"]``
  (the VLMEvalKit adapter sets it to the message's text parts joined with newlines), minus the
  answer-format instructions of :data:`INSTRUCTION_SUFFIXES` (the original's eval scripts remove
  theirs before the text tower).
* The CLIP text tower and ``visual_projection``: llava-hf checkpoints hold only CLIP's vision
  tower, so they are loaded from the CLIP checkpoint named by ``PRUNE_ARGS clip_model=...``
  (default ``openai/clip-vit-large-patch14-336``, LLaVA-1.5's tower) with transformers'
  ``CLIPTextModelWithProjection`` / ``CLIPVisionModelWithProjection`` and its tokenizer, once per
  process and device (:func:`load_clip`), in fp32 as the original (which loads them without a
  dtype). That checkpoint must be the model's own vision tower: its ``post_layernorm`` is compared
  with the model's once, and a mismatch is an error.

Rank: when T exceeds the kernel's numerical rank, the original takes ``sqrt`` of a gain <= 0, gets
NaN and repeats picks, so fewer than T tokens survive its mask. Here the greedy stops at the first
pick whose gain is not > 0 (every pick before it is the original's): fewer than T tokens are kept
(``exact_count=False``; the trace reports the count). The loop has no host sync (argmax, gathers and
the validity flag stay on the device); the one sync is the final filter of the valid picks.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch
from torch import nn

from methods import PruneContext, crop_budgets, crop_rows, register_prune

logger = logging.getLogger(__name__)

DEFAULT_CLIP = "openai/clip-vit-large-patch14-336"

# Answer-format instructions removed from the question before the text tower, with str.replace (as
# the original's scripts do). The first two are the original's own (model_vqa_loader.py,
# model_vqa_science.py); the original's MMBench script never puts its instruction (the last two,
# English and Chinese) into the text; VLMEvalKit's prompts use the first and the last three.
INSTRUCTION_SUFFIXES = (
    "\nAnswer the question using a single word or phrase.",
    "\nAnswer with the option's letter from the given choices directly.",
    "Please select the correct answer from the options above. \n",
    "\n请直接回答选项字母。",
)


def strip_instruction(text: str) -> str:
    """``text`` without the answer-format instructions of :data:`INSTRUCTION_SUFFIXES`."""
    for suffix in INSTRUCTION_SUFFIXES:
        text = text.replace(suffix, "")
    return text


def cdpruner_relevance(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` relevance: minus the mean cosine of each CLIP image embedding ``image_embeds``
    ``[B, N, E]`` to the text chunks ``text_embeds`` ``[M, E]``, min-max scaled over all ``B x N``
    (the original's ``(q - min + 1e-6) / (max - min)``; a constant q, whose range is 0, gives 1e-6
    / tiny instead of a division by zero). fp32."""
    im = image_embeds.float()
    tx = text_embeds.float()
    im = im / im.norm(dim=-1, keepdim=True)
    tx = tx / tx.norm(dim=-1, keepdim=True)
    rel = -(im @ tx.T).mean(dim=-1)  # [B, N]
    lo, hi = rel.min(), rel.max()
    return (rel - lo + 1e-6) / (hi - lo).clamp_min(torch.finfo(rel.dtype).tiny)


def dpp_greedy(kernel: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy MAP of a DPP with kernel ``kernel`` ``[B, N, N]`` by the incremental Cholesky update.

    Returns ``(picks [B, keep], valid [B, keep])``: the picks in pick order, and whether each is a
    pick of the original (its gain ``d²_j`` > 0; after the first gain <= 0 every later pick is
    invalid: the original's NaN region). No host sync: one kernel, ``keep`` device steps.
    """
    b_, n, _ = kernel.shape
    cis = torch.zeros(keep, b_, n, dtype=kernel.dtype, device=kernel.device)  # Cholesky rows
    d2 = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # [B, N] remaining gains
    picks = torch.empty(keep, b_, dtype=torch.long, device=kernel.device)
    valid = torch.empty(keep, b_, dtype=torch.bool, device=kernel.device)
    ok = torch.ones(b_, dtype=torch.bool, device=kernel.device)
    tiny = torch.finfo(kernel.dtype).tiny
    for i in range(keep):
        j = d2.argmax(dim=-1, keepdim=True)  # [B, 1], first maximum
        gain = d2.gather(1, j)  # [B, 1]
        ok = ok & (gain[:, 0] > 0)
        row = kernel.gather(1, j.unsqueeze(-1).expand(b_, 1, n))[:, 0]  # [B, N] = L[j]
        c_j = cis[:i].gather(2, j.unsqueeze(0).expand(i, b_, 1))[..., 0]  # [i, B] = c[:, j]
        e = (row - torch.einsum("tb,tbn->bn", c_j, cis[:i])) / gain.clamp_min(tiny).sqrt()
        e = torch.where(ok.unsqueeze(-1), e, torch.zeros_like(e))  # past the rank: no update
        cis[i] = e
        d2 = (d2 - e.square()).scatter(1, j, -torch.inf)
        picks[i], valid[i] = j[:, 0], ok
    return picks.T, valid.T


def cdpruner_select(
    features: torch.Tensor, image_embeds: torch.Tensor, text_embeds: torch.Tensor, keep: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """CDPruner's selection, per crop.

    Args:
        features: ``[B, N, D]`` the projected tokens of the ``B`` crops of one image (LLaVA-1.5:
            ``B = 1``).
        image_embeds: ``[B, N, E]`` their CLIP image embeddings (``visual_projection(post_layernorm(.))``).
        text_embeds: ``[M, E]`` the CLIP text embeddings of the instruction's chunks.
        keep: T, tokens per crop.

    Returns:
        ``(picks [B, T], valid [B, T])`` as :func:`dpp_greedy` (the original returns the mask of
        the picks, i.e. spatial order).
    """
    x = features.float()
    x = x / x.norm(dim=-1, keepdim=True)
    similarity = x @ x.transpose(1, 2)  # [B, N, N]
    rel = cdpruner_relevance(image_embeds, text_embeds)  # [B, N]
    kernel = rel.unsqueeze(2) * similarity * rel.unsqueeze(1)
    return dpp_greedy(kernel, keep)


def cdpruner_select_crops(
    features: torch.Tensor, image_embeds: torch.Tensor, text_embeds: torch.Tensor, rows: list[torch.Tensor],
    budgets: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """CDPruner's selection on crops of different sizes (LLaVA-NeXT after the unpadding): one DPP per
    crop with its own T, the relevance min-max scaled over all crops together.

    Args:
        features: ``[N, D]`` the image's projected tokens (all its crops).
        image_embeds: ``[N, E]`` their CLIP image embeddings.
        text_embeds: ``[M, E]`` the instruction's CLIP text chunks.
        rows: per crop, its rows of ``features`` (``[n_c]``).
        budgets: per crop, its T.

    Returns:
        ``(picks [B, T_max], valid [B, T_max])``: rows of ``features`` in each crop's pick order; a
        pick is valid if it is one of the first ``T_c`` of its crop and the original's (gain > 0).

    The crops are padded to the largest; a padding slot has zero features and zero relevance, so
    its kernel row and column are 0: its gain is 0, never taken before the crop's own tokens (the
    greedy stops at the first gain <= 0, and later picks are invalid). The greedy of a crop with
    ``T_c`` picks is the first ``T_c`` of ``T_max`` greedy picks (greedy order). One batched DPP,
    no host sync.
    """
    device = features.device
    rel = cdpruner_relevance(image_embeds.unsqueeze(0), text_embeds)[0]  # [N], scaled over all crops
    width = max(int(r.numel()) for r in rows)
    index = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    real = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
    for c, r in enumerate(rows):
        index[c, : r.numel()], real[c, : r.numel()] = r, True
    x = features.float()
    x = (x / x.norm(dim=-1, keepdim=True))[index] * real.unsqueeze(-1)  # [B, W, D]
    q = rel[index] * real  # [B, W]
    kernel = q.unsqueeze(2) * (x @ x.transpose(1, 2)) * q.unsqueeze(1)
    t_max = max(budgets)
    picks, valid = dpp_greedy(kernel, t_max)
    within = torch.arange(t_max, device=device).unsqueeze(0) < torch.tensor(budgets, device=device).unsqueeze(1)
    return index.gather(1, picks), valid & within


class ClipText:
    """The parts of a CLIP checkpoint CDPruner adds to a LLaVA model: tokenizer, text tower with
    projection, and ``visual_projection`` (fp32, on ``device``). Use :func:`load_clip`."""

    def __init__(self, name: str, device: torch.device) -> None:
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

        self.name = name
        self.tokenizer = AutoTokenizer.from_pretrained(name)
        self.text = CLIPTextModelWithProjection.from_pretrained(name, dtype=torch.float32).to(device).eval()
        vision = CLIPVisionModelWithProjection.from_pretrained(name, dtype=torch.float32)
        self.visual_projection = vision.visual_projection.to(device).eval()
        # Kept only to check that the model's vision tower is this CLIP (see check_tower).
        self.post_layernorm = vision.vision_model.post_layernorm.to(device).eval()
        self.chunk = int(self.text.config.max_position_embeddings)
        self._checked: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()
        self._last: tuple[str, torch.Tensor] | None = None

    @torch.no_grad()
    def text_embeds(self, text: str) -> torch.Tensor:
        """``[M, E]``: ``text_embeds`` of ``text`` in chunks of ``max_position_embeddings`` tokens,
        as the original's ``CLIPVisionTower.forward``: the whole text tokenized once (BOS ... EOS,
        no truncation), zero-padded (ids and mask) to a multiple of the chunk, one row a chunk.
        The last text's result is reused (several images of one prompt)."""
        if self._last is not None and self._last[0] == text:
            return self._last[1]
        enc = self.tokenizer(text=text, return_tensors="pt", truncation=False)
        length = enc["input_ids"].shape[1]
        pad = self.chunk * ((length - 1) // self.chunk + 1) - length
        device = self.visual_projection.weight.device
        inputs = {
            k: torch.cat([v, v.new_zeros((v.shape[0], pad))], dim=1).reshape(-1, self.chunk).to(device)
            for k, v in enc.items()
            if k in ("input_ids", "attention_mask")
        }
        out = self.text(**inputs).text_embeds  # [M, E]
        self._last = (text, out)
        return out

    @torch.no_grad()
    def image_embeds(self, vit_features: torch.Tensor, post_layernorm: nn.Module) -> torch.Tensor:
        """``[N, E]``: ``visual_projection(post_layernorm(vit_features).float())`` (the tower's own
        ``post_layernorm`` in its dtype, then the projection in fp32, as the original)."""
        self.check_tower(post_layernorm)
        return self.visual_projection(post_layernorm(vit_features).float())

    @torch.no_grad()
    def check_tower(self, post_layernorm: nn.Module) -> None:
        """Raise unless ``post_layernorm`` (the model's) is this checkpoint's (within fp16 rounding);
        once per module."""
        if self._checked.get(post_layernorm):
            return
        mine = [p.float() for p in (self.post_layernorm.weight, self.post_layernorm.bias)]
        theirs = [p.float().to(mine[0].device) for p in (post_layernorm.weight, post_layernorm.bias)]
        if any(a.shape != b.shape or not torch.allclose(a, b, rtol=1e-2, atol=1e-3) for a, b in zip(mine, theirs)):
            raise ValueError(
                f"cdpruner_pre_llm: the CLIP checkpoint {self.name!r} is not this model's vision tower (their "
                "post_layernorm differ); name the CLIP the model was built on with PRUNE_ARGS clip_model=..."
            )
        self._checked[post_layernorm] = True


_CLIPS: dict[tuple[str, str], ClipText] = {}


def load_clip(name: str, device: torch.device | str) -> ClipText:
    """The :class:`ClipText` of checkpoint ``name`` on ``device``, loaded once per process."""
    key = (name, str(device))
    if key not in _CLIPS:
        logger.info("CDPruner: loading the CLIP text tower and visual projection of %s", name)
        _CLIPS[key] = ClipText(name, torch.device(device))
    return _CLIPS[key]


@register_prune(
    "cdpruner_pre_llm",
    stage="pre_llm",
    needs=("vit_features", "vit_post_layernorm", "instruction_text"),
    exact_count=False,
    families=("llava", "llava_next"),
    source="Theia-4869/CDPruner",
    paper="https://arxiv.org/abs/2506.10967",
    deviation="Not in UniPruneBench. T = budget(N, KEEP_RATIO) per image; CLIP text tower + visual_projection "
    "from PRUNE_ARGS clip_model (llava-hf has neither); question = sample_info['text'] minus answer-format "
    "instructions; fewer than T at the kernel's rank (the original: NaN picks); relevance scaled per image; "
    "own positions (original: sequential). LLaVA-NeXT: one DPP per crop, T per crop = budget(N, r) split over the "
    "crops in proportion to their tokens, relevance scaled over the image's crops, among the tokens the unpadding "
    "keeps (original: T of 576 per crop, no unpad). docs/methods_text.md, docs/llava_next.md",
    refusal="its relevance is a CLIP text-image cosine, which needs CLIP's text tower and a CLIP-aligned image "
    "space; this family's ViT has neither (the paper's Qwen2.5-VL results come with no code)",
)
def cdpruner(
    ctx: PruneContext, keep: int, *, clip_model: str = DEFAULT_CLIP, strip_suffixes: bool = True
) -> torch.Tensor:
    """Keep a diverse, instruction-relevant subset by greedy MAP of a conditional DPP.

    ``keep`` is the original's ``visual_token_num`` T (``budget(N, KEEP_RATIO)``); fewer when T
    exceeds the kernel's rank. LLaVA-NeXT (``ctx.crops``): one DPP per crop with its share of
    ``keep`` (:func:`cdpruner_select_crops`), the relevance scaled over all crops, as the original. ``clip_model``: the CLIP checkpoint (name or path) whose text tower
    and ``visual_projection`` score relevance; it must be the model's vision tower.
    ``strip_suffixes``: remove :data:`INSTRUCTION_SUFFIXES` from the question first.
    """
    clip = load_clip(clip_model, ctx.features.device)
    text = ctx["instruction_text"]
    if strip_suffixes:
        text = strip_instruction(text)
    image_embeds = clip.image_embeds(ctx["vit_features"], ctx["vit_post_layernorm"])  # [N, E]
    if ctx.crops is not None:  # LLaVA-NeXT: a DPP per crop, each with its share of keep
        rows = crop_rows(ctx)
        budgets = crop_budgets([int(r.numel()) for r in rows], keep)
        picks, valid = cdpruner_select_crops(ctx.features, image_embeds, clip.text_embeds(text), rows, budgets)
        return picks[valid]  # the one host sync
    picks, valid = cdpruner_select(ctx.features.unsqueeze(0), image_embeds.unsqueeze(0), clip.text_embeds(text), keep)
    return picks[0][valid[0]]  # the one host sync: how many picks are valid
