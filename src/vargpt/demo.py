"""`vargpt demo`: generate, answer and edit on one model and write a self-contained HTML report."""

from __future__ import annotations

import base64
import html
import io
import time
from pathlib import Path
from typing import Any

from PIL import Image

DEMO_PROMPTS = ("a photo of a red circle", "a blue square above a yellow triangle", "draw three green triangles")
DEMO_QUESTION = "Which colour is the circle?"
DEMO_EDIT = "Change the colour of the circle to blue."


def _png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def demo_scene(size: int = 32) -> Image.Image:
    """A shapes-world scene: a large red circle in the centre of a white picture."""
    from .data.shapes_render import render
    from .data.shapes_scene import Scene, ShapeInstance, ShapesWorldConfig

    return render(Scene((ShapeInstance((1, 1), "circle", "red", "large"),)), ShapesWorldConfig(), size)


def run_demo(model: str, out_dir: str | Path, seed: int = 0, **load_kwargs: Any) -> Path:
    from .pipeline import VARGPTPipeline

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    pipe = VARGPTPipeline.from_pretrained(model, **load_kwargs)
    rows: list[str] = []
    for prompt in DEMO_PROMPTS:
        t0 = time.perf_counter()
        images = pipe.generate(prompt, num_images=4, seed=seed)
        rows.append(_row(f"generate: {prompt}", images, f"4 images in {time.perf_counter() - t0:.2f} s"))
    scene = demo_scene()
    t0 = time.perf_counter()
    answer = pipe.chat(DEMO_QUESTION, images=[scene], max_new_tokens=24)
    rows.append(_row(f"question: {DEMO_QUESTION}", [scene], f"answer: {answer!r} ({time.perf_counter() - t0:.2f} s)"))
    t0 = time.perf_counter()
    edited = pipe.edit(scene, DEMO_EDIT, seed=seed)
    rows.append(_row(f"edit: {DEMO_EDIT}", [scene, edited], f"{time.perf_counter() - t0:.2f} s"))
    total = time.perf_counter() - started
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>vargpt demo</title>"
        "<style>body{font-family:sans-serif;margin:2em}img{image-rendering:pixelated;width:192px;margin:4px;"
        "border:1px solid #ccc}td{padding:8px;vertical-align:top}</style></head><body>"
        f"<h1>vargpt demo</h1><p>model: {html.escape(str(model))}; seed {seed}; total {total:.1f} s</p>"
        f"<table>{''.join(rows)}</table></body></html>"
    )
    report = out / "report.html"
    report.write_text(page, encoding="utf-8")
    return report


def _row(title: str, images: list[Image.Image], note: str) -> str:
    pictures = "".join(f"<img src='{_png_data_url(i)}' alt='{html.escape(title)}'>" for i in images)
    return f"<tr><td><b>{html.escape(title)}</b><br>{html.escape(note)}</td><td>{pictures}</td></tr>"
