"""The latency plot: fused-job latency against batch size per backend, and what was chosen.

Read top to bottom: each backend's median with its p10-p90 spread as a shaded band (dashed
where the variant can never be written to a config, so it cannot be chosen however fast it
is); red crosses where a backend was timed but is not eligible; on the right-hand axis the
speed-up of the chosen backend over what the server runs without a config file; under the
plot, the chosen backend per size as a coloured strip, each key covering the sizes the
consumer's nearest-key lookup sends to it.
"""

from __future__ import annotations

import io
import itertools
import math
from typing import Any

from ..consumer import profile_for
from ..model import GroupKey
from ..results import ResultStore
from ..selection import SELECTION_JOB, Selection
from ..serving import writable_variants
from .index import GroupData, group_data
from .server_default import gains

NO_WINNER_COLOR = "#d9d9d9"


def _colors(names: list[str]) -> dict[str, Any]:
    """One colour per backend, stable for a given set of names."""
    from matplotlib import colormaps

    palette = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: palette(i % palette.N) for i, name in enumerate(sorted(names))}


def _regions(sizes: list[int], low: float, high: float) -> list[tuple[int, float, float]]:
    """(key, from, to): the batch sizes the consumer's nearest-key lookup maps to each key."""
    bounds = [low, *((a + b) / 2 for a, b in itertools.pairwise(sizes)), high]
    return [(key, bounds[i], bounds[i + 1]) for i, key in enumerate(sizes)]


def _mantissa(value: float) -> int:
    """The leading digit of a positive number (2 for 200 or 0.2)."""
    return round(value / 10 ** math.floor(math.log10(value) + 1e-9))


def _power_of_two_ticks(low: float, high: float) -> list[int]:
    """Powers of two inside (low, high), at least 1: batch sizes are whole rows."""
    first, last = max(math.ceil(math.log2(low)), 0), math.floor(math.log2(high))
    return [2**k for k in range(first, last + 1)]


def _draw_backends(
    ax: Any, store: ResultStore, data: GroupData, colors: dict[str, Any]
) -> list[float]:
    """Median lines with their p10-p90 bands; returns every median drawn."""
    writable_names = writable_variants(profile_for(store.device))
    medians: list[float] = []
    for t in data.targets:
        points = [
            (bs, lat)
            for bs in data.sizes
            if (lat := data.latency(t.backend, bs, SELECTION_JOB)) is not None
        ]
        if not points:
            continue
        xs = [bs for bs, _ in points]
        ys = [lat.median_us for _, lat in points]
        medians += ys
        writable = t.backend in writable_names
        label = t.backend if writable else f"{t.backend} (cannot be written to a config)"
        ax.plot(
            xs,
            ys,
            color=colors[t.backend],
            linestyle="-" if writable else "--",
            linewidth=1.6 if writable else 1.1,
            marker="o" if writable else None,
            markersize=3,
            label=label,
            zorder=3,
        )
        ax.fill_between(
            xs,
            [lat.spread_us[0] for _, lat in points],
            [lat.spread_us[1] for _, lat in points],
            color=colors[t.backend],
            alpha=0.15 if writable else 0.07,
            linewidth=0,
            zorder=2,
        )
    return medians


def plot_png(store: ResultStore, key: GroupKey, selection: Selection, dev: str) -> bytes:
    """The latency plot as PNG bytes. Raises ImportError when matplotlib is missing."""
    fig = latency_figure(store, key, selection, dev)
    buffer = io.BytesIO()
    chosen = sorted(selection.choices.items())
    description = "chosen: " + ", ".join(f"{bs}={c.backend_name}" for bs, c in chosen)
    metadata = {"Title": fig.axes[0].get_title(), "Description": description}
    fig.savefig(buffer, format="png", dpi=110, metadata=metadata)
    return buffer.getvalue()


def latency_figure(store: ResultStore, key: GroupKey, selection: Selection, dev: str) -> Any:
    """The plot as a matplotlib Figure: its main axes, the speed-up axes (when any speed-up
    was measured) and the strip of chosen backends, each with its legend.

    Uses matplotlib's object API with the Agg canvas directly, so the user's pyplot backend
    and global state are left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    data = group_data(store, key)
    colors = _colors([t.backend for t in data.targets])
    fig = Figure(figsize=(12, 7), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 1, height_ratios=(14, 1))
    ax = fig.add_subplot(grid[0])
    strip = fig.add_subplot(grid[1], sharex=ax)

    medians = _draw_backends(ax, store, data, colors)
    ineligible = [
        (bs, lat.median_us)
        for t in data.targets
        for bs in data.sizes
        if (lat := data.latency(t.backend, bs, SELECTION_JOB)) is not None
        and not store.eligible(t.at(bs))
    ]
    handles, _ = ax.get_legend_handles_labels()
    handles.append(Patch(color="grey", alpha=0.3, label="p10-p90 of the samples"))
    if ineligible:
        handles.append(
            ax.scatter(
                [p[0] for p in ineligible],
                [p[1] for p in ineligible],
                marker="x",
                s=36,
                color="red",
                zorder=4,
                label="not eligible (failed or unchecked suite)",
            )
        )

    # The timed sizes (not those only a check ran at, such as a limit far above the plan).
    sizes = sorted({*store.batch_sizes(key), *selection.batch_sizes}) or [1]
    low, high = sizes[0] / 1.3, sizes[-1] * 1.3
    ax.set_xscale("log", base=2)
    ax.set_xlim(low, high)
    ticks = _power_of_two_ticks(low, high)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    strip.set_xticks(ticks, [str(t) for t in ticks])
    if medians and max(medians) > 20 * min(medians):
        ax.set_yscale("log")
        # Plain numbers, with 2x and 5x between the decades: microseconds read at a glance.
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(
            FuncFormatter(lambda v, _: f"{v:g}" if _mantissa(v) in (2, 5) else "")
        )
    ax.set_ylabel(f"{SELECTION_JOB} job latency, median (us)")
    ax.set_title(f"tp{key.world_size}, hidden {key.hidden}, {key.dtype}, {dev}")
    ax.grid(True, which="major", alpha=0.3)
    ax.tick_params(labelbottom=False)

    speedups = gains(store, key, selection)
    if speedups:
        right = ax.twinx()
        right.plot(
            [g.batch_size for g in speedups],
            [g.speedup for g in speedups],
            color="black",
            linestyle=":",
            marker="D",
            markersize=3,
            linewidth=1.2,
            zorder=5,
        )
        right.axhline(1.0, color="black", linewidth=0.6, alpha=0.4)
        right.set_ylim(0, max(2.0, max(g.speedup for g in speedups) * 1.1))
        right.set_ylabel("speed-up over no config file (x)")
        handles.append(
            Line2D(
                [],
                [],
                color="black",
                linestyle=":",
                marker="D",
                markersize=3,
                label="speed-up over no config file (right axis)",
            )
        )

    chosen_names: list[str] = []
    for rows, start, end in _regions(selection.batch_sizes, low, high):
        winner = selection.winner(rows)
        if winner is not None and winner not in chosen_names:
            chosen_names.append(winner)
        strip.axvspan(
            start,
            end,
            color=colors.get(winner, NO_WINNER_COLOR) if winner else NO_WINNER_COLOR,
            hatch=None if winner else "//",
            linewidth=0,
        )
    strip.set_yticks([])
    strip.set_ylabel("chosen", rotation=0, ha="right", va="center")
    strip.set_xlabel("batch size (rows); the strip: the backend the config names for each size")
    band_handles = [Patch(color=colors[n], label=f"chosen: {n}") for n in chosen_names]
    if any(selection.winner(rows) is None for rows in selection.batch_sizes):
        band_handles.append(Patch(facecolor=NO_WINNER_COLOR, hatch="//", label="no winner"))

    # Both legends right of the plot, clear of the speed-up axis when there is one.
    for axes, entries, title in ((ax, handles, "latency"), (strip, band_handles, "config")):
        if entries:
            axes.legend(
                handles=entries,
                fontsize="small",
                loc="upper left",
                bbox_to_anchor=(1.08 if speedups else 1.01, 1.0),
                title=title,
            )
    return fig
