"""A model's card in machine-readable form: what it was trained on, its measured scores, the words it has seen.

A checkpoint folder may hold `model_card.json` beside its `config.json` (the shipped `vargpt-shapes-tiny` does;
its `README.md` says the same in prose). Commands, the server and the web page read it to warn, in one line and
without refusing, when a prompt uses words the model never met in training or asks for a resolution it was not
trained at, and `vargpt edit` states the measured editing score. A checkpoint without a card gets no warnings: a
general model's vocabulary is not a short list.

The card's vocabulary is generated, never typed: `training_vocabulary` collects every word of the training
conversations the recipe's data step writes (`vargpt data shapes --splits train`), and `write_vocabulary` stores
it in a card. Everything else in the card (scores with where they were measured, limits) is written by people
and quotes only measured figures.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_CARD_FILE = "model_card.json"
# a word: letters or digits, with an apostrophe's tail kept on it ("what's" is not "what" + "s": the model never
# saw the contraction)
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
# image placeholders of sharegpt rows: markup, not words a user types
_PLACEHOLDERS = ("<image_gen>", "<image>")
_REQUIRED = ("model", "trained_resolution", "scores", "vocabulary")
MAX_WORDS_SHOWN = 8


def prompt_words(text: str) -> list[str]:
    """The words of a text, lower-cased, in order (what the vocabulary check compares)."""
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def training_vocabulary(jsonl_paths: Iterable[str | Path]) -> list[str]:
    """Every word of every message (user and assistant) of sharegpt JSONL files, sorted."""
    words: set[str] = set()
    for path in jsonl_paths:
        with Path(path).open(encoding="utf-8") as rows:
            for line in rows:
                for message in json.loads(line)["messages"]:
                    text = message["content"]
                    for placeholder in _PLACEHOLDERS:
                        text = text.replace(placeholder, " ")
                    words.update(prompt_words(text))
    return sorted(words)


def write_vocabulary(card_path: str | Path, train_jsonl: Sequence[str | Path], source: str) -> int:
    """Store the vocabulary of `train_jsonl` (and where it came from, `source`) in an existing card; return its size.

    Rerun it whenever the model is retrained on other data: the rest of the card stays as written.
    """
    path = Path(card_path)
    card = _read_json(path)
    vocabulary = training_vocabulary(train_jsonl)
    if not vocabulary:
        raise ValueError(f"no words in {[str(p) for p in train_jsonl]}: give the training split's JSONL")
    card["vocabulary_source"] = source
    card["vocabulary"] = vocabulary
    path.write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return len(vocabulary)


@dataclass(frozen=True)
class ModelCard:
    """The parts of `model_card.json` the warnings use; `facts` keeps the whole file."""

    model: str
    trained_resolution: int
    scores: dict[str, dict[str, Any]]
    vocabulary: frozenset[str]
    facts: dict[str, Any] = field(repr=False, default_factory=dict)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelCard:
        """Read a card; a malformed one raises ValueError naming the file and what is wrong."""
        path = Path(path)
        raw = _read_json(path)
        missing = [key for key in _REQUIRED if key not in raw]
        if missing:
            raise ValueError(f"{path}: the model card lacks {', '.join(missing)}")
        resolution, vocabulary, scores = raw["trained_resolution"], raw["vocabulary"], raw["scores"]
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"{path}: trained_resolution must be a positive number of pixels, got {resolution!r}")
        if not isinstance(vocabulary, list) or not vocabulary or not all(isinstance(w, str) for w in vocabulary):
            raise ValueError(f"{path}: vocabulary must be a non-empty list of words")
        if not isinstance(scores, dict) or not all(isinstance(v, dict) and "score" in v for v in scores.values()):
            raise ValueError(f"{path}: scores must map each task to an object with a 'score'")
        return cls(str(raw["model"]), resolution, scores, frozenset(vocabulary), raw)

    @classmethod
    def in_folder(cls, folder: str | Path | None) -> ModelCard | None:
        """The card of a checkpoint folder, or None when it has none (or `folder` is not a folder)."""
        if not folder:
            return None
        path = Path(folder) / MODEL_CARD_FILE
        return cls.from_file(path) if path.is_file() else None

    def unseen_words(self, text: str) -> list[str]:
        """The words of `text` the model never met in training, each once, in the order they appear."""
        return list(dict.fromkeys(w for w in prompt_words(text) if w not in self.vocabulary))

    def words_warning(self, texts: str | Sequence[str]) -> str | None:
        """One line naming the unseen words of `texts` (a prompt, or all prompts of a batch), or None."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        unseen = list(dict.fromkeys(w for text in texts for w in self.unseen_words(text)))
        if not unseen:
            return None
        shown = ", ".join(repr(w) for w in unseen[:MAX_WORDS_SHOWN])
        more = f" and {len(unseen) - MAX_WORDS_SHOWN} more" if len(unseen) > MAX_WORDS_SHOWN else ""
        noun, pronoun = ("word", "it") if len(unseen) == 1 else ("words", "them")
        return (
            f"{self.model} never saw the {noun} {shown}{more} in training: it knows only its shapes world "
            f"(see its model card), so expect {pronoun} to be ignored"
        )

    def resolution_warning(self, resolution: int | None) -> str | None:
        """One line when images are asked for at a size the model was not trained at (None: its own size)."""
        if resolution is None or resolution == self.trained_resolution:
            return None
        return (
            f"{self.model} was trained at {self.trained_resolution} px only: {resolution} px images were never "
            "trained (expect noise, and a longer wait)"
        )

    def warnings(self, texts: str | Sequence[str] = (), resolution: int | None = None) -> list[str]:
        """Every warning a request earns: unseen words, then an untrained resolution."""
        found = (self.words_warning(texts), self.resolution_warning(resolution))
        return [line for line in found if line is not None]

    def score_line(self, task: str) -> str | None:
        """One line stating the measured score of `task` with where it was measured, or None if not measured."""
        entry = self.scores.get(task)
        if entry is None:
            return None
        parts = [f"{self.model}'s measured {task} score is {entry['score']}"]
        if entry.get("measured_on"):
            parts.append(f" on {entry['measured_on']}")
        if entry.get("detail"):
            parts.append(f": {entry['detail']}")
        if entry.get("source"):
            parts.append(f" ({entry['source']})")
        return "".join(parts)


def model_card_of(pipe: Any) -> ModelCard | None:
    """The card of the folder a pipeline's model was loaded from (None for presets and card-less checkpoints)."""
    return ModelCard.in_folder(getattr(pipe.model.config, "name_or_path", None))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable model card ({error})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a model card must be a JSON object")
    return raw
