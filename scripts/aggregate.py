"""Turn a sweep's work dir into the paper's tables (per model) and per-cell system metrics.

    python -m scripts.aggregate outputs/sweep                 # writes outputs/sweep/_report/
    python -m scripts.aggregate outputs/sweep --out report/ --warmup 5

Accuracy table, one per model (UniPruneBench's Tables 1-3): rows are the methods grouped by kept
ratio (vanilla first, then one block per ratio, largest first), columns the datasets grouped by
ability (comprehensive, OCR, multidisciplinary, hallucination, mathematical, instruction, then any
other), then the average over the row's datasets; under each score its drop relative to vanilla,
``(vanilla - score) / vanilla`` in percent (↓ worse, ↑ better; vanilla's own is 0). MME is
normalised to 0-100 as the paper does; each dataset's number is documented in
:func:`scripts._common.read_score`. Methods run with several seeds (``random_*``) show mean ± std
(sample std) over the seeds; the drop is that of the mean. The kept ratio of a row is the fraction
of the original visual tokens that reaches the last decoder layer (``KEEP_RATIO`` for a pre-LLM
method, the last intra-LLM ratio otherwise).

System metrics, one row per cell (model name x dataset), from ``prune_records.jsonl`` (records
attributed to datasets through the sweep's ledger, or, in a plain runner's work dir, by the dataset
each record names; records of runs whose predictions were not kept are left out, see
:func:`scripts._common.cell_records`):
  * prefill ms and method ms (sum of the sample's pruning events), mean and median over samples,
    the first ``--warmup`` samples of every runner process excluded (warm-up; per ``torchrun`` rank,
    and per cell with ``sweep.sh --one-load``, where one process runs many cells);
  * total s: wall time of the cell's runner processes (model loading included);
  * visual tokens per sample entering the decoder and at the last layer;
  * equivalent tokens: visual tokens averaged over the decoder's L layers (an image pruned to k of
    N tokens at the input of layer K counts ``(K * N + (L - K) * k) / L``), and that as a fraction
    of N;
  * theoretical prefill FLOPs of the decoder, without and with pruning (:func:`prefill_flops`),
    and the KV cache those layers hold after the prefill (:func:`kv_cache_bytes`), from the
    checkpoint's ``config.json`` (the path recorded in ``prune_config.json``);
  * measured KV cache after the prefill (every sample, the engine's ``kv_cache_bytes``; it equals
    the theoretical figure) and peak CUDA memory of the prefill (``peak_memory_bytes``, GPU runs
    only), averaged per cell (:data:`MEASURED_MEMORY_KEYS`).

Outputs in ``--out``: ``cells.csv`` (one row per cell: score and system metrics), per model
``<model>_accuracy.csv`` / ``.md`` and ``<model>_system.csv`` / ``.md``, and ``report.md`` with
every table.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils import ensure_torchvision  # noqa: E402

ensure_torchvision()  # before anything imports transformers (CPU torch + PyPI torchvision)

from scripts import _common  # noqa: E402

logger = logging.getLogger("aggregate")

DEFAULT_WARMUP = 3
# Measured memory in the engine's per-sample records (bytes; None where not measured, e.g. peak memory
# on CPU), averaged per cell like the timings.
MEASURED_MEMORY_KEYS = {"peak_memory_bytes": "peak mem MB", "kv_cache_bytes": "KV cache MB (measured)"}
DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2, "float64": 8}


# ----------------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class Configuration:
    """What a model folder's ``prune_config.json`` says, reduced to a table row's identity."""

    label: str  # "vanilla", "divprune_pre_llm", "fastv_intra_llm@L2", "divprune_pre_llm + fastv_intra_llm@L2",
    # "gprune_pre_llm(iterations=3)"
    stage: str  # "-", "pre", "intra", "pre+intra"
    ratio: float  # visual tokens reaching the last layer, as a fraction of the original
    seed: int | None  # only for configurations with a random method

    @classmethod
    def from_json(cls, cfg: dict[str, Any]) -> "Configuration":
        pre, intra = cfg.get("pre_method"), cfg.get("intra") or []
        args = cfg.get("method_args") or {}

        def part(method: str, where: str = "") -> str:  # "gprune_pre_llm(iterations=3)", "fastv_intra_llm@L2"
            hp = ", ".join(f"{k}={v}" for k, v in sorted((args.get(method) or {}).items()))
            return method + where + (f"({hp})" if hp else "")

        parts = ([part(pre)] if pre else []) + [part(s["method"], f"@L{s['layer']}") for s in intra]
        stage = "+".join(s for s, on in (("pre", bool(pre)), ("intra", bool(intra))) if on) or "-"
        ratio = float(intra[-1]["ratio"]) if intra else float(cfg["keep_ratio"]) if pre else 1.0
        names = ([pre] if pre else []) + [s["method"] for s in intra]
        seed = int(cfg.get("seed", 0)) if any(n.startswith("random_") for n in names) else None
        return cls(" + ".join(parts) or "vanilla", stage, round(ratio, 4), seed)

    @property
    def vanilla(self) -> bool:
        return self.stage == "-"


def display_name(name: str, cfg: dict[str, Any]) -> str:
    """The model a configuration belongs to: the folder name without ``__<PruneConfig tag>`` (or
    ``__vanilla``), i.e. ``--model``'s display name with its protocol tag, if any
    (``vlm_adapter.model_name``): configurations of one model under one protocol share a table."""
    try:
        from utils import LayerSpec, PruneConfig

        tag = PruneConfig(
            pre_method=cfg.get("pre_method"), keep_ratio=cfg.get("keep_ratio"),
            intra=tuple(LayerSpec(**s) for s in cfg.get("intra") or []),
            method_args=cfg.get("method_args") or {}, seed=int(cfg.get("seed", 0)),
        ).tag() or "vanilla"
    except Exception:  # a config this version cannot rebuild: fall back to the first separator
        return name.split("__", 1)[0]
    return name[: -len(tag) - 2] if name.endswith("__" + tag) else name


# ----------------------------------------------------------------------------- model config: FLOPs, KV cache
@dataclass(frozen=True)
class DecoderShape:
    """The decoder's size (from the checkpoint's text config)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int
    dtype: str


_SHAPES: dict[str, DecoderShape | None] = {}


def decoder_shape(checkpoint: str) -> DecoderShape | None:
    """Read with ``transformers.AutoConfig`` (which fills the defaults a ``config.json`` may omit,
    e.g. llava-hf's ``text_config``); ``None`` (with a warning) when the config cannot be read."""
    if checkpoint in _SHAPES:
        return _SHAPES[checkpoint]
    shape = None
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(checkpoint)
        t = cfg.get_text_config()
        heads = int(t.num_attention_heads)
        head_dim = int(getattr(t, "head_dim", None) or t.hidden_size // heads)
        dtype = str(getattr(cfg, "dtype", None) or getattr(t, "dtype", None) or getattr(cfg, "torch_dtype", None) or "float32")
        dtype = dtype.replace("torch.", "")
        shape = DecoderShape(
            layers=int(t.num_hidden_layers), hidden=int(t.hidden_size), intermediate=int(t.intermediate_size),
            heads=heads, kv_heads=int(getattr(t, "num_key_value_heads", None) or heads), head_dim=head_dim,
            dtype_bytes=DTYPE_BYTES.get(dtype, 2), dtype=dtype,
        )
    except Exception as e:  # offline without the checkpoint, or an unknown config
        logger.warning("no decoder config for %s (%s): FLOPs, KV cache and equivalent tokens are n/a", checkpoint, e)
    _SHAPES[checkpoint] = shape
    return shape


def layer_flops(n: int, s: DecoderShape) -> float:
    """Prefill FLOPs of one decoder layer on ``n`` tokens (a multiply-add counts 2):

    * attention projections: ``2 n d (2 h dh + 2 kv dh)`` (q and o: ``h dh``; k and v: ``kv dh``);
    * attention scores and weighted sum over the causal triangle: ``2 * 2 h dh * n (n + 1) / 2``;
    * gated MLP (gate, up, down; Qwen2 and LLaMA decoders): ``2 * 3 n d m``.
    Norms, rotary embeddings, softmax, the embedding and the LM head are left out, and so is the
    vision encoder (pruning does not change it).
    """
    d, h, kv, dh, m = s.hidden, s.heads, s.kv_heads, s.head_dim, s.intermediate
    proj = 2.0 * n * d * (2 * h * dh + 2 * kv * dh)
    attn = 2.0 * h * dh * n * (n + 1)
    mlp = 6.0 * n * d * m
    return proj + attn + mlp


def tokens_per_layer(record: dict[str, Any], layers: int) -> list[tuple[int, int]]:
    """``[(sequence length, visual tokens)]`` of each decoder layer during this sample's prefill.

    A pre-LLM event (``layer`` null) removes ``n_in - n_keep`` tokens from every layer; an intra-LLM
    event at layer K from layers K..L-1 (it prunes at the layer's input; layers above keep only the
    survivors, in the sequence and in the cache).
    """
    out = []
    for layer in range(layers):
        removed = sum(e["n_in"] - e["n_keep"] for e in record.get("events", [])
                      if e.get("layer") is None or e["layer"] <= layer)
        out.append((record["n_prompt"] - removed, record["n_visual"] - removed))
    return out


def prefill_flops(record: dict[str, Any], s: DecoderShape, pruned: bool = True) -> float:
    """The decoder's prefill FLOPs for one sample: sum over layers of :func:`layer_flops` at that
    layer's sequence length (``pruned=False``: the whole prompt at every layer)."""
    if not pruned:
        return s.layers * layer_flops(record["n_prompt"], s)
    return sum(layer_flops(n, s) for n, _ in tokens_per_layer(record, s.layers))


def kv_cache_bytes(record: dict[str, Any], s: DecoderShape, pruned: bool = True) -> float:
    """Keys and values the decoder caches after the prefill: ``2 * kv * dh * bytes`` per token per
    layer, summed over each layer's tokens (a theoretical figure, in the checkpoint's dtype)."""
    per_token = 2 * s.kv_heads * s.head_dim * s.dtype_bytes
    if not pruned:
        return float(per_token * s.layers * record["n_prompt"])
    return float(per_token * sum(n for n, _ in tokens_per_layer(record, s.layers)))


def equivalent_tokens(record: dict[str, Any], layers: int) -> float:
    """Visual tokens averaged over the decoder's layers (what an intra-LLM cut is worth in pre-LLM tokens)."""
    return statistics.fmean(v for _, v in tokens_per_layer(record, layers))


# ----------------------------------------------------------------------------- cells
@dataclass
class Cell:
    model: str
    name: str
    data: str
    config: Configuration
    checkpoint: str
    score: float | None = None
    score_file: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def after_warmup(records: list[dict[str, Any]], warmup: int) -> list[dict[str, Any]]:
    """The records of one attempt without the first ``warmup`` of each rank (under ``torchrun``
    every rank is a process with its own warm-up; their records interleave in the file)."""
    seen: dict[int, int] = {}
    out = []
    for r in records:
        rank = int(r.get("rank") or 0)
        seen[rank] = seen.get(rank, 0) + 1
        if seen[rank] > warmup:
            out.append(r)
    return out


def system_metrics(work: Path, name: str, data: str, datasets: list[str], checkpoint: str, warmup: int) -> dict[str, Any]:
    attempts, source = _common.cell_records(work, name, data, datasets)
    records = [r for part in attempts for r in part]
    timed = [r for part in attempts for r in after_warmup(part, warmup)]
    m: dict[str, Any] = {"records": len(records), "timed": len(timed), "attributed by": source}
    prefill = [r["prefill_ms"] for r in timed if r.get("prefill_ms") is not None]
    method = []
    for r in timed:
        ms = [e.get("ms") for e in r.get("events", [])]
        if all(x is not None for x in ms):
            method.append(float(sum(ms)))
    m.update({"prefill ms mean": _mean(prefill), "prefill ms median": _median(prefill),
              "method ms mean": _mean(method), "method ms median": _median(method)})
    ledger = _common.read_ledger(work, name, len(_common.read_records(work / name))).get(data, [])
    secs = [a.seconds for a in ledger if a.seconds is not None]
    m["total s"] = sum(secs) if secs else None
    m["runs"] = len(ledger) if ledger else len(attempts)
    m["visual in"] = _mean([r["n_visual"] for r in records])
    m["visual final"] = _mean([r["n_visual_final"] for r in records])
    shape = decoder_shape(checkpoint) if records else None
    if shape is not None:
        m["equiv tokens"] = _mean([equivalent_tokens(r, shape.layers) for r in records])
        m["equiv ratio"] = m["equiv tokens"] / m["visual in"] if m["visual in"] else None
        m["prefill GFLOPs full"] = _mean([prefill_flops(r, shape, pruned=False) / 1e9 for r in records])
        m["prefill GFLOPs"] = _mean([prefill_flops(r, shape) / 1e9 for r in records])
        m["KV MB full"] = _mean([kv_cache_bytes(r, shape, pruned=False) / 2**20 for r in records])
        m["KV MB"] = _mean([kv_cache_bytes(r, shape) / 2**20 for r in records])
        m["KV dtype"] = shape.dtype
        m["layers"] = shape.layers
    for key, column in MEASURED_MEMORY_KEYS.items():
        vals = [r[key] / 2**20 for r in records if r.get(key) is not None]
        m[column] = _mean(vals)
    return m


def discover_datasets(model_dir: Path, name: str, ledger_data: list[str]) -> list[str]:
    """Datasets of a model folder: the ledger's, plus every ``<name>_<data>.xlsx`` with a score file
    (aux files such as ``<name>_<data>_<judge>.xlsx`` are dropped when ``<data>`` is also there)."""
    found = set(ledger_data)
    prefix = f"{name}_"
    for folder in [model_dir, *_common.pred_roots(model_dir)]:
        for p in folder.glob(f"{_common.glob_escape(prefix)}*.xlsx"):
            found.add(p.name[len(prefix) : -len(".xlsx")])
    keep = []
    for d in found:
        known = _common.dataset_spec(d).kind != "generic"
        if not known and any(d.startswith(o + "_") for o in found if o != d):
            continue
        if d in ledger_data or _common.find_score_file(model_dir, name, d) is not None:
            keep.append(d)
    return sorted(keep, key=_common.dataset_sort_key)


def collect(work: Path, warmup: int = DEFAULT_WARMUP, datasets: list[str] | None = None) -> list[Cell]:
    cells = []
    for model_dir in _common.iter_model_dirs(work):
        name = model_dir.name
        cfg = json.loads((model_dir / "prune_config.json").read_text())
        conf = Configuration.from_json(cfg)
        n_records = len(_common.read_records(model_dir))
        ledger = _common.read_ledger(work, name, n_records)
        found = discover_datasets(model_dir, name, list(ledger))
        for data in found:
            if datasets and data not in datasets:
                continue
            cell = Cell(display_name(name, cfg), name, data, conf, str(cfg.get("model", "")))
            path = _common.find_score_file(model_dir, name, data)
            if path is not None:
                try:
                    cell.score, cell.score_file = _common.read_score(path, data), str(path)
                except Exception as e:  # a score file of an unexpected shape: say so, keep going
                    logger.warning("%s: %s", path, e)
            cell.metrics = system_metrics(work, name, data, found, cell.checkpoint, warmup)
            cells.append(cell)
    return cells


# ----------------------------------------------------------------------------- the accuracy table
@dataclass
class Row:
    label: str
    stage: str
    ratio: float
    seeds: list[int | None]
    mean: dict[str, float]
    std: dict[str, float]
    n: dict[str, int]
    avg: float | None = None
    avg_complete: bool = True
    drop: dict[str, float] = field(default_factory=dict)
    avg_drop: float | None = None

    @property
    def vanilla(self) -> bool:
        return self.stage == "-"


def column_labels(datasets: list[str]) -> dict[str, str]:
    """Dataset -> column label: the paper's abbreviation, or the dataset's name where two collide."""
    abbr = {d: _common.dataset_spec(d).abbr for d in datasets}
    counts = {a: list(abbr.values()).count(a) for a in abbr.values()}
    return {d: a if counts[a] == 1 else d for d, a in abbr.items()}


def accuracy_rows(cells: list[Cell]) -> tuple[list[str], list[Row]]:
    """Datasets (column order) and rows (vanilla first, then by ratio, largest first) of one model."""
    scored = [c for c in cells if c.score is not None and not math.isnan(c.score)]
    datasets = sorted({c.data for c in scored}, key=_common.dataset_sort_key)
    groups: dict[tuple[str, str, float], list[Cell]] = {}
    for c in scored:
        groups.setdefault((c.config.label, c.config.stage, c.config.ratio), []).append(c)
    rows = []
    for (label, stage, ratio), members in groups.items():
        mean, std, n = {}, {}, {}
        for d in datasets:
            xs = [c.score for c in members if c.data == d]
            if xs:
                mean[d] = statistics.fmean(xs)
                std[d] = statistics.stdev(xs) if len(xs) > 1 else 0.0
                n[d] = len(xs)
        seeds = sorted({c.config.seed for c in members}, key=lambda s: -1 if s is None else s)
        row = Row(label, stage, ratio, seeds, mean, std, n)
        row.avg = statistics.fmean(mean.values()) if mean else None
        row.avg_complete = len(mean) == len(datasets)
        rows.append(row)
    rows.sort(key=lambda r: (not r.vanilla, -r.ratio, r.label))
    vanilla = next((r for r in rows if r.vanilla), None)
    for r in rows:
        for d, x in r.mean.items():
            r.drop[d] = _drop(x, vanilla.mean.get(d) if vanilla else None, r.vanilla)
        # The average's drop compares averages over the same datasets.
        if vanilla and r.mean:
            common = [d for d in r.mean if d in vanilla.mean]
            r.avg_drop = _drop(statistics.fmean(r.mean[d] for d in common),
                               statistics.fmean(vanilla.mean[d] for d in common), r.vanilla) if common else None
        elif r.vanilla:
            r.avg_drop = 0.0
    return datasets, rows


def _drop(score: float, base: float | None, is_vanilla: bool) -> float:
    if is_vanilla:
        return 0.0
    if base is None or base == 0:
        return float("nan")
    return (base - score) / base * 100.0


def accuracy_csv_rows(datasets: list[str], rows: list[Row]) -> list[dict[str, Any]]:
    labels = column_labels(datasets)
    out = []
    for r in rows:
        d: dict[str, Any] = {"kept ratio": r.ratio, "method": r.label, "stage": r.stage,
                             "seeds": " ".join("-" if s is None else str(s) for s in r.seeds)}
        for ds in datasets:
            col = labels[ds]
            d[col] = r.mean.get(ds)
            d[f"{col} std"] = r.std.get(ds)
            d[f"{col} drop %"] = r.drop.get(ds)
        d["Avg"] = r.avg
        d["Avg drop %"] = r.avg_drop
        d["Avg complete"] = r.avg_complete
        out.append(d)
    return out


def _fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _fmt_drop(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "n/a"
    if abs(x) < 0.05:
        return "0.0%"
    return f"↓{x:.1f}%" if x > 0 else f"↑{-x:.1f}%"


def accuracy_markdown(model: str, datasets: list[str], rows: list[Row]) -> str:
    labels = column_labels(datasets)
    head = ["Method", "Stage"] + [f"{_common.dataset_spec(d).group}<br>{labels[d]}" for d in datasets] + ["Avg."]
    lines = [f"### {model}: accuracy", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    blank = [""] * len(datasets)
    current = None
    for r in rows:
        if r.vanilla:
            lines.append("| " + " | ".join([f"*{model}: upper bound, 100% tokens*", "", *blank, ""]) + " |")
        elif r.ratio != current:
            current = r.ratio
            title = f"*Retain {r.ratio * 100:.1f}% tokens (↓ {100 - r.ratio * 100:.1f}%)*"
            lines.append("| " + " | ".join([title, "", *blank, ""]) + " |")
        cells = []
        for d in datasets:
            if d not in r.mean:
                cells.append("-")
            elif r.n[d] > 1:
                cells.append(f"{r.mean[d]:.2f} ± {r.std[d]:.2f}")
            else:
                cells.append(f"{r.mean[d]:.2f}")
        avg = _fmt(r.avg) + ("" if r.avg_complete else "*")
        name = "Vanilla" if r.vanilla else r.label + (f" (seeds {', '.join(map(str, r.seeds))})" if len(r.seeds) > 1 else "")
        lines.append("| " + " | ".join([name, r.stage, *cells, avg]) + " |")
        lines.append("| " + " | ".join(["", "", *[_fmt_drop(r.drop.get(d)) if d in r.mean else "" for d in datasets],
                                        _fmt_drop(r.avg_drop)]) + " |")
    lines += ["", "Scores 0-100 (MME: (perception + reasoning) / 2800 x 100). Under each score: drop relative to "
              "vanilla, (vanilla - score) / vanilla. ± : sample std over seeds. * : average over fewer datasets "
              "than the table's columns."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the system table
SYSTEM_COLUMNS = [
    "method", "stage", "kept ratio", "seed", "dataset", "records", "timed", "runs",
    "prefill ms mean", "prefill ms median", "method ms mean", "method ms median", "total s",
    "visual in", "visual final", "equiv tokens", "equiv ratio", "layers",
    "prefill GFLOPs full", "prefill GFLOPs", "FLOPs ratio", "KV MB full", "KV MB", "KV dtype",
    *MEASURED_MEMORY_KEYS.values(), "attributed by",
]


def system_rows(cells: list[Cell]) -> list[dict[str, Any]]:
    out = []
    for c in sorted(cells, key=lambda c: (not c.config.vanilla, -c.config.ratio, c.config.label,
                                          c.config.seed or 0, _common.dataset_sort_key(c.data))):
        m = c.metrics
        row = {"method": c.config.label, "stage": c.config.stage, "kept ratio": c.config.ratio,
               "seed": "-" if c.config.seed is None else c.config.seed, "dataset": c.data, **m}
        full, pruned = m.get("prefill GFLOPs full"), m.get("prefill GFLOPs")
        row["FLOPs ratio"] = pruned / full if full and pruned is not None else None
        out.append({k: row.get(k) for k in SYSTEM_COLUMNS})
    return out


def system_markdown(model: str, rows: list[dict[str, Any]], warmup: int) -> str:
    head = ["Method", "Ratio", "Seed", "Dataset", "Samples (timed)", "Prefill ms mean / median",
            "Method ms mean / median", "Total s", "Visual tokens in → last layer", "Equiv. tokens (ratio)",
            "Prefill GFLOPs full → pruned (x)", "KV MB full → pruned (measured)", "Peak mem MB"]
    lines = [f"### {model}: system metrics", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ratio = r["FLOPs ratio"]
        lines.append("| " + " | ".join([
            r["method"], f"{r['kept ratio']:g}", str(r["seed"]), r["dataset"], f"{r['records']} ({r['timed']})",
            f"{_fmt(r['prefill ms mean'])} / {_fmt(r['prefill ms median'])}",
            f"{_fmt(r['method ms mean'], 3)} / {_fmt(r['method ms median'], 3)}",
            _fmt(r["total s"], 1),
            f"{_fmt(r['visual in'], 1)} → {_fmt(r['visual final'], 1)}",
            f"{_fmt(r['equiv tokens'], 1)} ({_fmt(r['equiv ratio'], 3)})",
            f"{_fmt(r['prefill GFLOPs full'], 4)} → {_fmt(r['prefill GFLOPs'], 4)} ({_fmt(ratio, 3)})",
            f"{_fmt(r['KV MB full'], 3)} → {_fmt(r['KV MB'], 3)} ({_fmt(r['KV cache MB (measured)'], 3)})",
            _fmt(r["peak mem MB"], 1),
        ]) + " |")
    dtype = next((r["KV dtype"] for r in rows if r.get("KV dtype")), "n/a")
    lines += ["", f"Timings: mean / median over samples, the first {warmup} samples of every runner process "
              "excluded as warm-up; method ms: the sample's pruning events summed (0 for vanilla). Total s: wall "
              "time of the cell's runner processes, model loading included. Equivalent tokens: visual tokens "
              "averaged over the decoder's layers. GFLOPs: decoder prefill per sample, theoretical "
              "(scripts/aggregate.py:layer_flops); KV MB: keys and values cached after the prefill, theoretical, "
              f"in the checkpoint dtype ({dtype}), and in brackets the cache measured after the prefill. Peak "
              "memory: peak CUDA memory during the prefill (n/a on CPU)."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- writing
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    import pandas as pd

    pd.DataFrame(rows).to_csv(path, index=False)


def aggregate(work: Path, out: Path, warmup: int = DEFAULT_WARMUP, datasets: list[str] | None = None) -> dict[str, Any]:
    """Write every table; return ``{"cells": [...], "models": {model: {"accuracy": rows, "system": rows}}}``."""
    out.mkdir(parents=True, exist_ok=True)
    cells = collect(work, warmup, datasets)
    write_csv(out / "cells.csv", [{"model": c.model, "name": c.name, "method": c.config.label, "stage": c.config.stage,
                                   "kept ratio": c.config.ratio, "seed": c.config.seed, "dataset": c.data,
                                   "score": c.score, "score file": c.score_file, **c.metrics} for c in cells])
    report = [f"# Sweep report: {work}", ""]
    result: dict[str, Any] = {"cells": cells, "models": {}}
    for model in sorted({c.model for c in cells}):
        mine = [c for c in cells if c.model == model]
        ds, rows = accuracy_rows(mine)
        acc = accuracy_csv_rows(ds, rows)
        sysrows = system_rows(mine)
        write_csv(out / f"{_safe(model)}_accuracy.csv", acc)
        write_csv(out / f"{_safe(model)}_system.csv", sysrows)
        acc_md, sys_md = accuracy_markdown(model, ds, rows), system_markdown(model, sysrows, warmup)
        (out / f"{_safe(model)}_accuracy.md").write_text(acc_md + "\n")
        (out / f"{_safe(model)}_system.md").write_text(sys_md + "\n")
        report += [f"## {model}", "", acc_md, "", sys_md, ""]
        result["models"][model] = {"datasets": ds, "accuracy": acc, "system": sysrows}
    if not cells:
        report.append("No finished cell found (model folders need prune_config.json and a score file or ledger entry).")
    (out / "report.md").write_text("\n".join(report) + "\n")
    logger.info("wrote %s (%d cells, %d models)", out, len(cells), len(result["models"]))
    return result


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work_dir", type=Path, help="the sweep's work dir (VLMEvalKit's --work-dir)")
    parser.add_argument("--out", type=Path, help="output folder (default <work-dir>/_report)")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                        help=f"samples excluded from timings at the start of every runner process (default {DEFAULT_WARMUP})")
    parser.add_argument("--datasets", nargs="+", help="only these datasets")
    args = parser.parse_args(argv)
    aggregate(args.work_dir.resolve(), (args.out or args.work_dir / "_report").resolve(), args.warmup, args.datasets)
    print((args.out or args.work_dir / "_report") / "report.md")


if __name__ == "__main__":
    main()
