"""Scores of conversation rows (`conversations.py`): does a later turn still answer, or draw, in the world?

Earlier turns are given as written in the row (their gold answers), the way `vargpt chat` keeps its history: a
drawing turn stays in the history as its text only, since the chat template has no slot for drawn images. The
last turn is the model's: an answer scored by exact match, or a drawing scored by GenEval's rules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from ..conversation import assistant_message, converse_batch, user_message
from .scoring import evaluate_generated_image, normalize_answer

IMAGE_TOKEN = "<image>"


def conversation_inputs(row: dict[str, Any]) -> tuple[list[dict], list[str]]:
    """(messages up to the last user turn, paths of the images they show) of a conversation row."""
    messages = row["messages"][:-1]
    history, images = [], []
    root = Path(row["_root"])
    paths = iter(row["images"])
    for message in messages:
        text = message["content"]
        if message["role"] == "user":
            shown = text.count(IMAGE_TOKEN)
            images += [str(root / next(paths)) for _ in range(shown)]
            history.append(user_message(text.replace(IMAGE_TOKEN, "").strip(), shown))
        else:
            drawn = text.count("<image_gen>")
            for _ in range(drawn):
                next(paths)  # a drawing the history does not carry
            history.append(assistant_message(text.replace("<image_gen>", "").strip()))
    return history, images


def _score_turn(row: dict[str, Any], turn: Any, to_world: Callable[[Image.Image], Image.Image]) -> tuple[bool, str]:
    """(correct, what the model gave) for the last turn of a conversation row."""
    wanted = row["meta"]["turns"][-1]
    if "geneval" in wanted:
        if not turn.images:
            return False, f"no image drawn (said {turn.text!r})"
        return evaluate_generated_image(to_world(turn.images[0]), wanted["geneval"])[0], "image"
    return normalize_answer(turn.text) == normalize_answer(wanted["answer"]), turn.text


def score_conversations(
    pipe,
    rows: Sequence[dict[str, Any]],
    *,
    batch_size: int,
    seed: int,
    to_world: Callable[[Image.Image], Image.Image],
) -> list[dict[str, Any]]:
    """One result per row, in row order: its kind, whether the last turn is right, the unseen flag and what the
    model gave. Rows whose last turn draws and rows whose last turn answers go in separate batches."""
    results: list[dict[str, Any]] = [{} for _ in rows]
    for start in range(0, len(rows), batch_size):
        for draws in (False, True):
            group = [i for i in range(start, min(start + batch_size, len(rows))) if _draws(rows[i]) == draws]
            if not group:
                continue
            inputs = [conversation_inputs(rows[i]) for i in group]
            turns = converse_batch(
                pipe,
                [messages for messages, _ in inputs],
                [images for _, images in inputs],
                seed=seed + start,
                max_new_tokens=12,
                allow_images=draws,
            )
            for i, turn in zip(group, turns, strict=True):
                correct, given = _score_turn(rows[i], turn, to_world)
                meta = rows[i]["meta"]
                results[i] = {
                    "kind": meta["form"],
                    "correct": correct,
                    "unseen": bool(meta.get("unseen_combination")),
                    "given": given,
                }
    return results


def _draws(row: dict[str, Any]) -> bool:
    return "geneval" in row["meta"]["turns"][-1]


def conversation_summary(results: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Accuracy of last turns overall ('accuracy', the multi-turn score) and per conversation kind."""
    by_kind: dict[str, list[bool]] = {}
    for result in results:
        by_kind.setdefault(result["kind"], []).append(result["correct"])
    overall = sum(r["correct"] for r in results) / len(results)
    return {"accuracy": overall, **{k: sum(v) / len(v) for k, v in sorted(by_kind.items())}, "n": len(results)}
