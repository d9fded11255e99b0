"""The teacher-forced per-scale fit: its numbers, its swaps, its errors, and `vargpt eval fit`."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from vargpt.cli.main import main
from vargpt.data.formats import load_sft_dataset
from vargpt.evaluation.teacher_forced import swapped_rows, teacher_forced_fit
from vargpt.pipeline import VARGPTPipeline
from vargpt.shapes.dataset import write_sharegpt_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Four text-to-image rows, then four editing rows."""
    return write_sharegpt_dataset(tmp_path_factory.mktemp("fit"), "validation", 0, 4, 4, seed=2)


@pytest.fixture(scope="module")
def rows(data):
    dataset, report = load_sft_dataset(data)
    assert report.skipped_rows == 0
    return [dataset[i] for i in range(len(dataset))]


@pytest.fixture(scope="module")
def pipe():
    return VARGPTPipeline.from_pretrained("tiny", device="cpu")


def test_fit_covers_every_scale_and_equals_the_models_own_image_loss(pipe, rows):
    model, processor = pipe.model, pipe.processor
    fit = teacher_forced_fit(model, processor, rows, batch_size=3)
    schedule = model.generation_schedule(model.config.image_resolution)
    assert [tuple(s["grid"]) for s in fit["scales"]] == [tuple(g) for g in schedule]
    assert fit["rows"] == fit["images"] == len(rows)
    sizes = [h * w for h, w in schedule]
    pooled = sum(s["cross_entropy"] * n for s, n in zip(fit["scales"], sizes, strict=True)) / sum(sizes)
    assert fit["cross_entropy"] == pytest.approx(pooled, rel=1e-5)
    assert all(0.0 <= s["bit_error"] <= 1.0 for s in fit["scales"])

    from vargpt.data.collator import SFTCollator

    collate = SFTCollator(
        processor,
        image_gen_resolution=model.config.image_resolution,
        num_image_gen_pad_tokens=model.num_image_gen_pad_tokens(schedule),
        resize_ratio=1.0,
    )
    with torch.no_grad():
        direct = model(**collate(rows), image_noise=False).image_loss
    assert fit["image_loss"] == pytest.approx(float(direct), rel=1e-4)  # batches of 3 average to the same mean


class _ScriptedModel(torch.nn.Module):
    """Stands in for the model: its bit logits favour the label's value except on the bits `wrong` marks."""

    def __init__(self, real, wrong_L: torch.Tensor):
        super().__init__()
        self.real, self.wrong_L = real, wrong_L
        self.config = real.config
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def generation_schedule(self, resolution):
        return self.real.generation_schedule(resolution)

    def num_image_gen_pad_tokens(self, schedule):
        return self.real.num_image_gen_pad_tokens(schedule)

    def forward(self, **batch):
        n = batch["pixel_gen_values"].shape[0]
        schedule = self.generation_schedule(self.config.image_resolution)
        length, bits = sum(h * w for h, w in schedule), self.config.visual_decoder_config.bits
        labels_NLd = torch.zeros(n, length, bits, dtype=torch.long)
        labels_NLd[..., ::2] = 1
        favoured_NLd = labels_NLd.clone()
        favoured_NLd[:, self.wrong_L] = 1 - favoured_NLd[:, self.wrong_L]  # every bit of those tokens wrong
        logits_NLd2 = torch.nn.functional.one_hot(favoured_NLd, 2).float() * 2.0
        return SimpleNamespace(image_logits=logits_NLd2, image_labels=labels_NLd)


def test_bit_error_is_the_share_of_bits_whose_likelier_value_is_wrong(pipe, rows):
    schedule = pipe.model.generation_schedule(pipe.model.config.image_resolution)
    length = sum(h * w for h, w in schedule)
    wrong_L = torch.zeros(length, dtype=torch.bool)
    wrong_L[0] = True  # the first scale's only token
    last = schedule[-1][0] * schedule[-1][1]
    wrong_L[length - last : length - last + last // 4] = True  # a quarter of the last scale
    fit = teacher_forced_fit(_ScriptedModel(pipe.model, wrong_L), pipe.processor, rows[:4], batch_size=2)
    errors = [s["bit_error"] for s in fit["scales"]]
    assert errors[0] == 1.0
    assert errors[-1] == pytest.approx((last // 4) / last)
    assert all(e == 0.0 for e in errors[1:-1])
    # a logit margin of 2 costs log(1 + e^-2) nats when right and log(1 + e^2) when wrong
    right, wrong = (float(torch.nn.functional.softplus(torch.tensor(m))) for m in (-2.0, 2.0))
    assert fit["scales"][0]["cross_entropy"] == pytest.approx(wrong, rel=1e-5)
    assert fit["scales"][1]["cross_entropy"] == pytest.approx(right, rel=1e-5)


def test_swaps_rotate_inputs_and_keep_targets(rows):
    editing = rows[4:]
    moved = swapped_rows(editing, "images")
    assert [r["images"] for r in moved] == [r["images"] for r in editing[1:] + editing[:1]]
    assert [r["gen_images"] for r in moved] == [r["gen_images"] for r in editing]
    prompts = swapped_rows(rows[:4], "prompts")
    assert [r["messages"][0] for r in prompts] == [r["messages"][0] for r in rows[1:4] + rows[:1]]
    assert [r["messages"][1:] for r in prompts] == [r["messages"][1:] for r in rows[:4]]
    assert [r["gen_images"] for r in prompts] == [r["gen_images"] for r in rows[:4]]
    assert swapped_rows(rows, "none") == rows


def test_swapping_the_source_image_changes_an_edits_fit(pipe, rows):
    editing = rows[4:]
    own = teacher_forced_fit(pipe.model, pipe.processor, editing)
    other = teacher_forced_fit(pipe.model, pipe.processor, editing, swap="images")
    assert other["swap"] == "images" and other["image_loss"] != own["image_loss"]


def test_positions_reach_the_forward_and_matter_for_edits_only(pipe, rows):
    """1-D positions (the original's training forward) and M-RoPE (generate's) differ only where a row holds
    an understanding image: the editing rows, not the text-to-image ones."""
    seen = []
    hook = pipe.model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw.get("positions")), with_kwargs=True)
    try:
        fits = {
            (part, mode): teacher_forced_fit(pipe.model, pipe.processor, rows[span], positions=mode)["image_loss"]
            for part, span in (("t2i", slice(0, 4)), ("edit", slice(4, 8)))
            for mode in ("mrope", "sequential")
        }
    finally:
        hook.remove()
    assert seen == ["mrope", "sequential"] * 2
    assert fits["t2i", "sequential"] == pytest.approx(fits["t2i", "mrope"], rel=1e-6)
    from vargpt.data.collator import SFTCollator

    model = pipe.model
    schedule = model.generation_schedule(model.config.image_resolution)
    collate = SFTCollator(
        pipe.processor,
        image_gen_resolution=model.config.image_resolution,
        num_image_gen_pad_tokens=model.num_image_gen_pad_tokens(schedule),
        resize_ratio=1.0,
    )
    with torch.no_grad():
        edits = {
            mode: model(**collate(rows[4:]), image_noise=False, positions=mode, return_logits=True)
            for mode in ("mrope", "sequential")
        }
    # small on random weights, whose decoder barely reads its context; the LLM's own logits move more
    assert (edits["mrope"].image_logits - edits["sequential"].image_logits).abs().max() > 1e-6
    assert (edits["mrope"].logits - edits["sequential"].logits).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("subset", "swap", "message"),
    [
        (slice(0, 8), "images", "same number of understanding images"),
        (slice(0, 4), "images", "needs rows with understanding images"),
        (slice(4, 5), "images", "at least two rows"),
        (slice(0, 4), "sideways", "unknown swap"),
    ],
)
def test_swaps_that_cannot_apply_are_refused(rows, subset, swap, message):
    with pytest.raises(ValueError, match=message):
        swapped_rows(rows[subset], swap)


def test_rows_without_a_generation_target_are_left_out_and_counted(pipe, tmp_path):
    path = write_sharegpt_dataset(tmp_path, "validation", 2, 1, 0, seed=2)
    dataset, _ = load_sft_dataset(path)
    mixed = [dataset[i] for i in range(len(dataset))]
    fit = teacher_forced_fit(pipe.model, pipe.processor, mixed)
    assert fit["rows"] == 1 and fit["rows_without_target"] == 2
    with pytest.raises(ValueError, match="none of the 2 rows has a generation target"):
        teacher_forced_fit(pipe.model, pipe.processor, mixed[:2])


def test_the_command_prints_a_table_and_writes_json(data, tmp_path, capsys):
    report = tmp_path / "fit.json"
    args = ["eval", "fit", "--model", "tiny", "--data", str(data), "--limit", "6", "--quiet", "--json", str(report)]
    args += ["--positions", "sequential"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "6 rows, 6 images" in out and "bit error" in out
    fit = json.loads(report.read_text())
    assert fit["rows"] == 6 and fit["swap"] == "none" and len(fit["scales"]) >= 2


def test_the_command_limits_rows_with_a_target_not_rows(tmp_path, capsys):
    """A split that opens with understanding rows (as the shapes test split does) still gets N scored rows."""
    path = write_sharegpt_dataset(tmp_path, "test", 6, 3, 0, seed=2)
    first_rows = [json.loads(line) for line in path.read_text().splitlines()[:6]]
    assert all("<image_gen>" not in json.dumps(row["messages"]) for row in first_rows)  # the premise
    report = tmp_path / "fit.json"
    assert (
        main(["eval", "fit", "--model", "tiny", "--data", str(path), "--limit", "2", "--quiet", "--json", str(report)])
        == 0
    )
    assert json.loads(report.read_text())["rows"] == 2
