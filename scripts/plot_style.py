"""What every accuracy plot of the harness shares (``scripts/plots.py``, ``scripts/demo.py``).

* one style per method, the same in every panel and every figure drawn from one set of labels:
  colour, marker and line style assigned in sorted label order (so ``divprune_pre_llm``,
  ``fastv_intra_llm`` and ``random_pre_llm`` get the same styles in the demo's plot and in the
  sweep's, where FastV is ``fastv_intra_llm@L2``); markers are hollow, so tied methods drawn on the
  same point stay visible as overlapping shapes;
* a small horizontal dodge per method on a kept-ratio axis, so that tied methods do not hide one
  another; the x ticks stay at exactly the evaluated ratios (the points of a method sit
  ``dodge`` beside them, which the figures say);
* the ratio labels the tables use (``33.3 %``), with the kept visual tokens under them when known;
* vanilla as a black dashed horizontal line (and a black star where it has an x position).

Only matplotlib is imported here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.transforms  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

VANILLA = "vanilla"
VANILLA_STYLE = {"color": "black", "linestyle": "--", "linewidth": 1.0}
VANILLA_MARKER = {"color": "black", "marker": "*", "markersize": 11, "linestyle": "none"}
# tab10 without its gray (vanilla is black): 9 colours, then markers and line styles cycle apart.
COLORS = [plt.get_cmap("tab10")(i) for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h"]
# No "--": that is vanilla's.
LINESTYLES = ["-", "-.", ":", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 1)), (0, (8, 2)), (0, (3, 1, 1, 1))]
DODGE = 0.09  # a method's offset step, as a fraction of the smallest gap between evaluated ratios


@dataclass(frozen=True)
class Style:
    color: tuple
    marker: str
    linestyle: object
    index: int  # the method's position among the styled methods (its dodge slot)

    def line_kwargs(self) -> dict:
        return {"color": self.color, "marker": self.marker, "linestyle": self.linestyle, "markersize": 7,
                "markerfacecolor": "none", "markeredgewidth": 1.6, "linewidth": 1.6}


def method_styles(labels: Iterable[str]) -> dict[str, Style]:
    """``{label: Style}`` for every label but vanilla, in sorted label order."""
    methods = sorted({lab for lab in labels if lab != VANILLA})
    return {m: Style(COLORS[i % len(COLORS)], MARKERS[i % len(MARKERS)], LINESTYLES[i % len(LINESTYLES)], i)
            for i, m in enumerate(methods)}


def dodge_offsets(methods: list[str], ratios: Iterable[float]) -> dict[str, float]:
    """A horizontal offset per method (in ratio units), centred on 0: ``DODGE`` times the smallest gap
    between the evaluated ratios (or 0.02 where there is one ratio) per method."""
    xs = sorted(set(ratios))
    gaps = [b - a for a, b in zip(xs, xs[1:]) if b - a > 0]
    step = DODGE * (min(gaps) if gaps else 0.3)
    n = len(methods)
    return {m: (i - (n - 1) / 2) * step for i, m in enumerate(methods)}


def ratio_label(ratio: float) -> str:
    """The tables' label of a kept ratio: ``33.3 %``."""
    return f"{100 * ratio:.1f} %"


def set_ratio_ticks(ax: plt.Axes, ratios: Iterable[float], kept: dict[float, str] | None = None) -> None:
    """x ticks at exactly the evaluated ratios, labelled as the tables label them (and the kept
    visual tokens under each, where ``kept`` gives them); limits with room for the dodge."""
    xs = sorted(set(ratios))
    kept = kept or {}
    ax.set_xticks(xs)
    ax.set_xticklabels([ratio_label(r) + (f"\n{kept[r]}" if r in kept else "") for r in xs], fontsize=8)
    ax.minorticks_off()
    lo, hi = xs[0], xs[-1]
    pad = 0.12 * (hi - lo) if hi > lo else 0.05
    ax.set_xlim(lo - pad, hi + pad)


def score_ylim(ax: plt.Axes, values: Iterable[float], headroom: float = 4) -> None:
    """0-100 with a margin where every value is a percentage (ties at 100 stay visible; ``headroom``
    above 100 leaves room for point labels), ticks every 20; else automatic."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if vals and all(0 <= v <= 100 for v in vals):
        ax.set_ylim(-4, 100 + headroom)
        ax.set_yticks(range(0, 101, 20))


def legend_handles(styles: dict[str, Style], vanilla: bool = True, star: bool = False,
                   vanilla_label: str = "vanilla (100 % tokens)") -> tuple[list, list[str]]:
    """Legend entries: one per method (colour, marker, line style), then vanilla (its line, and its
    star where the figure draws one)."""
    handles = [Line2D([], [], **s.line_kwargs()) for s in styles.values()]
    labels = list(styles)
    if vanilla:
        handles.append(Line2D([], [], marker="*" if star else None, markersize=10, **VANILLA_STYLE))
        labels.append(vanilla_label)
    return handles, labels


def grid(n: int, cols: int = 3, width: float = 4.2, height: float = 3.3) -> tuple[plt.Figure, list[plt.Axes]]:
    """``n`` panels on a grid of at most ``cols`` columns; no empty axes are left on the figure."""
    cols = n if n <= 4 else max(1, min(n, cols))  # up to four panels on one row
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows + 1.2), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        fig.delaxes(ax)
    return fig, flat[:n]


def finish(fig: plt.Figure, handles: list, labels: list[str], title: str, note: str = "") -> None:
    """One legend under the panels, the title above, an optional note under the legend (margins in
    inches, so they do not grow with the number of panel rows)."""
    height = fig.get_figheight()
    ncol = (len(labels) if len(labels) <= 6 else 4) or 1
    legend_in = 0.27 * math.ceil(len(labels) / ncol) if handles else 0.0
    note_in = 0.25 if note else 0.0
    if note:
        fig.text(0.5, 0.06 / height, note, ha="center", va="bottom", fontsize=8, color="dimgray")
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=9, frameon=False,
                   bbox_to_anchor=(0.5, (0.04 + note_in) / height))
    fig.suptitle(title, fontsize=11, y=1 - 0.08 / height, va="top")
    fig.tight_layout(rect=(0, (0.05 + note_in + legend_in) / height, 1, 1))  # it leaves room for the suptitle


# Where a point's label may go, tried in order: (offset in points, ha, va).
_LABEL_SPOTS = [((6, 0), "left", "center"), ((-6, 0), "right", "center"), ((0, 7), "center", "bottom"),
                ((0, -7), "center", "top"), ((5, 5), "left", "bottom"), ((5, -5), "left", "top"),
                ((-5, 5), "right", "bottom"), ((-5, -5), "right", "top")]
_LABEL_SPOTS += [((k * dx, k * dy), ha, va) for k in (2, 3) for (dx, dy), ha, va in _LABEL_SPOTS[:8]]


def place_labels(ax: plt.Axes, items: list[tuple[float, float, str, object]], fontsize: float = 7,
                 obstacles: Iterable[tuple[float, float]] = ()) -> None:
    """Label points ``(x, y, text, colour)`` without overlapping one another, the points, the other
    ``obstacles`` (unlabelled points, e.g. vanilla's star) or the frame: each label takes the first
    free spot around its point (else the least crowded one). Call it once the figure's layout is
    final (after :func:`finish`), since it measures in pixels."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    pad = 5 * fig.dpi / 72  # a marker's half size, in pixels
    points = [ax.transData.transform((x, y)) for x, y in [(i[0], i[1]) for i in items] + list(obstacles)]
    taken = [matplotlib.transforms.Bbox([[px - pad, py - pad], [px + pad, py + pad]]) for px, py in points]

    def cost(box) -> float:
        inside = box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y0 >= frame.y0 and box.y1 <= frame.y1
        box = box.padded(1.5)  # labels that merely touch read as one
        overlap = sum(max(0, min(box.x1, t.x1) - max(box.x0, t.x0)) * max(0, min(box.y1, t.y1) - max(box.y0, t.y0))
                      for t in taken)
        return overlap + (0 if inside else 1e6)

    for x, y, text, color in items:
        best = None
        for offset, ha, va in _LABEL_SPOTS:
            label = ax.annotate(text, (x, y), xytext=offset, textcoords="offset points", ha=ha, va=va,
                                fontsize=fontsize, color=color, zorder=5,
                                bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.85})
            box = label.get_window_extent(renderer)
            c = cost(box)
            if best is None or c < best[0]:
                if best is not None:
                    best[1].remove()
                best = (c, label, box)
            else:
                label.remove()
            if c == 0:
                break
        taken.append(best[2])
