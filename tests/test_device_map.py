"""`device_map="auto"` with `max_memory`: pinned parts on the main device, blocks spread, the rest on disk.

This machine has no GPU, so the split tested is the one accelerate supports on a CPU: "cpu" and "disk"
(blocks offloaded to disk are loaded by their hooks for each call). Outputs must equal the undispatched model.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from vargpt import VARGPTForConditionalGeneration, VARGPTPipeline, VARGPTProcessor
from vargpt.configuration import VARGPTConfig
from vargpt.device_map import build_device_map, movable_blocks, parse_max_memory_argument, parse_memory


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture(scope="module")
def skeleton():
    with torch.device("meta"):
        return VARGPTForConditionalGeneration(VARGPTConfig.from_preset("tiny"))


def _weight_bytes(model) -> int:
    return sum(t.numel() * 4 for t in [*model.parameters(), *model.buffers()])


def test_memory_sizes_parse():
    assert parse_memory("1.5GiB") == int(1.5 * 2**30)
    assert parse_memory("500MB") == 500 * 10**6
    assert parse_memory(1024) == 1024
    assert parse_max_memory_argument(["0=20GiB", "cpu=1GB"]) == {0: 20 * 2**30, "cpu": 10**9}
    for bad in ("lots", "-1GB", "nanGB"):
        with pytest.raises(ValueError, match="memory size"):
            parse_memory(bad)
    with pytest.raises(ValueError, match="DEVICE=SIZE"):
        parse_max_memory_argument(["20GiB"])


def test_map_pins_everything_but_the_blocks_and_fills_devices_in_order(skeleton):
    blocks = movable_blocks(skeleton)
    device_map = build_device_map(skeleton, {"cpu": _weight_bytes(skeleton) * 3 // 4, "disk": 10**12}, torch.float32)
    assert set(blocks) <= set(device_map)
    pinned = [name for name in device_map if name not in blocks]
    assert {"sos_embedding", "lm_head", "vae_local", "vargpt_gen.cfg_uncond", "vargpt_gen.lvl_embed"} <= set(pinned)
    assert all(device_map[name] == "cpu" for name in pinned)
    placed = [device_map[name] for name in blocks]
    assert placed == sorted(placed, key=["cpu", "disk"].index) and placed[-1] == "disk"  # in execution order
    covered = set(skeleton.state_dict())
    assert all(any(t == n or t.startswith(n + ".") for n in device_map) for t in covered)


def test_map_refuses_budgets_that_cannot_hold_the_model(skeleton):
    with pytest.raises(ValueError, match="must stay on the main device"):
        build_device_map(skeleton, {"cpu": 1000}, torch.float32)
    with pytest.raises(ValueError, match="does not fit max_memory"):
        build_device_map(skeleton, {"cpu": _weight_bytes(skeleton) * 3 // 4}, torch.float32)


def test_offloaded_model_equals_the_undispatched_one(checkpoint, tmp_path):
    plain = VARGPTForConditionalGeneration.from_pretrained(checkpoint).eval()
    budget = {"cpu": _weight_bytes(plain) * 3 // 4, "disk": "1GB"}
    split = VARGPTForConditionalGeneration.from_pretrained(
        checkpoint, device_map="auto", max_memory=budget, offload_folder=tmp_path
    ).eval()
    placement = Counter(split.hf_device_map.values())
    assert placement["disk"] >= 2 and placement["cpu"] >= 1
    assert any(p.device.type == "meta" for p in split.parameters())  # really offloaded, not in memory
    processor = VARGPTProcessor.from_pretrained(checkpoint)
    ids = {k: v for k, v in processor(text=["a red circle"], return_tensors="pt").items() if k != "mm_token_type_ids"}
    with torch.no_grad():
        assert torch.equal(plain(**ids).logits, split(**ids).logits)
    assert torch.equal(plain.generate(**ids, max_new_tokens=6), split.generate(**ids, max_new_tokens=6))
    a = plain.generate(**ids, generation_mode="image", seed=0)
    b = split.generate(**ids, generation_mode="image", seed=0)
    assert all(torch.equal(x, y) for x, y in zip(a.image_bits[0][0], b.image_bits[0][0], strict=True))
    assert torch.equal(a.images[0][0], b.images[0][0])


def test_disk_offload_without_a_folder_is_a_clear_error(checkpoint, skeleton):
    budget = {"cpu": _weight_bytes(skeleton) * 3 // 4, "disk": "1GB"}
    with pytest.raises(ValueError, match="offload_folder"):
        VARGPTForConditionalGeneration.from_pretrained(checkpoint, device_map="auto", max_memory=budget)


def test_pipeline_keeps_a_dispatched_model_where_it_is(checkpoint, tmp_path):
    plain = VARGPTPipeline.from_pretrained(checkpoint)
    budget = {"cpu": _weight_bytes(plain.model) * 3 // 4, "disk": "1GB"}
    pipe = VARGPTPipeline.from_pretrained(checkpoint, device_map="auto", max_memory=budget, offload_folder=tmp_path)
    assert "disk" in pipe.model.hf_device_map.values()
    assert any(p.device.type == "meta" for p in pipe.model.parameters())
    assert pipe.device == torch.device("cpu")
    assert list(pipe.generate("a red circle", seed=1)[0].getdata()) == list(
        plain.generate("a red circle", seed=1)[0].getdata()
    )
