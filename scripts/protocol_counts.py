"""Visual tokens per image under VLMEvalKit's protocol, per family and dataset (README "Comparability").

    python -m scripts.protocol_counts            # prints the Markdown table

The counts come from the runner's own path (``vlm_adapter.build_model`` with the ``vlmeval``
protocol: VLMEvalKit's wrappers with their dataset settings), run on tiny checkpoints whose image
geometry is the real one where it decides the count: Qwen2.5-VL's 14-px patches merged 2x2 (so its
count is the real model's), InternVL3's 448-px tiles (the real model has 256 tokens a tile),
LLaVA-1.5's padded square (576 tokens at 336 px, whatever the image). Only the image size and the
dataset matter: Qwen2.5-VL's OCRBench uses ``min_pixels=10*10*28*28`` instead of ``1280*28*28``;
InternVL3 allows 24 tiles for OCRBench and 6 for the other nine datasets. LLaVA-NeXT's ``LLaVA_Next``
has no dataset setting: its counts come from the family's layout (``custom_llava_next.tokens_of``,
checked against the processor and the model's own packing in ``tests/test_engine_llava_next.py``) on
the real configuration (336-px crops, pinpoints up to 672 x 672), as visual tokens + newline tokens.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils import ensure_torchvision  # noqa: E402

ensure_torchvision()

SIZES = ((640, 480), (1024, 768), (1920, 1080), (500, 375), (300, 1000), (160, 48))
REAL_TOKENS_PER_TILE = 256  # InternVL3: a 448-px tile, 14-px patches, pixel shuffle 0.5
LLAVA_TOKENS = 576  # LLaVA-1.5: 336 px, 14-px patches


def counts(sizes=SIZES) -> list[dict]:
    import torch
    from PIL import Image

    import custom_internvl
    import custom_llava_next
    import custom_qwenvl
    from transformers import LlavaNextConfig
    import vlm_adapter
    from synthetic import tiny_checkpoints
    from utils import PruneConfig

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = {}
        for key, module, save in (("qwen", custom_qwenvl, tiny_checkpoints.save_tiny_qwen),
                                  ("internvl", custom_internvl, tiny_checkpoints.save_tiny_internvl)):
            options = vlm_adapter.RunOptions(device="cpu", max_new_tokens=1)
            ckpt = save(tmp / key)
            model = vlm_adapter.build_model(module, str(ckpt), PruneConfig(),
                                            vlm_adapter.resolve_protocol(module, ckpt.name, options), options)
            seen: list[dict] = []
            model._pruned.loaded.model.generate = lambda seen=seen, **kw: seen.append(kw) or torch.cat(
                [kw["input_ids"], kw["input_ids"][:, -1:]], dim=1)
            models[key] = (model, seen)
        for w, h in sizes:
            path = tmp / f"{w}x{h}.png"
            Image.new("RGB", (w, h), (120, 140, 160)).save(path)
            n, span = custom_llava_next.tokens_of((h, w), LlavaNextConfig())
            row = {"image": f"{w}x{h}", "llava": LLAVA_TOKENS, "llava_next": (n, span - n)}
            for data in ("MME", "OCRBench"):
                message = [{"type": "image", "value": str(path)}, {"type": "text", "value": "What is it?"}]
                model, seen = models["qwen"]
                model.generate([dict(m) for m in message], dataset=data)
                t, gh, gw = seen[-1]["image_grid_thw"][0].tolist()
                row[f"qwen {data}"] = t * gh * gw // 4
                model, seen = models["internvl"]
                model.generate([dict(m) for m in message], dataset=data)
                tiles = seen[-1]["pixel_values"].shape[0]
                row[f"internvl {data}"] = (tiles, tiles * REAL_TOKENS_PER_TILE)
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| image (w x h) | Qwen2.5-VL: 9 datasets | Qwen2.5-VL: OCRBench | InternVL3: 9 datasets | "
             "InternVL3: OCRBench | LLaVA-1.5: all 10 | LLaVA-NeXT: all 10 (+ newlines) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        iv = [f"{r[f'internvl {d}'][1]} ({r[f'internvl {d}'][0]} tiles)" for d in ("MME", "OCRBench")]
        nx = r["llava_next"]
        lines.append(f"| {r['image']} | {r['qwen MME']} | {r['qwen OCRBench']} | {iv[0]} | {iv[1]} | {r['llava']} | {nx[0]} (+{nx[1]}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import contextlib
    import io

    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    with contextlib.redirect_stdout(io.StringIO()):  # VLMEvalKit's InternVL wrapper prints its version per sample
        rows = counts()
    print(table(rows))


if __name__ == "__main__":
    main()
