"""`vargpt demo`: generate, answer and edit on one model and write a self-contained HTML report.

Every output is marked right or wrong by the shapes world's own checks: the detector reads each drawn picture and
the GenEval rules of its prompt judge it, the answer is compared with the scene's, and the edit with its target
scene. A model with a card (`model_card.json`) has its measured scores shown beside them, so three pictures are
not mistaken for the model's quality.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..model_card import ModelCard, model_card_of
from .options import add_model_arguments, model_load_kwargs

DEMO_PROMPTS = ("a photo of a red circle", "a blue square above a yellow triangle", "draw three green triangles")
# What each prompt asks for, in GenEval's metadata format (anchor first, then the object placed relative to it)
DEMO_PROMPT_METADATA: dict[str, dict[str, Any]] = {
    "a photo of a red circle": {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}]},
    "a blue square above a yellow triangle": {
        "tag": "position",
        "include": [
            {"class": "triangle", "count": 1, "color": "yellow"},
            {"class": "square", "count": 1, "color": "blue", "position": ["above", 0]},
        ],
    },
    "draw three green triangles": {
        "tag": "counting",
        "include": [{"class": "triangle", "count": 3, "color": "green"}],
        "exclude": [{"class": "triangle", "count": 4}],
    },
}
DEMO_QUESTION = "Which colour is the circle?"
DEMO_ANSWER = "red"  # the demo scene's circle
DEMO_EDIT = "Change the colour of the circle to blue."
IMAGES_PER_PROMPT = 4


def register_demo_command(subparsers: argparse._SubParsersAction) -> None:
    """Add `demo` to a `vargpt` sub-command parser."""
    p = subparsers.add_parser("demo", help="chat, generate and edit on a model; write an HTML report")
    add_model_arguments(p)
    p.add_argument("--out", default="vargpt-demo", help="output folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--web", action="store_true", help="serve the interactive web demo instead (needs gradio)")
    p.add_argument("--host", default="127.0.0.1", help="web demo interface (default: %(default)s)")
    p.add_argument("--port", type=int, default=7860, help="web demo port (default: %(default)s)")
    p.set_defaults(func=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    """The HTML report, or with --web the interactive page (until interrupted)."""
    if args.web:
        from ..serving.web import launch_web_demo

        launch_web_demo(args.model, host=args.host, port=args.port, **model_load_kwargs(args))
        return 0
    path = run_demo(args.model, args.out, seed=args.seed, **model_load_kwargs(args))
    print(f"report written to {path}")
    return 0


def _png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def demo_scene(size: int = 32) -> Image.Image:
    """A shapes-world scene: a large red circle in the centre of a white picture."""
    from ..shapes.render import render
    from ..shapes.scene import ShapesWorldConfig

    return render(_scene("red"), ShapesWorldConfig(), size)


def _scene(colour: str):
    """The demo's symbolic scene (a large circle of `colour` in the centre, white background)."""
    from ..shapes.scene import Scene, ShapeInstance

    return Scene((ShapeInstance((1, 1), "circle", colour, "large"),))


@dataclass(frozen=True)
class Mark:
    """One output's verdict: right or wrong, and why it is wrong (what the detector saw)."""

    right: bool
    reason: str = ""

    def html(self) -> str:
        if self.right:
            return "<span class='right'>&#10003; right</span>"
        return f"<span class='wrong'>&#10007; wrong</span> <small>{html.escape(self.reason)}</small>"


def mark_generation(image: Image.Image, prompt: str) -> Mark:
    """Right when the detector finds what `prompt` asks for (GenEval's rules, as `vargpt eval shapes` scores)."""
    from ..shapes.scoring import evaluate_generated_image

    right, reason = evaluate_generated_image(image, DEMO_PROMPT_METADATA[prompt])
    return Mark(right, reason.replace("\n", "; "))


def mark_answer(answer: str) -> Mark:
    from ..shapes.scoring import normalize_answer

    said = normalize_answer(answer)
    return Mark(said == DEMO_ANSWER, f"expected {DEMO_ANSWER!r}, got {said!r}")


def mark_edit(edited: Image.Image) -> Mark:
    """Right when the edited picture shows exactly the target scene (a blue circle where the red one was)."""
    from ..shapes.scoring import edit_check

    return Mark(*edit_check(edited, _scene("blue"), _scene("red")))


def run_demo(model: str, out_dir: str | Path, seed: int = 0, **load_kwargs: Any) -> Path:
    from ..pipeline import VARGPTPipeline

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    pipe = VARGPTPipeline.from_pretrained(model, **load_kwargs)
    rows: list[str] = []
    marks: list[Mark] = []
    for prompt in DEMO_PROMPTS:
        t0 = time.perf_counter()
        images = pipe.generate(prompt, num_images=IMAGES_PER_PROMPT, seed=seed)
        note = f"{IMAGES_PER_PROMPT} images in {time.perf_counter() - t0:.2f} s"
        image_marks = [mark_generation(image, prompt) for image in images]
        marks += image_marks
        rows.append(_row(f"generate: {prompt}", list(zip(images, image_marks, strict=True)), note))
    scene = demo_scene()
    t0 = time.perf_counter()
    answer = pipe.chat(DEMO_QUESTION, images=[scene], max_new_tokens=24)
    note = f"answer: {answer!r} ({time.perf_counter() - t0:.2f} s)"
    marks.append(mark_answer(answer))
    rows.append(_row(f"question: {DEMO_QUESTION}", [(scene, None)], note, marks[-1]))
    t0 = time.perf_counter()
    edited = pipe.edit(scene, DEMO_EDIT, seed=seed)
    marks.append(mark_edit(edited))
    rows.append(_row(f"edit: {DEMO_EDIT}", [(scene, None), (edited, marks[-1])], f"{time.perf_counter() - t0:.2f} s"))
    total = time.perf_counter() - started
    right = sum(m.right for m in marks)
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>vargpt demo</title>"
        "<style>body{font-family:sans-serif;margin:2em}img{image-rendering:pixelated;width:192px;"
        "border:1px solid #ccc}figure{display:inline-block;margin:4px;max-width:196px;vertical-align:top}"
        "td{padding:8px;vertical-align:top}.right{color:#080}.wrong{color:#b00}</style></head><body>"
        f"<h1>vargpt demo</h1><p>model: {html.escape(str(model))}; seed {seed}; total {total:.1f} s</p>"
        f"<p id='marks'>{right} of {len(marks)} outputs right. Marks: the shapes detector reads each picture and "
        "the prompt's GenEval rules judge it (as <code>vargpt eval shapes</code> scores); the answer is compared "
        "with the scene's colour, the edit with its target scene.</p>"
        f"{_scores(model_card_of(pipe))}<table>{''.join(rows)}</table></body></html>"
    )
    report = out / "report.html"
    report.write_text(page, encoding="utf-8")
    return report


def _row(title: str, images: list[tuple[Image.Image, Mark | None]], note: str, mark: Mark | None = None) -> str:
    """A table row: the title, its note (and the mark of a text answer), then each picture with its own mark."""
    pictures = "".join(
        f"<figure><img src='{_png_data_url(image)}' alt='{html.escape(title)}'>"
        f"{'' if image_mark is None else '<figcaption>' + image_mark.html() + '</figcaption>'}</figure>"
        for image, image_mark in images
    )
    answer_mark = "" if mark is None else "<br>" + mark.html()
    return f"<tr><td><b>{html.escape(title)}</b><br>{html.escape(note)}{answer_mark}</td><td>{pictures}</td></tr>"


def _scores(card: ModelCard | None) -> str:
    """The model card's measured scores as a table (nothing for a model without a card)."""
    if card is None or not card.scores:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(task)}</td><td><b>{html.escape(str(entry['score']))}</b></td>"
        f"<td>{html.escape(str(entry.get('measured_on', '')))}<br><small>{html.escape(str(entry.get('detail', '')))}"
        f"</small></td><td><small>{html.escape(str(entry.get('source', '')))}</small></td></tr>"
        for task, entry in card.scores.items()
    )
    return (
        f"<h2>Measured scores of {html.escape(card.model)}</h2><p>From its model card; the marks below are a few "
        "samples, these are the scores on whole test splits.</p>"
        f"<table id='scores'><tr><th>task</th><th>score</th><th>measured on</th><th>source</th></tr>{rows}</table>"
        "<h2>This run</h2>"
    )
