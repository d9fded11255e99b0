"""Collating validated rows into model batches (vargpt.data.collator)."""

import json
import pickle

import pytest
import torch
from PIL import Image

from vargpt.configuration import VARGPTConfig
from vargpt.data.collator import IGNORE_INDEX, PreferenceCollator, SFTCollator
from vargpt.data.formats import load_preference_dataset, load_sft_dataset
from vargpt.modeling import VARGPTForConditionalGeneration
from vargpt.processing import VARGPTProcessor
from vargpt.tokenization import build_tiny_tokenizer

RESOLUTION = 32
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return VARGPTForConditionalGeneration(VARGPTConfig.from_preset("tiny")).eval()


@pytest.fixture(scope="module")
def processor():
    return VARGPTProcessor.from_tokenizer(build_tiny_tokenizer())


@pytest.fixture(scope="module")
def num_pads(model):
    return model.num_image_gen_pad_tokens(model.generation_schedule(RESOLUTION))


@pytest.fixture
def data_dir(tmp_path):
    for name, rgb in COLOURS.items():
        Image.new("RGB", (48, 40), rgb).save(tmp_path / f"{name}.png")
    return tmp_path


def sft_rows(data_dir):
    rows = [
        {
            "messages": [
                {"role": "user", "content": "<image>What is this?"},
                {"role": "assistant", "content": "A white card."},
                {"role": "user", "content": "Draw two."},
                {"role": "assistant", "content": "First <image_gen> then <image_gen>."},
            ],
            "images": ["white.png", "red.png", "green.png"],
        },
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Paint the sky"},
                {"role": "assistant", "content": "\nSky: <image_gen>"},
            ],
            "images": ["blue.png"],
        },
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    ]
    path = data_dir / "sft.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    dataset, report = load_sft_dataset(path, strict=True)
    assert report.kept_rows == 3
    return [dataset[i] for i in range(len(dataset))]


def pixel_value(channel):
    return channel / 255 * 2 - 1


def test_labels_cover_exactly_the_assistant_answers(data_dir, processor, num_pads):
    batch = SFTCollator(processor, RESOLUTION, num_pads)(sft_rows(data_dir))
    tokenizer = processor.tokenizer
    expected = [
        "A white card.<|im_end|>First <|image_gen_start|> then <|image_gen_start|>.<|im_end|>",
        "\nSky: <|image_gen_start|><|im_end|>",
        "Hello!<|im_end|>",
    ]
    for b, answer in enumerate(expected):
        labels, ids = batch["labels"][b], batch["input_ids"][b]
        labelled = labels != IGNORE_INDEX
        assert tokenizer.decode(labels[labelled]) == answer
        assert torch.equal(labels[labelled], ids[labelled])
    # The prompt (system, user turns, assistant headers) is unlabelled: decoding the rest shows no answer text.
    rest = tokenizer.decode(
        batch["input_ids"][2][(batch["labels"][2] == IGNORE_INDEX) & (batch["attention_mask"][2] == 1)]
    )
    assert (
        rest == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n\n"
    )


def test_pad_slots_image_tokens_and_padding_are_unlabelled_and_padding_is_right(data_dir, processor, num_pads):
    batch = SFTCollator(processor, RESOLUTION, num_pads)(sft_rows(data_dir))
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    for token_id in (processor.image_gen_pad_token_id, processor.image_gen_end_token_id, processor.image_token_id):
        assert (ids == token_id).any()
        assert (labels[ids == token_id] == IGNORE_INDEX).all()
    assert (labels[mask == 0] == IGNORE_INDEX).all()
    assert ((ids == processor.image_gen_pad_token_id).sum(dim=1) == torch.tensor([2, 1, 0]) * num_pads).all()
    lengths = mask.sum(dim=1)
    for b, length in enumerate(lengths.tolist()):  # ones then zeros: right padding
        assert mask[b, :length].all() and not mask[b, length:].any()
        assert (ids[b, length:] == processor.tokenizer.pad_token_id).all()
    assert lengths.min() < ids.shape[1]
    assert batch["image_grid_thw"].shape == (1, 3)
    assert (ids == processor.image_token_id).sum() == batch["image_grid_thw"].prod() // 4


def test_generation_targets_follow_the_start_tokens_in_reading_order(data_dir, processor, num_pads):
    batch = SFTCollator(processor, RESOLUTION, num_pads)(sft_rows(data_dir))
    starts = (batch["input_ids"] == processor.image_gen_start_token_id).nonzero().tolist()
    assert [b for b, _ in starts] == [0, 0, 1]
    targets = batch["pixel_gen_values"]
    assert targets.shape == (3, 3, RESOLUTION, RESOLUTION) and targets.dtype == torch.float32
    for target, colour in zip(targets, ("red", "green", "blue"), strict=True):
        expected = torch.tensor([pixel_value(c) for c in COLOURS[colour]]).view(3, 1, 1)
        assert torch.allclose(target, expected.expand_as(target), atol=1e-6)


def test_batch_runs_through_the_tiny_model_with_finite_losses(data_dir, processor, num_pads, model):
    batch = SFTCollator(processor, RESOLUTION, num_pads)(sft_rows(data_dir))
    with torch.no_grad():
        out = model(**batch)
    assert out.text_loss is not None and torch.isfinite(out.text_loss)
    assert out.image_loss is not None and torch.isfinite(out.image_loss)
    assert out.image_logits.shape[0] == 3


def test_over_long_rows_and_unreadable_images_name_the_row(data_dir, processor, num_pads):
    rows = sft_rows(data_dir)
    with pytest.raises(ValueError, match=r"sft\.jsonl row 0 is \d+ tokens long .* max_length=50"):
        SFTCollator(processor, RESOLUTION, num_pads, max_length=50)(rows)
    (data_dir / "red.png").write_bytes(b"not a png")  # exists at load time, fails when decoded
    with pytest.raises(ValueError, match=r"sft\.jsonl row 0: cannot read image .*red\.png"):
        SFTCollator(processor, RESOLUTION, num_pads)(rows)


def test_bad_collator_arguments_are_rejected(processor):
    with pytest.raises(ValueError, match="num_image_gen_pad_tokens"):
        SFTCollator(processor, RESOLUTION, 0)
    with pytest.raises(ValueError, match="max_length"):
        SFTCollator(processor, RESOLUTION, 8, max_length=-1)
    with pytest.raises(ValueError, match="empty batch"):
        SFTCollator(processor, RESOLUTION, 8)([])


def preference_rows(data_dir):
    rows = [
        {
            "conversations": [{"from": "human", "value": "<image>Make it red"}],
            "chosen": {"from": "gpt", "value": "<image_gen>"},
            "rejected": {"from": "gpt", "value": "<image_gen>"},
            "images": ["white.png", "red.png", "green.png"],
        },
        {
            "conversations": [{"from": "human", "value": "A blue sky, please, in a long prompt"}],
            "chosen": {"from": "gpt", "value": "Here it is: <image_gen>"},
            "rejected": {"from": "gpt", "value": "<image_gen>"},
            "images": ["blue.png", "white.png"],
        },
    ]
    path = data_dir / "pref.json"
    path.write_text(json.dumps(rows))
    dataset, _ = load_preference_dataset(path, strict=True)
    return [dataset[i] for i in range(len(dataset))]


def test_preference_batches_share_the_prompt_and_differ_in_the_target(data_dir, processor, num_pads):
    batch = PreferenceCollator(processor, RESOLUTION, num_pads)(preference_rows(data_dir))
    chosen, rejected = batch["chosen"], batch["rejected"]
    for b in range(2):
        # The prompt is everything before the first labelled token (the assistant answer).
        prompt_lengths = [int((side["labels"][b] != IGNORE_INDEX).nonzero()[0]) for side in (chosen, rejected)]
        assert prompt_lengths[0] == prompt_lengths[1]
        n = prompt_lengths[0]
        assert torch.equal(chosen["input_ids"][b, :n], rejected["input_ids"][b, :n])
        assert processor.tokenizer.decode(chosen["input_ids"][b, :n]).endswith("<|im_start|>assistant\n")
    # Row 1's answers differ (text + image vs image only), so the two sides are not the same sequence.
    assert chosen["attention_mask"][1].sum() > rejected["attention_mask"][1].sum()
    assert torch.equal(chosen["pixel_values"], rejected["pixel_values"])
    assert torch.equal(chosen["image_grid_thw"], rejected["image_grid_thw"])
    red, green = (pixel_value(COLOURS[c][0]) for c in ("red", "green"))
    assert torch.allclose(chosen["pixel_gen_values"][0, 0], torch.full((RESOLUTION, RESOLUTION), red))
    assert torch.allclose(rejected["pixel_gen_values"][0, 0], torch.full((RESOLUTION, RESOLUTION), green))
    assert chosen["pixel_gen_values"].shape[0] == rejected["pixel_gen_values"].shape[0] == 2


def test_collators_survive_pickling_for_dataloader_workers(data_dir, processor, num_pads):
    rows = sft_rows(data_dir)
    collator = SFTCollator(processor, RESOLUTION, num_pads)
    restored = pickle.loads(pickle.dumps(collator))
    expected, got = collator(rows), restored(rows)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[key], got[key]) for key in expected)
    pickle.loads(pickle.dumps(PreferenceCollator(processor, RESOLUTION, num_pads)))


def test_prompt_dropout_empties_only_text_to_image_prompts(data_dir, processor, num_pads):
    rows = sft_rows(data_dir)  # row 1 is text-to-image (with a system turn); rows 0 and 2 are not
    null = processor.null_prompt_ids().tolist()
    kept = SFTCollator(processor, RESOLUTION, num_pads)(rows)
    assert all(row[: len(null)] != null for row in kept["input_ids"].tolist())
    collator = SFTCollator(processor, RESOLUTION, num_pads, prompt_dropout=0.5)
    torch.manual_seed(0)
    dropped = 0
    for _ in range(16):
        batch = collator(rows)
        ids = batch["input_ids"].tolist()
        assert ids[0][: len(null)] != null and ids[2][: len(null)] != null
        if ids[1][: len(null)] == null:
            dropped += 1
            # the training row now reads exactly what null-prompt guidance feeds the unconditional branch,
            # and its answer (text and image) is still learnt
            assert (batch["labels"][1] != IGNORE_INDEX).sum() == (kept["labels"][1] != IGNORE_INDEX).sum()
            assert torch.equal(batch["pixel_gen_values"], kept["pixel_gen_values"])
        else:
            assert ids[1] == kept["input_ids"][1].tolist()
    assert 0 < dropped < 16
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="prompt_dropout"):
            SFTCollator(processor, RESOLUTION, num_pads, prompt_dropout=bad)


# -- video rows --------------------------------------------------------------------------------------------------


def test_a_video_row_trains_the_vit_through_the_video_path(data_dir, num_pads):
    """A sharegpt row with `<video>` and a video file: video slots unlabelled, a finite loss, gradients in the ViT."""
    from tests.clips import moving_square, write_clip
    from vargpt.video_io import VideoSampling

    write_clip(data_dir / "clip.mkv", moving_square(25))
    row = {
        "messages": [
            {"role": "user", "content": "<video>Where does the square go?"},
            {"role": "assistant", "content": "Right."},
        ],
        "videos": ["clip.mkv"],
    }
    path = data_dir / "video.jsonl"
    path.write_text(json.dumps(row) + "\n")
    dataset, _ = load_sft_dataset(path, strict=True)
    sampling = VideoSampling(min_pixels=56 * 56, max_pixels=56 * 56)
    processor = VARGPTProcessor.from_tokenizer(
        build_tiny_tokenizer(), video_min_pixels=56 * 56, video_max_pixels=56 * 56
    )
    batch = SFTCollator(processor, RESOLUTION, num_pads, video_sampling=sampling)([dataset[0]])
    assert batch["video_grid_thw"].tolist() == [[2, 4, 4]]  # 4 sampled frames of 56 x 56
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    slots = ids == processor.video_token_id
    assert int(slots.sum()) == 8 and (labels[slots] == IGNORE_INDEX).all()
    assert processor.tokenizer.decode(labels[labels != IGNORE_INDEX]) == "Right.<|im_end|>"
    torch.manual_seed(0)
    model = VARGPTForConditionalGeneration(VARGPTConfig.from_preset("tiny")).train()
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    vit_grads = [p.grad for p in model.visual.parameters() if p.grad is not None]
    assert vit_grads and any(float(g.abs().sum()) > 0 for g in vit_grads)


def test_prompt_dropout_leaves_a_conversation_that_draws_after_a_question(data_dir, processor, num_pads):
    drawing = sft_rows(data_dir)[1]  # text-to-image, one user turn
    earlier = [{"role": "user", "content": "How many circles?"}, {"role": "assistant", "content": "two"}]
    turns = [m for m in drawing["messages"] if m["role"] == "system"] + earlier
    conversation = {**drawing, "messages": turns + [m for m in drawing["messages"] if m["role"] != "system"]}
    kept = SFTCollator(processor, RESOLUTION, num_pads)([conversation])["input_ids"]
    collator = SFTCollator(processor, RESOLUTION, num_pads, prompt_dropout=0.99)
    torch.manual_seed(0)
    for _ in range(8):
        assert torch.equal(collator([conversation])["input_ids"], kept)
    one_turn = collator([drawing])["input_ids"][0].tolist()  # the same collator still drops the one-turn request
    assert one_turn[: len(processor.null_prompt_ids())] == processor.null_prompt_ids().tolist()
