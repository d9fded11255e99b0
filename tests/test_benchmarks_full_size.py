"""The full-size benchmark scripts (benchmarks/full_size_checkpoint.py, full_size_run.py, load_memory.py), run on
the tiny preset so they cannot rot."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.reference_keys import load_reference_keys
from vargpt import VARGPTForConditionalGeneration, VARGPTPipeline, VARGPTProcessor

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


writer = _load("full_size_checkpoint")
runner = _load("full_size_run")
load_memory = _load("load_memory")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """The tiny preset in the original sharded layout, split into several shards."""
    out = tmp_path_factory.mktemp("ckpt") / "tiny-sharded"
    total = sum(item.nbytes for item in writer.tensor_plan(writer.build_config("tiny")))
    summary = writer.write_checkpoint(out, preset="tiny", max_shard_size=total // 3 + 1, progress=False)
    assert summary["shards"] >= 3 and summary["bytes"] == total
    return out


def test_rules_follow_the_models_own_initialisation():
    """Every tensor the writer draws has the kind and scale of what the model's own initialisation gives it:
    constants and exact values equal, random draws of the same spread (and bound, for uniform draws)."""
    config = writer.build_config("tiny")
    torch.manual_seed(0)
    real = VARGPTForConditionalGeneration(config).state_dict()
    plan = writer.tensor_plan(config)
    assert [item.name for item in plan] == list(real)
    kinds = set()
    for item in plan:
        ours, theirs = writer.materialise(item, seed=0).float(), real[item.name].to(item.dtype).float()
        kind = item.init.kind
        kinds.add(kind)
        assert ours.shape == theirs.shape, item.name
        if kind in ("constant", "exact"):
            assert torch.equal(ours, theirs), item.name
        elif theirs.numel() >= 64:
            assert ours.std().item() == pytest.approx(theirs.std().item(), rel=0.3), item.name
        if kind == "uniform":
            assert ours.abs().max() <= item.init.scale * 1.01 and theirs.abs().max() <= item.init.scale * 1.01
    assert kinds == {"constant", "exact", "normal", "uniform"}
    pad = config.text_config.pad_token_id
    embed = next(item for item in plan if item.name == "model.embed_tokens.weight")
    assert embed.init.zero_row == pad and not writer.materialise(embed, 0)[pad].any()


def test_values_are_seeded_per_tensor():
    item = next(i for i in writer.tensor_plan(writer.build_config("tiny")) if i.name == "lm_head.weight")
    assert torch.equal(writer.materialise(item, 0), writer.materialise(item, 0))
    assert not torch.equal(writer.materialise(item, 0), writer.materialise(item, 1))


def test_full_size_plan_is_the_published_layout():
    """Names, shapes and shards of the full-size checkpoint, from the meta device (no weights)."""
    plan = writer.tensor_plan(writer.build_config("vargpt-v1.1"))
    reference = load_reference_keys()
    assert {item.name: item.shape for item in plan} == {name: ref.shape for name, ref in reference.items()}
    assert sum(item.numel for item in plan) == 10_948_528_387  # parameters plus 133,152 buffer values
    assert {str(item.dtype) for item in plan} == {"torch.bfloat16", "torch.int64"}
    shards = writer.plan_shards(plan, writer.parse_size("5GB"))
    assert len(shards) == 5 and all(sum(i.nbytes for i in shard) <= 5e9 for shard in shards)
    uncond = next(i for i in plan if i.name == "vargpt_gen.cfg_uncond")
    assert uncond.init.kind == "exact" and uncond.init.exact.shape == (512, 2048)
    rules = {item.name: item.init for item in plan}
    assert rules["vargpt_gen.block_chunks.7.module.3.sa.scale_mul_1H11"].scale == pytest.approx(math.log(4))
    assert rules["vargpt_gen.block_chunks.0.module.0.ffn.fc2.weight"].scale == pytest.approx(0.02 / 8)
    assert rules["vae_local.decoder.conv_in.conv.weight"].scale == pytest.approx(1 / math.sqrt(32 * 9))


def test_size_parsing():
    assert writer.parse_size("5GB") == 5 * 10**9
    assert writer.parse_size("300KiB") == 300 * 1024
    assert writer.parse_size(1234) == 1234
    with pytest.raises(ValueError, match="not a size"):
        writer.parse_size("five")


def test_tiny_sharded_checkpoint_loads_and_runs(tiny_checkpoint):
    index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())
    shard_names = sorted(set(index["weight_map"].values()))
    count = len(shard_names)
    assert count >= 3 and shard_names == [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]
    stored = 0
    for name in shard_names:
        with safe_open(str(tiny_checkpoint / name), framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            for key in handle.keys():  # noqa: SIM118
                assert index["weight_map"][key] == name
                stored += handle.get_tensor(key).nbytes
    assert stored == index["metadata"]["total_size"]
    report = VARGPTForConditionalGeneration.check_checkpoint(tiny_checkpoint)
    assert report.ok and report.dtypes == {"BF16": 263, "I64": 1}
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["model_type"] == "vargpt_qwen2_vl" and config["architectures"] == [writer.PUBLISHED_ARCHITECTURE]
    assert VARGPTProcessor.from_pretrained(tiny_checkpoint).tokenizer.convert_tokens_to_ids("<|image_gen_pad|>") == 509

    pipe = VARGPTPipeline.from_pretrained(tiny_checkpoint, device="cpu")
    assert pipe.model.dtype == torch.float32
    assert pipe.model.vargpt_gen.cfg_uncond.to(torch.bfloat16).equal(
        writer.materialise(next(i for i in writer.tensor_plan(pipe.model.config) if i.name.endswith("cfg_uncond")), 0)
    )
    image = runner.test_image(64)
    answer = pipe.chat("What is in the picture?", images=[image], max_new_tokens=4, allow_images=False)
    assert isinstance(answer, str)
    question = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}
    inputs = pipe._encode([[question]], [[image]])
    with torch.no_grad():
        logits = pipe.model(**inputs).logits
    assert torch.isfinite(logits).all()
    drawn = pipe.generate("a red circle", resolution=32, cfg_scale=3.0, seed=0)
    assert drawn[0].size == (32, 32)
    inputs = pipe._encode([[{"role": "user", "content": [{"type": "text", "text": "a red circle"}]}]], [[]])
    out = pipe.model.generate(**inputs, generation_mode="image", seed=0, max_new_tokens=1, cfg_scale=3.0)
    assert torch.isfinite(out.images[0][0]).all()


def test_full_size_run_in_its_scaled_mode(tiny_checkpoint, tmp_path):
    report_path = tmp_path / "run.json"
    args = ["--model", str(tiny_checkpoint), "--dry-run", "--dtype", "float32", "--json", str(report_path)]
    assert runner.main(args) == 0
    report = json.loads(report_path.read_text())
    assert set(report["memory"]) == {"load", "chat", "generate"}
    for phase in report["memory"].values():
        assert phase["peak_rss"] >= phase["rss_at_start"] > 0 and phase["seconds"] > 0
    chat, gen = report["chat"], report["generate"]
    assert chat["new_tokens"] == 4 and chat["per_token_s"] > 0 and chat["prefill_s"] > 0 and chat["vit_s"] > 0
    schedule = [[1, 1], [2, 2], [4, 4], [6, 6], [8, 8]]  # the tiny model's own 32 px
    assert [s["grid"] for s in gen["scales"]] == schedule and gen["size"] == [32, 32]
    assert all(s["wall_s"] >= s["llm_s"] + s["decoder_s"] > 0 for s in gen["scales"])
    assert sum(gen["shares"].values()) == pytest.approx(1.0)
    assert {"llm", "decoder", "vae"} <= set(gen["shares"])
    assert report["peak_rss_ru_maxrss"] > 0


def test_load_memory_on_the_tiny_checkpoint(tiny_checkpoint, tmp_path, capsys):
    size = load_memory.checkpoint_bytes(tiny_checkpoint, "float32")
    plan = writer.tensor_plan(writer.build_config("tiny"))
    assert size == sum(item.numel * (8 if item.dtype == torch.int64 else 4) for item in plan)
    out = tmp_path / "load.json"
    args = ["--model", str(tiny_checkpoint), "--dtypes", "float32", "--modes", "model,convert", "--json", str(out)]
    assert load_memory.main(args) == 0
    rows = json.loads(out.read_text())["loads"]
    assert [row["mode"] for row in rows] == ["model", "convert"]
    for row in rows:
        assert row["exit_code"] == 0 and row["dtypes"] == ["float32", "int64"]
        assert size <= row["weight_bytes"] <= 1.01 * size  # plus non-persistent buffers (rotary frequencies)
        assert row["peak_rss"] >= row["baseline_rss"] > 0
    # converting shard by shard leaves no tensor in a memory-mapped shard (a plain fp32 load leaves lfq.mask there)
    assert rows[1]["mapped"] == {}
    assert "baseline (import torch + vargpt)" in capsys.readouterr().out
