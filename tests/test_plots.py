"""The accuracy plots on hand-made cells (``scripts/plots.py``, ``scripts/plot_style.py``) and the
demo's (``scripts/demo.py:plot``): x ticks at the evaluated ratios, tied methods visible, panels
without data left out, vanilla as a reference, one style per method everywhere. Seconds, no model."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402

from scripts import aggregate, demo, plot_style, plots  # noqa: E402
from synthetic import proxy_data  # noqa: E402

RATIOS = (0.333, 0.222, 0.111)


def _cell(method: str, ratio: float, data: str, score: float | None, ms: float | None = 10.0,
          seed: int | None = None, final: float | None = None) -> aggregate.Cell:
    stage = "-" if method == "vanilla" else "intra" if "@L" in method else "pre"
    metrics = {"prefill ms mean": ms, "prefill GFLOPs": 0.01 + ratio / 10, "equiv tokens": 64 * ratio,
               "visual in": 64.0, "visual final": 64 * ratio if final is None else final}
    return aggregate.Cell("M", f"M__{method}-r{ratio}", data, aggregate.Configuration(method, stage, ratio, seed), "",
                          score=score, metrics=metrics)


def _cells(datasets=("MME", "POPE"), tie: bool = True) -> list[aggregate.Cell]:
    """vanilla, divprune and random (identical scores where ``tie``) and FastV at the three ratios."""
    out = []
    for d in datasets:
        out.append(_cell("vanilla", 1.0, d, 90.0, final=64.0))
        for i, r in enumerate(RATIOS):
            out.append(_cell("divprune_pre_llm", r, d, 80.0 - 10 * i, final=round(64 * r)))
            out.append(_cell("random_pre_llm", r, d, (80.0 if tie else 60.0) - 10 * i, final=round(64 * r), seed=0))
            out.append(_cell("fastv_intra_llm@L2", r, d, 70.0 - 5 * i, final=round(64 * r)))
    return out


def _panels(fig: plt.Figure) -> dict[str, plt.Axes]:
    return {ax.get_title(): ax for ax in fig.axes}


def _method_lines(ax: plt.Axes) -> dict[str, matplotlib.lines.Line2D]:
    """The data line of each method in a panel (errorbar and plot both label their Line2D)."""
    return {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}


def test_ratio_ticks_are_the_evaluated_ratios_labelled_as_the_tables():
    fig = plots.ratio_figure("M", _cells())
    for title, ax in _panels(fig).items():
        assert list(ax.get_xticks()) == pytest.approx(sorted(RATIOS)), title
        labels = [t.get_text() for t in ax.get_xticklabels()]
        assert labels == ["11.1 %\n7/64 tokens", "22.2 %\n14/64 tokens", "33.3 %\n21/64 tokens"], title
        lo, hi = ax.get_xlim()
        assert lo < 0.111 and hi > 0.333 and hi < 0.5  # vanilla's 1.0 does not squeeze the evaluated ratios
    plt.close(fig)


def test_kept_tokens_are_left_off_a_tick_where_cells_disagree():
    cells = _cells(("MME",))
    cells.append(_cell("fastv_intra_llm@L2", 0.5, "MME", 50.0, final=30.0))
    cells.append(_cell("divprune_pre_llm", 0.5, "MME", 50.0, final=32.0))
    fig = plots.ratio_figure("M", cells)
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()][-1] == "50.0 %"
    plt.close(fig)


def test_tied_methods_are_two_distinguishable_artists():
    fig = plots.ratio_figure("M", _cells(tie=True))
    for title, ax in _panels(fig).items():
        lines = _method_lines(ax)
        div, rnd = lines["divprune_pre_llm"], lines["random_pre_llm"]
        assert list(div.get_ydata()) == list(rnd.get_ydata())  # the tie
        assert all(a != b for a, b in zip(div.get_xdata(), rnd.get_xdata())), title  # dodged apart
        assert max(abs(a - b) for a, b in zip(div.get_xdata(), rnd.get_xdata())) < 0.05  # but still at their tick
        assert div.get_marker() != rnd.get_marker() and div.get_linestyle() != rnd.get_linestyle()
        assert to_rgba(div.get_color()) != to_rgba(rnd.get_color())
        assert div.get_markerfacecolor() == "none"  # hollow: overlapping markers both show
    plt.close(fig)


def test_vanilla_is_a_horizontal_reference_and_in_the_legend():
    fig = plots.ratio_figure("M", _cells())
    ax = _panels(fig)["MME"]
    (van,) = [line for line in ax.get_lines() if line.get_label() == "vanilla"]
    assert list(van.get_ydata()) == [90.0, 90.0] and van.get_transform() != ax.transData  # axhline
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["divprune_pre_llm", "fastv_intra_llm@L2", "random_pre_llm",
                                                          "vanilla (100 % tokens)"]
    plt.close(fig)


def test_styles_are_the_same_in_every_panel_and_figure():
    cells = _cells()
    styles = plot_style.method_styles(c.config.label for c in cells)
    figs = [plots.ratio_figure("M", cells, styles), plots.cost_figure("M", cells, "prefill_ms", styles),
            plots.cost_figure("M", cells, "gflops", styles)]
    seen: dict[str, set] = {}
    for fig in figs:
        for ax in fig.axes:
            for label, line in _method_lines(ax).items():
                seen.setdefault(label, set()).add((to_rgba(line.get_color()), line.get_marker(), str(line.get_linestyle())))
        plt.close(fig)
    assert set(seen) >= {"divprune_pre_llm", "random_pre_llm", "fastv_intra_llm@L2"}
    assert all(len(v) == 1 for k, v in seen.items()), seen
    # A subset of the methods keeps the styles given (make_plots styles all models' methods at once).
    only = [c for c in cells if c.config.label != "divprune_pre_llm"]
    fig = plots.ratio_figure("M", only, styles)
    line = _method_lines(fig.axes[0])["random_pre_llm"]
    assert line.get_marker() == styles["random_pre_llm"].marker
    plt.close(fig)


def test_a_dataset_without_timed_samples_has_no_prefill_panel():
    cells = _cells(("MME", "POPE", "SEED"))
    for c in cells:
        if c.data == "SEED":
            c.metrics["prefill ms mean"] = None  # e.g. one sample, excluded as warm-up
    fig = plots.cost_figure("M", cells, "prefill_ms")
    assert list(_panels(fig)) == ["MME", "POPE", "Average (3 datasets)"]
    assert not [t for ax in fig.axes for t in ax.texts if "no timed" in t.get_text()]
    plt.close(fig)
    fig = plots.ratio_figure("M", cells)  # it has a score: the ratio plot keeps its panel
    assert list(_panels(fig)) == ["MME", "POPE", "SEED", "Average (3 datasets)"]
    plt.close(fig)


def test_a_dataset_without_score_or_pruned_cells_has_no_panel_and_one_dataset_no_average():
    cells = _cells(("MME",)) + [_cell("vanilla", 1.0, "POPE", 85.0), _cell("divprune_pre_llm", 0.333, "OCRBench", None)]
    fig = plots.ratio_figure("M", cells)
    # POPE: vanilla only; OCRBench: no score; the average: no pruned configuration has both datasets.
    assert list(_panels(fig)) == ["MME"]
    plt.close(fig)
    fig = plots.ratio_figure("M", _cells(("MME",)))
    assert list(_panels(fig)) == ["MME"]  # the average of one dataset is that dataset
    plt.close(fig)
    nothing = [_cell("vanilla", 1.0, "MME", 80.0, ms=None), _cell("fastv_intra_llm@L2", 0.5, "MME", 70.0, ms=None)]
    assert plots.cost_figure("M", nothing, "prefill_ms") is None


def test_cost_figure_frontier_vanilla_and_ratio_labels():
    fig = plots.cost_figure("M", _cells(("MME",)), "gflops")
    (ax,) = fig.axes
    assert ax.get_xlabel().startswith("decoder prefill GFLOPs")
    stars = [line for line in ax.get_lines() if line.get_marker() == "*"]
    assert len(stars) == 1 and list(stars[0].get_ydata()) == [90.0]
    labels = sorted(t.get_text() for t in ax.texts)
    assert labels == sorted(["33.3%", "22.2%", "11.1%"] * 3)
    plt.close(fig)


def test_make_plots_writes_each_figure_once(tmp_path):
    cells = _cells()
    paths = plots.make_plots(tmp_path, tmp_path, cells, costs=("prefill_ms", "gflops"))
    assert [p.name for p in paths] == ["M_accuracy_vs_ratio.png", "M_accuracy_vs_prefill.png", "M_accuracy_vs_gflops.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- the demo's plot
def _demo_rows(tie: bool = True) -> list[dict]:
    rows = [{"family": "f", "method": "vanilla", "ratio": 1.0, **{t: 100.0 for t in proxy_data.TYPES}, "avg": 100.0,
             "kept": 64.0, "visual": 64}]
    for i, r in enumerate(demo.RATIOS):
        for m in ("random_pre_llm", "divprune_pre_llm", "fastv_intra_llm"):
            acc = {t: 100.0 if (tie and m != "fastv_intra_llm") else 50.0 + 10 * i for t in proxy_data.TYPES}
            rows.append({"family": "f", "method": m, "ratio": r, **acc, "avg": 100.0, "kept": round(64 * r), "visual": 64})
    return rows


def test_demo_plot_ticks_ties_and_panels(tmp_path, monkeypatch):
    figs = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig))
    path = demo.plot(_demo_rows(), "f", tmp_path / "f.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (fig,) = figs
    panels = _panels(fig)
    assert list(panels) == [*proxy_data.TYPES, "average"]
    for title, ax in panels.items():
        assert list(ax.get_xticks()) == pytest.approx(sorted(demo.RATIOS)), title
        assert [t.get_text() for t in ax.get_xticklabels()] == ["11.1 %\n7/64 tokens", "22.2 %\n14/64 tokens",
                                                                "33.3 %\n21/64 tokens"]
        lines = _method_lines(ax)
        div, rnd = lines["divprune_pre_llm"], lines["random_pre_llm"]
        assert list(div.get_ydata()) == list(rnd.get_ydata()) == [100.0] * 3  # tied with each other and vanilla
        assert all(a != b for a, b in zip(div.get_xdata(), rnd.get_xdata())) and div.get_marker() != rnd.get_marker()
        assert ax.get_ylim()[1] > 100  # a tie at 100 is not cut by the frame
    (legend,) = fig.legends
    assert "vanilla (100 % tokens)" in [t.get_text() for t in legend.get_texts()]
    monkeypatch.undo()
    plt.close("all")


def test_demo_plot_leaves_out_a_type_without_scores(tmp_path, monkeypatch):
    rows = _demo_rows()
    for r in rows:
        r["text"] = None
    figs = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig))
    demo.plot(rows, "f", tmp_path / "f.png")
    assert list(_panels(figs[0])) == ["global", "attribute", "counting", "existence", "average"]
    monkeypatch.undo()
    plt.close("all")


def test_demo_and_sweep_plots_style_a_method_alike():
    """The demo labels FastV ``fastv_intra_llm``, the sweep's tables ``fastv_intra_llm@L2``: same styles."""
    mine = plot_style.method_styles(token.split(":", 1)[1] for token in demo.METHODS)
    sweep = plot_style.method_styles(["vanilla", "divprune_pre_llm", "fastv_intra_llm@L2", "random_pre_llm"])
    assert [mine[m] for m in ("divprune_pre_llm", "fastv_intra_llm", "random_pre_llm")] == \
        [sweep[m] for m in ("divprune_pre_llm", "fastv_intra_llm@L2", "random_pre_llm")]


def test_cost_labels_of_tied_points_do_not_overlap():
    """DivPrune and random tie on cost and score in these cells: their ratio labels still go apart,
    inside the frame, clear of vanilla's star."""
    fig = plots.cost_figure("M", _cells(("MME",), tie=True), "gflops")
    (ax,) = fig.axes
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert len(boxes) == 9
    frame = ax.get_window_extent(renderer)
    for i, a in enumerate(boxes):
        assert frame.x0 <= a.x0 and a.x1 <= frame.x1 and frame.y0 <= a.y0 and a.y1 <= frame.y1
        assert not any(a.overlaps(b) for b in boxes[i + 1:]), ax.texts[i].get_text()
    (star,) = [line for line in ax.get_lines() if line.get_marker() == "*"]
    sx, sy = ax.transData.transform((star.get_xdata()[0], star.get_ydata()[0]))
    assert not any(b.contains(sx, sy) for b in boxes)
    plt.close(fig)


def test_the_frontier_is_in_the_legend_only_where_drawn():
    dominated = [_cell("vanilla", 1.0, "MME", 80.0, ms=5.0), _cell("fastv_intra_llm@L2", 0.5, "MME", 70.0, ms=9.0)]
    fig = plots.cost_figure("M", dominated, "prefill_ms")  # vanilla is faster and better: a one-point frontier
    assert "frontier" not in [t.get_text() for t in fig.legends[0].get_texts()]
    plt.close(fig)
    fig = plots.cost_figure("M", _cells(("MME",)), "prefill_ms")
    assert "frontier" not in [t.get_text() for t in fig.legends[0].get_texts()]  # every cell 10 ms: vanilla wins
    plt.close(fig)
    fig = plots.cost_figure("M", _cells(("MME",)), "gflops")
    assert "frontier" in [t.get_text() for t in fig.legends[0].get_texts()]
    plt.close(fig)
