"""Numerical parity with the ORIGINAL VARGPT-v1.1 implementation, on two golden sets.

Each set is a folder with `tiny-vargpt` (tiny weights written by our `save_pretrained`: original tensor names,
bf16), `golden.safetensors` (what the original code, VARGPT-family/VARGPT-v1.1 with transformers 4.46.1,
computed from that exact state dict loaded with `strict=True`) and `golden.json` (how). Here our model
recomputes every quantity from the same weights and inputs. Nothing of the original code is needed.

* small-init (`tests/data/fidelity`): near-init weights (std 0.02): tiny activations, the most exact check.
* trained-scale (`tests/data/fidelity/trained-scale`, made by tools/original_golden): weights with trained-like
  spreads (largest logits 4-10), so rounding differences show at the size they have in a real checkpoint.

The golden tensors come from the original with its bf16 cast inside the decoder's cross-attention turned off
(the only change to its arithmetic), so agreement is to float32 rounding; the `asis.*` tensors come from the
unchanged original and are compared with measured bounds (that cast: 1e-3 small-init, 2e-2 trained-scale).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vargpt import VARGPTConfig, VARGPTForConditionalGeneration, score_image_bits
from vargpt.configuration import PRESETS
from vargpt.image_tokenizer import encode_to_bits
from vargpt.image_tokenizer.multiscale import bits_to_latent
from vargpt.processing import UNDERSTANDING_MAX_PIXELS, UNDERSTANDING_MIN_PIXELS, Qwen2VLImageProcessorPil

DATA = Path(__file__).resolve().parents[1] / "data" / "fidelity"
GOLDEN_SETS = {"small-init": DATA, "trained-scale": DATA / "trained-scale"}
# Measured max abs differences, small-init / trained-scale: logits, features, losses <= 1e-6 / 5.3e-6
# (understanding 3.3e-6, teacher-forced text 4.3e-6, scale-loop head 5.2e-6).
FLOAT_ATOL = 2e-5
SAMPLER_ATOL = 1e-4  # after tau 0.5 and CFG 3 (which scale differences up to 14x): measured 4.1e-6 / 2.3e-5
IMAGE_ATOL = 5e-5  # decoded pixels in [-1, 1]; measured 7e-6 / 1.1e-5
# Against the unchanged original (bf16 cross-attention), ours in float32. Measured: small-init tf bit logits
# 6.7e-4, head logits 8.3e-4; trained-scale tf bit logits 9.6e-3, head logits 1.04e-2 (cfg 3), 1.37e-2 (cfg 1),
# 1.75e-2 (edit), loss 5.0e-5.
BF16_CAST_ATOL = {"small-init": 3e-3, "trained-scale": 3e-2}
# Sampled bits that may differ from the unchanged original: a logit 1e-2 away can cross a sampling threshold.
# Measured 0 of 968 per loop on both sets (an independent 256 px check measured 38 of 16,672 = 0.23%).
ASIS_BITS_FRACTION = 0.005
# Decoded uint8 values differing by one from the original's for the same bits: measured 0 on small-init; on
# trained-scale gen_nocfg and edit_cfg 1 of 3072 each. Cause: the summed codes (<= 2.4e-7 apart) and the decoder's
# input layout (channels-last in the original); the two tests after the scale-loop tests pin both down.
PIXELS_OFF_BY_ONE = 1
SEED = 12345678  # the original's clock-derived g_seed, pinned by the harness
IMAGE_GEN_PAD = 509


def fidelity_config() -> VARGPTConfig:
    """The tiny preset, changed only where the original cannot express it.

    * decoder FFN: the original rounds the width to a multiple of 256 (0 for 32 * 2), so mlp_ratio 8 (width 256);
    * two block chunks: the original's scale loop iterates `block_chunks`, which exists only for more than one;
    * 512 `cfg_uncond` rows: the original's loader hard-codes text_maxlen 512;
    * VAE: the original's GroupNorm takes 32 or 24 groups, so 24 channels at every level (kept small).
    """
    tiny = copy.deepcopy(PRESETS["tiny"])
    decoder = dict(tiny["visual_decoder_config"], mlp_ratio=8.0, num_block_chunks=2, cfg_uncond_length=512)
    tokenizer = dict(tiny["image_tokenizer_config"], base_channels=24, channel_multipliers=[1, 1, 1], norm_groups=24)
    return VARGPTConfig.from_preset("tiny", visual_decoder_config=decoder, image_tokenizer_config=tokenizer)


@pytest.fixture(scope="module", params=sorted(GOLDEN_SETS))
def golden_set(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def golden(golden_set) -> dict[str, torch.Tensor]:
    return load_file(GOLDEN_SETS[golden_set] / "golden.safetensors")


@pytest.fixture(scope="module")
def model(golden_set) -> VARGPTForConditionalGeneration:
    torch.set_grad_enabled(False)
    loaded = VARGPTForConditionalGeneration.from_pretrained(
        GOLDEN_SETS[golden_set] / "tiny-vargpt", config=fidelity_config(), dtype=torch.float32
    )
    yield loaded.eval()
    torch.set_grad_enabled(True)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return (a.float() - b.float()).abs().max().item()


def count_differing(a: torch.Tensor, b: torch.Tensor) -> int:
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return int((a != b).sum())


@pytest.mark.parametrize("name", sorted(GOLDEN_SETS))
def test_golden_metadata_names_the_original_commit(name):
    meta = json.loads((GOLDEN_SETS[name] / "golden.json").read_text())
    assert meta["original"]["commit"] == "8c67c263497a4f303b3e9668b49217d70bd47a44"
    assert meta["python_packages"]["transformers"] == "4.46.1"


def test_trained_scale_weights_give_trained_like_logits(model, golden, golden_set):
    """The point of the second set: logits spread over several units, not the near-zero ones of a 0.02 init."""
    largest_head = max(golden[f"gen_cfg.head_logits.{k}"].abs().max().item() for k in range(5))
    largest_text = golden["und.logits"][golden["und.attention_mask"].bool()].abs().max().item()
    if golden_set == "trained-scale":
        assert largest_head > 4.0 and largest_text > 4.0  # measured 8.97 and 9.19
    else:
        assert largest_head < 2.0 and largest_text < 1.0  # measured 1.60 and 0.62


def test_understanding_preprocessing_matches_original(golden):
    processor = Qwen2VLImageProcessorPil(min_pixels=UNDERSTANDING_MIN_PIXELS, max_pixels=UNDERSTANDING_MAX_PIXELS)
    features = processor(images=[Image.fromarray(golden["und.image_uint8"].numpy())], return_tensors="pt")
    assert torch.equal(features["image_grid_thw"], golden["und.image_grid_thw"])
    assert max_abs(features["pixel_values"], golden["und.pixel_values"]) <= 1e-6


def test_understanding_logits_match_original(model, golden):
    out = model(
        input_ids=golden["und.input_ids"],
        attention_mask=golden["und.attention_mask"],
        pixel_values=golden["und.pixel_values"],
        image_grid_thw=golden["und.image_grid_thw"],
    )
    real = golden["und.attention_mask"].bool()  # row 1 is left padded; padded slots are undefined
    assert max_abs(out.logits[real], golden["und.logits"][real]) <= FLOAT_ATOL
    assert torch.equal(out.rope_deltas.view(-1), golden["und.rope_deltas"].view(-1))


def test_sequential_positions_leave_the_original_generate_after_the_image(model, golden):
    """`und.*` come from the original's generate, which used M-RoPE; its plain forward (and training) used 1-D
    positions, which `positions="sequential"` reproduces: the same before the image and on the text-only row,
    different after the image (measured 1.6e-3 on the small-init weights, logits up to 0.62)."""
    inputs = {k: golden[f"und.{k}"] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
    out = model(**inputs, positions="sequential")
    image = (golden["und.input_ids"][0] == model.config.image_token_id).nonzero().view(-1)
    before, after = slice(0, int(image[0])), slice(int(image[-1]) + 1, None)
    real = golden["und.attention_mask"][1].bool()
    assert max_abs(out.logits[0, before], golden["und.logits"][0, before]) <= FLOAT_ATOL
    assert max_abs(out.logits[1][real], golden["und.logits"][1][real]) <= FLOAT_ATOL  # a shift of all positions
    assert max_abs(out.logits[0, after], golden["und.logits"][0, after]) > 1e-3


def test_vae_bits_and_reconstruction_match_original(model, golden):
    vae = model.vae_local
    features = vae.encode(golden["vae.image"])
    assert max_abs(features, golden["vae.raw_features"]) <= FLOAT_ATOL
    bits, summed = encode_to_bits(golden["vae.raw_features"], model.generation_schedule())
    assert len(bits) == 5
    for k, bits_k in enumerate(bits):
        assert torch.equal(bits_k.long(), golden[f"vae.bits.{k}"]), f"scale {k}"
    assert max_abs(summed, golden["vae.summed_codes"]) <= 1e-6
    assert max_abs(vae.decode(golden["vae.summed_codes"]), golden["vae.reconstruction"]) <= FLOAT_ATOL


def test_teacher_forced_training_path_matches_original(model, golden, golden_set):
    """Bit flips and condition dropout off (eval mode here, zero flip strength / drop rate in the original)."""
    ids = golden["tf.input_ids"]
    config = model.config
    weighting = config.image_loss_scale_weighting
    config.image_loss_scale_weighting = "uniform"  # the original's loss is a plain mean over all bits
    try:
        out = model(
            input_ids=ids, pixel_gen_values=golden["tf.pixel_gen_values"], labels=ids.clone(), return_logits=True
        )
    finally:
        config.image_loss_scale_weighting = weighting
    assert torch.equal(out.image_labels.long(), golden["tf.gen_labels"])
    assert max_abs(out.image_logits.flatten(2), golden["tf.gen_logits"]) <= FLOAT_ATOL
    assert max_abs(out.logits[ids != IMAGE_GEN_PAD], golden["tf.text_logits"]) <= FLOAT_ATOL
    assert abs(out.loss.item() - golden["tf.loss"].item()) <= FLOAT_ATOL
    assert max_abs(out.image_logits.flatten(2), golden["asis.tf.gen_logits"]) <= BF16_CAST_ATOL[golden_set]
    assert abs(out.loss.item() - golden["asis.tf.loss"].item()) <= 1e-3  # measured 9.8e-5 / 5.0e-5


def understanding_images(golden, name: str) -> dict[str, torch.Tensor]:
    if f"{name}.pixel_values" not in golden:
        return {}
    return {"pixel_values": golden[f"{name}.pixel_values"], "image_grid_thw": golden[f"{name}.image_grid_thw"]}


def score_golden_bits(model, golden, name: str, cfg_scale: float, position_mode: str, bits_of: str | None = None):
    """The original's draws (`bits_of`, default `name`) scored by our KV-cached scale loop in the original-code mode.

    Teacher forcing on the inference path: the logits are checked whatever our sampler would have drawn, so a
    logit mismatch and a sampling mismatch show up as separate failures."""
    prefix = f"{bits_of or name}.bits."
    bits = [golden[f"{prefix}{k}"] for k in range(sum(key.startswith(prefix) for key in golden))]
    return score_image_bits(
        model,
        golden[f"{name}.input_ids"],
        bits,
        cfg_scale=cfg_scale,
        tau=0.5,
        position_mode=position_mode,
        **understanding_images(golden, name),
    )


def head_logits(scores, k: int) -> torch.Tensor:
    """Scale k's head output as the original's `head` returns it: [rows, h*w, 2 * bits], conditional rows first."""
    branches = [scores.cond_logits[k]] + ([] if scores.uncond_logits is None else [scores.uncond_logits[k]])
    return torch.cat(branches).flatten(2)


def sample_image(model, golden, name: str, cfg_scale: float, position_mode: str):
    """Our image generation in the original-code mode, seeded as the original was."""
    return model.generate(
        golden[f"{name}.input_ids"],
        generation_mode="image",
        seed=SEED,
        cfg_scale=cfg_scale,
        tau=0.5,
        image_top_p=0.97,
        max_new_tokens=1,
        position_mode=position_mode,
        **understanding_images(golden, name),
    )


def to_bgr_uint8(image_3HW: torch.Tensor) -> torch.Tensor:
    """The original's conversion: (x + 1) / 2 * 255 truncated to uint8, HWC, channels flipped for cv2."""
    return ((image_3HW + 1) / 2).permute(1, 2, 0).mul(255).to(torch.uint8).flip(-1)


@pytest.mark.parametrize(
    ("name", "cfg_scale", "position_mode"),
    [
        ("gen_cfg", 3.0, "mrope"),  # text-only prompt: M-RoPE continuation equals cache positions
        ("gen_nocfg", 1.0, "mrope"),
        ("edit_cfg", 3.0, "cache"),  # prompt with an understanding image: the original uses cache positions
    ],
)
def test_scale_loop_matches_original(model, golden, name, cfg_scale, position_mode):
    scores = score_golden_bits(model, golden, name, cfg_scale, position_mode)
    assert len(scores.schedule) == 5
    for k in range(5):
        assert max_abs(head_logits(scores, k), golden[f"{name}.head_logits.{k}"]) <= FLOAT_ATOL, f"scale {k}"
        sampler_logits = scores.logits[k].flatten(1, 2)  # [1, h*w*bits, 2]: the original's layout
        assert max_abs(sampler_logits, golden[f"{name}.sampler_logits.{k}"]) <= SAMPLER_ATOL, f"scale {k}"
    assert max_abs(scores.latent, golden[f"{name}.summed_codes"]) <= 1e-6  # measured 2.4e-7
    out = sample_image(model, golden, name, cfg_scale, position_mode)
    bits = out.image_bits[0][0]
    assert len(bits) == 5
    for k, bits_k in enumerate(bits):
        assert torch.equal(bits_k.long(), golden[f"{name}.bits.{k}"][0]), f"scale {k}"
    image = out.images[0][0]
    assert max_abs(image, golden[f"{name}.decoder_out"][0].clamp(-1, 1)) <= IMAGE_ATOL
    pixels = to_bgr_uint8(image)
    assert count_differing(pixels, golden[f"{name}.image_bgr_uint8"]) <= PIXELS_OFF_BY_ONE
    assert max_abs(pixels, golden[f"{name}.image_bgr_uint8"]) <= 1


@pytest.mark.parametrize(
    ("name", "cfg_scale", "position_mode"),
    [("gen_cfg", 3.0, "mrope"), ("gen_nocfg", 1.0, "mrope"), ("edit_cfg", 3.0, "cache")],
)
def test_scale_loop_close_to_unchanged_original(model, golden, golden_set, name, cfg_scale, position_mode):
    """Against the original as published (bf16 cross-attention): head logits within the measured bound, sampled
    bits and decoded pixels counted against bounds (a 1e-2 logit difference can flip a draw)."""
    if f"asis.{name}.bits.0" not in golden:
        pytest.skip(f"the {golden_set} set has no asis.{name}")
    scores = score_golden_bits(model, golden, name, cfg_scale, position_mode, bits_of=f"asis.{name}")
    for k in range(5):
        error = max_abs(head_logits(scores, k), golden[f"asis.{name}.head_logits.{k}"])
        assert error <= BF16_CAST_ATOL[golden_set], f"scale {k}"
    out = sample_image(model, golden, name, cfg_scale, position_mode)
    ours, theirs = out.image_bits[0][0], [golden[f"asis.{name}.bits.{k}"][0] for k in range(5)]
    differing = sum(count_differing(a.long(), b) for a, b in zip(ours, theirs, strict=True))
    assert differing <= ASIS_BITS_FRACTION * sum(b.numel() for b in theirs)  # measured 0 of 968
    pixels = to_bgr_uint8(out.images[0][0])
    assert count_differing(pixels, golden[f"asis.{name}.image_bgr_uint8"]) <= PIXELS_OFF_BY_ONE  # with equal bits


def test_pixels_off_by_one_sit_on_integer_boundaries(model, golden):
    """Where the last-digit pixel differences come from: not the uint8 formula (ours is the original's, in the
    same order) but float rounding in the VAE decoder's convolutions, whose summation order depends on the input's
    memory layout (the original's codes arrive channels-last: decoding them that way reproduced its output exactly
    at 1 thread) and on the thread count. Decoder outputs differ by <= 7.9e-6 (trained-scale), so a truncated
    value can only flip where the original's value was within a few 1e-4 of an integer (measured: 1 such value
    each in trained-scale gen_nocfg and edit_cfg, 0 in small-init)."""
    for name in ("gen_cfg", "gen_nocfg", "edit_cfg"):
        ours = to_bgr_uint8(model.vae_local.decode(golden[f"{name}.summed_codes"])[0])
        theirs = golden[f"{name}.image_bgr_uint8"]
        differ = ours != theirs
        assert int(differ.sum()) <= PIXELS_OFF_BY_ONE, name
        scaled = ((golden[f"{name}.decoder_out"][0].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).mul(255).flip(-1)
        distance_to_integer = (scaled - scaled.round()).abs()
        assert (distance_to_integer[differ] <= 2e-3).all(), name


def test_summed_codes_are_bitwise_the_originals(golden):
    """The decoded image's input, from the original's own bits, equal to the last bit: codes built as the original
    builds them (l2-normalised signs) and upsampled in its trilinear order, channels-last (they differed by up to
    2.4e-7 before, enough to move a pixel across an integer boundary)."""
    for name in ("gen_cfg", "gen_nocfg", "edit_cfg"):
        bits = [golden[f"{name}.bits.{k}"] for k in range(5)]
        latent = bits_to_latent(bits, [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8)])
        assert torch.equal(latent, golden[f"{name}.summed_codes"]), name


@pytest.fixture(scope="module")
def model_with_bf16_cast(golden_set) -> VARGPTForConditionalGeneration:
    """The same weights with `cross_attention_bf16` on: the published code's rounding in cross-attention."""
    config = fidelity_config()
    config.visual_decoder_config.cross_attention_bf16 = True
    loaded = VARGPTForConditionalGeneration.from_pretrained(
        GOLDEN_SETS[golden_set] / "tiny-vargpt", config=config, dtype=torch.float32
    )
    return loaded.eval()


def test_bf16_cast_setting_reproduces_the_unchanged_original(model_with_bf16_cast, golden):
    """With the cast reproduced, most logits equal the published code's to float rounding (median 1.2e-7 /
    4.2e-7; mean 1.6e-5 / 1.0e-6 against 1.8e-4 / 2.1e-3 without the setting, small-init / trained-scale). Where
    an fp32 sum lands on a bf16 rounding boundary the two attention kernels' summation orders round apart by one
    bf16 step, which then propagates (max ~1e-3 / 1.5e-4; head logits per scale mean <= 2.5e-5 trained-scale)."""
    model = model_with_bf16_cast
    with torch.no_grad():
        ids = golden["tf.input_ids"]
        out = model(input_ids=ids, pixel_gen_values=golden["tf.pixel_gen_values"], labels=ids.clone())
    error = (out.image_logits.flatten(2) - golden["asis.tf.gen_logits"]).abs()
    assert error.median().item() <= 1e-6
    assert error.mean().item() <= 5e-5
    assert error[:, :5].max().item() <= FLOAT_ATOL  # scales 1 and 2 (5 tokens): exact
    scores = score_golden_bits(model, golden, "gen_cfg", 3.0, "mrope", bits_of="asis.gen_cfg")
    assert max_abs(head_logits(scores, 0), golden["asis.gen_cfg.head_logits.0"]) <= FLOAT_ATOL
    for k in range(5):
        error = head_logits(scores, k) - golden[f"asis.gen_cfg.head_logits.{k}"]
        assert error.abs().mean().item() <= 1e-4, f"scale {k}"
    loop = sample_image(model, golden, "gen_cfg", 3.0, "mrope")
    for k in range(5):
        assert torch.equal(loop.image_bits[0][0][k].long(), golden[f"asis.gen_cfg.bits.{k}"][0]), f"scale {k}"
    assert torch.equal(to_bgr_uint8(loop.images[0][0]), golden["asis.gen_cfg.image_bgr_uint8"])
