"""PNG plots of a sweep (matplotlib, Agg backend).

    python -m scripts.plots outputs/sweep                          # curves into outputs/sweep/_report/plots/
    python -m scripts.plots outputs/sweep --frontier-x prefill_ms gflops --warmup 5
    python -m scripts.plots outputs/sweep --overlay "Qwen2.5-VL-7B-Instruct__divprune_pre_llm-r0.111" MME 1

* ``<model>_accuracy_vs_ratio.png``: per dataset with a score (and the average over the datasets,
  where there are several), score against the kept ratio, one line per method (mean over seeds,
  error bar = std), vanilla as a dashed horizontal line. The x ticks are the evaluated ratios,
  labelled as the tables label them (``33.3 %``, and the kept tokens under them where every cell of
  the ratio keeps the same number); each method's points sit a small step left or right of the tick
  (``scripts/plot_style.py``), and every method has its own colour, hollow marker and line style, so
  tied methods stay visible.
* ``<model>_accuracy_vs_prefill.png`` (and ``_vs_gflops`` / ``_vs_tokens`` with ``--frontier-x``):
  score against a cost of the cell (measured mean prefill ms after warm-up; theoretical decoder
  prefill GFLOPs; visual tokens averaged over the decoder layers), one marker per method and ratio
  (labelled with the ratio, joined per method), vanilla as a star and a dashed line, the trade-off
  frontier (the cells no other cell beats on both cost and score) in gray. A dataset with no value
  of the cost (no sample past the warm-up) has no panel.
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

from scripts import _common, aggregate, plot_style  # noqa: E402

logger = logging.getLogger("plots")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _points(cells: list[aggregate.Cell], data: str | None, x: str | None = None) -> dict[tuple[str, float], dict[str, Any]]:
    """``{(method, ratio): {"score", "std", "x"}}`` for one dataset (``None``: the row average over the
    datasets every configuration has). ``x``: a system metric of the cells (``"prefill ms mean"``,
    ``"prefill GFLOPs"``, ...), averaged over the cells that have it (``None`` where none has)."""
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
        xs = [c.metrics.get(x) for c in members if x and c.metrics.get(x) is not None]
        out[key] = {"score": statistics.fmean(per_seed), "std": statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0,
                    "x": statistics.fmean(xs) if xs else None}
    return out


def _kept_tokens(cells: list[aggregate.Cell], data: str | None) -> dict[float, str]:
    """``{ratio: "21/64 tokens"}`` where every scored cell of that ratio (in ``data``, or all) keeps the
    same number of visual tokens at the last layer out of the same number in."""
    seen: dict[float, set] = {}
    for c in cells:
        if c.config.vanilla or c.score is None or (data is not None and c.data != data):
            continue
        fin, vin = c.metrics.get("visual final"), c.metrics.get("visual in")
        seen.setdefault(c.config.ratio, set()).add(None if fin is None or vin is None else (round(fin, 1), round(vin, 1)))
    return {r: f"{fin:g}/{vin:g} tokens" for r, s in seen.items() if len(s) == 1 and None not in s for fin, vin in s}


def _panels(cells: list[aggregate.Cell], x: str | None = None) -> list[tuple[str | None, str, dict]]:
    """``[(dataset or None, title, points)]``: the datasets with a score (and, for ``x``, a value of
    ``x``), then the average where there are several datasets; a panel without a point is left out."""
    datasets = sorted({c.data for c in cells if c.score is not None}, key=_common.dataset_sort_key)
    labels = aggregate.column_labels(datasets)  # the tables' labels (ScienceQA_VAL and _TEST apart)
    out = []
    for data in [*datasets, None] if len(datasets) > 1 else datasets:
        pts = _points(cells, data, x)
        if x is not None:
            pts = {k: v for k, v in pts.items() if v["x"] is not None}
        if any(m != "vanilla" for m, _ in pts) or (x is not None and pts):
            out.append((data, labels[data] if data else f"Average ({len(datasets)} datasets)", pts))
    return out


def _styles(cells: list[aggregate.Cell], styles: dict[str, plot_style.Style] | None) -> dict[str, plot_style.Style]:
    """The styles given (make_plots styles every model's methods at once), or the cells' own where
    those do not cover every method."""
    labels = {c.config.label for c in cells if not c.config.vanilla}
    return styles if styles and labels <= set(styles) else plot_style.method_styles(labels)


def ratio_figure(model: str, cells: list[aggregate.Cell], styles: dict[str, plot_style.Style] | None = None) -> plt.Figure | None:
    """Accuracy against the kept ratio: one panel per dataset with a score (and the average), one line
    per method (mean over seeds, error bar = std), dodged per method; x ticks at the evaluated ratios;
    vanilla as a dashed line. ``None`` when no pruned configuration has a score."""
    styles = _styles(cells, styles)
    panels = _panels(cells)
    if not panels:
        return None
    fig, axes = plot_style.grid(len(panels))
    shown: set[str] = set()
    any_vanilla = False
    present = [m for m in styles if any(c.config.label == m for c in cells)]  # the same dodge slot in every panel
    for ax, (data, title, pts) in zip(axes, panels):
        ratios = sorted({r for m, r in pts if m != "vanilla"})
        offset = plot_style.dodge_offsets(present, ratios)
        for m in [m for m in present if any(mm == m for mm, _ in pts)]:
            xs = sorted(r for mm, r in pts if mm == m)
            ys = [pts[(m, r)]["score"] for r in xs]
            es = [pts[(m, r)]["std"] for r in xs]
            xd = [x + offset[m] for x in xs]
            ax.plot(xd, ys, label=m, **styles[m].line_kwargs())
            if any(es):  # std over seeds
                ax.errorbar(xd, ys, yerr=es, fmt="none", ecolor=styles[m].color, capsize=3, linewidth=1)
            shown.add(m)
        if ("vanilla", 1.0) in pts:
            any_vanilla = True
            ax.axhline(pts[("vanilla", 1.0)]["score"], label="vanilla", **plot_style.VANILLA_STYLE)
        plot_style.set_ratio_ticks(ax, ratios, _kept_tokens(cells, data))
        plot_style.score_ylim(ax, [v["score"] for v in pts.values()])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("kept visual tokens (ratio)", fontsize=9)
        ax.set_ylabel("score (0-100)", fontsize=9)
        ax.grid(alpha=0.3)
    handles, labels = plot_style.legend_handles({m: s for m, s in styles.items() if m in shown}, any_vanilla)
    plot_style.finish(fig, handles, labels, f"{model}: accuracy vs kept visual tokens",
                      "Points of each method are offset slightly left/right of the evaluated ratio so ties stay visible"
                      + ("; error bars: std over seeds" if any(v["std"] for *_, pts in panels for v in pts.values()) else "")
                      + ". Kept tokens: at the last decoder layer.")
    return fig


def accuracy_vs_ratio(model: str, cells: list[aggregate.Cell], out: Path,
                      styles: dict[str, plot_style.Style] | None = None) -> Path | None:
    fig = ratio_figure(model, cells, styles)
    return _save(fig, out / f"{_safe(model)}_accuracy_vs_ratio.png")


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (lower time, higher score), by increasing time."""
    best, out = -math.inf, []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            out.append((x, y))
            best = y
    return out


# What the frontier can be drawn against: option -> (cell metric, axis label, file suffix).
COSTS = {
    "prefill_ms": ("prefill ms mean", "prefill time (ms per sample, mean after warm-up)", "accuracy_vs_prefill"),
    "gflops": ("prefill GFLOPs", "decoder prefill GFLOPs per sample (theoretical)", "accuracy_vs_gflops"),
    "tokens": ("equiv tokens", "visual tokens per decoder layer (mean over layers)", "accuracy_vs_tokens"),
}


def cost_figure(model: str, cells: list[aggregate.Cell], cost: str = "prefill_ms",
                styles: dict[str, plot_style.Style] | None = None) -> plt.Figure | None:
    """Accuracy against a cost (``COSTS``): one panel per dataset that has a value of the cost (a
    dataset with no timed sample has no panel), and the average; one marker per method and ratio,
    each method's points joined in ratio order and labelled with the ratio; vanilla a star and a
    dashed line; the trade-off frontier in gray. ``None`` when no panel has a point."""
    metric, xlabel, _ = COSTS[cost]
    styles = _styles(cells, styles)
    panels = _panels(cells, metric)
    if not panels:
        return None
    fig, axes = plot_style.grid(len(panels))
    shown: set[str] = set()
    any_vanilla = False
    labels_of: dict[plt.Axes, list] = {ax: [] for ax in axes}
    stars: dict[plt.Axes, list] = {ax: [] for ax in axes}
    any_front = False
    for ax, (data, title, pts) in zip(axes, panels):
        for m, style in styles.items():
            mine = sorted((r, v) for (mm, r), v in pts.items() if mm == m)
            if not mine:
                continue
            shown.add(m)
            ax.plot([v["x"] for _, v in mine], [v["score"] for _, v in mine], label=m, **style.line_kwargs())
            labels_of[ax] += [(v["x"], v["score"], plot_style.ratio_label(r).replace(" ", ""), style.color) for r, v in mine]
        if ("vanilla", 1.0) in pts:
            any_vanilla = True
            v = pts[("vanilla", 1.0)]
            ax.axhline(v["score"], **plot_style.VANILLA_STYLE)
            ax.plot([v["x"]], [v["score"]], **plot_style.VANILLA_MARKER)
            stars[ax].append((v["x"], v["score"]))
        front = frontier([(v["x"], v["score"]) for v in pts.values()])
        if len(front) > 1:
            any_front = True
            ax.step([x for x, _ in front], [y for _, y in front], where="post", color="gray", linewidth=3, alpha=0.35,
                    zorder=0)
        plot_style.score_ylim(ax, [v["score"] for v in pts.values()], headroom=12)  # room for the ratio labels
        ax.margins(x=0.12)  # and beside the outermost points
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_ylabel("score (0-100)", fontsize=9)
        ax.grid(alpha=0.3)
    handles, labels = plot_style.legend_handles({m: s for m, s in styles.items() if m in shown}, any_vanilla, star=True)
    if any_front:
        handles.append(plt.Line2D([], [], color="gray", linewidth=3, alpha=0.35))
        labels.append("frontier")
    name = xlabel.split(" (")[0]
    plot_style.finish(fig, handles, labels, f"{model}: accuracy vs {name}",
                      "Numbers: kept visual-token ratio. Frontier: the configurations no other beats on both cost and "
                      "score. Datasets without a value of the cost (e.g. no sample after warm-up) have no panel.")
    for ax, items in labels_of.items():  # once the layout is final: the labels are placed in pixels
        plot_style.place_labels(ax, items, obstacles=stars[ax])
    return fig


def accuracy_vs_cost(model: str, cells: list[aggregate.Cell], out: Path, cost: str = "prefill_ms",
                     styles: dict[str, plot_style.Style] | None = None) -> Path | None:
    fig = cost_figure(model, cells, cost, styles)
    return _save(fig, out / f"{_safe(model)}_{COSTS[cost][2]}.png")


def accuracy_vs_prefill(model: str, cells: list[aggregate.Cell], out: Path,
                        styles: dict[str, plot_style.Style] | None = None) -> Path | None:
    return accuracy_vs_cost(model, cells, out, "prefill_ms", styles)


def _save(fig: plt.Figure | None, path: Path) -> Path | None:
    if fig is None:
        logger.warning("%s: nothing to draw", path.name)
        return None
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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


def make_plots(work: Path, out: Path, cells: list[aggregate.Cell] | None = None,
               costs: tuple[str, ...] = ("prefill_ms",)) -> list[Path]:
    """Per model: accuracy vs kept ratio and accuracy vs each of ``costs`` (keys of :data:`COSTS`),
    the methods styled alike in every figure; a figure with nothing to draw is not written."""
    cells = aggregate.collect(work) if cells is None else cells
    out.mkdir(parents=True, exist_ok=True)
    styles = plot_style.method_styles(c.config.label for c in cells)  # one style per method across models
    paths = []
    for model in sorted({c.model for c in cells}):
        mine = [c for c in cells if c.model == model]
        if any(c.score is not None for c in mine):
            drawn = [accuracy_vs_ratio(model, mine, out, styles)]
            drawn += [accuracy_vs_cost(model, mine, out, cost, styles) for cost in costs]
            paths += [p for p in drawn if p is not None]
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
    parser.add_argument("--frontier-x", nargs="+", choices=list(COSTS), default=["prefill_ms"],
                        help="the x axes of the accuracy-vs-cost plots (default prefill_ms): prefill_ms (measured), "
                             "gflops (theoretical decoder prefill FLOPs), tokens (visual tokens per decoder layer)")
    parser.add_argument("--warmup", type=int, default=aggregate.DEFAULT_WARMUP,
                        help=f"samples excluded from timings at the start of every runner process (default {aggregate.DEFAULT_WARMUP})")
    args = parser.parse_args(argv)
    work = args.work_dir.resolve()
    out = (args.out or work / "_report" / "plots").resolve()
    paths = [] if args.no_curves else make_plots(work, out, aggregate.collect(work, args.warmup), tuple(args.frontier_x))
    for name, data, sample in args.overlay:
        paths.append(overlay(work, name, data, int(sample), args.lmu_data, out))
    for p in paths:
        print(p)


if __name__ == "__main__":
    main()
