"""The fast decoding path (static LLM cache, compiled calls) against the default eager path, on the CPU.

Tolerance: the static cache attends over its whole capacity with unused slots masked out, and compiled
kernels may fuse and reorder float sums, so logits agree to float32 rounding (measured ~2e-9 on tiny), not bit
for bit; 1e-5 absolute leaves room for other CPUs while still catching any real difference (a wrong position,
mask or cache slot moves logits by 1e-2 or more). Greedy tokens and seeded bits / pixels are compared exactly.
"""

from __future__ import annotations

import pytest
import torch

from vargpt.configuration import VARGPTConfig
from vargpt.generation import DecodingState, GenerationCancelled, stop_when
from vargpt.generation.static_cache import FastDecoding
from vargpt.modeling import VARGPTForConditionalGeneration

LOGIT_ATOL = 1e-5
NULL_PROMPT = torch.tensor([5, 6, 7, 8])


@pytest.fixture(scope="module")
def model() -> VARGPTForConditionalGeneration:
    torch.manual_seed(0)
    return VARGPTForConditionalGeneration(VARGPTConfig.from_preset("tiny")).eval()


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(10, 100, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row
    return ids, mask


def _generate(model, **kwargs):
    ids, mask = _prompts()
    return model.generate(ids, mask, seed=1, max_new_tokens=4, eos_token_id=-1, return_dict_in_generate=True, **kwargs)


def _assert_equal(eager, fast) -> None:
    assert torch.equal(eager.sequences, fast.sequences)
    for row_e, row_f in zip(eager.images, fast.images, strict=True):
        for img_e, img_f in zip(row_e, row_f, strict=True):
            assert torch.equal(img_e, img_f)
    for row_e, row_f in zip(eager.image_bits, fast.image_bits, strict=True):
        for bits_e, bits_f in zip(row_e, row_f, strict=True):
            assert all(torch.equal(a, b) for a, b in zip(bits_e, bits_f, strict=True))
    for row_e, row_f in zip(eager.image_logits, fast.image_logits, strict=True):
        for lg_e, lg_f in zip(row_e, row_f, strict=True):
            torch.testing.assert_close(lg_f, lg_e, rtol=0, atol=LOGIT_ATOL)


@pytest.mark.parametrize(
    "settings",
    [
        {"generation_mode": "text"},
        {"generation_mode": "image", "resolution": 32, "uncond_mode": "original"},
        {"generation_mode": "image", "resolution": 32, "uncond_mode": "null_prompt", "null_prompt_ids": NULL_PROMPT},
        {"generation_mode": "image", "resolution": 32, "cfg_scale": 1.0, "image_top_k": 1},
    ],
    ids=["text", "image-original-cfg", "image-null-prompt-cfg", "image-greedy-no-cfg"],
)
def test_static_cache_equals_the_eager_path(model, settings):
    eager = _generate(model, **settings)
    static = _generate(model, cache_implementation="static", **settings)
    _assert_equal(eager, static)
    if settings["generation_mode"] == "image":
        assert all(len(row) == 1 for row in static.images)


def test_static_cache_grows_when_an_answer_outruns_it(model):
    """Capacity is reserved for one image; a longer answer copies into a larger cache, same result."""
    ids, mask = _prompts()
    dynamic = DecodingState(model, ids, mask, None, None)
    static = DecodingState(model, ids, mask, None, None, FastDecoding(static_cache=True), capacity=ids.shape[1])
    real = torch.ones(2, dtype=torch.bool)
    for token in (11, 12, 13):
        embeds = model.model.embed_tokens(torch.full((2, 1), token))
        torch.testing.assert_close(static.step(embeds, real), dynamic.step(embeds, real), rtol=0, atol=LOGIT_ATOL)
    assert static.capacity >= ids.shape[1] + 3


def test_stop_when_still_cancels_on_the_static_path(model):
    calls = []

    def check() -> bool:
        calls.append(1)
        return len(calls) >= 3

    with pytest.raises(GenerationCancelled), stop_when(check):
        _generate(model, generation_mode="image", resolution=32, cache_implementation="static")
    assert len(calls) == 3


def test_compile_implies_the_static_cache_and_unknown_caches_are_refused():
    assert FastDecoding.from_flags(None, True).static_cache
    assert not FastDecoding.from_flags("dynamic", False).static_cache
    with pytest.raises(ValueError, match="cache_implementation"):
        FastDecoding.from_flags("offloaded", False)


def test_compiled_path_equals_eager_slow_torch_compile(model):
    """The one test that runs torch.compile (inductor builds C++ kernels: about a minute on 2 CPU cores).
    Counts the graphs compiled: the decode step, the scale calls and the decoder blocks share a few graphs
    (automatic dynamic shapes), not one per token or scale."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    settings = {"generation_mode": "image", "resolution": 32, "cfg_scale": 1.0, "max_new_tokens": 3}
    ids, mask = _prompts()
    run = {"seed": 1, "eos_token_id": -1, "return_dict_in_generate": True, **settings}
    eager = model.generate(ids, mask, **run)
    fast = model.generate(ids, mask, compile=True, **run)
    _assert_equal(eager, fast)
    graphs = counters["stats"]["unique_graphs"]
    assert 0 < graphs <= 8, graphs
    again = model.generate(ids, mask, compile=True, **run)
    assert counters["stats"]["unique_graphs"] == graphs  # a second generation reuses every graph
    _assert_equal(eager, again)


def test_compile_without_a_cpp_compiler_decodes_eagerly_with_one_warning(monkeypatch, caplog):
    import vargpt.generation.static_cache as fast_decoding

    monkeypatch.setattr(fast_decoding.shutil, "which", lambda name: None)
    monkeypatch.setattr(fast_decoding, "_warned", set())

    def fn(x: int) -> int:
        return x

    with caplog.at_level("WARNING", logger="vargpt.generation.static_cache"):
        for _ in range(2):
            assert fast_decoding.compiled(fn, FastDecoding(compile=True), torch.device("cpu")) is fn
    assert len(caplog.records) == 1 and "C++ compiler" in caplog.records[0].getMessage()


def test_bench_times_the_static_cache_and_parses_compile(tmp_path):
    from vargpt.bench.speed import run_benchmark
    from vargpt.cli.main import build_parser

    report = run_benchmark(
        "tiny", repeats=1, resolutions=[16], batch_sizes=[1], text_new_tokens=2, matmul_size=64, static_cache=True
    )
    assert report["decoding"] == "static_cache" and report["generation"][0]["latency_s"] > 0
    args = build_parser().parse_args(["bench", "--json", str(tmp_path / "b.json"), "--compile"])
    assert args.compile and not args.static_cache
