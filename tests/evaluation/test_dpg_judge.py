"""DPG-Bench's transformers judge (tiny random BLIP / ViLT saved offline) and the official dependency rule."""

import csv
import json

import pytest
import torch
from PIL import Image

from vargpt.cli.main import main
from vargpt.evaluation.dpg import (
    DPGQuestion,
    apply_dependencies,
    grid_tiles,
    make_grid,
    read_dpg_questions,
    resolve_vqa,
    score_answers,
    score_dpg_folder,
    summarize_dpg,
    write_category_csv,
)
from vargpt.evaluation.dpg_judge import TransformersVQA, normalize_answer, parse_vqa_spec

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "yes", "no"]
WORDS += ["is", "there", "a", "red", "blue", "circle", "square", "the", "of", "left", "?", ","]
YES, NO = WORDS.index("yes"), WORDS.index("no")
SIDE = 32

CSV_FIELDS = ["item_id", "proposition_id", "dependency", "category_broad", "category_detailed", "tuple"]
CSV_FIELDS += ["question_natural_language"]
# item 7: 1 <- 2 <- 3 is a chain, 4 has no parent, 5 depends on 1 and 4
CSV_ROWS = [
    ("7", 1, "0", "entity", "whole", "entity - whole (circle)", "Is there a circle?"),
    ("7", 2, "1", "attribute", "color", "attribute - color (circle, red)", "Is the circle red?"),
    ("7", 3, "2", "attribute", "color", "attribute - color (circle, bright red)", "Is the red circle bright?"),
    ("7", 4, "0", "entity", "whole", "entity - whole (square)", "Is there a square?"),
    ("7", 5, "1,4", "relation", "spatial", "relation - spatial (circle, square, left of)", "Is the circle left?"),
]


def _tokenizer(tmp_path):
    from transformers import BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    return BertTokenizerFast(vocab=str(vocab), bos_token="[DEC]")


def save_tiny_blip(folder, tmp_path, favour: int | None = None) -> str:
    """A randomly initialised BlipForQuestionAnswering + BlipProcessor; `favour` pins the decoder's output bias
    on one token so the model always says that word."""
    from transformers import BlipConfig, BlipForQuestionAnswering, BlipProcessor
    from transformers.models.blip import BlipImageProcessorPil

    text = dict(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    text |= dict(intermediate_size=37, max_position_embeddings=64, encoder_hidden_size=32)
    text |= dict(bos_token_id=WORDS.index("[DEC]"), pad_token_id=0, sep_token_id=3, eos_token_id=3)
    vision = dict(hidden_size=32, image_size=SIDE, patch_size=8, num_hidden_layers=1, num_attention_heads=2)
    vision |= dict(intermediate_size=37)
    torch.manual_seed(0)
    model = BlipForQuestionAnswering(BlipConfig(text_config=text, vision_config=vision, projection_dim=16))
    if favour is not None:
        with torch.no_grad():
            model.text_decoder.cls.predictions.bias[favour] = 100.0
    processor = BlipProcessor(BlipImageProcessorPil(size={"height": SIDE, "width": SIDE}), _tokenizer(tmp_path))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def write_questions(path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_FIELDS)
        writer.writerows(CSV_ROWS)


def write_grid(folder, item_id: str = "7") -> None:
    colours = ["red", "blue", "green", "white"]
    folder.mkdir(parents=True, exist_ok=True)
    make_grid([Image.new("RGB", (SIDE, SIDE), c) for c in colours]).save(folder / f"{item_id}.png")


class FixedVQA:
    """Answers from a table keyed by question text; records every call."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    def __call__(self, image: Image.Image, question: str) -> str:
        self.calls.append(question)
        return self.answers[question]


# ---------------------------------------------------------------- the official dependency rule


def test_a_no_to_the_root_zeroes_the_whole_chain(tmp_path):
    write_questions(tmp_path / "dpg_bench.csv")
    questions = read_dpg_questions(tmp_path / "dpg_bench.csv")["7"]
    raw = {1: 0.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 1.0}
    # the official loop reads scores as it zeroes them: 2 falls with 1, and 3 falls with 2
    assert apply_dependencies(raw, questions) == {1: 0.0, 2: 0.0, 3: 0.0, 4: 1.0, 5: 0.0}
    assert apply_dependencies({1: 1.0, 2: 1.0, 3: 1.0, 4: 0.0, 5: 1.0}, questions) == {
        1: 1.0,
        2: 1.0,
        3: 1.0,
        4: 0.0,
        5: 0.0,
    }


def test_a_parent_listed_after_its_child_is_read_before_its_own_zeroing():
    # file order 3, 2, 1: when 3 is visited its parent 2 still holds its raw "yes"
    questions = [
        DPGQuestion(3, (2,), "attribute - color", "c"),
        DPGQuestion(2, (1,), "attribute - color", "b"),
        DPGQuestion(1, (), "entity - whole", "a"),
    ]
    assert apply_dependencies({1: 0.0, 2: 1.0, 3: 1.0}, questions) == {1: 0.0, 2: 0.0, 3: 1.0}


def test_fixed_answers_score_with_dependencies_and_categories_use_raw_answers(tmp_path):
    write_questions(tmp_path / "dpg_bench.csv")
    questions = read_dpg_questions(tmp_path / "dpg_bench.csv")
    vqa = FixedVQA(
        {
            "Is there a circle?": "no",
            "Is the circle red?": "yes",
            "Is the red circle bright?": "yes",
            "Is there a square?": "yes",
            "Is the circle left?": "yes",
        }
    )
    write_grid(tmp_path / "images")
    results, summary = score_dpg_folder(tmp_path / "images", questions, vqa, progress=False)
    assert len(vqa.calls) == 4 * 5  # every question on each of the 4 crops
    assert results[0].tile_scores == (0.2,) * 4  # only question 4 survives the "no" to question 1
    assert summary["dpg_score"] == pytest.approx(20.0)
    # categories: the last crop's answers before zeroing (the official qid2scores_orig)
    assert summary["l1_categories"] == {"attribute": 100.0, "entity": 50.0, "relation": 100.0}
    assert summary["l1_questions"]["attribute"] == 2 and summary["l2_questions"]["attribute - color"] == 2
    path = write_category_csv(summary, tmp_path / "out" / "categories.csv")
    rows = list(csv.DictReader(path.open(encoding="utf-8")))
    assert rows[0] == {"level": "overall", "category": "overall", "score": "20.0000", "questions": "1"}
    by_name = {(r["level"], r["category"]): r for r in rows}
    assert by_name["L1", "entity"]["score"] == "50.0000"
    assert by_name["L2", "relation - spatial"]["questions"] == "1"
    with pytest.raises(ValueError, match="lacks 'images'"):
        write_category_csv({"dpg_score": 1.0}, tmp_path / "bad.csv")


def test_official_exact_yes_after_normalisation():
    assert normalize_answer("Yes.") == "yes"
    assert normalize_answer("  no, it is not") == "no"
    assert normalize_answer("yesterday") == "yesterday"
    assert normalize_answer("Two Cats!") == "two cats"
    result = score_answers("7", [DPGQuestion(1, (), "entity - whole", "q")], [{1: normalize_answer("YES")}])
    assert result.score == 1.0


def test_vqa_names_resolve_or_fail_clearly():
    assert parse_vqa_spec("shapes") == ("shapes", None)
    assert parse_vqa_spec("hf:Salesforce/blip-vqa-base") == ("hf", "Salesforce/blip-vqa-base")
    with pytest.raises(ValueError, match="needs a Hub id"):
        parse_vqa_spec("hf:")
    with pytest.raises(ValueError, match="unknown VQA model 'mplug'"):
        parse_vqa_spec("mplug")
    with pytest.raises(ValueError, match="cannot load a visual-question-answering model"):
        resolve_vqa("hf:/nonexistent/folder/of/a/model")


# ---------------------------------------------------------------- the transformers judge


def test_tiny_blip_judge_matches_its_own_raw_answers(tmp_path):
    vqa = resolve_vqa("hf:" + save_tiny_blip(tmp_path / "blip", tmp_path))
    assert isinstance(vqa, TransformersVQA) and vqa.generative
    image = Image.new("RGB", (48, 40), "red")
    raw = vqa.raw_answer(image, "Is there a red circle?")
    assert vqa(image, "Is there a red circle?") == normalize_answer(raw)
    assert "[DEC]" not in raw  # the decoder's start token is special, not part of the answer


def test_biased_tiny_blip_says_yes_or_no(tmp_path):
    always_yes = TransformersVQA.from_pretrained(save_tiny_blip(tmp_path / "yes", tmp_path, favour=YES))
    always_no = TransformersVQA.from_pretrained(save_tiny_blip(tmp_path / "no", tmp_path, favour=NO))
    image = Image.new("RGB", (SIDE, SIDE), "blue")
    assert always_yes.raw_answer(image, "Is there a square?").split()[0] == "yes"
    assert always_yes(image, "Is there a square?") == "yes"
    assert always_no(image, "Is there a square?") == "no"


def test_tiny_vilt_classifier_judge(tmp_path):
    from transformers import ViltConfig, ViltForQuestionAnswering, ViltProcessor
    from transformers.models.vilt import ViltImageProcessorPil

    sizes = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    sizes |= dict(image_size=SIDE, patch_size=8, max_position_embeddings=40)
    labels = dict(id2label={0: "Yes", 1: "no"}, label2id={"Yes": 0, "no": 1})
    config = ViltConfig(vocab_size=len(WORDS), **sizes, **labels)
    model = ViltForQuestionAnswering(config)
    with torch.no_grad():
        model.classifier[-1].bias[0] = 100.0
    processor = ViltProcessor(ViltImageProcessorPil(size={"shortest_edge": SIDE}, size_divisor=8), _tokenizer(tmp_path))
    model.save_pretrained(tmp_path / "vilt")
    processor.save_pretrained(tmp_path / "vilt")
    vqa = resolve_vqa(f"hf:{tmp_path / 'vilt'}")
    assert not vqa.generative
    assert vqa(Image.new("RGB", (40, 40)), "is there a circle?") == "yes"  # label "Yes", normalised


def test_dpg_score_cli_end_to_end_with_a_tiny_blip(tmp_path, capsys):
    write_questions(tmp_path / "dpg_bench.csv")
    write_grid(tmp_path / "images")
    folder = save_tiny_blip(tmp_path / "blip", tmp_path)
    args = ["eval", "dpg-score", str(tmp_path / "images"), "--questions", str(tmp_path / "dpg_bench.csv")]
    assert main([*args, "--vqa", f"hf:{folder}", "--quiet", "--results", str(tmp_path / "out" / "r.jsonl")]) == 0
    summary = json.loads((tmp_path / "out" / "r_summary.json").read_text())
    assert summary["vqa"] == f"hf:{folder}" and summary["images"] == 1
    (result,) = [json.loads(line) for line in (tmp_path / "out" / "r.jsonl").read_text().splitlines()]
    # the answers recorded are the judge's own, crop by crop, and the score is the official arithmetic of them
    judge = TransformersVQA.from_pretrained(folder)
    questions = read_dpg_questions(tmp_path / "dpg_bench.csv")["7"]
    with Image.open(tmp_path / "images" / "7.png") as grid:
        expected = [{str(q.proposition_id): judge(tile, q.question) for q in questions} for tile in grid_tiles(grid)]
    assert result["answers"] == expected
    rescored = score_answers("7", questions, [{int(k): v for k, v in a.items()} for a in expected])
    assert summary["dpg_score"] == pytest.approx(summarize_dpg([rescored], {"7": questions})["dpg_score"])
    rows = list(csv.DictReader((tmp_path / "out" / "r_categories.csv").open(encoding="utf-8")))
    assert {r["level"] for r in rows} == {"overall", "L1", "L2"}

    # a judge that always says "yes" gives 100 everywhere; one that always says "no" gives 0
    for favour, expected_score in ((YES, 100.0), (NO, 0.0)):
        biased = save_tiny_blip(tmp_path / f"biased{favour}", tmp_path, favour=favour)
        out = tmp_path / f"out{favour}" / "r.jsonl"
        assert main([*args, "--vqa", f"hf:{biased}", "--quiet", "--results", str(out)]) == 0
        rows = list(csv.DictReader(out.with_name("r_categories.csv").open(encoding="utf-8")))
        assert {float(r["score"]) for r in rows} == {expected_score}
    capsys.readouterr()

    assert main([*args, "--vqa", "mplug-large"]) == 2
    assert "unknown VQA model 'mplug-large'" in capsys.readouterr().err
