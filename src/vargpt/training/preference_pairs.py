"""A recipe's DPO pairs drawn from a world that renders the ground truth of its prompts.

Winners are the world's rendering of a prompt's scene. Losers (`losers`): "own_samples", the model's own wrong
samples (the paper's construction); "other_prompts", the ground truth of the previous prompt of the same category
where it fails this one, which rewards following the prompt rather than drawing any clean scene; or
"own_samples_or_other_prompts", the model's sample where it is wrong and another prompt's ground truth where it
is right, so categories the model already draws right keep pairs (and the winners' NLL term) instead of drifting
while the round trains only on the others.

Whether an image satisfies a prompt is the caller's `scorer` (`PromptScorer`, the same callable `vargpt
dpo-pairs --scorer` takes): training holds no evaluation code of its own.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

DPO_LOSERS = ("own_samples", "other_prompts", "own_samples_or_other_prompts")
PROMPTS_PER_DRAW = 16  # prompts drawn (and sampled) at a time
MAX_DRAWS_PER_PAIR = 4  # give up after this many prompts per pair asked for


@dataclass(frozen=True)
class PromptRow:
    """One prompt: `index` is its position among the prompts, `metadata` its source row (empty for text lines),
    `problem` why it cannot become a training row (None when it can)."""

    index: int
    prompt: str
    metadata: Mapping[str, Any] = field(default_factory=dict)
    problem: str | None = None


class PromptScorer(Protocol):
    """True when `image` already satisfies the prompt of `row` (it then carries no preference signal)."""

    def __call__(self, image: Image.Image, row: PromptRow) -> bool: ...


class PromptWorld(Protocol):
    """What pair building needs of a world (the shapes world has it): text-to-image prompts of a category with a
    ground-truth scene (`.prompt`, `.metadata`, `.scene`), and the rendering of a scene."""

    def t2i_prompt(self, category: str, split: str = "train") -> Any: ...

    def render(self, scene: Any) -> Image.Image: ...


Sampler = Callable[..., list[Image.Image]]  # a pipeline's `generate(prompts, seed=...)`


def draws_own_samples(losers: str) -> bool:
    """Whether these losers need the model's samples (else a pair costs no sampling, and no pipeline)."""
    return losers in ("own_samples", "own_samples_or_other_prompts")


@dataclass
class _Tally:
    rows: list[dict[str, Any]] = field(default_factory=list)
    drawn: int = 0
    skipped: int = 0
    from_other_prompts: int = 0
    previous: dict[str, Any] = field(default_factory=dict)  # category -> the last prompt item drawn for it


def build_preference_pairs(
    world: PromptWorld,
    categories: Sequence[str],
    scorer: PromptScorer,
    folder: Path,
    *,
    count: int,
    losers: str,
    image_size: int,
    seed: int,
    generate: Sampler | None = None,
) -> Path:
    """Write up to `count` pairs (images and `pairs.jsonl`) and `pairs_stats.json` into `folder`; returns the
    JSONL's path. `generate` draws the model's samples: needed exactly when `losers` uses them."""
    if losers not in DPO_LOSERS:
        raise ValueError(f"losers must be one of {list(DPO_LOSERS)}, got {losers!r}")
    if (generate is not None) != draws_own_samples(losers):
        raise ValueError(f"losers {losers!r} {'need' if draws_own_samples(losers) else 'take no'} model samples")
    folder.mkdir(parents=True, exist_ok=True)
    others = losers in ("other_prompts", "own_samples_or_other_prompts")
    tally = _Tally()
    while len(tally.rows) < count and tally.drawn < count * MAX_DRAWS_PER_PAIR:
        items = [
            world.t2i_prompt(categories[(tally.drawn + i) % len(categories)], "train") for i in range(PROMPTS_PER_DRAW)
        ]
        tally.drawn += len(items)
        other_items = _previous_of_category(items, tally, others)
        if generate is not None:
            samples = generate([it.prompt for it in items], seed=seed + tally.drawn)
            drawn = [s.resize((image_size,) * 2) for s in samples]
        else:
            drawn = [None if other is None else world.render(other.scene) for other in other_items]
        for item, loser, other in zip(items, drawn, other_items, strict=True):
            loser = _loser(world, scorer, item, loser, other if generate is not None else None, tally)
            if loser is not None:
                tally.rows.append(_write_pair(world, folder, len(tally.rows), item, loser))
    return _write_pairs_file(folder, tally, count, losers, generate is not None and others)


def _previous_of_category(items: list[Any], tally: _Tally, others: bool) -> list[Any]:
    """Per item, the previous prompt drawn of its category when the losers use other prompts (else None); its
    scene is rendered only when used."""
    previous = []
    for item in items:
        previous.append(tally.previous.get(item.metadata["tag"]) if others else None)
        tally.previous[item.metadata["tag"]] = item
    return previous


def _loser(world: PromptWorld, scorer: PromptScorer, item: Any, loser, replacement, tally: _Tally):
    """`loser` where it fails the item's prompt; else `replacement`'s scene where that fails it (counted); else
    None (a skipped candidate: no preference signal)."""
    if loser is None:
        return None
    row = PromptRow(tally.drawn, item.prompt, item.metadata)
    correct = scorer(loser, row)
    if correct and replacement is not None:
        loser = world.render(replacement.scene)  # the model draws this prompt right: another prompt's scene loses
        correct = scorer(loser, row)
        tally.from_other_prompts += not correct
    if correct:
        tally.skipped += 1
        return None
    return loser


def _write_pair(world: PromptWorld, folder: Path, index: int, item: Any, loser: Image.Image) -> dict[str, Any]:
    chosen, rejected = f"pair{index:05d}_chosen.png", f"pair{index:05d}_rejected.png"
    world.render(item.scene).save(folder / chosen)
    loser.save(folder / rejected)
    answer = {"role": "assistant", "content": "<image_gen>"}
    return {
        "conversations": [{"role": "user", "content": item.prompt}],
        "chosen": answer,
        "rejected": dict(answer),
        "images": [chosen, rejected],
    }


def _write_pairs_file(folder: Path, tally: _Tally, count: int, losers: str, mixed: bool) -> Path:
    rows = tally.rows[:count]  # the last draw of prompts may overshoot
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = {
        "pairs": len(rows),
        "prompts_drawn": tally.drawn,
        "losers": losers,
        "skipped_loser_satisfies_prompt": tally.skipped,
        "losers_from_other_prompts": tally.from_other_prompts if mixed else None,
    }
    (folder / "pairs_stats.json").write_text(json.dumps(stats))
    return path
