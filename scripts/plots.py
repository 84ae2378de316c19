"""PNG plots of a sweep (matplotlib, Agg backend).

    python -m scripts.plots outputs/sweep                          # curves into outputs/sweep/_report/plots/
    python -m scripts.plots outputs/sweep --overlay "Qwen2.5-VL-7B-Instruct__divprune_pre_llm-r0.111" MME 1

* ``<model>_accuracy_vs_ratio.png``: per dataset (and the average), score against the kept ratio,
  one line per method (mean over seeds, error bar = std), vanilla as a dashed line at ratio 1.
* ``<model>_accuracy_vs_prefill.png``: per dataset (and the average), score against the mean
  prefill ms of the cell, one marker per method and ratio, with the trade-off frontier (the cells no
  other cell beats on both time and score).
* ``overlay_<model name>_<dataset>_s<sample>.png`` (``--overlay NAME DATASET SAMPLE``): the kept
  visual tokens of one sample drawn over the image on its token grid, one panel per pruning event
  (pre-LLM, then each intra-LLM layer). ``SAMPLE`` is the 1-based record of the cell's first runner
  process, which is the dataset's row of the same rank (VLMEvalKit infers rows in order); under
  ``torchrun``, rank 0's SAMPLE-th record, row ``(SAMPLE - 1) * world_size``.

The records hold the kept positions in the prompt but not where the image starts nor its grid, so
the overlay rebuilds them: the row's image and question are read from ``$LMUData/<dataset>.tsv``,
the prompt is rebuilt with the checkpoint's processor and chat template as the adapter does (image
first, as VLMEvalKit's prompts put it), and the family module's ``image_layout`` gives the grid. The
image-token count and the kept positions are checked against the record.
"""

from __future__ import annotations

import argparse
import base64
import io
import logging
import math
import re
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils import ensure_torchvision  # noqa: E402

ensure_torchvision()  # before anything imports transformers (CPU torch + PyPI torchvision)

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from scripts import _common, aggregate  # noqa: E402

logger = logging.getLogger("plots")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _points(cells: list[aggregate.Cell], data: str | None) -> dict[tuple[str, float], dict[str, Any]]:
    """``{(method, ratio): {"score", "std", "ms"}}`` for one dataset (``None``: the row average over the
    datasets every configuration has)."""
    by: dict[tuple[str, float], list[aggregate.Cell]] = {}
    for c in cells:
        if c.score is not None and not math.isnan(c.score) and (data is None or c.data == data):
            by.setdefault((c.config.label, c.config.ratio), []).append(c)
    datasets = sorted({c.data for c in cells if c.score is not None})
    out = {}
    for key, members in by.items():
        if data is None:
            if {c.data for c in members} != set(datasets):
                continue  # incomplete rows would not be comparable
            seeds = sorted({c.config.seed for c in members}, key=lambda s: -1 if s is None else s)
            per_seed = [statistics.fmean(c.score for c in members if c.config.seed == s) for s in seeds]
        else:
            per_seed = [c.score for c in members]
        ms = [c.metrics.get("prefill ms mean") for c in members if c.metrics.get("prefill ms mean") is not None]
        out[key] = {"score": statistics.fmean(per_seed), "std": statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0,
                    "ms": statistics.fmean(ms) if ms else None}
    return out


def _grid(n: int) -> tuple[plt.Figure, list[plt.Axes]]:
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n]


def _finish(fig: plt.Figure, handles: list, labels: list[str], title: str, path: Path) -> Path:
    """One legend under the panels, the title, and the PNG."""
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def accuracy_vs_ratio(model: str, cells: list[aggregate.Cell], out: Path) -> Path:
    datasets = sorted({c.data for c in cells if c.score is not None}, key=_common.dataset_sort_key)
    labels = aggregate.column_labels(datasets)  # the tables' labels (ScienceQA_VAL and _TEST apart)
    panels = [*datasets, None]
    fig, axes = _grid(len(panels))
    for ax, data in zip(axes, panels):
        pts = _points(cells, data)
        methods = sorted({m for m, _ in pts if m != "vanilla"})
        for m in methods:
            xs = sorted(r for mm, r in pts if mm == m)
            ys = [pts[(m, r)]["score"] for r in xs]
            es = [pts[(m, r)]["std"] for r in xs]
            ax.errorbar(xs, ys, yerr=es if any(es) else None, marker="o", capsize=3, label=m)
        if ("vanilla", 1.0) in pts:
            y = pts[("vanilla", 1.0)]["score"]
            ax.axhline(y, color="black", linestyle="--", linewidth=1, label="vanilla")
            ax.plot([1.0], [y], marker="*", color="black", markersize=9, linestyle="none")
        ax.set_title(labels[data] if data else "Average")
        ax.set_xlabel("kept visual-token ratio")
        ax.set_ylabel("score")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    return _finish(fig, handles, labels, f"{model}: accuracy vs kept ratio", out / f"{_safe(model)}_accuracy_vs_ratio.png")


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (lower time, higher score), by increasing time."""
    best, out = -math.inf, []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            out.append((x, y))
            best = y
    return out


def accuracy_vs_prefill(model: str, cells: list[aggregate.Cell], out: Path) -> Path:
    datasets = sorted({c.data for c in cells if c.score is not None}, key=_common.dataset_sort_key)
    labels = aggregate.column_labels(datasets)
    panels = [*datasets, None]
    fig, axes = _grid(len(panels))
    methods = sorted({c.config.label for c in cells})
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    for ax, data in zip(axes, panels):
        pts = {k: v for k, v in _points(cells, data).items() if v["ms"] is not None}
        for (m, r), v in sorted(pts.items()):
            ax.scatter(v["ms"], v["score"], color=colors[m], marker="*" if m == "vanilla" else "o", s=60 if m == "vanilla" else 30,
                       label=m)
            if m != "vanilla":
                ax.annotate(f"{r:g}", (v["ms"], v["score"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if not pts:  # e.g. a cell with no more samples than the warm-up
            ax.text(0.5, 0.5, "no timed samples", ha="center", va="center", transform=ax.transAxes, color="gray")
        front = frontier([(v["ms"], v["score"]) for v in pts.values()])
        if len(front) > 1:
            ax.step([x for x, _ in front], [y for _, y in front], where="post", color="gray", linewidth=1, alpha=0.7)
        ax.set_title(labels[data] if data else "Average")
        ax.set_xlabel("prefill ms (mean per sample)")
        ax.set_ylabel("score")
        ax.grid(alpha=0.3)
    handles, labels, seen = [], [], set()
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in seen:
                seen.add(lab)
                handles.append(h)
                labels.append(lab)
    title = f"{model}: accuracy vs prefill time (labels: kept ratio; gray: frontier)"
    return _finish(fig, handles, labels, title, out / f"{_safe(model)}_accuracy_vs_prefill.png")


# ----------------------------------------------------------------------------- retained-token overlay
FAMILY_MODULES = {"qwen2_5_vl": "custom_qwenvl", "internvl": "custom_internvl", "llava": "custom_llava",
                  "llava_next": "custom_llava_next"}


def _decode_image(value: str, rows: Any) -> "Any":
    from PIL import Image

    if len(value) <= 64:  # VLMEvalKit's convention: a short value is the index of the row holding the image
        value = rows.loc[rows["index"].astype(str) == value, "image"].iloc[0]
    return Image.open(io.BytesIO(base64.b64decode(value))).convert("RGB")


def sample_row(lmu: Path, data: str, position: int) -> tuple[Any, str, Any]:
    """``(PIL image, question, index)`` of the dataset row at ``position`` (0-based, file order)."""
    import pandas as pd

    tsv = lmu / f"{data}.tsv"
    if not tsv.exists():
        raise SystemExit(f"no {tsv}: pass --lmu-data (the LMUData folder the sweep used)")
    rows = pd.read_csv(tsv, sep="\t", dtype=str, keep_default_na=False)
    row = rows.iloc[position]
    return _decode_image(row["image"], rows), row.get("question", ""), row["index"]


def image_token_grid(checkpoint: str, image: Any, question: str) -> dict[str, Any]:
    """Rebuild the prompt as the adapter does; return the image's first token position, token count,
    grid ``(t, h, w)`` (``t``: tiles for InternVL), the tile views and the prompt length."""
    import importlib
    from types import SimpleNamespace

    import numpy as np
    import torch
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(checkpoint)
    processor = AutoProcessor.from_pretrained(checkpoint)
    module = importlib.import_module(FAMILY_MODULES[config.model_type])
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        tokenize=False, add_generation_prompt=True,
    )
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    stub = SimpleNamespace(config=config)
    (entry,) = module.FAMILY.image_layout(stub, dict(inputs))[:1] or [(None, None)]
    n_tokens, grid = (entry.n, entry.grid) if hasattr(entry, "span") else entry  # an ImageLayout, or (n, grid)
    ids = inputs["input_ids"][0]
    where = torch.nonzero(ids == int(config.image_token_id)).flatten()
    if grid is None or where.numel() == 0:
        # LLaVA-NeXT: a base image and stitched crops, no single grid (docs/llava_next.md)
        raise SystemExit(f"no token grid for this {config.model_type} prompt (image tokens {where.numel()})")
    pv = inputs.get("pixel_values")
    ip = processor.image_processor
    if pv is not None and pv.dim() == 4:  # LLaVA (one view) and InternVL (tiles): what the vision tower saw
        mean = torch.tensor(ip.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(ip.image_std).view(1, 3, 1, 1)
        views = ((pv.float() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
        views = [views[i] for i in range(views.shape[0])]
    else:  # Qwen: the image resized to the patch grid (smart_resize keeps the aspect ratio)
        t, h, w = grid
        px = getattr(ip, "patch_size", 14) * getattr(ip, "merge_size", 2)
        views = [np.asarray(image.resize((w * px, h * px)))]
    return {"start": int(where[0]), "n": int(n_tokens), "grid": tuple(grid), "views": views, "n_prompt": int(ids.numel())}


def first_run_record(part: list[dict | None], sample: int, what: str = "") -> tuple[dict, int]:
    """Record ``sample`` (1-based) of a run's records and the dataset row (0-based) it is. Under
    ``torchrun`` the ranks' records interleave: ``sample`` counts rank 0's, whose k-th sample is row
    ``(k - 1) * world_size`` (VLMEvalKit gives rank r the rows r, r + world_size, ...)."""
    world = len({int(r.get("rank") or 0) for r in part if r is not None}) or 1
    mine = [r for r in part if r is None or int(r.get("rank") or 0) == 0] if world > 1 else part
    if not 1 <= sample <= len(mine) or mine[sample - 1] is None:
        raise SystemExit(f"{what}: no record {sample} (the first run has {len(mine)}{' on rank 0' if world > 1 else ''})")
    return mine[sample - 1], (sample - 1) * world


def overlay(work: Path, name: str, data: str, sample: int, lmu: Path, out: Path) -> Path:
    import json

    import numpy as np

    model_dir = work / name
    records = _common.read_records(model_dir)
    ledger = _common.read_ledger(work, name, len(records)).get(data)
    if ledger:
        first = ledger[0]
        if first.saved_before:
            logger.warning("the cell's first run resumed %d saved predictions: record %d may not be row %d",
                           first.saved_before, sample, sample)
        part = records[first.start : first.end]
    else:
        part = records  # a folder the sweep did not write: assume one dataset, one run
    record, row = first_run_record(part, sample, f"{name}/{data}")
    if not record.get("events"):
        raise SystemExit(f"{name}/{data} record {sample}: no pruning event (vanilla?)")
    checkpoint = json.loads((model_dir / "prune_config.json").read_text())["model"]
    image, question, index = sample_row(lmu, data, row)
    g = image_token_grid(checkpoint, image, question)
    if g["n"] != record["n_visual"]:
        raise SystemExit(f"rebuilt prompt has {g['n']} image tokens, the record {record['n_visual']}: "
                         "the record is not this row's (was the cell resumed?)")
    t, h, w = g["grid"]
    events = record["events"]
    fig, axes = plt.subplots(len(events), t, figsize=(max(3.2 * t, 4.5), 3.4 * len(events) + 0.4), squeeze=False)
    for row, e in enumerate(events):
        kept = np.array(e["kept"]) - g["start"]
        if kept.size and (kept.min() < 0 or kept.max() >= g["n"]):
            raise SystemExit(f"kept positions fall outside the rebuilt image span [{g['start']}, {g['start'] + g['n']})")
        mask = np.zeros(t * h * w, dtype=bool)
        mask[kept] = True
        mask = mask.reshape(t, h, w)
        for tile in range(t):
            ax = axes[row][tile]
            view = g["views"][min(tile, len(g["views"]) - 1)]
            ax.imshow(view, extent=(0, w, h, 0), interpolation="nearest")
            shade = np.zeros((h, w, 4))
            shade[~mask[tile]] = (0, 0, 0, 0.72)
            ax.imshow(shade, extent=(0, w, h, 0), interpolation="nearest")
            for y, x in zip(*np.nonzero(mask[tile])):
                ax.add_patch(plt.Rectangle((x, y), 1, 1, fill=False, edgecolor="lime", linewidth=0.8))
            ax.set_xticks(range(w + 1), minor=True)
            ax.set_yticks(range(h + 1), minor=True)
            ax.grid(which="minor", color="white", linewidth=0.3, alpha=0.5)
            ax.tick_params(which="both", length=0, labelbottom=False, labelleft=False)
            where = "pre-LLM" if e["layer"] is None else f"layer {e['layer']}"
            tile_note = f", tile {tile + 1}/{t}" if t > 1 else ""
            ax.set_title(f"{where}: {e['method']}\nkept {e['n_keep']}/{record['n_visual']}{tile_note}", fontsize=8)
    fig.suptitle(f"{name}\n{data} index {index} (record {sample}); token grid {h}x{w}", fontsize=7)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"overlay_{_safe(name)}_{_safe(data)}_s{sample}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_plots(work: Path, out: Path, cells: list[aggregate.Cell] | None = None) -> list[Path]:
    cells = aggregate.collect(work) if cells is None else cells
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for model in sorted({c.model for c in cells}):
        mine = [c for c in cells if c.model == model]
        if any(c.score is not None for c in mine):
            paths += [accuracy_vs_ratio(model, mine, out), accuracy_vs_prefill(model, mine, out)]
    return paths


def main(argv: list[str] | None = None) -> None:
    import os

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work_dir", type=Path)
    parser.add_argument("--out", type=Path, help="default <work-dir>/_report/plots")
    parser.add_argument("--overlay", nargs=3, action="append", metavar=("MODEL_NAME", "DATASET", "SAMPLE"), default=[],
                        help="retained-token overlay of one sample (repeatable)")
    parser.add_argument("--lmu-data", type=Path, default=Path(os.environ.get("LMUData") or Path.home() / "LMUData"),
                        help="the LMUData folder the sweep used (default $LMUData, else ~/LMUData)")
    parser.add_argument("--no-curves", action="store_true", help="only the overlays")
    args = parser.parse_args(argv)
    work = args.work_dir.resolve()
    out = (args.out or work / "_report" / "plots").resolve()
    paths = [] if args.no_curves else make_plots(work, out)
    for name, data, sample in args.overlay:
        paths.append(overlay(work, name, data, int(sample), args.lmu_data, out))
    for p in paths:
        print(p)


if __name__ == "__main__":
    main()
