"""GenEval's judge (Mask2Former + CLIP): its rules on hand-made inputs, and the whole CLI path on tiny random
models of the real classes, built offline."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vargpt.cli.main import main
from vargpt.evaluation.geneval import OFFICIAL_FILTER, ObjectDetection, make_detector, score_detections
from vargpt.evaluation.geneval_judge import (
    GENEVAL_COLOUR_PROMPTS,
    GENEVAL_COLOURS,
    CLIPColourClassifier,
    InstanceMask,
    Mask2FormerCLIPDetector,
    colour_crop,
    geneval_object_names,
    mask_box,
    select_instances,
)

SIZE = 64
REFERENCE_RGB = {
    "red": (255, 0, 0),
    "orange": (255, 128, 0),
    "yellow": (255, 255, 0),
    "green": (0, 160, 0),
    "blue": (0, 0, 255),
    "purple": (128, 0, 128),
    "pink": (255, 160, 200),
    "brown": (120, 70, 20),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
}


# ---------------------------------------------------------------- hand-made cases: the rules decide


def test_mask_box_is_mmdets_mask2bbox():
    mask = np.zeros((10, 12), dtype=bool)
    mask[2:5, 3:9] = True
    assert mask_box(mask) == (3.0, 2.0, 9.0, 5.0)  # last pixel + 1
    assert mask_box(np.zeros((4, 4), dtype=bool)) == (0.0, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="2-D"):
        mask_box(np.zeros(4, dtype=bool))


def test_colour_crop_pastes_the_mask_on_grey_and_cuts_the_box():
    image = Image.new("RGB", (20, 20), (255, 0, 0))
    mask = np.zeros((20, 20), dtype=bool)
    mask[5:10, 5:10] = True
    mask[5, 5] = False
    crop = colour_crop(image, mask, mask_box(mask))
    assert crop.size == (5, 5)
    assert crop.getpixel((0, 0)) == (153, 153, 153)  # outside the mask: the official #999
    assert crop.getpixel((2, 2)) == (255, 0, 0)
    assert colour_crop(image, None, (0, 0, 4, 3)).size == (4, 3)
    with pytest.raises(ValueError, match="does not match"):
        colour_crop(image, mask[:10], (0, 0, 4, 4))


def test_preselection_keeps_everything_the_official_filter_would():
    rng = np.random.default_rng(0)
    empty = np.zeros((1, 1), dtype=bool)
    instances = [
        InstanceMask(str(rng.choice(["cup", "dog"])), float(rng.random()), (float(i), 0.0, i + 5.0, 5.0), empty)
        for i in range(60)
    ]

    def official(chosen, tag):
        dets = [ObjectDetection(i.label, None, i.bbox, i.score) for i in chosen]
        return OFFICIAL_FILTER.select(dets, tag)

    kept = select_instances(instances, OFFICIAL_FILTER.threshold, OFFICIAL_FILTER.max_objects)
    assert all(i.score > 0.3 for i in kept) and len(kept) < len(instances)
    for tag in ("counting", "two_object"):
        assert sorted(map(repr, official(kept, tag))) == sorted(map(repr, official(instances, tag)))


class _Texts(dict):
    def to(self, device):
        return self


class _Pooled:
    def __init__(self, pooled):
        self.pooler_output = pooled


class _ColourOracle(torch.nn.Module):
    """A stand-in CLIP: texts embed as the one-hot of the colour they name, images as the one-hot of the
    reference colour nearest to their mean RGB; it records the prompts it was given."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.prompts: list[str] = []

    def get_text_features(self, texts):
        self.prompts += texts
        rows = [[float(f"a {c} " in t + " " or f"a {c}-colored" in t) for c in GENEVAL_COLOURS] for t in texts]
        return _Pooled(torch.tensor(rows))

    def get_image_features(self, pixel_values):
        refs = torch.tensor([REFERENCE_RGB[c] for c in GENEVAL_COLOURS], dtype=torch.float32)
        nearest = torch.cdist(pixel_values, refs).argmin(dim=1)
        return _Pooled(torch.nn.functional.one_hot(nearest, len(GENEVAL_COLOURS)).float())


class _MeanRGBProcessor:
    """Reduces an image to the mean RGB of its pixels that are not the flat #999 canvas (a stand-in for CLIP
    reading the object rather than the neutral background)."""

    def tokenizer(self, texts, **kwargs):
        return _Texts(texts=list(texts))

    def image_processor(self, images, **kwargs):
        means = []
        for image in images:
            pixels = np.asarray(image, dtype=np.float32).reshape(-1, 3)
            means.append(pixels[(pixels != 153).any(axis=1)].mean(axis=0))
        return {"pixel_values": torch.tensor(np.stack(means))}


def test_colour_rule_reads_the_masked_crop_not_the_background():
    # a red triangle on blue: half its box is blue background, its mask is all red
    yy, xx = np.mgrid[0:40, 0:40]
    mask = (xx + yy < 40) & (xx >= 4) & (yy >= 4)
    pixels = np.zeros((40, 40, 3), dtype=np.uint8)
    pixels[...] = (0, 0, 255)
    pixels[mask] = (255, 0, 0)
    image = Image.fromarray(pixels)
    oracle = _ColourOracle()
    classify = CLIPColourClassifier(oracle, _MeanRGBProcessor())
    box = mask_box(mask)
    assert classify([colour_crop(image, mask, box), colour_crop(image, None, box)], "car") == ["red", "purple"]
    assert {"a photo of a red car", "a photo of a red-colored car", "a photo of a red object"} <= set(oracle.prompts)
    assert len(oracle.prompts) == len(GENEVAL_COLOURS) * len(GENEVAL_COLOUR_PROMPTS)
    classify([colour_crop(image, mask, box)], "car")
    assert len(oracle.prompts) == len(GENEVAL_COLOURS) * len(GENEVAL_COLOUR_PROMPTS)  # text weights cached per class


def test_colour_position_and_counting_rules_on_judge_detections():
    detections = [
        ObjectDetection("dog", "brown", (10.0, 20.0, 40.0, 50.0), 0.95),
        ObjectDetection("dog", "white", (44.0, 20.0, 60.0, 50.0), 0.6),
        ObjectDetection("cat", "black", (45.0, 10.0, 62.0, 30.0), 0.92),
    ]
    colour = {"tag": "colors", "prompt": "p", "include": [{"class": "dog", "count": 1, "color": "brown"}]}
    assert score_detections(detections, colour, (SIZE, SIZE))[0]  # the most confident dog is brown
    counting = {
        "tag": "counting",
        "prompt": "p",
        "include": [{"class": "dog", "count": 2}],
        "exclude": [{"class": "dog", "count": 3}],
    }
    ok, reason, _ = score_detections(detections, counting, (SIZE, SIZE))
    assert not ok and "expected dog>=2, found 1" in reason  # 0.6 is below the counting threshold 0.9
    counting["tag"] = "two_object"
    assert score_detections(detections, counting, (SIZE, SIZE))[0]
    position = {
        "tag": "position",
        "prompt": "p",
        "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["right of", 0]}],
    }
    assert score_detections(detections, position, (SIZE, SIZE))[0]
    position["include"][1]["position"] = ["above", 0]  # shrunk dy is -0.31 of |offset|: not above
    ok, reason, _ = score_detections(detections, position, (SIZE, SIZE))
    assert not ok and "expected cat above target, found right of target" in reason


# ---------------------------------------------------------------- tiny random models, the whole path


def _write_tokenizer_and_clip(folder):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    chars = [chr(i) for i in range(33, 127)]  # printable ASCII, each a word piece and a word end
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    text = dict(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32)
    CLIPModel(
        CLIPConfig(text_config=text, vision_config={**vision, "patch_size": 8}, projection_dim=8)
    ).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


def _write_mask2former(folder, favoured: str):
    """80 COCO-sized classes; the class head's bias makes every query `favoured`, so scores sit near 0.5."""
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    backbone = SwinConfig(
        image_size=SIZE,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=2,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=backbone,
        feature_size=32,
        mask_feature_size=32,
        hidden_dim=32,
        encoder_feedforward_dim=32,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        dim_feedforward=32,
        num_queries=8,
        id2label=dict(enumerate(f"coco_{i}" for i in range(80))),
    )
    model = Mask2FormerForUniversalSegmentation(config)
    with torch.no_grad():
        model.class_predictor.bias[geneval_object_names().index(favoured)] = 20.0
    model.save_pretrained(folder)
    Mask2FormerImageProcessor(size={"shortest_edge": SIZE, "longest_edge": SIZE}).save_pretrained(folder)


@pytest.fixture(scope="module")
def judge_dirs(tmp_path_factory):
    pytest.importorskip("scipy", reason="transformers' Mask2Former needs scipy (its Hungarian matcher)")
    root = tmp_path_factory.mktemp("judge")
    torch.manual_seed(0)
    _write_mask2former(root / "mask2former", favoured="cat")
    _write_tokenizer_and_clip(root / "clip")
    return root / "mask2former", root / "clip"


def _image(seed):
    return Image.fromarray((np.random.default_rng(seed).random((SIZE, SIZE, 3)) * 255).astype(np.uint8))


def test_tiny_judge_detects_with_geneval_names_and_colours(judge_dirs):
    detector = make_detector("geneval", detector_model=judge_dirs[0], clip_model=judge_dirs[1], device="cpu")
    assert isinstance(detector, Mask2FormerCLIPDetector)
    found = detector(_image(0))
    assert found and {d.label for d in found} == {"cat"}  # index 15 named by object_names.txt, not id2label
    assert all(0.3 < d.score < 0.9 and d.colour in GENEVAL_COLOURS for d in found)
    assert all(0 <= d.bbox[0] < d.bbox[2] <= SIZE and 0 <= d.bbox[1] < d.bbox[3] <= SIZE for d in found)
    assert [d.score for d in found] == sorted((d.score for d in found), reverse=True)
    resized = Mask2FormerCLIPDetector.from_pretrained(
        *judge_dirs, device="cpu", processor_kwargs={"size": {"shortest_edge": 96, "longest_edge": 96}}
    )
    assert resized.image_processor.size.shortest_edge == 96 and resized(_image(0))


def test_geneval_score_cli_with_the_tiny_judge(judge_dirs, tmp_path, capsys):
    prompts = [
        {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
        {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"},
        {
            "tag": "counting",
            "include": [{"class": "cat", "count": 2}],
            "exclude": [{"class": "cat", "count": 3}],
            "prompt": "a photo of two cats",
        },
        {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "blue"}], "prompt": "a blue cat"},
    ]
    for i, metadata in enumerate(prompts):
        (tmp_path / f"{i:05d}" / "samples").mkdir(parents=True)
        (tmp_path / f"{i:05d}" / "metadata.jsonl").write_text(json.dumps(metadata))
        _image(i).save(tmp_path / f"{i:05d}" / "samples" / "0000.png")
    argv = ["eval", "geneval-score", str(tmp_path), "--detector", "geneval", "--device", "cpu", "--quiet"]
    assert main([*argv, "--detector-model", str(judge_dirs[0]), "--clip-model", str(judge_dirs[1])]) == 0
    results = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in results[:3]] == [True, False, False]
    assert "expected dog>=1, found 0" in results[1]["reason"]
    assert "expected cat>=2, found 0" in results[2]["reason"]  # scores near 0.5 miss the 0.9 counting threshold
    detector = Mask2FormerCLIPDetector.from_pretrained(judge_dirs[0], judge_dirs[1], device="cpu")
    with Image.open(tmp_path / "00003" / "samples" / "0000.png") as image:
        top_colour = detector(image)[0].colour
    assert results[3]["correct"] == (top_colour == "blue")
    summary = json.loads(capsys.readouterr().out)
    assert summary["total_images"] == 4 and summary["tasks"]["single_object"]["score"] == 0.5


class _FakeSegmenter:
    def __init__(self, names):
        self.config = type("Config", (), {"id2label": dict(enumerate(names))})()

    def eval(self):
        return self


def test_coco_indices_are_named_like_the_official_evaluator():
    names = geneval_object_names()
    hub_names = [
        {"computer mouse": "mouse", "tv remote": "remote", "computer keyboard": "keyboard"}.get(n, n) for n in names
    ]
    detector = Mask2FormerCLIPDetector(_FakeSegmenter(hub_names), None, None)
    assert detector.class_names[64] == "computer mouse"  # the Hub's "mouse"
    swapped = [names[1], names[0], *names[2:]]
    with pytest.raises(ValueError, match="not in COCO's order"):
        Mask2FormerCLIPDetector(_FakeSegmenter(swapped), None, None)
    assert Mask2FormerCLIPDetector(_FakeSegmenter(["a", "b"]), None, None).class_names == ["a", "b"]


def test_make_detector_rejects_bad_names_and_options(tmp_path):
    with pytest.raises(ValueError, match="takes no models"):
        make_detector("shapes", detector_model="x")
    with pytest.raises(ValueError, match="unknown detector 'owl'"):
        make_detector("owl")
    with pytest.raises(FileNotFoundError, match="no model folder"):
        make_detector("geneval", detector_model=tmp_path / "missing", clip_model=tmp_path)
