"""The user-facing `vargpt chat | generate | edit | serve` commands.

`register_commands(subparsers)` adds them to the `vargpt` parser. Each handler returns an exit code and raises
`ValueError` / `FileNotFoundError` for user errors (the caller turns those into exit code 2). User input is
checked before the model loads, so a typo fails in milliseconds rather than after loading weights.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from PIL import Image

from ..configuration import PRESETS
from ..conversation import require_prompt
from ..model_card import ModelCard, model_card_of
from .options import add_image_arguments, add_model_arguments, image_config, model_load_kwargs

# the image settings `generate` and `edit` take (besides --preset)
IMAGE_COMMAND_SETTINGS = ("cfg_scale", "tau", "top_k", "top_p", "resolution", "uncond_mode")
EXIT_COMMANDS = ("/exit", "/quit")
# typed without the slash they still mean "leave", never a prompt (a drawing of "exit" helps nobody)
BARE_EXIT_WORDS = ("exit", "quit", "exit()", "quit()")


def register_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `chat`, `generate`, `edit` and `serve` to a `vargpt` sub-command parser."""
    p = subparsers.add_parser("chat", help="chat with a model (one question, or interactive from stdin)")
    p.add_argument("prompt", nargs="?", default=None, help="the question; omit it to chat interactively")
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="an image for the first turn")
    p.add_argument(
        "--video",
        action="append",
        default=[],
        metavar="PATH",
        help='a video file for the first turn (MP4, WebM/MKV, GIF, AVI; needs pip install "vargpt[video]")',
    )
    add_model_arguments(p)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); above 0 samples")
    p.add_argument("--seed", type=int, default=0, help="seed of turn 1; turn t uses seed + t - 1")
    p.add_argument("--no-images", action="store_true", help="answer in text only (the model never draws)")
    p.add_argument("--out", default="vargpt-chat", help="folder for images the model draws (default: %(default)s)")
    p.set_defaults(func=run_chat)

    p = subparsers.add_parser("generate", help="text-to-image in batches: PNGs, a contact sheet, generations.json")
    p.add_argument("prompt", nargs="?", default=None, help="one prompt (or use --prompts)")
    p.add_argument("--prompts", default=None, metavar="FILE", help='one prompt per line, or JSONL with "prompt"')
    p.add_argument("-n", "--num-images", type=int, default=1, help="images per prompt (default: 1)")
    _image_arguments(p)
    p.add_argument("--batch-size", type=int, default=8, help="images per model call (default: %(default)s)")
    p.add_argument("--out", default="vargpt-generations", help="output folder (default: %(default)s)")
    p.set_defaults(func=run_generate)

    p = subparsers.add_parser("edit", help="edit an image by an instruction")
    p.add_argument("image", help="the image file to edit")
    p.add_argument("instruction", help='what to change, e.g. "make the circle blue"')
    _image_arguments(p)
    p.add_argument("--out", default=None, help="output PNG (default: <image name>-edited.png here)")
    p.set_defaults(func=run_edit)

    from ..serving.server import add_serve_arguments

    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (needs the 'serve' extra)")
    add_serve_arguments(p)
    p.add_argument("--ui", action="store_true", help="serve the Gradio web demo on --host/--port instead")
    p.set_defaults(func=run_serve)


def _image_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    add_image_arguments(
        p,
        IMAGE_COMMAND_SETTINGS,
        preset_help="image settings preset: original-code or paper (default: the model's own settings)",
        helps={"resolution": "square side in pixels (default: the model's, e.g. 512)"},
    )


# -- chat ---------------------------------------------------------------------------------------------------------
def run_chat(args: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """One answer when a prompt is given, otherwise a conversation read line by line: it opens with a banner saying
    how to leave and ends at end of input or a line that `is_exit_command` (never drawing for it)."""
    from ..image_io import load_image
    from ..video_io import load_video

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if args.prompt is not None:
        require_prompt(args.prompt)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    images = [load_image(_existing_file(path, "image")) for path in args.image]
    videos = [load_video(_existing_file(path, "video")) for path in args.video]
    pipe = _load(args)
    session = _ChatSession(pipe, args, stdout, model_card_of(pipe))
    if args.prompt is not None:
        session.turn(args.prompt, images, videos)
        return 0
    print(chat_banner(args.model), file=sys.stderr, flush=True)
    interactive = stdin.isatty()
    pending_images, pending_videos = images, videos
    for line in _lines(stdin, "you> " if interactive else None):
        text = line.strip()
        if not text:
            continue
        if is_exit_command(text):
            break
        session.turn(text, pending_images, pending_videos)
        pending_images, pending_videos = [], []
    return 0


def chat_banner(model: str) -> str:
    """The line an interactive chat opens with: whom you talk to and how to leave."""
    return f"Chatting with {model}. Type /exit or /quit (or press Ctrl-D) to leave."


def is_exit_command(text: str) -> bool:
    """Whether a chat line asks to leave: /exit, /quit, or the bare words exit / quit (any case)."""
    word = text.strip().lower()
    return word in EXIT_COMMANDS or word in BARE_EXIT_WORDS


class _ChatSession:
    """History and output of one chat: streams each answer and saves the images the model draws.

    Images are saved as `turnNNN-imageK.png`, NNN counting on from the highest turn already in the output folder, so
    a second run into the same folder (the default one) keeps the first run's images.
    """

    def __init__(self, pipe: Any, args: argparse.Namespace, stdout: TextIO, card: ModelCard | None = None) -> None:
        self.pipe = pipe
        self.args = args
        self.stdout = stdout
        self.card = card  # the model's card, if it has one: turns with words it never saw earn a warning
        self.history: list[dict] = []
        self.images: list[Image.Image] = []
        self.videos: list[list[Image.Image]] = []
        self.turns = 0
        self.turn_offset: int | None = None  # turns of earlier runs in the output folder, read at the first save

    def turn(self, text: str, new_images: Sequence[Image.Image], new_videos: Sequence[list[Image.Image]] = ()) -> None:
        from ..conversation import StreamDecoder, assistant_message, converse_batch, user_message

        if self.card is not None:
            _warn(self.card.warnings(text))
        message = user_message(text, len(new_images), len(new_videos))
        decoder = StreamDecoder(self.pipe)
        image_start = self.pipe.model.config.image_gen_start_token_id

        def on_token(ids_B) -> None:
            token = int(ids_B[0])
            if decoder.finished:
                return
            if token == image_start:
                self.stdout.write(" [drawing an image] ")
            self.stdout.write(decoder.push(token))
            self.stdout.flush()

        sampling: dict[str, Any] = {"max_new_tokens": self.args.max_new_tokens}
        if self.args.temperature > 0:
            sampling |= {"do_sample": True, "temperature": self.args.temperature}
        turn = converse_batch(
            self.pipe,
            [[*self.history, message]],
            [[*self.images, *new_images]],
            **({"videos": [[*self.videos, *new_videos]]} if self.videos or new_videos else {}),
            on_token=on_token,
            seed=self.args.seed + self.turns,
            allow_images=not self.args.no_images,
            **sampling,
        )[0]
        self.stdout.write(decoder.flush() + "\n")
        self.turns += 1
        for k, image in enumerate(turn.images):
            path = self._save(image, k + 1)
            self.stdout.write(f"[image saved: {path}]\n")
        self.stdout.flush()
        self.history += [message, assistant_message(turn.text)]
        self.images += list(new_images)
        self.videos += list(new_videos)

    def _save(self, image: Image.Image, number: int) -> Path:
        """Write image `number` of this turn to a file no other run wrote: created exclusively, and on a clash
        (a run writing into the same folder right now) the turn numbers move past that run's."""
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        if self.turn_offset is None:
            self.turn_offset = self._last_saved_turn(out)
        while True:
            path = out / f"turn{self.turn_offset + self.turns:03d}-image{number}.png"
            try:
                with open(path, "xb") as handle:
                    image.save(handle, format="PNG")
                return path
            except FileExistsError:
                self.turn_offset = self._last_saved_turn(out)

    @staticmethod
    def _last_saved_turn(folder: Path) -> int:
        """The highest NNN among the `turnNNN-imageK.png` files in `folder` (0 when there are none)."""
        turns = [0]
        for path in folder.glob("turn*-image*.png"):
            head, _, image_number = path.stem.partition("-image")
            if head[4:].isdigit() and image_number.isdigit():
                turns.append(int(head[4:]))
        return max(turns)


def _lines(stream: TextIO, prompt: str | None) -> Iterator[str]:
    while True:
        if prompt:
            print(prompt, end="", file=sys.stderr, flush=True)
        line = stream.readline()
        if not line:
            return
        yield line


# -- generate -----------------------------------------------------------------------------------------------------
def run_generate(args: argparse.Namespace) -> int:
    """Batched text-to-image; every image's prompt, seed, batch and settings go to generations.json."""
    from tqdm import tqdm

    prompts = _collect_prompts(args.prompt, args.prompts)
    if args.num_images < 1:
        raise ValueError(f"-n must be >= 1, got {args.num_images}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    image_config(args)  # refuse bad settings before the model loads
    pipe = _load(args)
    settings = image_config(args, pipe.image_config)
    _check_resolution(pipe, args.resolution)
    resolved = settings.updated(resolution=args.resolution or pipe.model.config.image_resolution)
    card = model_card_of(pipe)
    warnings = [] if card is None else card.warnings(prompts, resolved.resolution)
    _warn(warnings)
    rows = [(i, p, s) for i, p in enumerate(prompts) for s in range(args.num_images)]
    batches = [rows[start : start + args.batch_size] for start in range(0, len(rows), args.batch_size)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    images: list[Image.Image] = []
    for b, batch in enumerate(tqdm(batches, desc="generating", unit="batch", file=sys.stderr)):
        batch_prompts = [p for _, p, _ in batch]
        drawn = pipe.generate(batch_prompts, num_images=1, seed=args.seed + b, **resolved.to_dict())
        for row, ((index, prompt, sample), image) in enumerate(zip(batch, drawn, strict=True)):
            name = f"{len(images):04d}.png"
            image.save(out / name)
            images.append(image)
            records.append(
                {
                    "file": name,
                    "prompt": prompt,
                    "prompt_index": index,
                    "sample": sample,
                    "batch": b,
                    "row": row,
                    "batch_seed": args.seed + b,
                    "batch_prompts": batch_prompts,
                }
            )
    _contact_sheet(images).save(out / "contact_sheet.png")
    report = {
        "model": _model_reference(args.model, args.revision),
        "image_settings": resolved.to_dict(),
        "preset": args.preset or "original-code",
        "seed": args.seed,
        "num_images_per_prompt": args.num_images,
        "batch_size": args.batch_size,
        "reproduce": (
            "VARGPTPipeline.from_pretrained(model).generate(batch_prompts, num_images=1, seed=batch_seed, "
            "**image_settings)[row]: the model samples a batch from one random stream, so an image depends on its "
            "batch; with --batch-size 1 it depends only on its prompt and seed"
        ),
        "contact_sheet": "contact_sheet.png",
        "warnings": warnings,
        "images": records,
    }
    (out / "generations.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(f"{len(images)} images, contact sheet and generations.json written to {out}")
    return 0


def _collect_prompts(prompt: str | None, prompts_file: str | None) -> list[str]:
    if (prompt is None) == (prompts_file is None):
        raise ValueError("give exactly one of PROMPT or --prompts FILE")
    if prompt is not None:
        prompts = [prompt]
    else:
        lines = Path(_existing_file(prompts_file, "prompts file")).read_text(encoding="utf-8").splitlines()
        prompts = [_prompt_of_line(line, n, prompts_file) for n, line in enumerate(lines, 1) if line.strip()]
        if not prompts:
            raise ValueError(f"the prompts file {prompts_file} holds no prompts")
    for n, text in enumerate(prompts, 1):
        require_prompt(text, f"prompt {n}")
    return prompts


def _prompt_of_line(line: str, number: int, source: str) -> str:
    if not line.lstrip().startswith("{"):
        return line.strip()
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{source} line {number} is not valid JSON: {error}") from None
    if not isinstance(row.get("prompt"), str):
        raise ValueError(f'{source} line {number} has no string "prompt" field')
    return row["prompt"]


def _contact_sheet(images: Sequence[Image.Image], max_columns: int = 8, gap: int = 4) -> Image.Image:
    """All images on one white sheet, row-major in generation order."""
    columns = min(max_columns, len(images))
    rows = math.ceil(len(images) / columns)
    width = max(i.width for i in images)
    height = max(i.height for i in images)
    sheet = Image.new("RGB", (columns * (width + gap) + gap, rows * (height + gap) + gap), "white")
    for k, image in enumerate(images):
        r, c = divmod(k, columns)
        sheet.paste(image, (gap + c * (width + gap), gap + r * (height + gap)))
    return sheet


# -- edit ---------------------------------------------------------------------------------------------------------
def run_edit(args: argparse.Namespace) -> int:
    from ..image_io import load_image

    source = load_image(_existing_file(args.image, "image"))
    require_prompt(args.instruction, "the instruction", "say what to change")
    image_config(args)  # refuse bad settings before the model loads
    out = Path(args.out) if args.out else Path(f"{Path(args.image).stem}-edited.png")
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must name a .png file, got {out}")
    pipe = _load(args)
    settings = image_config(args, pipe.image_config)
    _check_resolution(pipe, args.resolution)
    card = model_card_of(pipe)
    if card is not None:
        _warn(card.warnings(args.instruction, args.resolution))
    changes = {k: v for k, v in settings.to_dict().items() if k != "resolution"}
    edited = pipe.edit(source, args.instruction, seed=args.seed, resolution=args.resolution, **changes)
    out.parent.mkdir(parents=True, exist_ok=True)
    edited.save(out)
    print(f"edited image written to {out}")
    score = None if card is None else card.score_line("editing")
    if score is not None:
        print(f"note: {score}")
    return 0


# -- serve --------------------------------------------------------------------------------------------------------
def run_serve(args: argparse.Namespace) -> int:
    if getattr(args, "ui", False):
        from ..serving.web import launch_web_demo

        launch_web_demo(args.model, host=args.host, port=args.port, **model_load_kwargs(args))
        return 0
    from ..serving.server import config_from_args, serve

    config_from_args(args)  # refuse bad options before the model loads
    return serve(args)


# -- shared -------------------------------------------------------------------------------------------------------
def _warn(lines: Sequence[str]) -> None:
    """Warnings of the model card: one line each on stderr, never an error (the command goes on)."""
    for line in lines:
        print(f"vargpt: warning: {line}", file=sys.stderr, flush=True)


def _existing_file(path: str, what: str) -> str:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} {path!r} does not exist or is not a file")
    return path


def _check_resolution(pipe: Any, resolution: int | None) -> None:
    if resolution is None:
        return
    try:
        pipe.model.generation_schedule(resolution)
    except ValueError as error:
        raise ValueError(f"--resolution {resolution} is not supported by this model: {error}") from None


def _load(args: argparse.Namespace) -> Any:
    from ..pipeline import VARGPTPipeline

    return VARGPTPipeline.from_pretrained(args.model, **model_load_kwargs(args))


def _model_reference(model: str, revision: str | None = None) -> dict[str, Any]:
    """What generations.json records to reload the model: a folder's path, a preset's name and init seed,
    or a shipped model's name / a Hub id (and its revision)."""
    path = Path(model)
    if path.is_dir():
        return {"path": str(path.resolve())}
    if model in PRESETS:
        return {"name": model, "init_seed": 0}
    return {"name": model} | ({"revision": revision} if revision else {})
