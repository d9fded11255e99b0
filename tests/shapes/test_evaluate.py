"""The prompt-shuffled baseline of the shapes evaluation: what ignoring the prompt scores."""

from __future__ import annotations

from vargpt.shapes.evaluate import prompt_shuffled_baseline
from vargpt.shapes.scoring import evaluate_generated_image
from vargpt.shapes.world import ShapesWorld


def _rows(world: ShapesWorld, category: str, count: int):
    items = [world.t2i_prompt(category, "validation") for _ in range(count)]
    rows = [{"meta": {"category": category, "geneval": item.metadata}} for item in items]
    return rows, [world.render(item.scene) for item in items]


def test_ground_truth_passes_its_own_prompts_and_fewer_shuffled_ones():
    world = ShapesWorld(3, image_size=32)
    drawn = []
    for category in ("colors", "position", "counting"):
        rows, images = _rows(world, category, 12)
        assert all(evaluate_generated_image(i, r["meta"]["geneval"])[0] for r, i in zip(rows, images, strict=True))
        drawn += list(zip(rows, images, strict=True))
    baseline = prompt_shuffled_baseline(drawn)
    assert set(baseline) == {"overall", "colors", "position", "counting"}
    assert baseline["overall"] < 0.6  # another prompt's scene rarely satisfies this prompt


def test_a_prompt_independent_image_scores_the_same_either_way():
    world = ShapesWorld(4, image_size=32)
    rows, images = _rows(world, "single_object", 10)
    same = images[0]
    own = sum(evaluate_generated_image(same, r["meta"]["geneval"])[0] for r in rows) / len(rows)
    assert prompt_shuffled_baseline([(r, same) for r in rows])["overall"] == own
    assert prompt_shuffled_baseline([(rows[0], same)]) == {}  # a lone prompt has no other to be judged against


class _SeedRecorder:
    """Stands in for a pipeline: draws blank pictures and records the seed of every prompt."""

    def __init__(self) -> None:
        from vargpt.generation.config import ImageGenerationConfig

        self.image_config = ImageGenerationConfig()
        self.seeds: list[int] = []

    def generate(self, prompts, seed):
        from PIL import Image

        assert isinstance(seed, list) and len(seed) == len(prompts)
        self.seeds += seed
        return [Image.new("RGB", (32, 32), "white") for _ in prompts]


def test_repeated_prompts_are_drawn_from_different_seeds_whatever_the_batch_size(tmp_path):
    import json

    from vargpt.shapes.evaluate import evaluate_split

    world = ShapesWorld(5, image_size=32)
    item = world.t2i_prompt("single_object", "validation")
    world.render(item.scene).save(tmp_path / "truth.png")
    row = {
        "messages": [{"role": "user", "content": item.prompt}, {"role": "assistant", "content": "<image_gen>"}],
        "images": ["truth.png"],
        "meta": {"task": "generation", "category": "single_object", "geneval": item.metadata},
    }
    split = tmp_path / "split.jsonl"
    split.write_text((json.dumps(row) + "\n") * 7)  # one prompt, seven times, as the shapes splits repeat prompts
    seen = []
    for batch_size in (3, 7):
        pipe = _SeedRecorder()
        evaluate_split(pipe, split, batch_size=batch_size, seed=100, progress=False)
        seen.append(pipe.seeds)
    assert seen[0] == seen[1] == list(range(100, 107))


class _FixedEditor:
    """Stands in for a pipeline's editing: returns each row's target (an oracle) or its source (no edit)."""

    def __init__(self, split, answer: str) -> None:
        import json

        from vargpt.generation.config import ImageGenerationConfig

        self.image_config = ImageGenerationConfig()
        rows = [json.loads(line) for line in split.read_text().splitlines()]
        index = 0 if answer == "source" else 1
        self.answers = {str(split.parent / r["images"][0]): split.parent / r["images"][index] for r in rows}

    def edit_batch(self, sources, instructions, seed):
        from PIL import Image

        return [Image.open(self.answers[str(s)]).convert("RGB") for s in sources]


def test_editing_reports_exact_and_partial_scores_beside_the_no_model_baselines(tmp_path):
    from vargpt.shapes.dataset import write_sharegpt_dataset
    from vargpt.shapes.evaluate import evaluate_split

    split = write_sharegpt_dataset(tmp_path, "validation", 0, 0, 12, seed=3)
    oracle = evaluate_split(_FixedEditor(split, "target"), split, progress=False, grid_path=tmp_path / "g.png")
    assert oracle["editing"]["accuracy"] == 1.0 and oracle["editing"]["unchanged"] == 0.0
    assert {oracle["editing"][k] for k in ("object_recall", "object_precision", "background")} == {1.0}
    assert (tmp_path / "g-editing.png").is_file() and oracle["editing_grid"] == str(tmp_path / "g-editing.png")

    copier = evaluate_split(_FixedEditor(split, "source"), split, progress=False)
    assert copier["editing"]["accuracy"] == 0.0 and copier["editing"]["unchanged"] == 1.0
    baselines = copier["editing_baselines"]
    assert set(baselines) == {"source_copied", "other_row_target"}
    for key in ("object_recall", "object_precision", "background"):
        assert copier["editing"][key] == baselines["source_copied"][key]  # the baseline is what copying scores
    assert baselines["source_copied"]["object_recall"] > baselines["other_row_target"]["object_recall"]
    assert baselines["source_copied"]["object_recall"] < 1.0  # every edit changes something
