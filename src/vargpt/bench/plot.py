"""The PNG of `vargpt bench`: cost per image against resolution, one line per batch size."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any


def plot_benchmark(report: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Two panels: seconds per image and share of the matmul peak, against resolution, per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = report["generation"]
    figure = Figure(figsize=(10, 4), dpi=100)
    left, right = figure.subplots(1, 2)
    for batch in sorted({r["batch_size"] for r in rows}):
        mine = sorted((r for r in rows if r["batch_size"] == batch), key=lambda r: r["resolution"])
        xs = [r["resolution"] for r in mine]
        left.plot(xs, [r["seconds_per_image"] for r in mine], marker="o", label=f"batch {batch}")
        right.plot(xs, [100 * r["share_of_matmul_peak"] for r in mine], marker="o", label=f"batch {batch}")
    left.set(xlabel="resolution (px)", ylabel="seconds per image", yscale="log", title="generation cost")
    right.set(xlabel="resolution (px)", ylabel="% of measured matmul peak", title="achieved FLOP/s share")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(f"{report['preset']} on {report['device']} ({report['dtype']})")
    figure.tight_layout()
    figure.savefig(path)
