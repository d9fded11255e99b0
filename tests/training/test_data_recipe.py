"""Fine-tuning recipes (`"kind": "finetune"`): validation, and the packaged paper recipe run small on plain files."""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import pytest

from vargpt.shapes.dataset import write_sharegpt_dataset
from vargpt.training.data_recipe import (
    ScaleDown,
    is_data_recipe,
    load_data_recipe,
    parse_data_recipe,
    read_recipe_json,
    run_data_recipe,
)

PAPER = "vargpt-v1.1-paper"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _export(folder: Path, split: str, name: str, n_understanding: int, n_generation: int, n_editing: int) -> Path:
    """Shapes rows written as ordinary sharegpt files, renamed to what the paper recipe expects."""
    path = write_sharegpt_dataset(folder, split, n_understanding, n_generation, n_editing, seed=1)
    return path.rename(folder / name)


def paper_data_root(root: Path) -> Path:
    """Every file the paper recipe names, from shapes-world data (nothing shapes-specific on the recipe's path)."""
    laion = _export(root / "generation", "train", "laion_coco_aesthetic.jsonl", 0, 4, 0)
    _export(root / "generation", "validation", "journeydb.jsonl", 0, 4, 0)
    _export(root / "stage2-sft", "train", "llava_v1_5_mix665k.jsonl", 2, 0, 0)
    _export(root / "stage2-sft", "validation", "llava_onevision_508k.jsonl", 2, 0, 0)
    _export(root / "stage2-sft", "test", "50k_generation.jsonl", 0, 2, 0)
    _export(root / "edit", "train", "stylebooth_11k.jsonl", 0, 0, 2)
    generation = _rows(laion)
    pairs = []
    for i, row in enumerate(generation):
        loser = generation[(i + 1) % len(generation)]
        pairs.append(
            {
                "conversations": [row["messages"][0]],
                "chosen": row["messages"][1],
                "rejected": loser["messages"][1],
                # relative to the pairs file's folder, like any row's images
                "images": [f"../../generation/{row['images'][0]}", f"../../generation/{loser['images'][0]}"],
            }
        )
    for resolution in ("256", "512"):
        (root / "dpo" / resolution).mkdir(parents=True)
        (root / "dpo" / resolution / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return root


SMALL = ScaleDown(max_steps=1, resolution=32, batch_size=1)


def test_paper_recipe_runs_small_every_stage_then_skips_them(tmp_path):
    root = paper_data_root(tmp_path / "data")
    out = tmp_path / "run"
    recipe = load_data_recipe(PAPER)
    kwargs = {"data_root": root, "model": "tiny", "scale": SMALL, "cpu": True, "bf16": False, "quiet": True}
    summary = run_data_recipe(recipe, out, **kwargs)
    names = [s.name for s in recipe.stages]
    assert [s["stage"] for s in summary["stages"]] == names
    assert {s["status"] for s in summary["stages"]} == {"trained"}
    for index, stage in enumerate(summary["stages"]):
        folder = out / "stages" / f"{index + 1:02d}-{names[index]}"
        assert (folder / "DONE").is_file() and (folder / "final" / "config.json").is_file()
        assert len(stage["losses"]) == 1 and stage["steps"] == 1
        settings = json.loads((folder / "stage.json").read_text())
        # each stage starts from the previous stage's saved model
        assert settings["model"] == (
            "tiny" if index == 0 else str(out / "stages" / f"{index:02d}-{names[index - 1]}" / "final")
        )
    assert summary["final"] == str(out / "stages" / f"07-{names[-1]}" / "final")
    # streamed stages report what they read; the stage-2 mixture is in memory and complete
    assert summary["stages"][1]["data"]["kept_rows"] == 6 and summary["stages"][1]["data"]["skipped_rows"] == 0
    from vargpt import VARGPTPipeline

    pipe = VARGPTPipeline.from_pretrained(summary["final"])
    assert pipe.model.config.image_resolution == 32

    started = time.time()
    again = run_data_recipe(recipe, out, **kwargs)
    assert {s["status"] for s in again["stages"]} == {"done earlier"}
    assert time.time() - started < 5
    assert again["stages"][3]["losses"] == summary["stages"][3]["losses"]

    # an interrupted last stage (no DONE yet) resumes from its checkpoint; the others stay skipped
    (out / "stages" / f"07-{names[-1]}" / "DONE").unlink()
    resumed = run_data_recipe(recipe, out, **kwargs)
    assert [s["status"] for s in resumed["stages"]] == ["done earlier"] * 6 + ["trained"]

    with pytest.raises(ValueError, match=r"stage 'stage1-projectors' .* other settings \(steps: 1 -> 2"):
        run_data_recipe(recipe, out, **{**kwargs, "scale": ScaleDown(max_steps=2, resolution=32, batch_size=1)})


def test_plain_file_recipe_runs_through_todays_finetune(tmp_path):
    """Stages of plain files (what `vargpt finetune --data` reads) need nothing new from finetune: two stages,
    chained, stopped after the first and continued."""
    root = paper_data_root(tmp_path / "data")
    raw = {
        "kind": "finetune",
        "name": "two-stages",
        "model": "tiny",
        "stages": [
            {"name": "sft", "plan": "stage3-decoder", "data": ["generation/laion_coco_aesthetic.jsonl"], "steps": 1,
             "batch_size": 2, "learning_rate": 1e-3},
            {"name": "dpo", "plan": "stage3-dpo", "data": [{"path": "dpo/256/pairs.jsonl"}], "steps": 1,
             "batch_size": 1, "beta": 0.2},
        ],
    }  # fmt: skip
    (root / "recipe.json").write_text(json.dumps(raw))
    recipe = load_data_recipe(root / "recipe.json")  # no --data-root: the recipe file's folder
    out = tmp_path / "run"
    first = run_data_recipe(recipe, out, cpu=True, quiet=True, stop_after="sft")
    assert [s["status"] for s in first["stages"]] == ["trained"] and not first["complete"]
    second = run_data_recipe(recipe, out, cpu=True, quiet=True)
    assert [s["status"] for s in second["stages"]] == ["done earlier", "trained"] and second["complete"]
    assert json.loads((out / "stages" / "02-dpo" / "stage.json").read_text())["beta"] == 0.2


def test_an_interrupted_streamed_stage_resumes_to_the_same_weights(tmp_path):
    """The stream replays its seeded order on every iter(), so the Trainer's resume (skip the batches already
    trained) sees the rows an uninterrupted run saw: same final weights."""
    from safetensors.torch import load_file

    root = paper_data_root(tmp_path / "data")
    raw = {
        "kind": "finetune",
        "name": "streamed",
        "model": "tiny",
        "stages": [
            {"name": "sft", "plan": "stage3-decoder", "steps": 3, "batch_size": 1, "learning_rate": 3e-3,
             "save_steps": 1, "data": [
                 {"path": "generation/laion_coco_aesthetic.jsonl", "streaming": True, "weight": 1, "shuffle_buffer": 2},
                 {"path": "generation/journeydb.jsonl", "streaming": True, "weight": 1, "shuffle_buffer": 2}]},
        ],
    }  # fmt: skip
    recipe = parse_data_recipe(raw)
    out = tmp_path / "run"
    first = run_data_recipe(recipe, out, data_root=root, cpu=True, quiet=True)
    folder = out / "stages" / "01-sft"
    reference = load_file(str(folder / "final" / "model.safetensors"))
    # as if killed after the checkpoint of step 2: no DONE, no final model, no checkpoint-3
    for name in ("DONE", "metrics.json"):
        (folder / name).unlink()
    shutil.rmtree(folder / "final")
    shutil.rmtree(folder / "checkpoint-3")
    resumed = run_data_recipe(recipe, out, data_root=root, cpu=True, quiet=True)
    assert resumed["stages"][0]["status"] == "trained"
    # the log history comes back with the checkpoint; step 3 was trained again on the same rows
    assert resumed["stages"][0]["losses"] == pytest.approx(first["stages"][0]["losses"], rel=1e-5)
    weights = load_file(str(folder / "final" / "model.safetensors"))
    assert max(float((weights[k] - reference[k]).abs().max()) for k in reference) < 1e-6


def test_kind_decides_the_runner():
    assert is_data_recipe(PAPER)
    assert not is_data_recipe("shapes-tiny")


def test_paper_recipe_follows_the_report():
    recipe = load_data_recipe(PAPER)
    table = {  # report Table 1: global batch, lr, steps; generation resolution from section 3.2.1
        "stage1-projectors": (1024, 1e-3, 2000, "stage1-projectors"),
        "stage2-llm": (256, 5e-5, 3100, "stage2-llm"),
        "sft-256": (1024, 5e-5, 40000, "stage3-decoder"),
        "dpo-256": (384, 1e-6, 5000, "stage3-dpo"),
        "sft-512": (512, 5e-5, 30000, "stage3-decoder"),
        "dpo-512": (384, 1e-6, 3000, "stage3-dpo"),
        "edit": (512, 5e-5, 2000, "edit"),
    }
    assert [s.name for s in recipe.stages] == list(table)
    for stage in recipe.stages:
        batch, lr, steps, plan = table[stage.name]
        assert stage.batch_size * stage.gradient_accumulation_steps * 8 == batch, stage.name
        assert (stage.learning_rate, stage.steps, stage.plan, stage.warmup_ratio) == (lr, steps, plan, 0.1)
        assert stage.notes
    resolutions = {s.name: s.resolution for s in recipe.stages}
    assert resolutions["sft-256"] == resolutions["dpo-256"] == 256
    assert resolutions["sft-512"] == resolutions["dpo-512"] == resolutions["edit"] == 512
    assert all(s.beta == 0.1 for s in recipe.stages if s.kind == "dpo")


def test_freeze_plans_match_the_original_stage_table():
    """The original code's freeze table (qwen2vl-v1.1): stage 1 trains the generation projectors and the sos
    embedding with the decoder frozen; 2 the LLM; 3 the decoder and projectors; editing all but the VAE."""
    from vargpt.training.stages import STAGES

    assert set(STAGES["stage1-projectors"].trainable) == {
        "image_gen_projector.",
        "image_gen_projector_out.",
        "sos_embedding.",
    }
    assert set(STAGES["stage2-llm"].trainable) == {"model.", "lm_head."}
    assert set(STAGES["stage3-decoder"].trainable) == set(STAGES["stage3-dpo"].trainable)
    assert "vargpt_gen." in STAGES["stage3-decoder"].trainable and "model." not in STAGES["stage3-decoder"].trainable
    assert set(STAGES["edit"].trainable) == {
        "visual.", "model.", "lm_head.", "vargpt_gen.", "image_gen_projector.", "image_gen_projector_out.",
        "sos_embedding.",
    }  # fmt: skip


def _paper_raw() -> dict:
    raw, _ = read_recipe_json(PAPER)
    return copy.deepcopy(raw)


def _broken(edit) -> dict:
    raw = _paper_raw()
    edit(raw)
    return raw


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.pop("model"), "recipe: model must be a non-empty string"),
        (lambda r: r.update(kind="shapes"), 'has "kind": "finetune"'),
        (lambda r: r.update(stages=[]), "stages must be a non-empty list"),
        (lambda r: r.update(epochs=3), r"recipe: unknown field\(s\) \['epochs'\]"),
        (lambda r: r["stages"][0].update(plan="stage9"), "stage 'stage1-projectors': unknown plan 'stage9'"),
        (lambda r: r["stages"][1].update(steps=0), "stage 'stage2-llm': steps must be a positive integer"),
        (lambda r: r["stages"][1].update(batch_size="4"), "stage 'stage2-llm': batch_size must be a positive"),
        (lambda r: r["stages"][2].update(learning_rate=-1), "stage 'sft-256': learning_rate must be a number > 0"),
        (lambda r: r["stages"][2].update(warmup_ratio=1.0), "stage 'sft-256': warmup_ratio must be a number"),
        (lambda r: r["stages"][2].update(beta=0.1), "stage 'sft-256': beta is a DPO setting"),
        (lambda r: r["stages"][3].update(beta=0), "stage 'dpo-256': beta must be a number > 0"),
        (lambda r: r["stages"][3].update(chosen_nll_weight=-1), "stage 'dpo-256': chosen_nll_weight must be"),
        (lambda r: r["stages"][3].pop("data"), "stage 'dpo-256': missing field 'data'"),
        (lambda r: r["stages"][3].update(data=[]), "stage 'dpo-256': data must be a non-empty list"),
        (lambda r: r["stages"][0]["data"][1].pop("weight"), r"stage 'stage1-projectors' data: .*needs a weight"),
        (lambda r: r["stages"][0]["data"][0].update(wieght=1), r"stage 'stage1-projectors' data\[0\]: unknown"),
        (lambda r: r["stages"][4].update(trainable=["vae_local."]), "stage 'sft-512': trainable names the image"),
        (lambda r: r["stages"][4].update(resolution=0), "stage 'sft-512': resolution must be a positive integer"),
        (lambda r: r["stages"][5].update(name="dpo 512"), "stage 5: name must be letters"),
        (lambda r: r["stages"][5].update(name="edit"), r"stage names must be unique; repeated: \['edit'\]"),
        (lambda r: r["stages"][6].update(options={"steps": 3}), r"stage 'edit': options: \['steps'\] are set by"),
        (lambda r: r["stages"][6].update(options={"turbo": True}), r"stage 'edit': options: unknown option"),
        (lambda r: r["stages"][6].update(lr=1), r"stage 'edit': unknown field\(s\) \['lr'\]"),
    ],
)
def test_validation_names_the_stage_and_field(edit, message):
    with pytest.raises(ValueError, match=message):
        parse_data_recipe(_broken(edit))


def test_missing_files_and_data_root_fail_before_training(tmp_path):
    recipe = load_data_recipe(PAPER)
    with pytest.raises(ValueError, match="stage 'stage1-projectors' names files relative to a data root"):
        run_data_recipe(recipe, tmp_path / "run", model="tiny")
    root = paper_data_root(tmp_path / "data")
    (root / "edit" / "stylebooth_11k.jsonl").unlink()  # the last stage's file: found missing before stage 1 runs
    with pytest.raises(FileNotFoundError, match=r"stage 'edit' data\[0\]: file .*stylebooth_11k.jsonl"):
        run_data_recipe(recipe, tmp_path / "run", data_root=root, model="tiny")
    assert not (tmp_path / "run" / "stages").exists()
    with pytest.raises(ValueError, match="--stop-after 'sft-1024' is not a stage"):
        run_data_recipe(recipe, tmp_path / "run", data_root=root, stop_after="sft-1024")


def test_scale_down():
    stage = load_data_recipe(PAPER).stages[2]
    small = SMALL.apply(stage)
    assert (small.steps, small.resolution, small.batch_size, small.gradient_accumulation_steps) == (1, 32, 1, 1)
    assert ScaleDown(max_steps=10**6).apply(stage).steps == stage.steps
    kept = ScaleDown(gradient_accumulation_steps=2).apply(stage)
    assert (kept.batch_size, kept.gradient_accumulation_steps) == (stage.batch_size, 2)
