"""What make_golden.py records from the original model (kept apart from the set-up code).

Names and layouts follow tests/data/fidelity/golden.json, which tests/fidelity/test_original_parity.py reads.
"""

from __future__ import annotations

import os
import time
import types

import torch

IMAGE_GEN_PAD = 509
SCHEDULE = [(1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 6, 6), (1, 8, 8)]


def understanding(model, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Logits with the positions the original's generate computes (get_rope_index, M-RoPE)."""
    position_ids, rope_deltas = model.get_rope_index(
        x["und.input_ids"], x["und.image_grid_thw"], None, x["und.attention_mask"]
    )
    out = model(
        input_ids=x["und.input_ids"],
        attention_mask=x["und.attention_mask"],
        position_ids=position_ids,
        pixel_values=x["und.pixel_values"],
        image_grid_thw=x["und.image_grid_thw"],
        use_cache=False,
    )
    return {"und.logits": out.logits.float(), "und.position_ids": position_ids, "und.rope_deltas": rope_deltas}


def vae(model, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    vae_local = model.vae_local
    raw = vae_local.encode_for_raw_features(x["vae.image"], scale_schedule=SCHEDULE)[0]
    summed, _, bit_indices, *_ = vae_local.quantizer(raw, scale_schedule=SCHEDULE)
    out = {
        "vae.raw_features": raw,
        "vae.summed_codes": summed.squeeze(-3),
        "vae.reconstruction": vae_local.decode(summed.squeeze(-3)),
    }
    for k, bits in enumerate(bit_indices):
        out[f"vae.bits.{k}"] = bits.reshape(bits.shape[0], -1, bits.shape[-1]).long()
    return out


def teacher_forced(model, x: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Training path in eval mode (dpo_training=True takes the generation-loss branch), no bit flips."""
    from visionllm.vargpt_qwen_v1_1.var_model.infinity.models.bitwise_self_correction import BitwiseSelfCorrection

    model.bitwise_self_correction = BitwiseSelfCorrection(model.vae_local)
    model.bitwise_self_correction.noise_apply_strength = 0
    ids = x["tf.input_ids"]
    out = model(
        input_ids=ids, pixel_gen_values=x["tf.pixel_gen_values"], labels=ids.clone(), dpo_training=True, use_cache=False
    )
    logits = out.gen_logits.float()
    return {
        f"{prefix}tf.gen_labels": out.image_gen_labels.reshape(1, -1, logits.shape[-1] // 2).long(),
        f"{prefix}tf.gen_logits": logits.reshape(1, -1, logits.shape[-1]),
        f"{prefix}tf.text_logits": out.logits.float()[ids != IMAGE_GEN_PAD],  # the original leaves pads unset
        f"{prefix}tf.loss": out.loss.float().reshape(1),
    }


class ScaleLoopRecorder:
    """Records, per scale, the decoder head output, the sampler's input logits and drawn bits, plus the VAE
    decoder's input / output and the image the original hands to cv2.imwrite; changes none of them."""

    def __init__(self, model, modeling):
        self.model, self.modeling = model, modeling
        self.head, self.sampler_logits, self.bits, self.images = [], [], [], []
        self.decoder_io = []

    def __enter__(self):
        sampler = self.modeling.sample_with_top_k_top_p_also_inplace_modifying_logits_
        self._sampler, self._cv2, self._time = sampler, self.modeling.cv2, time.time

        def recording_sampler(logits_BlV, **kwargs):
            self.sampler_logits.append(logits_BlV.clone())  # the sampler modifies its input in place
            drawn = sampler(logits_BlV, **kwargs)
            self.bits.append(drawn[:, :, 0].reshape(drawn.shape[0], -1, 8).long())
            return drawn

        self.modeling.sample_with_top_k_top_p_also_inplace_modifying_logits_ = recording_sampler
        self.modeling.cv2 = types.SimpleNamespace(imwrite=lambda _path, image: self.images.append(image.copy()))
        time.time = lambda: 12345.678  # the original seeds its sampler with int(time.time() * 1000)
        self._hooks = [
            self.model.vargpt_gen.head.register_forward_hook(lambda _m, _i, out: self.head.append(out.clone())),
            self.model.vae_local.decoder.register_forward_hook(
                lambda _m, inp, out: self.decoder_io.append((inp[0].clone(), out.clone()))
            ),
        ]
        return self

    def __exit__(self, *_):
        self.modeling.sample_with_top_k_top_p_also_inplace_modifying_logits_ = self._sampler
        self.modeling.cv2, time.time = self._cv2, self._time
        for hook in self._hooks:
            hook.remove()

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        out = {}
        for k, (head, logits, bits) in enumerate(zip(self.head, self.sampler_logits, self.bits, strict=True)):
            out[f"{name}.head_logits.{k}"] = head.float()
            out[f"{name}.sampler_logits.{k}"] = logits.float()
            out[f"{name}.bits.{k}"] = bits
        ((summed, decoded),) = self.decoder_io
        out[f"{name}.summed_codes"] = summed.float()
        out[f"{name}.decoder_out"] = decoded.float()
        (image,) = self.images
        out[f"{name}.image_bgr_uint8"] = torch.from_numpy(image)
        return out


def scale_loop(model, modeling, x: dict[str, torch.Tensor], name: str, out_name: str, cfg: float):
    """The steps of patching_utils/vargpt_sample.py: prefill, <|image_gen_start|>, greedy extra token, then
    forward(inference_image_gen=True). cfg 1 reruns the same autoregressive_infer_cfg call with cfg_list 1."""
    from transformers.cache_utils import DynamicCache

    ids = x[f"{name}.input_ids"]
    kwargs = {
        "attention_mask": torch.ones_like(ids),
        "use_cache": True,
        "past_key_values": DynamicCache(),
        "cache_position": torch.arange(ids.shape[1]),
    }
    if f"{name}.pixel_values" in x:
        kwargs.update(pixel_values=x[f"{name}.pixel_values"], image_grid_thw=x[f"{name}.image_grid_thw"])

    def step(ids, **extra):
        nonlocal kwargs
        outputs = model(**model.prepare_inputs_for_generation(ids, **kwargs), return_dict=True, **extra)
        if not extra.get("inference_image_gen"):
            kwargs = model._update_model_kwargs_for_generation(outputs, kwargs)
        return outputs

    step(ids)
    start = torch.tensor([[model.config.special_tokens["image_gen_start_token_id"]]])
    ids = torch.cat([ids, start], dim=1)
    extra = step(ids, inference_image_gen=False).logits[:, -1].argmax(-1, keepdim=True)
    ids = torch.cat([ids, extra], dim=1)
    infer = model.autoregressive_infer_cfg
    if cfg != 3:
        model.autoregressive_infer_cfg = lambda **kw: infer(**{**kw, "cfg_list": [cfg] * len(kw["cfg_list"])})
    try:
        with ScaleLoopRecorder(model, modeling) as recorder:
            step(ids, inference_image_gen=True)
    finally:
        model.autoregressive_infer_cfg = infer
    return recorder.tensors(out_name)


def record_all(model, modeling, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    keep = (
        "und.input_ids",
        "und.attention_mask",
        "und.pixel_values",
        "und.image_grid_thw",
        "und.image_uint8",
        "vae.image",
        "tf.input_ids",
        "tf.pixel_gen_values",
        "gen_cfg.input_ids",
        "gen_nocfg.input_ids",
        "edit_cfg.input_ids",
        "edit_cfg.pixel_values",
        "edit_cfg.image_grid_thw",
    )
    out = {k: inputs[k] for k in keep}
    os.environ["ORIG_CA_BF16"] = "0"
    out.update(understanding(model, inputs))
    out.update(vae(model, inputs))
    out.update(teacher_forced(model, inputs))
    loops = (("gen_cfg", "gen_cfg", 3.0), ("gen_nocfg", "gen_nocfg", 1.0), ("edit_cfg", "edit_cfg", 3.0))
    for name, prompt, cfg in loops:
        out.update(scale_loop(model, modeling, inputs, prompt, name, cfg))
    os.environ["ORIG_CA_BF16"] = "1"
    out.update(teacher_forced(model, inputs, prefix="asis."))
    for name, prompt, cfg in loops:
        out.update(scale_loop(model, modeling, inputs, prompt, f"asis.{name}", cfg))
    return out
