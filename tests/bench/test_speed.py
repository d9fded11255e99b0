import argparse
import json

import pytest

from vargpt.bench.flops import generation_flops, vae_decoder_flops
from vargpt.bench.speed import (
    available_resolutions,
    bench_config,
    run_benchmark,
    weight_memory,
    write_report,
)
from vargpt.cli.evaluate import register_bench_command, register_eval_commands
from vargpt.configuration import PRESETS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vargpt")
    sub = parser.add_subparsers(dest="command", required=True)
    register_bench_command(sub)
    evals = sub.add_parser("eval").add_subparsers(dest="suite", required=True)
    register_eval_commands(evals)
    return parser


def test_resolutions_of_the_presets():
    assert available_resolutions(bench_config("tiny")) == [16, 32]
    assert available_resolutions(bench_config("bench-100m")) == [16, 32, 64]


def test_bench_100m_has_about_100m_parameters():
    count = weight_memory(bench_config("bench-100m"))["parameters"]
    assert 90e6 < count < 115e6
    assert PRESETS["bench-100m"]["vocab_size"] == 512  # the tiny tokenizer's ids


def test_full_size_weight_memory_from_the_meta_device():
    memory = weight_memory(bench_config("vargpt-v1.1"))
    assert 10.5e9 < memory["parameters"] < 11.5e9
    assert memory["bytes"]["fp32"] == 4 * memory["parameters"] == 2 * memory["bytes"]["bf16"]


def test_analytic_flops_match_torch_flop_counter_on_the_tiny_model():
    """Without attention products (which FlopCounterMode does not count on CPU) the analytic count agrees
    with the matmuls and convolutions torch actually runs, to within the unmodelled AdaLN / pooling work."""
    from torch.utils.flop_counter import FlopCounterMode

    from vargpt.pipeline import VARGPTPipeline

    pipe = VARGPTPipeline.from_pretrained("tiny", device="cpu")
    pipe.model.requires_grad_(False)
    prompt = "a red circle"
    message = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
    text = pipe.processor.apply_chat_template(message, add_generation_prompt=True, tokenize=False)
    prompt_tokens = pipe.processor(text=[text], return_tensors="pt")["input_ids"].shape[1]
    for resolution, cfg in ((32, 3.0), (16, 1.0)):
        with FlopCounterMode(display=False) as counter:
            pipe.generate([prompt, prompt], seed=0, resolution=resolution, cfg_scale=cfg)
        counted = counter.get_total_flops() / 2
        schedule = pipe.model.generation_schedule(resolution)
        analytic = generation_flops(pipe.model.config, schedule, prompt_tokens, cfg=cfg != 1.0, include_attention=False)
        assert analytic["total"] == pytest.approx(counted, rel=0.01)
        assert analytic["vae"] == sum(counter.get_flop_counts()["Decoder"].values()) / 2
        with_attention = generation_flops(pipe.model.config, schedule, prompt_tokens, cfg=cfg != 1.0)
        assert with_attention["total"] > analytic["total"]
    # null-prompt guidance: a second LLM state over the empty conversation, its own context
    null_tokens = int(pipe.processor.null_prompt_ids().numel())
    with FlopCounterMode(display=False) as counter:
        pipe.generate([prompt, prompt], seed=0, resolution=32, cfg_scale=3.0, uncond_mode="null_prompt")
    schedule = pipe.model.generation_schedule(32)
    kwargs = {"cfg": True, "include_attention": False, "uncond_mode": "null_prompt", "null_prompt_tokens": null_tokens}
    analytic = generation_flops(pipe.model.config, schedule, prompt_tokens, batch_size=2, **kwargs)
    assert analytic["total"] == pytest.approx(counter.get_total_flops() / 2, rel=0.01)
    # the null prompt is prefilled once per batch: a batch of one pays all of it
    assert generation_flops(pipe.model.config, schedule, prompt_tokens, **kwargs)["llm"] > analytic["llm"]
    original = generation_flops(pipe.model.config, schedule, prompt_tokens, cfg=True, include_attention=False)
    assert analytic["llm"] > original["llm"]
    with pytest.raises(ValueError, match="null_prompt_tokens"):
        generation_flops(pipe.model.config, schedule, prompt_tokens, uncond_mode="null_prompt")


def test_vae_flops_grow_with_the_pixel_count():
    config = bench_config("tiny")
    assert vae_decoder_flops(config, (8, 8)) == pytest.approx(4 * vae_decoder_flops(config, (4, 4)))


def test_bench_json_schema_on_the_tiny_preset(tmp_path):
    report = run_benchmark("tiny", repeats=1, resolutions=[16], batch_sizes=[1, 2], text_new_tokens=4, matmul_size=256)
    plot = write_report(report, tmp_path / "bench.json")
    data = json.loads((tmp_path / "bench.json").read_text())
    assert plot.suffix == ".png" and plot.stat().st_size > 0
    assert {
        "preset",
        "device",
        "dtype",
        "machine",
        "matmul_peak",
        "model",
        "generation",
        "understanding",
        "full_size_weight_memory",
    } <= set(data)
    assert data["matmul_peak"]["flops_per_s"] > 0
    assert [(r["resolution"], r["batch_size"]) for r in data["generation"]] == [(16, 1), (16, 2)]
    for row in data["generation"]:
        assert row["scale_steps"] == 3 and row["tokens_per_image"] == 21
        assert row["images_per_s"] == pytest.approx(row["batch_size"] / row["latency_s"])
        assert row["share_of_matmul_peak"] == pytest.approx(
            row["flops_per_image"]["total"] / row["seconds_per_image"] / data["matmul_peak"]["flops_per_s"]
        )
        assert row["peak_memory"]["kind"] == "process_peak_rss" and row["peak_memory"]["bytes"] > 0
    understanding = data["understanding"]
    assert understanding["new_tokens"] == 4 and understanding["decode_tokens_per_s"] > 0
    assert data["full_size_weight_memory"]["bytes"]["int8"] > 10e9


def test_bench_rejects_an_unavailable_resolution():
    with pytest.raises(ValueError, match="not available"):
        run_benchmark("tiny", resolutions=[64], repeats=1)
    with pytest.raises(ValueError, match=r"unknown preset .*vargpt-shapes-tiny"):
        bench_config("no-such-preset")


def test_bench_runs_the_shipped_model_with_its_own_guidance(tmp_path):
    report = run_benchmark(
        "vargpt-shapes-tiny", repeats=1, resolutions=[16], batch_sizes=[1], text_new_tokens=2, matmul_size=64
    )
    assert report["preset"] == "vargpt-shapes-tiny" and report["model"]["parameters"] > 3_000_000
    assert report["generation"][0]["uncond_mode"] == "null_prompt"  # the shipped image settings, not a preset's


def test_commands_parse_and_run(tmp_path):
    parser = _parser()
    args = parser.parse_args(
        [
            "bench",
            "--preset",
            "tiny",
            "--json",
            str(tmp_path / "b.json"),
            "--resolutions",
            "16",
            "--batch-sizes",
            "1",
            "--repeats",
            "1",
            "--text-tokens",
            "2",
            "--quiet",
        ]
    )
    assert args.batch_sizes == [1] and args.dtype == "float32"
    args = parser.parse_args(
        [
            "eval",
            "geneval-sample",
            "--out",
            str(tmp_path / "g"),
            "--limit",
            "2",
            "--cfg-scale",
            "1.5",
            "--images-per-prompt",
            "1",
            "--resolution",
            "16",
            "--device",
            "cpu",
            "--quiet",
        ]
    )
    assert args.func(args) == 0
    manifest = json.loads((tmp_path / "g" / "manifest.json").read_text())
    assert manifest["settings"]["cfg_scale"] == 1.5 and manifest["settings"]["resolution"] == 16
    assert sorted(p.name for p in (tmp_path / "g").iterdir() if p.is_dir() and p.name.isdigit()) == ["00000", "00001"]
    args = parser.parse_args(["eval", "geneval-score", str(tmp_path / "g"), "--quiet"])
    assert args.func(args) == 0
    summary = json.loads((tmp_path / "g" / "results_summary.json").read_text())
    assert summary["total_images"] == 2 and summary["total_prompts"] == 2
