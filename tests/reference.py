"""An independent reference for the exactness tests: the UNPATCHED model's own modules run
without cache, layer by layer, on a sequence from which the dropped tokens are removed at the
layer where the harness removed them (kept tokens keeping their original position ids).

It shares no code with the engine: positions come from the model's own position logic on the
full sequence, rotary embeddings are computed directly for the kept positions, and every layer
sees a plain causal sequence (no cache, no hand-built mask).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def reference_logits(family, model, inputs: dict, ids: torch.Tensor, drops: dict[int, list[int]],
                     trim: tuple[int, set[int], int] | None = None) -> torch.Tensor:
    """Logits ``[L_alive, V]`` of the last layer for the full token sequence ``ids`` ``[1, L]``.

    ``drops[layer]`` lists the visual positions (indices into the original prompt) that survive
    from ``layer`` on; non-visual tokens always survive. ``family`` supplies ``embed`` and
    ``positions`` for the model family. ``trim = (from_layer, final, n_prompt)`` models a KV cache
    trimmed after the prefill: from ``from_layer`` on, the tokens after the prompt (decoded ones)
    see only the visual positions in ``final``.
    """
    text = model.model.language_model
    hidden = family.embed(model, inputs, ids)  # [1, L, D]
    pos = family.positions(model, inputs, ids)  # rotary position ids, seq on the last dim
    visual = family.visual_mask(model, ids, inputs)  # [L] bool
    alive = torch.arange(ids.shape[1])
    for i, layer in enumerate(text.layers):
        if i in drops:
            keep = set(drops[i])
            sel = torch.tensor([j for j, p in enumerate(alive.tolist()) if not visual[p] or p in keep])
            hidden, alive = hidden[:, sel], alive[sel]
        cos, sin = text.rotary_emb(hidden, pos[..., alive])
        mask = None  # sdpa: its own causal flag
        n = hidden.shape[1]
        if trim is not None and i >= trim[0]:
            _, final, n_prompt = trim
            gone = torch.tensor([bool(visual[p]) and p not in final for p in alive.tolist()])
            blocked = torch.ones(n, n, dtype=torch.bool).triu(1) | (alive >= n_prompt)[:, None] & gone[None, :]
            mask = torch.zeros(n, n).masked_fill(blocked, torch.finfo(hidden.dtype).min)[None, None]
        elif text.config._attn_implementation == "eager":  # eager applies no causality by itself
            mask = torch.full((n, n), torch.finfo(hidden.dtype).min).triu(1)[None, None]
        hidden = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=None)
    return model.lm_head(text.norm(hidden))[0], alive


def drops_from_trace(trace) -> dict[int, list[int]]:
    """The trace's survivors per layer (pre-LLM events act at layer 0)."""
    return {(0 if e.layer is None else e.layer): e.kept for e in trace}


class QwenRef:
    @staticmethod
    def embed(model, inputs, ids):
        inner = model.model
        emb = inner.get_input_embeddings()(ids)
        feats = inner.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        feats = torch.cat(feats, dim=0)
        mask = (ids == model.config.image_token_id).unsqueeze(-1)
        return emb.masked_scatter(mask, feats)

    @staticmethod
    def positions(model, inputs, ids):
        types = torch.zeros_like(ids)
        n = inputs["mm_token_type_ids"].shape[1]
        types[:, :n] = inputs["mm_token_type_ids"]
        pos, _ = model.model.get_rope_index(ids, image_grid_thw=inputs["image_grid_thw"], mm_token_type_ids=types)
        return pos  # [3, 1, L]

    @staticmethod
    def visual_mask(model, ids, inputs=None):
        return ids[0] == model.config.image_token_id


class _PlainRef:
    """Families whose decoder takes plain 1-D position ids (LLaMA, Qwen2)."""

    @staticmethod
    def positions(model, inputs, ids):
        # [1, L]: LlamaModel.forward / Qwen2Model.forward (transformers 5.23.0) with no cache,
        # ``arange(L)`` unsqueezed; unchanged.
        return torch.arange(ids.shape[1]).unsqueeze(0)

    @staticmethod
    def visual_mask(model, ids, inputs=None):
        return ids[0] == model.config.image_token_id


class InternVLRef(_PlainRef):
    @staticmethod
    def embed(model, inputs, ids):
        """``[1, L, D]``: from ``InternVLModel.forward`` (transformers 5.23.0): token embeddings,
        the projected tile features ``[T, 16, D]`` scattered into the context tokens in order;
        changed: no placeholder-count check, ``ids`` may run past the prompt (decoded tokens)."""
        inner = model.model
        emb = inner.get_input_embeddings()(ids)
        feats = inner.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output  # [tiles, 16, D]
        feats = feats.reshape(-1, feats.shape[-1])
        mask = (ids == model.config.image_token_id).unsqueeze(-1)
        return emb.masked_scatter(mask, feats)


class LlavaRef(_PlainRef):
    @staticmethod
    def embed(model, inputs, ids):
        """``[1, L, D]``: from ``LlavaModel.forward`` (transformers 5.23.0): token embeddings, the
        per-image projected features (a list of ``[16, D]``) concatenated and scattered into the
        ``<image>`` tokens; changed: no placeholder-count check, ``ids`` may run past the prompt."""
        inner = model.model
        emb = inner.get_input_embeddings()(ids)
        feats = inner.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output  # [n_img] x [16, D]
        feats = torch.cat(list(feats), dim=0)
        mask = (ids == model.config.image_token_id).unsqueeze(-1)
        return emb.masked_scatter(mask, feats)


class LlavaNextRef(_PlainRef):
    @staticmethod
    def features(model, inputs):
        """``[placeholders, D]``: ``LlavaNextModel.get_image_features``'s packed features of every image
        (base, unpadded crops, newline rows), concatenated in prompt order."""
        out = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
        return torch.cat(list(out.pooler_output), dim=0)

    @staticmethod
    def embed(model, inputs, ids):
        """``[1, L, D]``: from ``LlavaNextModel.forward`` (transformers 5.23.0): token embeddings, the
        packed features scattered into the prompt's ``<image>`` tokens; changed: no placeholder-count
        check, ``ids`` may run past the prompt (decoded tokens, embedded as tokens whatever they are)."""
        emb = model.model.get_input_embeddings()(ids)
        mask = LlavaNextRef.placeholders(model, inputs, ids).unsqueeze(-1)
        return emb.masked_scatter(mask, LlavaNextRef.features(model, inputs))

    @staticmethod
    def placeholders(model, inputs, ids):
        """``[1, L]`` bool: the prompt's ``<image>`` tokens (a decoded token is never one)."""
        image = ids == model.config.image_token_id
        image[:, inputs["input_ids"].shape[1] :] = False
        return image

    @staticmethod
    def visual_mask(model, ids, inputs=None):
        """The ``<image>`` tokens whose feature is not the model's ``image_newline`` vector (the row-end
        tokens, which are never pruned), found on the model's own packed features."""
        image = LlavaNextRef.placeholders(model, inputs, ids)[0]
        newline = (LlavaNextRef.features(model, inputs) == model.model.image_newline).all(dim=-1)
        visual = image.clone()
        visual[torch.nonzero(image).flatten()] = ~newline
        return visual
