"""Conversation rows and their multi-turn score (issue 28, item 2)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from PIL import Image

from vargpt.shapes import multiturn
from vargpt.shapes.dataset import validate_sharegpt_dataset, write_sharegpt_dataset
from vargpt.shapes.evaluate import read_rows
from vargpt.shapes.multiturn import conversation_inputs, conversation_summary, score_conversations
from vargpt.shapes.scene import ShapesWorldConfig

KINDS = ["follow-up", "draw-after-question", "question-after-drawing"]


def _conversations(tmp_path, n=6):
    config = ShapesWorldConfig(generation_layout="varied")
    path = write_sharegpt_dataset(tmp_path, "test", 0, 0, 0, seed=0, config=config, language="broad", n_conversation=n)
    return path


def test_conversation_rows_alternate_and_carry_their_images(tmp_path):
    path = _conversations(tmp_path)
    assert validate_sharegpt_dataset(path) == 6
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["meta"]["form"] for r in rows] == KINDS * 2
    for row in rows:
        assert len(row["messages"]) == 4 and row["meta"]["task"] == "understanding"
        assert row["meta"]["category"] == "conversation" and len(row["meta"]["turns"]) == 2
    follow_up, draw_after, question_after = rows[:3]
    assert "<image>" in follow_up["messages"][0]["content"] and "<image" not in follow_up["messages"][2]["content"]
    assert draw_after["messages"][3]["content"] == "<image_gen>" and len(draw_after["images"]) == 2
    assert question_after["messages"][1]["content"] == "<image_gen>"
    assert question_after["messages"][3]["content"] == question_after["meta"]["answer"]


def test_the_history_keeps_text_and_shown_images_only(tmp_path):
    rows = read_rows(_conversations(tmp_path, 3))
    messages, images = conversation_inputs(rows[1])  # draw after a question: the question's image only
    assert [m["role"] for m in messages] == ["user", "assistant", "user"] and len(images) == 1
    messages, images = conversation_inputs(rows[2])  # question after a drawing: the drawing is not fed back
    assert images == [] and messages[1]["content"] == [{"type": "text", "text": ""}]


@dataclass
class _Turn:
    text: str
    images: list = field(default_factory=list)


def test_an_oracle_scores_one_and_a_model_that_answers_dot_scores_zero(tmp_path, monkeypatch):
    rows = read_rows(_conversations(tmp_path))

    def oracle(pipe, conversations, images, **settings):
        by_history = {json.dumps(conversation_inputs(r)[0]): r for r in rows}
        turns = []
        for conversation in conversations:
            row = by_history[json.dumps(conversation)]
            if settings["allow_images"]:
                with Image.open(tmp_path / row["images"][-1]) as image:
                    turns.append(_Turn("", [image.convert("RGB")]))
            else:
                turns.append(_Turn(row["meta"]["answer"] + "."))
        return turns

    monkeypatch.setattr(multiturn, "converse_batch", oracle)
    results = score_conversations(None, rows, batch_size=4, seed=0, to_world=lambda image: image)
    assert conversation_summary(results) == {"accuracy": 1.0, **dict.fromkeys(sorted(KINDS), 1.0), "n": 6}
    monkeypatch.setattr(multiturn, "converse_batch", lambda p, c, i, **s: [_Turn(".") for _ in c])
    assert conversation_summary(score_conversations(None, rows, batch_size=4, seed=0, to_world=None))["accuracy"] == 0


def test_a_real_model_runs_every_kind(tmp_path, tiny_checkpoint):
    from vargpt.pipeline import VARGPTPipeline

    pipe = VARGPTPipeline.from_pretrained(str(tiny_checkpoint))
    rows = read_rows(_conversations(tmp_path, 3))
    results = score_conversations(pipe, rows, batch_size=3, seed=0, to_world=lambda i: i.resize((32, 32)))
    assert [r["kind"] for r in results] == KINDS and all(isinstance(r["correct"], bool) for r in results)
