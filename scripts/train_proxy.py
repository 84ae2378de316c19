"""Train a proxy checkpoint: a tiny model of one family's real architecture on the synthetic suite.

    python -m scripts.train_proxy --family qwen --out synthetic/proxy_checkpoints/qwen2_5_vl
    python -m scripts.train_proxy --family internvl --out synthetic/proxy_checkpoints/internvl3
    python -m scripts.train_proxy --family llava --out synthetic/proxy_checkpoints/llava1_5

The model is the family's transformers class at tiny width (text: hidden 128, 3 layers; vision:
hidden 64 (Qwen, InternVL: 256 patches) or 128 (LLaVA: 64 patches), 2-3 layers), 64 visual tokens from a 224-px image, with a word-level tokenizer built
here from the suite's prompts (:func:`proxy_data.vocabulary`) and the family's chat format
(``tiny_checkpoints``). It learns from fresh scenes every step (:func:`proxy_data.random_scene`,
seeds disjoint from the held-out ones):

* cross-entropy on the answers (and the end-of-turn token) of a 5-turn conversation per image,
  the questions in random order, each prompt exactly as VLMEvalKit builds it;
* a dense auxiliary loss on the projector/merger output: per visual token, which shape, colour,
  glyph and background is in its cell (linear heads, discarded after training). It stands in for
  a pretrained vision encoder; without it only the global question is learnt in this budget
  (../shared/PROXY_NOTES.md).

AdamW (lr 2e-3, betas 0.9/0.98), 30 warm-up steps, cosine decay to 0.1x, batch 32 by default (the shipped checkpoints: 24). At the end
it prints the held-out accuracy per question type (first answer token, greedy) of the weights as
saved (fp16 safetensors; the harness loads them in fp32 on CPU) and writes ``train_log.json``.
Train offline, never in CI: the shipped checkpoints took 2-4 stages of 1-25 minutes each on 2
shared CPU cores (the README's table has every stage's command and result).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils import ensure_torchvision  # noqa: E402

ensure_torchvision()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from synthetic import proxy_data as P  # noqa: E402
from synthetic import tiny_checkpoints as TC  # noqa: E402

logger = logging.getLogger("train_proxy")

TEXT = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048)
VISION_WIDTH = dict(hidden_size=64, intermediate_size=256, num_attention_heads=4)  # ViTs over 256 patches
UNK = "[UNK]"


# ----------------------------------------------------------------------------- tokenizer, models
def build_tokenizer(specials: list[str], **named):
    """A word-level ``PreTrainedTokenizerFast``: the family's special tokens, ``[UNK]``, and
    :func:`proxy_data.vocabulary` (split like ``pre_tokenizers.Whitespace``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*specials, UNK, *P.vocabulary()])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=UNK, **named)


def _finish(model, tok, stop: list[int], pad: int):
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(eos_token_id=stop, pad_token_id=pad, do_sample=False)
    return model


def build_qwen(seed: int):
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    tok = build_tokenizer(TC.QWEN_SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in TC.QWEN_SPECIALS}
    cfg = Qwen2_5_VLConfig(
        text_config=dict(TEXT, vocab_size=len(tok), bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"],
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 6, 6])),
        vision_config=dict(VISION_WIDTH, depth=2, num_heads=4, out_hidden_size=TEXT["hidden_size"], patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = _finish(Qwen2_5_VLForConditionalGeneration(cfg), tok, [ids["<|im_end|>"], ids["<|endoftext|>"]],
                    ids["<|endoftext|>"])
    px = P.IMAGE_PX * P.IMAGE_PX
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=px, max_pixels=px),
                                    tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                                    chat_template=TC.QWEN_MINIMAL_CHAT_TEMPLATE)
    return model, processor


def build_internvl(seed: int):
    from transformers import (GotOcr2ImageProcessor, InternVLConfig, InternVLForConditionalGeneration,
                              InternVLProcessor, InternVLVideoProcessor)

    tok = build_tokenizer(TC.INTERNVL_SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                          extra_special_tokens=TC.INTERNVL_NAMED_TOKENS)
    ids = {t: tok.convert_tokens_to_ids(t) for t in TC.INTERNVL_SPECIALS}
    tokens = (P.IMAGE_PX // 14 // 2) ** 2
    cfg = InternVLConfig(
        text_config=dict(TEXT, model_type="qwen2", vocab_size=len(tok), tie_word_embeddings=True,
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(VISION_WIDTH, num_hidden_layers=2, image_size=P.IMAGE_PX, patch_size=14),
        image_token_id=ids["<IMG_CONTEXT>"], image_seq_length=tokens, downsample_ratio=0.5,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = _finish(InternVLForConditionalGeneration(cfg), tok, [ids["<|im_end|>"], ids["<|endoftext|>"]],
                    ids["<|endoftext|>"])
    tile = {"height": P.IMAGE_PX, "width": P.IMAGE_PX}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=tile, crop_to_patches=False, image_mean=[0.485, 0.456, 0.406],
                                              image_std=[0.229, 0.224, 0.225]),
        tokenizer=tok, video_processor=InternVLVideoProcessor(size=tile), image_seq_length=tokens,
        chat_template=TC.INTERNVL_CHAT_TEMPLATE,
    )
    return model, processor


def build_llava(seed: int):
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = build_tokenizer(TC.LLAVA_SPECIALS, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in TC.LLAVA_SPECIALS}
    patch = P.CELL  # 28-px patches: one per cell, 8x8 = 64 visual tokens (+ [CLS], dropped)
    cfg = LlavaConfig(
        text_config=dict(TEXT, model_type="llama", vocab_size=len(tok), bos_token_id=ids["<s>"],
                         eos_token_id=ids["</s>"], pad_token_id=ids["</s>"]),
        # 3 layers: the features come from the penultimate one (vision_feature_layer=-2), as in LLaVA-1.5
        vision_config=dict(VISION_WIDTH, hidden_size=128, intermediate_size=512, model_type="clip_vision_model",
                           num_hidden_layers=3, image_size=P.IMAGE_PX, patch_size=patch, projection_dim=128),
        image_token_index=ids["<image>"], image_seq_length=P.GRID * P.GRID, vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = _finish(LlavaForConditionalGeneration(cfg), tok, [ids["</s>"]], ids["</s>"])
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": P.IMAGE_PX},
                                           crop_size={"height": P.IMAGE_PX, "width": P.IMAGE_PX}),
        tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=TC.LLAVA_BOS_CHAT_TEMPLATE,
    )
    return model, processor


BUILDERS = {"qwen": build_qwen, "internvl": build_internvl, "llava": build_llava}


# ----------------------------------------------------------------------------- batches
def chat_text(processor, turns: list[tuple[str, str | None]]) -> str:
    """The chat-template text of a conversation: one image in the first user turn; ``turns`` are
    (prompt, answer); a final answer of None leaves the assistant turn open (generation prompt)."""
    messages = []
    for i, (prompt, answer) in enumerate(turns):
        content = ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": prompt}]
        messages.append({"role": "user", "content": content})
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=turns[-1][1] is None)


def answer_marker(processor) -> list[int]:
    """Token ids that open an assistant turn (what the generation prompt appends)."""
    turn = [{"role": "user", "content": [{"type": "text", "text": "x"}]}]
    with_prompt = processor.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    without = processor.apply_chat_template(turn, tokenize=False, add_generation_prompt=False)
    return processor.tokenizer(with_prompt[len(without):], add_special_tokens=False).input_ids


def answer_labels(input_ids: torch.Tensor, marker: list[int], stops: list[int]) -> torch.Tensor:
    """-100 everywhere but the assistant answers: the tokens after each ``marker`` up to and
    including the next stop token."""
    labels = torch.full_like(input_ids, -100)
    m = len(marker)
    for b, row in enumerate(input_ids.tolist()):
        i = 0
        while i + m <= len(row):
            if row[i : i + m] == marker:
                j = i + m
                while j < len(row):
                    labels[b, j] = row[j]
                    if row[j] in stops:
                        break
                    j += 1
                i = j
            i += 1
    return labels


def training_batch(processor, seeds: list[int], rng: random.Random, types: tuple[str, ...] = P.TYPES):
    scenes = [P.random_scene(s) for s in seeds]
    texts = []
    for scene in scenes:
        qs = [q for t, q in P.questions(scene).items() if t in types]
        rng.shuffle(qs)
        texts.append(chat_text(processor, [(q.prompt(), q.target) for q in qs]))
    inputs = processor(text=texts, images=[P.as_evaluated(P.render(s)) for s in scenes], padding=True,
                       return_tensors="pt")
    labels = [P.token_labels(s) for s in scenes]
    targets = {k: torch.from_numpy(np.stack([lab[k] for lab in labels]).reshape(-1)) for k in labels[0]}
    return inputs, targets


def image_features(out) -> torch.Tensor:
    """``[images * 64, D]`` from ``get_image_features``'s output (raster order within an image)."""
    po = out.pooler_output
    return torch.cat(list(po)) if isinstance(po, (list, tuple)) else po.reshape(-1, po.shape[-1])


class Capture:
    """Keeps the last ``get_image_features`` output of ``model`` (the merger/projector output)."""

    def __init__(self, model):
        self.value = None
        original = model.model.get_image_features

        def wrapped(*args, **kwargs):
            out = original(*args, **kwargs)
            self.value = image_features(out)
            return out

        model.model.get_image_features = wrapped
        self._restore = lambda: delattr(model.model, "get_image_features")

    def close(self):
        self._restore()


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def heldout_accuracy(model, processor, n: int = 256, seed: int = 0, batch: int = 32, on_batch=None) -> dict[str, float]:
    """Greedy first-token accuracy per question type on ``n`` held-out scenes (single-turn prompts,
    as VLMEvalKit builds them). A model patched for pruning takes ``batch=1``; ``on_batch(scenes)``
    is called before each batch's forwards."""
    model.eval()
    tok = processor.tokenizer
    scenes = P.eval_scenes(n, seed)
    correct = {t: 0 for t in P.TYPES}
    for start in range(0, n, batch):
        chunk = scenes[start : start + batch]
        if on_batch is not None:
            on_batch(chunk)
        asked = [P.questions(s) for s in chunk]
        images = [P.as_evaluated(P.render(s)) for s in chunk]  # once per scene, for all five types
        for t in P.TYPES:
            qs = [q[t] for q in asked]
            texts = [chat_text(processor, [(q.prompt(), None)]) for q in qs]
            inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
            logits = model(**inputs).logits
            last = inputs["attention_mask"].sum(1) - 1  # right padding
            last = last + logits.shape[1] - inputs["input_ids"].shape[1]  # pre-LLM pruning shortens the sequence
            pred = logits[torch.arange(len(chunk)), last].argmax(-1)
            for q, p in zip(qs, pred.tolist()):
                correct[t] += tok.convert_ids_to_tokens(p) == q.target
    return {t: correct[t] / n for t in P.TYPES}


# ----------------------------------------------------------------------------- training
SEEDS_PER_RUN = 1_000_000  # training scene seeds: seed * 1e6 + [0, 5e5) for a first stage, + [5e5, 1e6) after
FIRST_STAGE_SCENES = 500_000


def scene_seeds(seed: int, later_stage: bool, step: int, batch: int) -> list[int]:
    """The scene seeds of one training step. A first stage draws from ``seed * 1e6 + [0, 5e5)``,
    every later stage (``--init``) from ``seed * 1e6 + [5e5, 1e6)`` (so later stages share one
    stream, distinct from the first stage's); none reaches the held-out seeds."""
    first = seed * SEEDS_PER_RUN + (FIRST_STAGE_SCENES if later_stage else 0)
    return [first + step * batch + i for i in range(batch)]


def check_budget(seed: int, steps: int, batch: int) -> None:
    """Refuse a run whose scene seeds would leave its range (and reach another seed's scenes or the
    held-out ones): ``0 <= seed``, ``seed * 1e6 + 1e6 <= EVAL_SEED_BASE``, ``steps * batch <= 5e5``."""
    if not 0 <= seed < P.EVAL_SEED_BASE // SEEDS_PER_RUN:
        raise ValueError(f"--seed {seed}: use 0..{P.EVAL_SEED_BASE // SEEDS_PER_RUN - 1} (higher seeds would train on "
                         "the held-out scenes)")
    if steps < 1 or batch < 1 or steps * batch > FIRST_STAGE_SCENES:
        raise ValueError(f"--steps {steps} x --batch {batch}: both must be >= 1 and their product at most "
                         f"{FIRST_STAGE_SCENES} (the scenes of one seed's stage); split the run into stages with --init")


FAMILY_MODULES = {"qwen": "custom_qwenvl", "internvl": "custom_internvl", "llava": "custom_llava"}


def load(family: str, path: Path):
    """A saved proxy checkpoint through the harness's own loading path (fp32 on CPU)."""
    import importlib

    from vlm_adapter import load_pretrained

    return load_pretrained(importlib.import_module(FAMILY_MODULES[family]), str(path), torch.device("cpu"))


def train(family: str, steps: int, seed: int = 0, batch: int = 32, lr: float = 2e-3, warmup: int = 30,
          log_every: int = 25, eval_every: int = 200, init: Path | None = None, types: tuple[str, ...] = P.TYPES):
    """``steps`` AdamW steps from a fresh model (``init=None``) or from a saved checkpoint (a later
    stage: fresh optimiser, schedule and auxiliary heads; scenes from :func:`scene_seeds`)."""
    check_budget(seed, steps, batch)
    with torch.enable_grad():  # whatever the caller's grad mode (VLMEvalKit's inference switches it off)
        return _train(family, steps, seed, batch, lr, warmup, log_every, eval_every, init, types)


def _train(family, steps, seed, batch, lr, warmup, log_every, eval_every, init, types):
    model, processor = BUILDERS[family](seed) if init is None else load(family, init)
    model.train()
    d = model.config.text_config.hidden_size
    heads = nn.ModuleDict({
        "shape": nn.Linear(d, len(P.SHAPE_CLASSES)), "color": nn.Linear(d, len(P.COLOR_CLASSES)),
        "glyph": nn.Linear(d, len(P.GLYPH_CLASSES)), "background": nn.Linear(d, len(P.BACKGROUNDS)),
    })
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps))))))
    marker = answer_marker(processor)
    stops = list(model.generation_config.eos_token_id)
    capture = Capture(model)
    rng = random.Random(f"order:{seed}")
    t0 = time.time()
    for step in range(steps):
        inputs, targets = training_batch(processor, scene_seeds(seed, init is not None, step, batch), rng, types)
        labels = answer_labels(inputs["input_ids"], marker, stops)
        logits = model(**inputs).logits
        lm = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                             ignore_index=-100)
        feats = capture.value
        aux = sum(F.cross_entropy(heads[k](feats), targets[k]) for k in heads)
        loss = lm + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            logger.info("step %d/%d  lm %.4f  aux %.4f  lr %.2e  %.1f min", step, steps, lm.item(), aux.item(),
                        sched.get_last_lr()[0], (time.time() - t0) / 60)
        if eval_every and step and step % eval_every == 0:
            acc = heldout_accuracy(model, processor, n=64, seed=1)
            logger.info("step %d  held-out (64 scenes): %s", step, "  ".join(f"{t} {100 * a:.0f}" for t, a in acc.items()))
            model.train()
    capture.close()
    model.eval()
    return model, processor, (time.time() - t0) / 60


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", choices=sorted(BUILDERS), required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--init", type=Path, help="continue from this saved checkpoint (a second training stage)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--types", nargs="+", choices=P.TYPES, default=list(P.TYPES),
                    help="question types in the training conversations (a focused stage; default all five)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-n", type=int, default=512, help="held-out scenes for the final accuracy")
    args = ap.parse_args(argv)
    try:
        check_budget(args.seed, args.steps, args.batch)
    except ValueError as err:
        ap.error(str(err))
    if args.init is not None and not (args.init / "train_log.json").exists():
        ap.error(f"--init {args.init}: no proxy checkpoint there (no train_log.json); give a folder this script wrote")
    if args.eval_n < 1:
        ap.error("--eval-n must be >= 1")
    torch.set_num_threads(args.threads)
    previous = json.loads((args.init / "train_log.json").read_text()) if args.init else None
    model, processor, minutes = train(args.family, args.steps, args.seed, batch=args.batch, lr=args.lr, init=args.init,
                                      types=tuple(args.types))
    args.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(args.out)  # fp16 on disk: half the size
    processor.save_pretrained(args.out)
    # Accuracy of the weights as saved, loaded back through the harness's path (fp32 on CPU).
    loaded, loaded_proc = load(args.family, args.out)
    acc = heldout_accuracy(loaded, loaded_proc, n=args.eval_n)
    for t, a in acc.items():
        print(f"held-out accuracy  {t:<10} {100 * a:6.1f} %")
    log = {"family": args.family, "steps": args.steps, "seed": args.seed, "batch": args.batch, "train_minutes": round(minutes, 1),
           "threads": args.threads, "heldout_scenes": args.eval_n, "heldout_accuracy": acc,
           "lr": args.lr, "types": list(args.types), "command": "python -m scripts.train_proxy " + " ".join(sys.argv[1:] if argv is None else argv),
           "previous_stage": previous}
    (args.out / "train_log.json").write_text(json.dumps(log, indent=2))


if __name__ == "__main__":
    main()
