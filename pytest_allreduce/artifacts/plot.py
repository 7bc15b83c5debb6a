"""The latency plot: fused-job latency against batch size per backend, the choice marked."""

from __future__ import annotations

import io

from ..model import GroupKey
from ..results import ResultStore
from ..selection import SELECTION_JOB, Selection
from .index import group_data


def plot_png(store: ResultStore, key: GroupKey, selection: Selection, dev: str) -> bytes:
    """The latency plot as PNG bytes. Raises ImportError when matplotlib is missing.

    Uses matplotlib's object API with the Agg canvas directly, so the user's pyplot backend
    and global state are left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    data = group_data(store, key)
    fig = Figure(figsize=(9, 5.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for t in data.targets:
        points = [
            (bs, lat.median_us)
            for bs in data.sizes
            if (lat := data.latency(t.backend, bs, SELECTION_JOB)) is not None
        ]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, label=t.backend)
    ineligible = [
        (bs, lat.median_us)
        for t in data.targets
        for bs in data.sizes
        if (lat := data.latency(t.backend, bs, SELECTION_JOB)) is not None
        and not store.eligible(t.at(bs))
    ]
    if ineligible:
        ax.scatter(
            [p[0] for p in ineligible],
            [p[1] for p in ineligible],
            marker="x",
            s=40,
            color="red",
            zorder=4,
            label="not eligible (failed or unchecked suite)",
        )
    chosen = [(bs, c.median_us, c.backend_name) for bs, c in sorted(selection.choices.items())]
    if chosen:
        ax.scatter(
            [c[0] for c in chosen],
            [c[1] for c in chosen],
            s=90,
            facecolors="none",
            edgecolors="black",
            linewidths=1.3,
            zorder=5,
            label="chosen",
        )
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("batch size (rows)")
    ax.set_ylabel(f"{SELECTION_JOB} job median latency (us)")
    ax.set_title(f"tp{key.world_size}, hidden {key.hidden}, {key.dtype}, {dev}")
    ax.grid(True, which="both", alpha=0.3)
    if ax.has_data():
        ax.legend(fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    description = "chosen: " + ", ".join(f"{bs}={name}" for bs, _, name in chosen)
    fig.savefig(
        buffer,
        format="png",
        dpi=110,
        metadata={"Title": ax.get_title(), "Description": description},
    )
    return buffer.getvalue()
