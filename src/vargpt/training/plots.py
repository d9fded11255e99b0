"""Pictures a person would rather look at than read: loss curves and image sheets."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image


def loss_curve(log_history: Sequence[dict], path: str | Path, title: str) -> None:
    """Plot every `*loss` series (and DPO reward margin) of a Trainer log history against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, tuple[list[int], list[float]]] = {}
    for entry in log_history:
        step = entry.get("step")
        if step is None:
            continue
        for key, value in entry.items():
            if (key.endswith("loss") or key in ("rewards/margin", "l1", "mse")) and key != "train_loss":
                xs, ys = series.setdefault(key, ([], []))
                xs.append(step)
                ys.append(float(value))
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    for key, (xs, ys) in sorted(series.items()):
        ax.plot(xs, ys, label=key, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_title(title)
    if series:
        ax.legend(fontsize=7)
        if all(min(ys) > 0 for _, ys in series.values()):
            ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def image_rows(rows: Sequence[Sequence[Image.Image]], scale: int = 3, gap: int = 4) -> Image.Image:
    """Rows of equally sized images, enlarged with nearest-neighbour so pixels stay visible."""
    size = rows[0][0].size[0] * scale
    width = max(len(r) for r in rows) * (size + gap)
    sheet = Image.new("RGB", (width, len(rows) * (size + gap)), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            sheet.paste(image.resize((size, size), Image.NEAREST), (x * (size + gap), y * (size + gap)))
    return sheet
