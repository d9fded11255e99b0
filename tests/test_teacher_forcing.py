"""Teacher forcing on the inference path: the KV-cached scale loop scores given bits as it would have drawn them."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.test_modeling import END, PAD, START, image_prompt, make_tiny_model, prompt_ids
from vargpt import ImageGenerationConfig, encode_image_bits, score_image, score_image_bits

TOLERANCE = 1e-5  # loop vs the one-pass forward (or another batch shape): float summation order; measured <= 2e-7


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(seed=3)


def random_bits(model, batch: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    d = model.config.visual_decoder_config.bits
    return [torch.randint(0, 2, (batch, h * w, d), generator=generator) for h, w in model.generation_schedule()]


def with_image_block(model, ids: torch.Tensor) -> torch.Tensor:
    """The prompt followed by the training layout of one image: start, pad slots, end."""
    n_pad = model.num_image_gen_pad_tokens(model.generation_schedule())
    block = torch.tensor([START] + [PAD] * n_pad + [END]).expand(ids.shape[0], -1)
    return torch.cat([ids, block], dim=1)


@pytest.mark.parametrize("prompt", ["text", "understanding_image"])
def test_scores_at_cfg_1_tau_1_equal_the_training_forward(model, prompt):
    """Same bits, same (M-RoPE) positions: the loop's logits and likelihood are the training forward's."""
    if prompt == "text":
        ids, images = prompt_ids(), {}
    else:
        ids, _, pixels, grid = image_prompt(model)
        images = {"pixel_values": pixels, "image_grid_thw": grid}
    bits = random_bits(model, ids.shape[0])
    scores = score_image_bits(model, ids, bits, cfg_scale=1.0, tau=1.0, position_mode="mrope", **images)
    with torch.no_grad():
        forward = model(input_ids=with_image_block(model, ids), image_gen_labels=torch.cat(bits, dim=1), **images)
    assert scores.uncond_logits is None
    assert torch.equal(scores.all_bits(), forward.image_labels)
    assert (scores.all_cond_logits() - forward.image_logits).abs().max().item() < TOLERANCE
    assert torch.equal(scores.all_logits(), scores.all_cond_logits())  # tau 1, no guidance: the raw logits
    cross_entropy = F.cross_entropy(
        forward.image_logits.flatten(0, 2), forward.image_labels.flatten(), reduction="none"
    ).view(ids.shape[0], -1)
    torch.testing.assert_close(scores.log_likelihood, -cross_entropy.sum(1), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(scores.nll_per_bit, cross_entropy.mean(1), rtol=1e-5, atol=1e-6)
    sizes = [h * w for h, w in scores.schedule]
    per_scale = torch.stack([part.sum(1) for part in cross_entropy.split([n * bits[0].shape[2] for n in sizes], 1)], 1)
    torch.testing.assert_close(scores.log_likelihood_per_scale, -per_scale, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_the_samplers_own_draws_score_to_the_logits_it_drew_them_from(model, cfg_scale):
    """Greedy bits are the argmax of `logits` everywhere; drawn bits (top-p 0.97) never have probability <= 0.03;
    and the conditional logits equal the ones `generate` returns, for a left-padded batch of two prompts."""
    short, long = prompt_ids((72,)), prompt_ids((72, 105, 33, 44))
    pad = torch.full((1, long.shape[1] - short.shape[1]), 500)
    ids = torch.cat([torch.cat([pad, short], dim=1), long])
    mask = torch.cat([torch.cat([torch.zeros_like(pad), torch.ones_like(short)], dim=1), torch.ones_like(long)])
    # tau 0.1: the tiny model's bit logits differ by 0.2 on average, so top-p would never bite at tau 1
    config = ImageGenerationConfig(cfg_scale=cfg_scale, tau=0.1, top_k=1)
    for settings in (config, config.updated(top_k=900, top_p=0.97)):
        out = model.generate(ids, attention_mask=mask, generation_mode="image", image_config=settings, max_new_tokens=1)
        out_seed = model.generate(
            ids, attention_mask=mask, generation_mode="image", image_config=settings, max_new_tokens=1, seed=7
        )
        for drawn in (out, out_seed) if settings.top_k == 900 else (out,):
            bits = [
                torch.stack([drawn.image_bits[b][0][k] for b in range(2)]) for k in range(len(drawn.image_bits[0][0]))
            ]
            scores = score_image_bits(model, ids, bits, attention_mask=mask, image_config=settings)
            loop_cond = torch.stack([drawn.image_logits[b][0] for b in range(2)])
            assert torch.equal(scores.all_cond_logits(), loop_cond)
            assert (scores.uncond_logits is None) == (cfg_scale == 1.0)
            if settings.top_k == 1:
                assert torch.equal(scores.all_logits().argmax(-1), scores.all_bits())
            else:
                probs = torch.cat(scores.bit_log_probs, dim=1).exp()
                assert probs.min().item() > 1 - 0.97
                filterable = scores.all_logits().softmax(-1).min(-1).values <= 1 - 0.97
                assert filterable.any()  # the check above could have failed


def test_cfg_and_tau_enter_as_defined(model):
    """`logits = cfg * cond / tau + (1 - cfg) * uncond / tau`; `log_likelihood` sums log-softmax of the bits."""
    ids, bits = prompt_ids(), random_bits(model, 1, seed=4)
    guided = score_image_bits(model, ids, bits, cfg_scale=3.0, tau=0.5)
    plain = score_image_bits(model, ids, bits, cfg_scale=1.0, tau=1.0)
    cooled = score_image_bits(model, ids, bits, cfg_scale=1.0, tau=0.5)
    for k, (cond, uncond) in enumerate(zip(guided.cond_logits, guided.uncond_logits, strict=True)):
        torch.testing.assert_close(guided.logits[k], 3.0 * cond / 0.5 - 2.0 * uncond / 0.5, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cond, plain.cond_logits[k], rtol=0, atol=TOLERANCE)  # the doubled batch
        assert torch.equal(cooled.cond_logits[k], plain.cond_logits[k])
        torch.testing.assert_close(cooled.logits[k], plain.cond_logits[k] / 0.5, rtol=1e-6, atol=1e-6)
    expected = sum(
        logits.log_softmax(-1).gather(-1, b.unsqueeze(-1)).sum() for logits, b in zip(guided.logits, bits, strict=True)
    )
    assert guided.log_likelihood.item() == pytest.approx(float(expected), rel=1e-6)
    lls = {guided.log_likelihood.item(), plain.log_likelihood.item(), cooled.log_likelihood.item()}
    assert len(lls) == 3


def test_null_prompt_guidance_scores_the_empty_conversation_as_its_unconditional_branch(model):
    ids, bits = prompt_ids(), random_bits(model, 1, seed=5)
    null_ids = prompt_ids(())[0]
    guided = score_image_bits(
        model, ids, bits, cfg_scale=2.0, tau=1.0, uncond_mode="null_prompt", null_prompt_ids=null_ids
    )
    alone = score_image_bits(model, null_ids.view(1, -1), bits, cfg_scale=1.0, tau=1.0)
    for uncond, cond in zip(guided.uncond_logits, alone.cond_logits, strict=True):
        torch.testing.assert_close(uncond, cond, rtol=0, atol=TOLERANCE)


def test_an_image_scores_as_the_bits_the_training_forward_codes_it_into(model):
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(6)) * 2 - 1
    ids = prompt_ids()
    scores = score_image(model, ids, image, cfg_scale=1.0, tau=1.0)
    bits = encode_image_bits(model, image)
    assert torch.equal(scores.all_bits(), torch.cat(bits, dim=1))
    with torch.no_grad():
        forward = model(input_ids=with_image_block(model, ids), pixel_gen_values=image)
    assert torch.equal(scores.all_bits(), forward.image_labels)
    assert (scores.all_cond_logits() - forward.image_logits).abs().max().item() < TOLERANCE
    assert math.isfinite(scores.log_likelihood.item())


def test_the_model_is_scored_in_eval_mode_and_left_as_it_was(model):
    ids, bits = prompt_ids(), random_bits(model, 1)
    model.train()
    try:
        first = score_image_bits(model, ids, bits, cfg_scale=1.0, tau=1.0)
        assert model.training
    finally:
        model.eval()
    assert torch.equal(first.log_likelihood, score_image_bits(model, ids, bits, cfg_scale=1.0, tau=1.0).log_likelihood)


def test_bad_inputs_are_named(model):
    ids, bits = prompt_ids(), random_bits(model, 1)
    with pytest.raises(ValueError, match="scales"):
        score_image_bits(model, ids, bits[:-1])
    with pytest.raises(ValueError, match=r"scale 1 .* must be \[B, 4, "):
        score_image_bits(model, ids, [bits[0], bits[1][:, :3], *bits[2:]])
    with pytest.raises(ValueError, match="other than 0 and 1"):
        score_image_bits(model, ids, [bits[0] * 2, *bits[1:]])
    with pytest.raises(ValueError, match="one tensor must be"):
        score_image_bits(model, ids, torch.cat(bits, dim=1)[:, 1:])
    with pytest.raises(ValueError, match="bits for 1 images but 2 prompts"):
        score_image_bits(model, ids.expand(2, -1), bits)
    with pytest.raises(ValueError, match="without that token"):
        score_image_bits(model, torch.cat([ids, torch.tensor([[START]])], dim=1), bits)
    with pytest.raises(ValueError, match="tau"):
        score_image_bits(model, ids, bits, tau=0.0)
    with pytest.raises(ValueError, match="null_prompt_ids"):
        score_image_bits(model, ids, bits, cfg_scale=2.0, uncond_mode="null_prompt")
    with pytest.raises(ValueError, match=r"images must be \[B, 3, 32, 32\]"):
        encode_image_bits(model, torch.zeros(1, 3, 48, 32))


# -- `vargpt eval fit --through inference`: the fit scored by the same loop -------------------------------------


@pytest.fixture(scope="module")
def fit_rows(tmp_path_factory):
    """Three text-to-image rows, then three editing rows (an understanding image before the target)."""
    from vargpt.data.formats import load_sft_dataset
    from vargpt.shapes.dataset import write_sharegpt_dataset

    path = write_sharegpt_dataset(tmp_path_factory.mktemp("fit"), "validation", 0, 3, 3, seed=4)
    dataset, _ = load_sft_dataset(path)
    return path, [dataset[i] for i in range(len(dataset))]


@pytest.fixture(scope="module")
def pipe():
    from vargpt import VARGPTPipeline

    pipe = VARGPTPipeline.from_pretrained("tiny", device="cpu", seed=2)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # as `make_tiny_model`: the zero-initialised gates perturbed, so the bits carry signal
        for p in [*pipe.model.vargpt_gen.parameters(), *pipe.model.image_gen_projector.parameters()]:
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return pipe


def test_fit_through_the_inference_loop_equals_the_forward_at_cfg_1_tau_1(pipe, fit_rows):
    """Batches of 4 mix text-to-image and editing rows, so prompts are left padded and images sliced per row."""
    from vargpt.evaluation.teacher_forced import teacher_forced_fit

    _, rows = fit_rows
    forward = teacher_forced_fit(pipe.model, pipe.processor, rows, batch_size=4, positions="mrope")
    loop = teacher_forced_fit(pipe.model, pipe.processor, rows, batch_size=4, through="inference")
    assert (forward["through"], loop["through"], loop["positions"]) == ("forward", "inference", "mrope")
    for key in ("image_loss", "cross_entropy", "bit_error"):
        assert loop[key] == pytest.approx(forward[key], rel=1e-4), key
    for ours, theirs in zip(loop["scales"], forward["scales"], strict=True):
        assert ours["cross_entropy"] == pytest.approx(theirs["cross_entropy"], rel=1e-4)


def test_fit_through_the_inference_loop_scores_the_samplers_distribution(pipe, fit_rows):
    """tau rescales the logits without moving their argmax: the bit error stays, the cross-entropy moves;
    guidance moves both."""
    from vargpt.evaluation.teacher_forced import teacher_forced_fit

    _, rows = fit_rows
    fit = {
        (cfg, tau): teacher_forced_fit(
            pipe.model, pipe.processor, rows[:3], through="inference", cfg_scale=cfg, tau=tau, positions="cache"
        )
        for cfg, tau in ((1.0, 1.0), (1.0, 0.5), (3.0, 0.5))
    }
    assert fit[1.0, 0.5]["bit_error"] == fit[1.0, 1.0]["bit_error"]
    assert fit[1.0, 0.5]["cross_entropy"] != pytest.approx(fit[1.0, 1.0]["cross_entropy"], rel=1e-3)
    assert fit[3.0, 0.5]["cross_entropy"] != pytest.approx(fit[1.0, 0.5]["cross_entropy"], rel=1e-3)
    assert fit[3.0, 0.5]["bit_error"] != fit[1.0, 0.5]["bit_error"]
    null = teacher_forced_fit(
        pipe.model, pipe.processor, rows[:2], through="inference", cfg_scale=2.0, uncond_mode="null_prompt"
    )
    assert math.isfinite(null["cross_entropy"]) and null["uncond_mode"] == "null_prompt"


def test_fit_settings_a_path_does_not_have_are_refused(pipe, fit_rows):
    from vargpt.evaluation.teacher_forced import teacher_forced_fit

    _, rows = fit_rows
    with pytest.raises(ValueError, match="through='inference' to use them"):
        teacher_forced_fit(pipe.model, pipe.processor, rows, cfg_scale=3.0)
    with pytest.raises(ValueError, match="training forward only"):
        teacher_forced_fit(pipe.model, pipe.processor, rows, through="inference", positions="sequential")
    with pytest.raises(ValueError, match="positions on the training forward"):
        teacher_forced_fit(pipe.model, pipe.processor, rows, positions="cache")
    with pytest.raises(ValueError, match="unknown path"):
        teacher_forced_fit(pipe.model, pipe.processor, rows, through="sideways")


def test_the_fit_command_scores_through_the_inference_loop(fit_rows, tmp_path, capsys):
    import json

    from vargpt.cli.main import main

    path, _ = fit_rows
    report = tmp_path / "fit.json"
    args = ["eval", "fit", "--model", "tiny", "--data", str(path), "--limit", "4", "--quiet"]
    args += ["--through", "inference", "--cfg-scale", "3", "--tau", "0.5", "--positions", "cache"]
    args += ["--json", str(report)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "4 rows, 4 images" in out and "inference loop (cfg 3, tau 0.5, cache positions" in out
    fit = json.loads(report.read_text())
    assert (fit["through"], fit["cfg_scale"], fit["tau"], fit["positions"]) == ("inference", 3.0, 0.5, "cache")
