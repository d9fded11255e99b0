"""The web demo: one page with three tabs (Chat, Generate, Edit) over a `VARGPTPipeline`, built with Gradio.

Gradio is not a dependency of vargpt (`pip install gradio`); only this module imports it. The page is meant
for a person at the machine: it listens on loopback by default, sends no analytics, makes no share link
unless asked and renders server-side nothing (no Node process). One pipeline holds one model whose
generation is not re-entrant, so every event shares one queue slot: requests run one at a time, in order.

A model with a card (`model_card.json`, see `vargpt.model_card`) gets a yellow one-line warning (`gr.Warning`)
when a prompt uses words it never saw in training or asks for a size it was not trained at, and the page states
its summary and, on the Edit tab, its measured editing score.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr
from PIL import Image, UnidentifiedImageError

from ..conversation import EmptyPromptError, require_prompt
from ..generation.config import IMAGE_PRESETS
from ..model_card import ModelCard, model_card_of

if TYPE_CHECKING:
    from ..pipeline import ChatTurn, VARGPTPipeline

# Every event names this concurrency group (limit 1), so chat, generate and edit never overlap.
MODEL_QUEUE = "vargpt-model"
_MODEL_EVENT: dict[str, Any] = {"concurrency_limit": 1, "concurrency_id": MODEL_QUEUE}
MAX_NEW_TOKENS_LIMIT = 1024
MAX_IMAGES_PER_PROMPT = 8
# the preset choice that keeps the image settings the checkpoint ships (image_generation_config.json)
MODEL_DEFAULTS = "model defaults"
EMPTY_ANSWER = "(the model answered with no text)"

# Small pictures (32 px for the test models) are shown enlarged, with visible pixels.
PAGE_CSS = (
    "#chat-box img, #gen-gallery img, #edit-input img, #edit-output img { image-rendering: pixelated; }\n"
    "#chat-box img { min-width: 128px; object-fit: contain; }"
)


def supported_resolutions(pipe: VARGPTPipeline) -> list[int]:
    """Square sizes the Generate tab offers, smallest first; the model's native size is always among them.

    A size is offered when the model builds a scale schedule for it and its last grid fits the decoder's 2D
    RoPE reference grid (the 1024 px class of the published model). Classes under half the native size are
    left out: the published model was trained at 256 and 512 px only (larger classes run, untrained).
    """
    config = pipe.model.config
    stride = config.image_tokenizer_config.downsample_factor
    largest = config.visual_decoder_config.rope_max_grid * stride
    native = config.image_resolution
    sizes = {native}
    for resolution in range(stride, largest + 1, stride):
        if 2 * resolution < native:
            continue
        try:
            pipe.model.generation_schedule(resolution)
        except ValueError:
            continue
        sizes.add(resolution)
    return sorted(sizes)


class _Handlers:
    """The event functions: turn UI values into pipeline calls and pipeline errors into `gr.Error`."""

    def __init__(self, pipe: VARGPTPipeline) -> None:
        self.pipe = pipe
        self.card = model_card_of(pipe)  # None: no warnings

    def warn(self, text: str, resolution: int | None = None) -> None:
        """The card's warnings as yellow notices on the page (outside an event: Python warnings); never a refusal."""
        for line in [] if self.card is None else self.card.warnings(text, resolution):
            gr.Warning(html.escape(line))

    def chat(
        self,
        message: dict | None,
        shown: list[dict],
        history: list[dict],
        max_new_tokens: float,
        seed: float | None,
    ) -> tuple[list[dict], list[dict], dict]:
        """One conversation turn. `shown` is the chatbot's messages, `history` the model's text-only memory.

        Earlier turns are remembered as text only: `converse` takes the pictures of the current turn, so a
        picture uploaded earlier is not seen again (upload it again to ask about it).
        """
        message = message or {}
        text = _required(
            message.get("text"), "Type a question or an instruction first (a picture alone is not a prompt)."
        )
        paths = [str(path) for path in message.get("files") or []]
        images = [_open_image(path) for path in paths]
        self.warn(text)
        turn = _call(
            self.pipe.converse,
            text,
            images,
            history=list(history),
            seed=_seed(seed),
            max_new_tokens=_positive_int(max_new_tokens, "max new tokens"),
        )
        user = [{"role": "user", "content": {"path": path}} for path in paths]
        user.append({"role": "user", "content": text})
        shown = [*shown, *user, *_assistant_messages(turn)]
        history = [*history, _text_message("user", text), _text_message("assistant", turn.text)]
        return shown, history, {"text": "", "files": []}

    def generate(
        self,
        prompt: str,
        num_images: float,
        seed: float | None,
        preset: str,
        cfg_scale: float,
        tau: float,
        top_p: float,
        resolution: float,
    ) -> list[Image.Image]:
        prompt = _required(prompt, "Describe the picture to draw first: the prompt is empty.")
        if preset != MODEL_DEFAULTS and preset not in IMAGE_PRESETS:
            raise _refusal(f"Unknown preset {preset!r}; choose {MODEL_DEFAULTS!r} or one of {sorted(IMAGE_PRESETS)}.")
        size = _positive_int(resolution, "resolution")
        self.warn(prompt, size)
        return _call(
            self.pipe.generate,
            prompt,
            num_images=_positive_int(num_images, "number of images"),
            seed=_seed(seed),
            preset=None if preset == MODEL_DEFAULTS else preset,
            cfg_scale=float(cfg_scale),
            tau=float(tau),
            top_p=float(top_p),
            resolution=size,
        )

    def edit(self, image: Image.Image | None, instruction: str, seed: float | None) -> Image.Image:
        if image is None:
            raise _refusal("Upload the picture to edit first.")
        instruction = _required(instruction, "Say how to change the picture: the instruction is empty.")
        self.warn(instruction)
        return _call(self.pipe.edit, image.convert("RGB"), instruction, seed=_seed(seed))

    def preset_values(self, preset: str) -> tuple[float, float, float]:
        """The cfg, tau and top-p sliders' values when a preset is picked."""
        config = self.pipe.image_config if preset == MODEL_DEFAULTS else IMAGE_PRESETS[preset]
        return config.cfg_scale, config.tau, config.top_p

    @staticmethod
    def clear() -> tuple[list, list, dict]:
        return [], [], {"text": "", "files": []}


def build_web_demo(pipe: VARGPTPipeline) -> gr.Blocks:
    """The page for one pipeline (not launched): Chat, Generate and Edit tabs sharing one model queue."""
    handlers = _Handlers(pipe)
    # Uploads and drawn pictures are cached as files by Gradio: drop them after an hour, and all at shutdown.
    with gr.Blocks(title="vargpt", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            "# vargpt\nAsk about pictures, draw them and edit them with one model." + _card_summary(handlers.card)
        )
        _chat_tab(handlers)
        _generate_tab(handlers)
        _edit_tab(handlers)
    demo.queue(default_concurrency_limit=1)
    return demo


def _chat_tab(handlers: _Handlers) -> None:
    config = handlers.pipe.model.config
    token_limit = min(MAX_NEW_TOKENS_LIMIT, config.text_config.max_position_embeddings)
    with gr.Tab("Chat", id="chat"):
        chatbot = gr.Chatbot(label="Conversation", elem_id="chat-box", height=420, feedback_options=None)
        history = gr.State([])
        chat_input = gr.MultimodalTextbox(
            placeholder="Ask a question; attach pictures with the clip button",
            file_types=["image"],
            file_count="multiple",
            show_label=False,
            elem_id="chat-input",
        )
        with gr.Row():
            max_new_tokens = gr.Slider(1, token_limit, value=min(128, token_limit), step=1, label="Max new tokens")
            chat_seed = gr.Number(value=0, precision=0, label="Seed (empty: random)")
            clear = gr.Button("Clear conversation", elem_id="chat-clear")
        chat_input.submit(
            handlers.chat,
            [chat_input, chatbot, history, max_new_tokens, chat_seed],
            [chatbot, history, chat_input],
            **_MODEL_EVENT,
        )
        clear.click(handlers.clear, None, [chatbot, history, chat_input], queue=False)


def _generate_tab(handlers: _Handlers) -> None:
    pipe = handlers.pipe
    own = pipe.image_config
    with gr.Tab("Generate", id="generate"), gr.Row():
        with gr.Column(scale=1):
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id="gen-prompt")
            with gr.Row():
                num_images = gr.Slider(1, MAX_IMAGES_PER_PROMPT, value=1, step=1, label="Number of images")
                seed = gr.Number(value=0, precision=0, label="Seed (empty: random)")
            preset = gr.Dropdown(
                [MODEL_DEFAULTS, *sorted(IMAGE_PRESETS)], value=MODEL_DEFAULTS, label="Preset", elem_id="gen-preset"
            )
            cfg_scale = gr.Slider(0.0, 10.0, value=own.cfg_scale, step=0.1, label="CFG scale")
            tau = gr.Slider(0.05, 2.0, value=own.tau, step=0.05, label="Tau (temperature)")
            top_p = gr.Slider(0.0, 1.0, value=own.top_p, step=0.01, label="Top-p")
            resolution = gr.Dropdown(
                supported_resolutions(pipe),
                value=pipe.model.config.image_resolution,
                label="Resolution (pixels, square)",
                elem_id="gen-res",
            )
            draw = gr.Button("Generate", variant="primary", elem_id="gen-button")
        with gr.Column(scale=1):
            gallery = gr.Gallery(label="Images", format="png", columns=2, elem_id="gen-gallery")
    preset.change(handlers.preset_values, preset, [cfg_scale, tau, top_p], queue=False)
    inputs = [prompt, num_images, seed, preset, cfg_scale, tau, top_p, resolution]
    draw.click(handlers.generate, inputs, gallery, **_MODEL_EVENT)
    prompt.submit(handlers.generate, inputs, gallery, **_MODEL_EVENT)


def _edit_tab(handlers: _Handlers) -> None:
    with gr.Tab("Edit", id="edit"):
        with gr.Row():
            with gr.Column(scale=1):
                source = gr.Image(type="pil", image_mode="RGB", label="Picture", elem_id="edit-input")
                instruction = gr.Textbox(label="Instruction", lines=2, elem_id="edit-instruction")
                seed = gr.Number(value=0, precision=0, label="Seed (empty: random)")
                apply = gr.Button("Edit", variant="primary", elem_id="edit-button")
            with gr.Column(scale=1):
                edited = gr.Image(type="pil", format="png", label="Edited", interactive=False, elem_id="edit-output")
        score = None if handlers.card is None else handlers.card.score_line("editing")
        if score:
            gr.Markdown(html.escape(score), elem_id="edit-score")
        apply.click(handlers.edit, [source, instruction, seed], edited, **_MODEL_EVENT)


def web_launch_options(host: str = "127.0.0.1", port: int = 7860, share: bool = False) -> dict[str, Any]:
    """Keyword arguments of `gr.Blocks.launch` for this demo: no SSR server, no MCP, no monitoring route."""
    return {
        "server_name": host,
        "server_port": port,
        "share": share,
        "ssr_mode": False,
        "mcp_server": False,
        "enable_monitoring": False,
        "show_error": True,
        "css": PAGE_CSS,
    }


def launch_web_demo(
    model: str, host: str = "127.0.0.1", port: int = 7860, share: bool = False, **load_kwargs: Any
) -> None:
    """Load `model` (checkpoint directory, shipped model, preset or Hub id; `load_kwargs` as
    `VARGPTPipeline.from_pretrained` takes them) and serve the demo until interrupted."""
    from ..pipeline import VARGPTPipeline

    pipe = VARGPTPipeline.from_pretrained(model, **load_kwargs)
    build_web_demo(pipe).launch(**web_launch_options(host, port, share))


# -- helpers ---------------------------------------------------------------------------------------------------
def _card_summary(card: ModelCard | None) -> str:
    """The header's second paragraph: what the model is, from its card (nothing for a model without one)."""
    if card is None or not card.facts.get("summary"):
        return ""
    return f"\n\n**{html.escape(card.model)}**: {html.escape(str(card.facts['summary']))}"


def _refusal(message: str) -> gr.Error:
    """An error the page shows as a message. Expected, so no traceback in the log; escaped, because Gradio
    renders the message as HTML and it may quote a file name or a prompt."""
    return gr.Error(html.escape(message), print_exception=False)


def _required(text: str | None, refusal: str) -> str:
    """The text without surrounding white space; `refusal` on the page when it is empty (the pipeline's check)."""
    try:
        return require_prompt(text).strip()
    except EmptyPromptError:
        raise _refusal(refusal) from None


def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a pipeline call; its ValueErrors (bad settings, unreadable input) become messages in the page."""
    try:
        return fn(*args, **kwargs)
    except ValueError as error:
        raise _refusal(str(error)) from None


def _open_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise _refusal(f"{Path(path).name} is not a picture that can be read ({error.__class__.__name__}).") from None


def _seed(value: float | None) -> int | None:
    return None if value is None else int(value)


def _positive_int(value: float | None, what: str) -> int:
    if value is None or int(value) < 1:
        raise _refusal(f"The {what} must be a positive whole number, got {value!r}.")
    return int(value)


def _text_message(role: str, text: str) -> dict:
    # Parts, not a plain string: the chat template rewrites "<image>" inside string contents.
    return {"role": role, "content": [{"type": "text", "text": text}]}


def _assistant_messages(turn: ChatTurn) -> Sequence[dict]:
    """The answer as chatbot messages, text and pictures in the order the model wrote them."""
    messages = [
        {"role": "assistant", "content": gr.Image(value=part, format="png", show_label=False)}
        if isinstance(part, Image.Image)
        else {"role": "assistant", "content": part}
        for part in turn.segments
    ]
    return messages or [{"role": "assistant", "content": EMPTY_ANSWER}]
