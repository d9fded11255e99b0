"""The unified model on the tiny preset, and the full-size layout on the meta device."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from tests.reference_keys import load_reference_keys
from vargpt import VARGPTConfig, VARGPTForConditionalGeneration
from vargpt.checkpoint import CheckpointMismatchError
from vargpt.schedule import Schedule

TINY = VARGPTConfig.from_preset("tiny")
START, END, PAD = TINY.image_gen_start_token_id, TINY.image_gen_end_token_id, TINY.image_gen_pad_token_id
IM_START, IM_END = 501, 502


def make_tiny_model(seed: int = 0) -> VARGPTForConditionalGeneration:
    """A tiny model whose zero-initialised gates are perturbed, so every path carries signal."""
    torch.manual_seed(seed)
    model = VARGPTForConditionalGeneration(VARGPTConfig.from_preset("tiny")).eval()
    with torch.no_grad():
        for p in [*model.vargpt_gen.parameters(), *model.image_gen_projector.parameters()]:
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def tiny_model() -> VARGPTForConditionalGeneration:
    return make_tiny_model()


def generation_sample(model, prompt=(72, 105, 33), image_px: int = 32):
    """ids and labels of `user: prompt / assistant: <image>` with the pad slots of one image."""
    n_pad = model.num_image_gen_pad_tokens(model.generation_schedule(image_px))
    prompt_ids = [IM_START, 117, 10, *prompt, IM_END, IM_START, 97, 10]
    answer = [START] + [PAD] * n_pad + [END, IM_END]
    ids = torch.tensor([prompt_ids + answer])
    labels = torch.tensor([[-100] * len(prompt_ids) + answer])
    return ids, labels


def test_full_size_preset_has_exactly_the_published_tensors():
    config = VARGPTConfig.from_preset("vargpt-v1.1")
    with torch.device("meta"):
        model = VARGPTForConditionalGeneration(config)
    state = model.state_dict()
    reference = load_reference_keys()
    assert sorted(set(state) - set(reference)) == []
    assert sorted(set(reference) - set(state)) == []
    wrong = {n: (tuple(t.shape), reference[n].shape) for n, t in state.items() if tuple(t.shape) != reference[n].shape}
    assert wrong == {}
    dtype_names = {n: str(t.dtype).removeprefix("torch.") for n, t in state.items()}
    assert {n: d for n, d in dtype_names.items() if d != reference[n].dtype} == {}
    buffers = {n for n, _ in model.named_buffers() if n in state}
    assert buffers == {n for n, r in reference.items() if r.is_buffer}
    assert sum(p.numel() for p in model.parameters()) == 10_948_395_235
    per_module = {}
    for name, p in model.named_parameters():
        per_module[name.split(".")[0]] = per_module.get(name.split(".")[0], 0) + p.numel()
    assert per_module["visual"] == 675_759_104
    assert per_module["image_gen_projector"] == 11_544_064
    assert per_module["image_gen_projector_out"] == 20_197_888
    assert per_module["sos_embedding"] == 310_595_584


def test_config_reads_the_original_flat_config_json(tmp_path):
    original = {
        "model_type": "vargpt_qwen2_vl",
        "architectures": ["VARGPTQwen2VLForConditionalGeneration"],
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vision_config": {"depth": 32, "embed_dim": 1280, "hidden_size": 3584, "num_heads": 16, "in_chans": 3},
        "special_tokens": {
            "image_gen_start": "<|image_gen_start|>",
            "image_gen_start_token_id": 151657,
            "image_gen_end": "<|image_gen_end|>",
            "image_gen_end_token_id": 151658,
            "image_gen_pad": "<|image_gen_pad|>",
            "image_gen_pad_token_id": 151659,
        },
        "torch_dtype": "bfloat16",
    }
    (tmp_path / "config.json").write_text(json.dumps(original))
    config = VARGPTConfig.from_pretrained(tmp_path)
    assert config.text_config.hidden_size == 3584 and config.text_config.num_hidden_layers == 28
    assert config.image_gen_pad_token_id == 151659
    assert config.visual_decoder_config.depth == 32 and config.visual_decoder_config.embed_dim == 2048
    assert config.image_tokenizer_config.bits == 32 and config.image_resolution == 512


def test_config_rejects_inconsistent_settings():
    with pytest.raises(ValueError, match="bits"):
        VARGPTConfig.from_preset("tiny", image_tokenizer_config={"bits": 16})
    with pytest.raises(ValueError, match="image_loss_scale_weighting"):
        VARGPTConfig.from_preset("tiny", image_loss_scale_weighting="sqrt")
    with pytest.raises(ValueError, match="unknown preset"):
        VARGPTConfig.from_preset("huge")


def test_training_forward_losses_and_gradients(tiny_model):
    model = make_tiny_model(1).train()
    ids, labels = generation_sample(model)
    target = torch.rand(1, 3, 32, 32) * 2 - 1
    noise = torch.Generator().manual_seed(0)
    out = model(input_ids=ids, labels=labels, pixel_gen_values=target, image_noise_generator=noise)
    assert out.text_loss is not None and out.image_loss is not None
    torch.testing.assert_close(out.loss, out.text_loss + 3.0 * out.image_loss)
    n_tokens = sum(h * w for h, w in model.generation_schedule())
    assert out.image_logits.shape == (1, n_tokens, 8, 2)
    assert out.image_labels.shape == (1, n_tokens, 8)
    out.loss.backward()
    for module in (model.vargpt_gen, model.image_gen_projector, model.image_gen_projector_out, model.model):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert model.vae_local.encoder.conv_in.conv.weight.grad is None  # the tokenizer is frozen in this pass


def test_text_loss_ignores_image_pad_slots(tiny_model):
    ids, labels = generation_sample(tiny_model)
    target = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        out = tiny_model(input_ids=ids, labels=labels, pixel_gen_values=target, return_logits=True)
        # only the tokens outside the pad slots count: recompute by hand
        logits = out.logits[0, :-1]
        tgt = labels[0, 1:].clone()
        tgt[ids[0, 1:] == PAD] = -100
        expected = torch.nn.functional.cross_entropy(logits, tgt, ignore_index=-100)
    torch.testing.assert_close(out.text_loss, expected)


def test_scale_weighting_changes_the_image_loss(tiny_model):
    ids, _ = generation_sample(tiny_model)
    target = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        weighted = tiny_model(input_ids=ids, pixel_gen_values=target).image_loss
        tiny_model.config.image_loss_scale_weighting = "uniform"
        try:
            uniform = tiny_model(input_ids=ids, pixel_gen_values=target).image_loss
        finally:
            tiny_model.config.image_loss_scale_weighting = "scale"
    assert not torch.allclose(weighted, uniform)


def test_mismatched_pad_count_is_a_clear_error(tiny_model):
    ids, _ = generation_sample(tiny_model)
    short = ids[:, :-20]
    with pytest.raises(ValueError, match="image_gen_pad"):
        tiny_model(input_ids=short, pixel_gen_values=torch.zeros(1, 3, 32, 32))


# -- checkpoints ----------------------------------------------------------------------------------


def write_original_layout(model, directory, shards: int = 2, dtype=torch.bfloat16):
    """Write a checkpoint the way the published one is stored: sharded safetensors + index, bf16."""
    directory.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    config.dtype = dtype  # the published config.json says torch_dtype bfloat16
    config.save_pretrained(directory)
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k] for k in part}, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return state


def forward_signature(model, ids, target):
    with torch.no_grad():
        out = model(input_ids=ids, pixel_gen_values=target)
    return out.logits, out.image_logits


def test_save_and_load_round_trip_uses_original_names(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    files = list((tmp_path / "ckpt").glob("*.safetensors"))
    names = set()
    for f in files:
        with safe_open(str(f), "pt") as h:
            names |= set(h.keys())
    assert "vargpt_gen.block_chunks.0.module.0.sa.mat_qkv.weight" in names
    assert "vae_local.quantizer.lfq.mask" in names and "image_gen_projector.ln_q.weight" in names
    assert "model.layers.0.self_attn.q_proj.weight" in names and "visual.merger.mlp.0.weight" in names
    loaded = VARGPTForConditionalGeneration.from_pretrained(tmp_path / "ckpt").eval()
    ids, _ = generation_sample(tiny_model)
    target = torch.rand(1, 3, 32, 32) * 2 - 1
    a, b = forward_signature(tiny_model, ids, target), forward_signature(loaded, ids, target)
    # identical weights; outputs agree to fp32 rounding (loaded tensors live in differently aligned memory)
    torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(a[1], b[1], atol=1e-6, rtol=0)
    assert not list(tmp_path.glob(".ckpt.*"))  # no staging folders left behind


def test_loads_sharded_bf16_checkpoint_in_the_original_layout(tiny_model, tmp_path):
    state = write_original_layout(tiny_model, tmp_path / "orig")
    loaded = VARGPTForConditionalGeneration.from_pretrained(tmp_path / "orig")
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    fp32 = VARGPTForConditionalGeneration.from_pretrained(tmp_path / "orig", dtype=torch.float32)
    assert fp32.lm_head.weight.dtype == torch.float32


def test_missing_unexpected_and_misshaped_tensors_are_listed(tiny_model, tmp_path):
    directory = tmp_path / "bad"
    state = write_original_layout(tiny_model, directory, shards=1, dtype=torch.float32)
    shard = directory / "model-00001-of-00001.safetensors"
    state.pop("vargpt_gen.head.weight")
    state["extra.weight"] = torch.zeros(2)
    state["lm_head.weight"] = torch.zeros(3, 3)
    save_file(state, str(shard))
    with pytest.raises(CheckpointMismatchError) as err:
        VARGPTForConditionalGeneration.from_pretrained(directory)
    message = str(err.value)
    assert "vargpt_gen.head.weight" in message and "extra.weight" in message and "lm_head.weight" in message
    assert "missing" in message and "unexpected" in message and "wrong shape" in message


def test_config_that_does_not_match_the_weights_is_refused(tiny_model, tmp_path):
    directory = tmp_path / "ckpt"
    tiny_model.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    config["visual_decoder_config"]["depth"] = 4
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match="missing"):
        VARGPTForConditionalGeneration.from_pretrained(directory)


def test_tensors_rewritten_in_a_dtype_the_model_cannot_use_are_listed(tiny_model, tmp_path):
    directory = tmp_path / "bad"
    state = write_original_layout(tiny_model, directory, shards=1)
    shard = directory / "model-00001-of-00001.safetensors"
    state["lm_head.weight"] = torch.ones_like(state["lm_head.weight"], dtype=torch.bool)
    state["model.norm.weight"] = state["model.norm.weight"].to(torch.int64)
    state["visual.merger.ln_q.weight"] = state["visual.merger.ln_q.weight"].to(torch.uint8)
    state["vae_local.quantizer.lfq.mask"] = state["vae_local.quantizer.lfq.mask"].float()
    save_file(state, str(shard))
    with pytest.raises(CheckpointMismatchError) as err:
        VARGPTForConditionalGeneration.from_pretrained(directory)
    message = str(err.value)
    assert "4 tensor(s) in a dtype the model cannot use" in message
    assert "lm_head.weight: BOOL" in message and "model.norm.weight: I64" in message
    assert "visual.merger.ln_q.weight: U8" in message and "vae_local.quantizer.lfq.mask: F32" in message


def test_float_tensors_in_any_float_dtype_and_integer_buffers_in_any_width_load(tiny_model, tmp_path):
    directory = tmp_path / "mixed"
    state = write_original_layout(tiny_model, directory, shards=1, dtype=torch.float16)
    state["lm_head.weight"] = state["lm_head.weight"].to(torch.float64)
    state["vae_local.quantizer.lfq.mask"] = state["vae_local.quantizer.lfq.mask"].to(torch.int32)
    save_file(state, str(directory / "model-00001-of-00001.safetensors"))
    assert VARGPTForConditionalGeneration.check_checkpoint(directory).ok


def test_non_finite_weights_are_named_after_loading(tiny_model, tmp_path):
    directory = tmp_path / "nan"
    state = write_original_layout(tiny_model, directory, shards=2, dtype=torch.float32)
    state = {name: tensor.clone() for name, tensor in state.items()}  # fp32 entries share the fixture's memory
    state["model.layers.0.mlp.up_proj.weight"][3, 4] = float("nan")
    state["vargpt_gen.head.bias"][0] = float("-inf")
    shards = sorted(directory.glob("model-*.safetensors"))
    for shard in shards:
        with safe_open(str(shard), "pt") as handle:
            names = list(handle.keys())
        save_file({k: state[k] for k in names}, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match="NaN or infinite") as err:
        VARGPTForConditionalGeneration.from_pretrained(directory)
    assert "model.layers.0.mlp.up_proj.weight" in str(err.value) and "vargpt_gen.head.bias" in str(err.value)
    loaded = VARGPTForConditionalGeneration.from_pretrained(directory, strict=False)  # the escape hatch
    assert torch.isnan(loaded.model.layers[0].mlp.up_proj.weight).any()


def test_pickle_only_directory_is_refused(tmp_path):
    VARGPTConfig.from_preset("tiny").save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointMismatchError, match="safetensors only"):
        VARGPTForConditionalGeneration.from_pretrained(tmp_path)


def test_auto_classes_resolve_without_remote_code(tiny_model, tmp_path):
    from transformers import AutoConfig, AutoModel

    tiny_model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), VARGPTConfig)
    assert isinstance(AutoModel.from_pretrained(tmp_path), VARGPTForConditionalGeneration)


# -- inference ----------------------------------------------------------------------------------------


def prompt_ids(text=(72, 105)):
    return torch.tensor([[IM_START, 117, 10, *text, IM_END, IM_START, 97, 10]])


def test_image_generation_is_reproducible_and_seed_dependent(tiny_model):
    ids = prompt_ids()
    a = tiny_model.generate(ids, generation_mode="image", seed=3, max_new_tokens=4)
    b = tiny_model.generate(ids, generation_mode="image", seed=3, max_new_tokens=4)
    c = tiny_model.generate(ids, generation_mode="image", seed=4, max_new_tokens=4)
    assert a.images[0][0].shape == (3, 32, 32)
    assert float(a.images[0][0].abs().max()) <= 1.0
    assert torch.equal(a.images[0][0], b.images[0][0])
    assert not torch.equal(torch.cat(a.image_bits[0][0]), torch.cat(c.image_bits[0][0]))
    seq = a.sequences[0, ids.shape[1] :].tolist()
    n_pad = tiny_model.num_image_gen_pad_tokens(tiny_model.generation_schedule())
    assert seq[0] == START and seq[1 : 1 + n_pad] == [PAD] * n_pad and seq[1 + n_pad] == END


def test_scale_loop_logits_equal_the_teacher_forced_forward(tiny_model):
    """The KV-cached scale loop and the training forward see the same thing (no CFG, M-RoPE positions)."""
    ids = prompt_ids()
    out = tiny_model.generate(ids, generation_mode="image", seed=0, cfg_scale=1.0, max_new_tokens=1)
    bits = torch.cat(out.image_bits[0][0], dim=0).unsqueeze(0)
    n_pad = tiny_model.num_image_gen_pad_tokens(tiny_model.generation_schedule())
    full = torch.cat([ids, torch.tensor([[START] + [PAD] * n_pad + [END]])], dim=1)
    with torch.no_grad():
        forced = tiny_model(input_ids=full, image_gen_labels=bits).image_logits[0]
    loop = out.image_logits[0][0]
    assert (forced - loop).abs().max().item() < 1e-4


def test_batched_generation_matches_single_prompts(tiny_model):
    """Left padding and batching do not change a prompt's image (greedy bits make it deterministic)."""
    short, long = prompt_ids((72,)), prompt_ids((72, 105, 33, 44))
    pad = torch.full((1, long.shape[1] - short.shape[1]), 500)
    batch = torch.cat([torch.cat([pad, short], dim=1), long])
    mask = torch.cat([torch.cat([torch.zeros_like(pad), torch.ones_like(short)], dim=1), torch.ones_like(long)])
    settings = {"generation_mode": "image", "top_k": 0, "image_top_k": 1, "max_new_tokens": 1}
    both = tiny_model.generate(batch, attention_mask=mask, **settings)
    one = tiny_model.generate(short, **settings)
    two = tiny_model.generate(long, **settings)
    torch.testing.assert_close(both.images[0][0], one.images[0][0], atol=1e-4, rtol=0)
    torch.testing.assert_close(both.images[1][0], two.images[0][0], atol=1e-4, rtol=0)


def test_text_mode_returns_token_ids(tiny_model):
    ids = prompt_ids()
    out = tiny_model.generate(ids, max_new_tokens=5)
    assert isinstance(out, torch.Tensor) and out.shape[0] == 1 and ids.shape[1] < out.shape[1] <= ids.shape[1] + 5
    assert torch.equal(out[:, : ids.shape[1]], ids)
    assert START not in out[0, ids.shape[1] :].tolist()


def test_interleaved_mode_switches_on_the_start_token_and_continues_text():
    model = make_tiny_model(2)
    ids = prompt_ids()
    start_bias = torch.zeros(model.config.text_config.vocab_size)
    start_bias[START] = 1e4

    calls = {"n": 0}
    head = model.lm_head

    class BiasedHead(torch.nn.Module):
        def forward(self, x):
            calls["n"] += 1
            logits = head(x)
            return logits + start_bias if calls["n"] == 1 else logits

    model.lm_head = BiasedHead()
    try:
        out = model.generate(ids, generation_mode="interleaved", seed=0, max_new_tokens=4)
    finally:
        model.lm_head = head
    new = out.sequences[0, ids.shape[1] :].tolist()
    assert new[0] == START and END in new
    assert len(out.images[0]) == 1
    assert len(new) > new.index(END) + 1  # text continued after the image


def test_cfg_runs_and_changes_the_image(tiny_model):
    ids = prompt_ids()
    guided = tiny_model.generate(ids, generation_mode="image", seed=1, cfg_scale=3.0, max_new_tokens=1)
    plain = tiny_model.generate(ids, generation_mode="image", seed=1, cfg_scale=1.0, max_new_tokens=1)
    assert not torch.equal(guided.image_logits[0][0], plain.image_logits[0][0]) or not torch.equal(
        torch.cat(guided.image_bits[0][0]), torch.cat(plain.image_bits[0][0])
    )


def test_bad_generation_requests_are_clear_errors(tiny_model):
    ids = prompt_ids()
    with pytest.raises(ValueError, match="generation_mode"):
        tiny_model.generate(ids, generation_mode="video")
    with pytest.raises(ValueError, match="tau"):
        tiny_model.generate(ids, generation_mode="image", tau=0.0)
    with pytest.raises(ValueError, match=r"resolution|supported"):
        tiny_model.generate(ids, generation_mode="image", resolution=33)
    with pytest.raises(ValueError, match="context"):
        tiny_model.generate(ids, max_new_tokens=10**6)
    with pytest.raises(ValueError, match="unknown image generation settings"):
        tiny_model.generate(ids, generation_mode="image", guidance=2.0)


def test_cfg_with_a_prompt_longer_than_cfg_uncond_does_not_crash(tiny_model):
    rows = tiny_model.vargpt_gen.cfg_uncond.shape[0]
    ids = prompt_ids(tuple(range(65, 65 + 26)) * (rows // 26 + 2))
    assert ids.shape[1] > rows
    out = tiny_model.generate(ids, generation_mode="image", seed=0, cfg_scale=3.0, max_new_tokens=1)
    assert torch.isfinite(out.images[0][0]).all()


# -- rotary positions of the plain forward: "mrope" (as generate) and "sequential" (as the original's forward) --
IMAGE_GRID = (1, 4, 6)  # 24 patches -> 2 x 3 merged image tokens, so height and width positions differ


def image_prompt(model, left_pad: int = 0):
    """`ids, mask, pixel_values, grid` of a batch of two: row 0 text with one image between, row 1 the same row
    left-padded by `left_pad` (its image placeholders shifted along)."""
    t, h, w = IMAGE_GRID
    merged = t * h * w // model.config.vision_config.spatial_merge_size**2
    image = model.config.image_token_id
    row = [IM_START, 117, 10, 503, *[image] * merged, 504, 72, 105, 33, IM_END, IM_START, 97, 10, 88, 99]
    ids = torch.tensor([row + [11] * left_pad, [TINY.text_config.pad_token_id] * left_pad + row])
    mask = torch.ones_like(ids)
    mask[1, :left_pad] = 0
    pixels = torch.randn(2 * t * h * w, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(1))
    return ids, mask, pixels, torch.tensor([IMAGE_GRID, IMAGE_GRID])


def image_embeds(model, ids, pixels, grid):
    return model.embed_understanding_images(model.model.embed_tokens(ids), ids, pixels, grid)


def transformers_rope_index(model, ids, mask, grid):
    """M-RoPE positions from transformers' own `Qwen2VLModel.get_rope_index` (its methods use only the config)."""
    from functools import partial
    from types import SimpleNamespace

    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    owner = SimpleNamespace(
        config=model.config, get_vision_position_ids=partial(Qwen2VLModel.get_vision_position_ids, None)
    )
    types = (ids == model.config.image_token_id).int()
    return Qwen2VLModel.get_rope_index(owner, ids, types, image_grid_thw=grid, attention_mask=mask)[0]


@torch.no_grad()
def test_sequential_positions_are_qwen2vl_s_1d_positions(tiny_model):
    """ "sequential" = explicit `arange(L)` in all three sections = Qwen2-VL's text model given no positions
    (what the original's forward got from transformers 4.46), left padding included."""
    ids, mask, pixels, grid = image_prompt(tiny_model, left_pad=3)
    out = tiny_model(
        input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid, positions="sequential"
    )
    explicit = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, 2, -1)
    given = tiny_model(
        input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid, position_ids=explicit
    )
    hidden = tiny_model.model(inputs_embeds=image_embeds(tiny_model, ids, pixels, grid), attention_mask=mask)
    real = mask.bool()
    assert torch.equal(out.logits, given.logits)
    torch.testing.assert_close(out.logits[real], tiny_model.lm_head(hidden.last_hidden_state)[real], rtol=0, atol=1e-6)
    assert torch.equal(out.rope_deltas, torch.zeros(2, 1, dtype=torch.long))


@torch.no_grad()
def test_mrope_positions_are_transformers_get_rope_index(tiny_model):
    ids, mask, pixels, grid = image_prompt(tiny_model, left_pad=3)
    out = tiny_model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid, positions="mrope")
    reference = transformers_rope_index(tiny_model, ids, mask, grid)
    given = tiny_model(
        input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid, position_ids=reference
    )
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], given.logits[real], rtol=0, atol=1e-6)
    assert torch.equal(
        tiny_model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid).logits, out.logits
    )


@torch.no_grad()
def test_positions_differ_after_an_image_and_agree_on_text(tiny_model):
    ids, _, pixels, grid = image_prompt(tiny_model)
    runs = {
        mode: tiny_model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, positions=mode).logits
        for mode in ("mrope", "sequential")
    }
    first_image = int((ids[0] == tiny_model.config.image_token_id).nonzero()[0])
    last_image = int((ids[0] == tiny_model.config.image_token_id).nonzero()[-1])
    before = slice(0, first_image)
    assert torch.equal(runs["mrope"][:, before], runs["sequential"][:, before])
    assert (runs["mrope"][:, last_image + 1 :] - runs["sequential"][:, last_image + 1 :]).abs().max() > 1e-3
    text = torch.tensor([[IM_START, 117, 10, 72, 105, 33, IM_END, IM_START, 97, 10]])
    assert torch.equal(
        tiny_model(input_ids=text, positions="mrope").logits, tiny_model(input_ids=text, positions="sequential").logits
    )


@torch.no_grad()
def test_forward_positions_setting_sets_forward_s_default(tiny_model, tmp_path):
    ids, _, pixels, grid = image_prompt(tiny_model)
    sequential = tiny_model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, positions="sequential").logits
    assert tiny_model.config.forward_positions == "mrope"
    tiny_model.config.forward_positions = "sequential"
    try:
        assert torch.equal(tiny_model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid).logits, sequential)
        tiny_model.config.save_pretrained(tmp_path)
    finally:
        tiny_model.config.forward_positions = "mrope"
    assert VARGPTConfig.from_pretrained(tmp_path).forward_positions == "sequential"
    stored = json.loads((tmp_path / "config.json").read_text())
    del stored["forward_positions"]  # a config.json from before the setting, or the published one
    (tmp_path / "config.json").write_text(json.dumps(stored))
    assert VARGPTConfig.from_pretrained(tmp_path).forward_positions == "mrope"
    with pytest.raises(ValueError, match="forward_positions"):
        VARGPTConfig.from_preset("tiny", forward_positions="1d")
    with pytest.raises(ValueError, match="positions must be one of"):
        tiny_model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, positions="1d")


# -- the text loss reads the LM head only where labels are -------------------------------------------------


def mixed_batch(model) -> dict:
    """Three right-padded rows: understanding (one image, answer labelled), generation (prompt unlabelled,
    image block labelled), and a short text-only row with padding labelled -100."""
    ids_u, _, pixels, grid = image_prompt(model)
    understanding = ids_u[0].tolist()
    labels_u = [-100] * (len(understanding) - 2) + understanding[-2:]  # the answer "88 99"
    ids_g, labels_g = generation_sample(model)
    text = [IM_START, 117, 10, 72, IM_END, IM_START, 97, 10, 55, 66, IM_END]
    labels_t = [-100] * 8 + text[8:]
    rows = [(understanding, labels_u), (ids_g[0].tolist(), labels_g[0].tolist()), (text, labels_t)]
    length = max(len(r) for r, _ in rows)
    pad = model.config.text_config.pad_token_id
    ids = torch.tensor([r + [pad] * (length - len(r)) for r, _ in rows])
    labels = torch.tensor([lab + [-100] * (length - len(lab)) for _, lab in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r, _ in rows])
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "pixel_values": pixels[: pixels.shape[0] // 2],
        "image_grid_thw": grid[:1],
        "pixel_gen_values": torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1,
        "image_noise": False,
    }


def full_logits_losses(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, text, image) by the previous method: the head on every position, then cross-entropy with
    ignore_index over the shifted labels, pad slots masked."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs, return_logits=True)
    masked = batch["labels"].clone()
    masked[batch["input_ids"] == PAD] = -100
    logits = out.logits[:, :-1].float()
    text = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), masked[:, 1:].reshape(-1), ignore_index=-100
    )
    return text + model.config.image_loss_weight * out.image_loss, text, out.image_loss


def gradients(model) -> dict[str, torch.Tensor | None]:
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def test_text_loss_on_the_read_rows_equals_full_logits_loss_and_gradients():
    model = make_tiny_model(3)
    batch = mixed_batch(model)
    loss, text, image = full_logits_losses(model, batch)
    loss.backward()
    expected = gradients(model)
    out = model(**batch)
    out.loss.backward()
    got = gradients(model)
    assert out.logits is None  # labels given and no logits asked for
    torch.testing.assert_close(out.text_loss, text)
    torch.testing.assert_close(out.image_loss, image)
    torch.testing.assert_close(out.loss, loss)
    assert {n for n, g in got.items() if g is None} == {n for n, g in expected.items() if g is None}
    trained = [n for n, g in expected.items() if g is not None]
    assert "lm_head.weight" in trained and any(n.startswith("visual.") for n in trained)
    for name in trained:
        torch.testing.assert_close(got[name], expected[name], msg=name)


def _saved_bytes(run) -> int:
    """Bytes of the distinct storages autograd saves while `run()` builds its graph, parameters excluded."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, nn.Parameter):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def test_a_generation_row_saves_no_vocabulary_rows_for_its_image_slots():
    model = make_tiny_model(4)
    ids, labels = generation_sample(model)
    batch = {
        "input_ids": ids,
        "labels": labels,
        "pixel_gen_values": torch.rand(1, 3, 32, 32) * 2 - 1,
        "image_noise": False,
    }
    old = _saved_bytes(lambda: full_logits_losses(model, batch))
    new = _saved_bytes(lambda: model(**batch))
    read = int(((labels[0, 1:] != -100) & (ids[0, 1:] != PAD)).sum())  # <|image_gen_start|>, end, <|im_end|>
    assert read == 3
    # the previous method kept an fp32 log-softmax row for every position; now only the read rows
    vocab = model.config.text_config.vocab_size
    assert old - new >= (ids.shape[1] - 1 - read) * vocab * 4, (old, new)


def test_logits_are_returned_as_asked(tiny_model):
    ids, labels = generation_sample(tiny_model)
    with torch.no_grad():
        full = tiny_model(input_ids=ids).logits
        assert full.shape == (1, ids.shape[1], tiny_model.config.text_config.vocab_size)
        assert tiny_model(input_ids=ids, return_logits=False).logits is None
        with_labels = tiny_model(input_ids=ids, labels=labels, return_logits=True)
        assert torch.equal(with_labels.logits, full) and with_labels.text_loss is not None
        torch.testing.assert_close(tiny_model(input_ids=ids, logits_to_keep=1).logits, full[:, -1:])
        positions = torch.tensor([0, 5, 7])
        torch.testing.assert_close(tiny_model(input_ids=ids, logits_to_keep=positions).logits, full[:, positions])
        # a row with no labelled position has no text loss (the head still runs, on zero rows)
        none = tiny_model(input_ids=ids, labels=torch.full_like(labels, -100))
        assert none.text_loss is None and none.loss is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"logits_to_keep": -1}, "logits_to_keep must be an int >= 0"),
        ({"logits_to_keep": torch.tensor([[0, 1]])}, "1-D integer positions"),
        ({"logits_to_keep": torch.tensor([True, False])}, "1-D integer positions"),
        ({"labels": torch.zeros(1, 3, dtype=torch.long)}, "labels must be"),
    ],
)
def test_bad_logits_and_labels_arguments_are_clear_errors(tiny_model, kwargs, message):
    ids, _ = generation_sample(tiny_model)
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        tiny_model(input_ids=ids, **kwargs)


def test_generation_schedule_carries_the_models_counts(tiny_model):
    schedule = tiny_model.generation_schedule()
    assert isinstance(schedule, Schedule)
    assert list(schedule) == [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8)]
    assert (schedule.stride, schedule.pad_multiple, schedule.rope_reference) == (4, 8, (8, 8))
    assert schedule.image_size == (32, 32)
    assert schedule.num_tokens == 121 and schedule.num_pad_tokens == 128
    assert tiny_model.num_image_gen_pad_tokens(schedule) == schedule.num_pad_tokens
    assert tiny_model.num_image_gen_pad_tokens(list(schedule)) == schedule.num_pad_tokens
    wide = tiny_model.generation_schedule(32, aspect_ratio=0.5)
    assert wide.last_grid == (5, 10) and wide.rope_reference == (5, 10)
    with pytest.raises(ValueError, match="unsupported resolution"):
        tiny_model.generation_schedule(40)
