"""The Gradio web demo: its handlers on the tiny model, then the real page driven in headless Chromium.

The browser test needs Playwright for Python and Debian's chromium (/usr/bin/chromium); it is skipped,
saying which is missing, only when one of them is absent. Playwright's own browser download is never used.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest
from PIL import Image

gr = pytest.importorskip("gradio", reason="the web demo needs gradio (pip install gradio)")

from tests.live_server import free_port, stop  # noqa: E402
from vargpt.cli.demo import demo_scene  # noqa: E402
from vargpt.pipeline import ChatTurn, VARGPTPipeline  # noqa: E402
from vargpt.serving.web import (  # noqa: E402
    EMPTY_ANSWER,
    MODEL_QUEUE,
    _assistant_messages,
    _Handlers,
    build_web_demo,
    supported_resolutions,
    web_launch_options,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LOOPBACK = "127.0.0.1"


@pytest.fixture(scope="module")
def pipe() -> VARGPTPipeline:
    return VARGPTPipeline.from_pretrained("tiny", device="cpu")


@pytest.fixture(scope="module")
def handlers(pipe) -> _Handlers:
    return _Handlers(pipe)


@pytest.fixture
def scene_png(tmp_path) -> Path:
    path = tmp_path / "scene.png"
    demo_scene().save(path)
    return path


# -- the page's parts, without a browser -------------------------------------------------------------------------
def test_resolutions_are_the_tiny_models_schedules_up_to_its_rope_grid(pipe):
    # tiny: stride 4, native 32 px, RoPE grid 8 -> square sides 4 and 6 and 8 (half the native size and up).
    sizes = supported_resolutions(pipe)
    assert sizes == [16, 24, 32]
    for size in sizes:
        assert pipe.model.generation_schedule(size)[-1] == (size // 4, size // 4)


def test_every_model_event_shares_one_queue_slot_and_analytics_are_off(pipe):
    demo = build_web_demo(pipe)
    assert demo.analytics_enabled is False
    model_events = [fn for fn in demo.fns.values() if fn.concurrency_id == MODEL_QUEUE]
    names = sorted({fn.name for fn in model_events})
    assert names == ["chat", "edit", "generate"]
    assert all(fn.concurrency_limit == 1 for fn in model_events)
    options = web_launch_options()
    assert options["server_name"] == LOOPBACK and options["share"] is False and options["ssr_mode"] is False


def test_chat_turn_shows_the_picture_and_question_and_keeps_a_text_history(handlers, scene_png):
    message = {"text": "Which colour is the circle?", "files": [str(scene_png)]}
    shown, history, cleared = handlers.chat(message, [], [], max_new_tokens=8, seed=0)
    assert shown[0] == {"role": "user", "content": {"path": str(scene_png)}}
    assert shown[1] == {"role": "user", "content": "Which colour is the circle?"}
    assert [m["role"] for m in shown[2:]] == ["assistant"] * (len(shown) - 2) and len(shown) > 2
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert history[0]["content"] == [{"type": "text", "text": "Which colour is the circle?"}]
    assert cleared == {"text": "", "files": []}
    shown, history, _ = handlers.chat({"text": "And the shape?", "files": []}, shown, history, 8, 0)
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]


def test_answers_show_pictures_inline_and_an_empty_answer_is_said(pipe):
    picture = demo_scene()
    messages = list(_assistant_messages(ChatTurn(["Here it is:", picture, "done"])))
    rendered = gr.Chatbot().postprocess(messages).root
    kinds = [m.content[0].type for m in rendered]
    assert kinds == ["text", "component", "text"]
    assert rendered[1].content[0].component == "image"
    assert list(_assistant_messages(ChatTurn([]))) == [{"role": "assistant", "content": EMPTY_ANSWER}]


def test_picking_a_preset_sets_its_sliders(handlers):
    assert handlers.preset_values("paper") == (1.5, 0.5, 0.95)
    assert handlers.preset_values("original-code") == (3.0, 0.5, 0.97)
    own = handlers.pipe.image_config
    assert handlers.preset_values("model defaults") == (own.cfg_scale, own.tau, own.top_p)


def test_generate_returns_the_asked_number_of_images_at_the_asked_size(handlers):
    images = handlers.generate("a red circle", 2, 0, "paper", 1.5, 0.5, 0.95, 24)
    assert [image.size for image in images] == [(24, 24), (24, 24)]


def test_edit_returns_a_picture(handlers):
    edited = handlers.edit(demo_scene(), "make the circle blue", 0)
    assert edited.size == (32, 32)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda h, png: h.chat({"text": "  ", "files": []}, [], [], 8, 0), "Type a question"),
        (lambda h, png: h.generate("", 1, 0, "paper", 1.5, 0.5, 0.95, 32), "prompt is empty"),
        (lambda h, png: h.generate("a cat", 1, 0, "nope", 1.5, 0.5, 0.95, 32), "Unknown preset"),
        (lambda h, png: h.generate("a cat", 0, 0, "paper", 1.5, 0.5, 0.95, 32), "number of images"),
        (lambda h, png: h.generate("a cat", 1, 0, "paper", 1.5, 0.5, 0.95, 12), "unsupported resolution"),
        (lambda h, png: h.edit(None, "make it blue", 0), "Upload the picture"),
        (lambda h, png: h.edit(demo_scene(), " ", 0), "instruction is empty"),
        (lambda h, png: h.chat({"text": "what?", "files": [str(png)]}, [], [], 8, 0), "garbage.png is not a picture"),
    ],
)
def test_bad_input_becomes_a_message_in_the_page(handlers, tmp_path, call, message):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not a png")
    with pytest.raises(gr.Error, match=message):
        call(handlers, garbage)


def test_refusals_are_escaped_because_gradio_shows_them_as_html(handlers, tmp_path):
    bad = tmp_path / "<img src=x onerror=alert(1)>.png"
    bad.write_bytes(b"not a picture")
    with pytest.raises(gr.Error) as refused:
        handlers.chat({"text": "what?", "files": [str(bad)]}, [], [], 8, 0)
    assert "<img" not in refused.value.message and "&lt;img src=x" in refused.value.message


# -- the real page in headless Chromium ----------------------------------------------------------------------
def _wait_until_served(url: str, server: subprocess.Popen, log: Path, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the web demo exited with {server.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.3)
    pytest.fail(f"the web demo did not answer at {url} within {timeout_s} s:\n{log.read_text()}")


@pytest.fixture
def served_demo(tmp_path):
    """`launch_web_demo("tiny")` in a child process on a free loopback port; its URL."""
    port = free_port()
    log = tmp_path / "server.log"
    code = f"from vargpt.serving.web import launch_web_demo; launch_web_demo('tiny', host={LOOPBACK!r}, port={port})"
    with log.open("w") as out:
        server = subprocess.Popen([sys.executable, "-u", "-c", code], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://{LOOPBACK}:{port}/"
    try:
        _wait_until_served(url, server, log)
        yield url
    finally:
        stop(server, timeout_s=10)


def _playwright():
    if not CHROMIUM.is_file():
        pytest.skip(f"Debian's chromium is not installed ({CHROMIUM} is missing): apt-get install -y chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright for Python is not installed: pip install playwright")
    return sync_playwright


def _natural_width(locator) -> int:
    return locator.evaluate("img => img.complete ? img.naturalWidth : 0")


def test_the_page_chats_about_an_uploaded_picture_draws_and_edits(served_demo, scene_png, tmp_path):
    sync_playwright = _playwright()
    off_loopback: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1200, "height": 900},
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            page.on(
                "request",
                lambda r: None if urlparse(r.url).hostname in (LOOPBACK, None) else off_loopback.append(r.url),
            )
            page.goto(served_demo)

            # Chat: attach the picture, wait for its thumbnail, ask, wait for the answer bubble.
            page.locator("#chat-input input[type=file]").set_input_files(str(scene_png))
            page.locator("#chat-input img").first.wait_for()
            question = page.locator("#chat-input textarea")
            question.fill("Which colour is the circle?")
            question.press("Enter")
            answer = page.locator('#chat-box [data-testid="bot"]').first
            answer.wait_for()
            assert answer.inner_text().strip()
            sent = page.locator('#chat-box [data-testid="user"] img').first
            sent.wait_for()
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=sent.element_handle())
            assert _natural_width(sent) == 32
            assert "Which colour is the circle?" in page.locator("#chat-box").inner_text()
            sent.scroll_into_view_if_needed()
            page.screenshot(path=str(tmp_path / "web-demo-chat.png"), full_page=True)

            # Generate: an empty prompt is refused with a message, then a prompt draws a picture.
            page.get_by_role("tab", name="Generate").click()
            page.locator("#gen-button").click()
            page.get_by_text("the prompt is empty").first.wait_for()
            page.locator("#gen-prompt textarea").fill("a red circle in the middle")
            page.locator("#gen-button").click()
            drawn = page.locator("#gen-gallery img").first
            drawn.wait_for()
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=drawn.element_handle())
            assert _natural_width(drawn) == 32

            shot = tmp_path / "web-demo.png"
            page.screenshot(path=str(shot), full_page=True)

            # Edit: upload the picture, give an instruction, get the edited picture.
            page.get_by_role("tab", name="Edit").click()
            page.locator("#edit-input input[type=file]").set_input_files(str(scene_png))
            page.locator("#edit-input img").first.wait_for()
            page.locator("#edit-instruction textarea").fill("make the circle blue")
            page.locator("#edit-button").click()
            edited = page.locator("#edit-output img").first
            edited.wait_for()
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=edited.element_handle())
            assert _natural_width(edited) == 32
        finally:
            browser.close()
    assert off_loopback == [], f"the page reached beyond loopback: {off_loopback}"
    for path in (tmp_path / "web-demo-chat.png", shot):
        with Image.open(path) as screenshot:
            assert screenshot.format == "PNG" and screenshot.width == 1200 and screenshot.height >= 900
            assert len(screenshot.convert("RGB").getcolors(maxcolors=1 << 20) or ()) > 50  # a page, not a blank


# -- the model card's warnings (issue 28) ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shapes_handlers() -> _Handlers:
    return _Handlers(VARGPTPipeline.from_pretrained("vargpt-shapes-tiny", device="cpu"))


def test_unseen_words_and_untrained_sizes_warn_on_the_page_without_refusing(shapes_handlers):
    with pytest.warns(UserWarning) as caught:
        images = shapes_handlers.generate("a dog", 1, 0, "model defaults", 3.0, 1.0, 0.97, 16)
    assert [image.size for image in images] == [(16, 16)]
    words, size = (str(w.message) for w in caught)
    assert "&#x27;dog&#x27;" in words and "16 px" in size  # escaped: Gradio shows it as HTML
    with pytest.warns(UserWarning, match="pink"):
        shapes_handlers.edit(demo_scene(), "make the circle pink", 0)
    with pytest.warns(UserWarning, match="hello"):
        shapes_handlers.chat({"text": "hello", "files": []}, [], [], max_new_tokens=2, seed=0)


def test_known_words_and_card_less_models_warn_nothing(shapes_handlers, handlers, recwarn):
    shapes_handlers.generate("a photo of a red circle", 1, 0, "model defaults", 3.0, 1.0, 0.97, 32)
    handlers.generate("a dog", 1, 0, "paper", 1.5, 0.5, 0.95, 24)  # the tiny preset has no card
    assert not [w for w in recwarn if w.category is UserWarning]


def test_the_page_states_the_models_summary_and_editing_score(shapes_handlers, pipe):
    def texts(demo: gr.Blocks) -> str:
        return " ".join(str(b.value) for b in demo.blocks.values() if isinstance(b, gr.Markdown))

    page = texts(build_web_demo(shapes_handlers.pipe))
    assert "vargpt-shapes-tiny" in page and "measured editing score is 0.0" in page
    assert "measured" not in texts(build_web_demo(pipe))
