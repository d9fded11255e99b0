"""The unified VARGPT model: Qwen2-VL understanding plus next-scale image generation in one network.

Module names follow the published checkpoint exactly (`visual.*`, `model.*`, `lm_head`, `vae_local.*`,
`vargpt_gen.*`, `image_gen_projector*`, `sos_embedding`), so its sharded safetensors load with no key
renaming and `save_pretrained` writes the same layout back.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.integrations import is_deepspeed_zero3_enabled, is_fsdp_enabled
from transformers.models.qwen2_vl.modeling_qwen2_vl import (
    Qwen2VisionTransformerPretrainedModel,
    Qwen2VLTextModel,
)
from transformers.utils import ModelOutput

from .checkpoint import (
    CheckpointMismatchError,
    CheckpointReport,
    ShardReader,
    atomic_directory_write,
    check_finite,
    compare,
    expected_tensor_layout,
    read_tensor_headers,
    release_freed_memory,
)
from .configuration import VARGPTConfig
from .device_map import resolve_device_map, storage_dtype
from .generation.config import ImageGenerationConfig
from .hub import pop_hub_arguments, resolve_checkpoint
from .image_tokenizer import (
    BSQVAE,
    accumulate_scale,
    next_scale_input,
    sample_flip_probs,
    teacher_forcing,
)
from .llm_cache import cache_kwargs, returned_cache
from .quantization import is_quantized, quantization_load_kwargs
from .rope_index import FORWARD_POSITIONS, mrope_positions, sequential_positions
from .schedule import Schedule, as_grids, padded_token_count, scale_offsets, token_count
from .visual_decoder import InfinityDecoder, bit_cross_entropy


class GenerationProjector(nn.Module):
    """Two-layer MLP between the visual decoder's width and the LLM's width.

    `ln_q` exists only because the published checkpoint stores it (an unused LayerNorm inherited from
    Qwen2-VL's PatchMerger); it is loaded and saved so the layout round-trips, and never applied.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.ln_q = nn.LayerNorm(in_dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


@dataclass
class VARGPTOutput(ModelOutput):
    """Losses and logits of one forward pass.

    `loss` is `text_loss + image_loss_weight * image_loss` over whatever the batch contains;
    `logits` are the text head's `[B, kept positions, vocab]`, None where the forward was given `labels` and not
    asked for them (`return_logits`): training never materialises them;
    `image_logits` are per-bit 2-way logits `[num_generated_images, L, bits, 2]` and `image_labels` the bits
    they were trained against.
    """

    loss: torch.Tensor | None = None
    text_loss: torch.Tensor | None = None
    image_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    image_logits: torch.Tensor | None = None
    image_labels: torch.Tensor | None = None
    past_key_values: Cache | None = None
    hidden_states: torch.Tensor | None = None
    rope_deltas: torch.Tensor | None = None


class VARGPTPreTrainedModel(PreTrainedModel):
    config_class = VARGPTConfig
    config: VARGPTConfig
    base_model_prefix = "vargpt"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["Qwen2VLDecoderLayer", "Qwen2VLVisionBlock", "DecoderBlock"]
    _skip_keys_device_placement: ClassVar[list[str]] = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        # The image tokenizer and the visual decoder initialise themselves in their constructors
        # (Infinity's schemes); the generic initialiser would overwrite them.
        if getattr(module, "_vargpt_self_initialised", False):
            return
        super()._init_weights(module)


def inputs_from_bits(labels_NLd: torch.Tensor, schedule: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Next-scale inputs (scales 2..K) implied by clean bits: what the scale loop feeds after sampling them."""
    N, _, d = labels_NLd.shape
    latent = torch.zeros(N, d, *schedule[-1], dtype=torch.float32, device=labels_NLd.device)
    offsets = scale_offsets(schedule)
    inputs = []
    for k, grid in enumerate(schedule[:-1]):
        latent = accumulate_scale(latent, labels_NLd[:, offsets[k] : offsets[k + 1]], grid)
        inputs.append(next_scale_input(latent, schedule[k + 1]))
    if not inputs:
        return labels_NLd.new_zeros(N, 0, d, dtype=torch.float32)
    return torch.cat(inputs, dim=1)


def _kept_positions(logits_to_keep: int | torch.Tensor) -> slice | torch.Tensor:
    """The sequence positions `logits_to_keep` selects (transformers' convention: 0 keeps all)."""
    if isinstance(logits_to_keep, torch.Tensor):
        if logits_to_keep.dim() != 1 or logits_to_keep.is_floating_point() or logits_to_keep.dtype == torch.bool:
            raise ValueError(
                f"logits_to_keep as a tensor must be 1-D integer positions, got {logits_to_keep.dtype} of shape "
                f"{tuple(logits_to_keep.shape)}"
            )
        return logits_to_keep
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
        raise ValueError(f"logits_to_keep must be an int >= 0 or a 1-D index tensor, got {logits_to_keep!r}")
    return slice(-logits_to_keep if logits_to_keep else 0, None)


def _mark_self_initialised(root: nn.Module) -> None:
    for module in root.modules():
        module._vargpt_self_initialised = True


class VARGPTForConditionalGeneration(VARGPTPreTrainedModel, GenerationMixin):
    """Understanding, generation and editing in one model.

    Training: `forward(input_ids, labels, pixel_values, image_grid_thw, pixel_gen_values)` returns the text
    loss on labelled (assistant) tokens, the bit loss of every generated image, and their weighted sum.
    Inference: `generate()` (see `vargpt.generation`) writes text and switches to the scale loop at
    `<|image_gen_start|>`.
    """

    def __init__(self, config: VARGPTConfig) -> None:
        super().__init__(config)
        text = config.text_config
        decoder_width = config.visual_decoder_config.embed_dim
        self.visual = Qwen2VisionTransformerPretrainedModel._from_config(config.vision_config)
        self.model = Qwen2VLTextModel._from_config(text)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.vae_local = BSQVAE(config.image_tokenizer_config)
        self.vargpt_gen = InfinityDecoder(config.visual_decoder_config)
        self.image_gen_projector = GenerationProjector(decoder_width, text.hidden_size)
        self.image_gen_projector_out = GenerationProjector(text.hidden_size, decoder_width)
        self.sos_embedding = nn.Embedding(config.image_gen_start_token_id + 1, decoder_width)
        _mark_self_initialised(self.vae_local)
        _mark_self_initialised(self.vargpt_gen)
        self.post_init()

    # -- transformers plumbing -------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    # -- pieces shared by training and inference ---------------------------------------------------
    def generation_schedule(self, resolution: int | None = None, aspect_ratio: float = 1.0) -> Schedule:
        """The `Schedule` of one generated image: its latent grids (smallest first) with this model's stride, RoPE
        reference grid and `<|image_gen_pad|>` rounding, so that every count (tokens, pad slots, offsets) comes
        from the one object both towers read."""
        cfg = self.config
        return Schedule.for_resolution(
            resolution or cfg.image_resolution,
            stride=cfg.image_tokenizer_config.downsample_factor,
            aspect_ratio=aspect_ratio,
            rope_max_grid=cfg.visual_decoder_config.rope_max_grid,
            pad_multiple=cfg.image_gen_pad_multiple,
        )

    def num_image_gen_pad_tokens(self, schedule: Sequence[tuple[int, int]]) -> int:
        """`<|image_gen_pad|>` slots of one image: the schedule's tokens rounded up to this model's pad multiple
        (`Schedule.num_pad_tokens`; kept for callers holding a plain list of grids)."""
        return padded_token_count(token_count(as_grids(schedule)), self.config.image_gen_pad_multiple)

    def image_condition(self, batch_size: int, unconditional: bool = False) -> torch.Tensor:
        """AdaLN condition `cond_BD`: the `<|image_gen_start|>` row of `sos_embedding` (or `cfg_uncond[0]`)
        through the decoder's text_norm and attentive pooling. It depends on no prompt (as published)."""
        if unconditional:
            row = self.vargpt_gen.cfg_uncond[:1]
        else:
            start = self.config.image_gen_start_token_id
            row = self.sos_embedding.weight[start : start + 1]
        return self.vargpt_gen.condition(row.unsqueeze(0).expand(batch_size, 1, -1))

    def embed_understanding_images(
        self,
        inputs_embeds_BLH: torch.Tensor,
        input_ids_BL: torch.Tensor,
        pixel_values,
        image_grid_thw,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Write the ViT's merged patch features into the `<|image_pad|>` (and `<|video_pad|>`) slots.

        As in Qwen2-VL, a video's patches (pairs of frames) run through the same ViT call as an image's; only the
        grid's t and the placeholder token differ."""
        if pixel_values is not None:
            inputs_embeds_BLH = self._scatter_vision_features(
                inputs_embeds_BLH, input_ids_BL, pixel_values, image_grid_thw, self.config.image_token_id, "image"
            )
        if pixel_values_videos is not None:
            if video_grid_thw is None:
                raise ValueError("pixel_values_videos need video_grid_thw")
            inputs_embeds_BLH = self._scatter_vision_features(
                inputs_embeds_BLH,
                input_ids_BL,
                pixel_values_videos,
                video_grid_thw,
                self.config.video_token_id,
                "video",
            )
        return inputs_embeds_BLH

    def _scatter_vision_features(
        self,
        inputs_embeds_BLH: torch.Tensor,
        input_ids_BL: torch.Tensor,
        pixels: torch.Tensor,
        grid_thw: torch.Tensor,
        token_id: int,
        kind: str,
    ) -> torch.Tensor:
        features = self.visual(pixels.to(self.visual.get_dtype()), grid_thw=grid_thw)
        features = getattr(features, "pooler_output", features)
        if isinstance(features, (list, tuple)):
            features = torch.cat(list(features), dim=0)
        slots = input_ids_BL == token_id
        if int(slots.sum()) != features.shape[0]:
            raise ValueError(
                f"the prompt has {int(slots.sum())} <|{kind}_pad|> tokens but the {kind}s give {features.shape[0]} "
                f"features; build inputs with VARGPTProcessor so each {kind} is expanded to its patch count"
            )
        return inputs_embeds_BLH.masked_scatter(slots.unsqueeze(-1), features.to(inputs_embeds_BLH.dtype))

    def context_for_decoder(
        self, hidden_BLH: torch.Tensor, attention_mask_BL: torch.Tensor, start_positions: Sequence[tuple[int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention context of each image: the LLM's final hidden states of every real token before
        its `<|image_gen_start|>` (the start token itself excluded), through `image_gen_projector_out`.

        Returns `(context_NTC, mask_NT)` padded on the right to the longest context.
        """
        rows = []
        for b, pos in start_positions:
            real = attention_mask_BL[b, :pos].bool()
            rows.append(hidden_BLH[b, :pos][real])
        longest = max(1, max(r.shape[0] for r in rows))
        context = hidden_BLH.new_zeros(len(rows), longest, hidden_BLH.shape[-1])
        mask = torch.zeros(len(rows), longest, dtype=torch.bool, device=hidden_BLH.device)
        for i, r in enumerate(rows):
            context[i, : r.shape[0]] = r
            mask[i, : r.shape[0]] = True
        return self.image_gen_projector_out(context), mask

    # -- training / scoring forward ----------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        pixel_gen_values: torch.Tensor | None = None,
        image_gen_labels: torch.Tensor | None = None,
        image_gen_resolution: int | None = None,
        use_cache: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_noise_generator: torch.Generator | None = None,
        image_noise: bool | None = None,
        positions: str | None = None,
        return_logits: bool | None = None,
        **kwargs,
    ) -> VARGPTOutput:
        """One causal pass over a batch that may mix understanding, generation and editing samples.

        `pixel_gen_values` `[N, 3, H, W]` in [-1, 1] are the generation targets, one per `<|image_gen_start|>` block
        in reading order (row by row); each block must hold `schedule.num_pad_tokens` pad tokens (see
        `generation_schedule`). `image_noise_generator` seeds bitwise self-correction and condition dropout so that
        DPO's policy and reference passes can share them; by default they apply in training mode only;
        `image_noise=True/False` forces them on or off (DPO scores its frozen reference with the policy's noise).
        Instead of pixels, `image_gen_labels` `[N, L, bits]` teacher-force given bits (for instance an image the
        model sampled) at `image_gen_resolution` (default: the model's), with no bit flips.
        Without `position_ids`, `positions` ("mrope" or "sequential"; default `config.forward_positions`) picks
        the rotary positions: they differ on rows holding understanding images (see `VARGPTConfig`).
        `pixel_values_videos` / `video_grid_thw` (from `VARGPTProcessor(videos=...)`) fill the `<|video_pad|>`
        slots through the ViT, and their grids give those slots M-RoPE positions with t = temporal patch.

        Text logits: the text loss applies the LM head only to the positions it reads (those whose next label is
        not -100 and whose next token is not an `<|image_gen_pad|>`), so a training step never holds the
        full-vocabulary logits of the image slots. `logits` in the output are therefore computed only when asked
        for: `return_logits` defaults to True without `labels` (scoring, tests) and to False with them (training;
        `logits` is then None). When computed, they cover the positions `logits_to_keep` selects, as in
        transformers: 0 = every position, an int k = the last k, a 1-D index tensor = those positions; the loss
        never reads them, whatever they cover.
        """
        inputs_embeds = self._input_embeddings(
            input_ids, inputs_embeds, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw
        )
        if attention_mask is None:
            attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        noise = self.training if image_noise is None else image_noise
        inputs_embeds, generation = self._with_generation_inputs(
            inputs_embeds,
            input_ids,
            pixel_gen_values,
            image_gen_labels,
            image_gen_resolution,
            image_noise_generator,
            noise,
        )
        rope_deltas = None
        if position_ids is None and past_key_values is None and input_ids is not None:
            position_ids, rope_deltas = self.forward_position_ids(
                input_ids, attention_mask, image_grid_thw, positions, video_grid_thw_N3=video_grid_thw
            )
        llm_kwargs = {**cache_kwargs(past_key_values), "use_cache": use_cache, "cache_position": cache_position}
        llm_kwargs.update(kwargs, attention_mask=attention_mask, position_ids=position_ids)
        outputs = self.model(inputs_embeds=inputs_embeds, **llm_kwargs)
        hidden = outputs.last_hidden_state
        keep_logits = labels is None if return_logits is None else return_logits
        return VARGPTOutput(
            **self._losses(hidden, attention_mask, labels, input_ids, generation),
            logits=self.lm_head(hidden[:, _kept_positions(logits_to_keep)]) if keep_logits else None,
            past_key_values=returned_cache(outputs),
            hidden_states=hidden,
            rope_deltas=rope_deltas,
        )

    def _input_embeddings(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        image_grid_thw: torch.Tensor | None,
        pixel_values_videos: torch.Tensor | None,
        video_grid_thw: torch.Tensor | None,
    ) -> torch.Tensor:
        """Token embeddings with understanding images and videos in their slots (given embeddings pass as they are)."""
        if input_ids is None and inputs_embeds is None:
            raise ValueError("pass input_ids (or inputs_embeds)")
        if inputs_embeds is not None:
            return inputs_embeds
        inputs_embeds = self.model.embed_tokens(input_ids)
        if pixel_values is not None and image_grid_thw is None:
            raise ValueError("pixel_values need image_grid_thw")
        if pixel_values is not None or pixel_values_videos is not None:
            inputs_embeds = self.embed_understanding_images(
                inputs_embeds, input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw
            )
        return inputs_embeds

    def _with_generation_inputs(
        self,
        inputs_embeds_BLH: torch.Tensor,
        input_ids: torch.Tensor | None,
        pixel_gen_values: torch.Tensor | None,
        image_gen_labels: torch.Tensor | None,
        resolution: int | None,
        generator: torch.Generator | None,
        noise: bool,
    ) -> tuple[torch.Tensor, dict | None]:
        """The embeddings with the teacher-forced generation inputs in their `<|image_gen_pad|>` slots, and those
        targets (see `_prepare_generation_targets`); unchanged embeddings and None for a batch without any."""
        if pixel_gen_values is None and image_gen_labels is None:
            return inputs_embeds_BLH, None
        if input_ids is None:
            raise ValueError("generation targets need input_ids to locate <|image_gen_pad|> slots")
        if pixel_gen_values is not None and image_gen_labels is not None:
            raise ValueError("give pixel_gen_values or image_gen_labels, not both")
        generation = self._prepare_generation_targets(
            input_ids, pixel_gen_values, generator, image_gen_labels, resolution, noise=noise
        )
        slots_BL1, llm_inputs = generation["pad_mask_BL"].unsqueeze(-1), generation["llm_inputs"]
        return inputs_embeds_BLH.masked_scatter(slots_BL1, llm_inputs.to(inputs_embeds_BLH.dtype)), generation

    def _losses(
        self,
        hidden_BLH: torch.Tensor,
        attention_mask_BL: torch.Tensor,
        labels_BL: torch.Tensor | None,
        input_ids_BL: torch.Tensor | None,
        generation: dict | None,
    ) -> dict[str, torch.Tensor | None]:
        """Text loss, image bit loss (with the logits and labels it read) and `loss`, their weighted sum
        `text + image_loss_weight * image` over whichever the batch has."""
        text_loss = self._text_loss(hidden_BLH, labels_BL, input_ids_BL) if labels_BL is not None else None
        image_loss = image_logits = image_labels = None
        if generation is not None:
            image_logits = self._decode_generation_targets(hidden_BLH, attention_mask_BL, generation)
            image_labels = generation["labels_NLd"]
            weighting = self.config.image_loss_scale_weighting
            image_loss = bit_cross_entropy(image_logits, image_labels, generation["schedule"], weighting=weighting)
        loss = text_loss
        if image_loss is not None:
            weighted_image_loss = self.config.image_loss_weight * image_loss
            loss = weighted_image_loss if text_loss is None else text_loss + weighted_image_loss
        return {
            "loss": loss,
            "text_loss": text_loss,
            "image_loss": image_loss,
            "image_logits": image_logits,
            "image_labels": image_labels,
        }

    def _text_loss(
        self, hidden_BLH: torch.Tensor, labels_BL: torch.Tensor, input_ids_BL: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Mean next-token cross-entropy over the labelled positions, with the head applied to those rows only.

        Equal to cross-entropy with `ignore_index=-100` over full logits, but autograd keeps the fp32
        log-softmax of the `n` read rows `[n, vocab]` instead of `[B, L - 1, vocab]` (and, where the head trains,
        its input rows `[n, hidden]`): one 512 px image alone brings 2,560 pad slots that no text loss reads.
        The head runs even when no position is labelled (on zero rows), so that every rank of a ZeRO-3 run
        gathers its weight in the same order.
        """
        if labels_BL.shape != hidden_BLH.shape[:2]:
            raise ValueError(
                f"labels must be [batch, length] = {tuple(hidden_BLH.shape[:2])} like the inputs, got "
                f"{tuple(labels_BL.shape)}"
            )
        targets_BL = labels_BL[:, 1:].to(hidden_BLH.device)
        read_BL = targets_BL != -100
        if input_ids_BL is not None:  # image slots are trained by the bit loss, never by the text head
            read_BL &= input_ids_BL[:, 1:].to(hidden_BLH.device) != self.config.image_gen_pad_token_id
        hidden_NH = hidden_BLH[:, :-1][read_BL]
        logits_NV = self.lm_head(hidden_NH).float()
        if logits_NV.shape[0] == 0:
            return None
        return F.cross_entropy(logits_NV, targets_BL[read_BL].to(logits_NV.device))

    def forward_position_ids(
        self,
        input_ids_BL: torch.Tensor,
        attention_mask_BL: torch.Tensor | None,
        image_grid_thw_N3: torch.Tensor | None,
        positions: str | None = None,
        video_grid_thw_N3: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(position_ids_3BL, rope_deltas_B1)` that `forward` uses for a prompt passed without positions.

        "mrope" is what `generate` uses; "sequential" (1-D cache positions) is what the original's `forward`,
        and so the published checkpoint's training, used. `positions=None` takes `config.forward_positions`.
        """
        mode = positions or self.config.forward_positions
        if mode not in FORWARD_POSITIONS:
            raise ValueError(f"positions must be one of {FORWARD_POSITIONS}, got {mode!r}")
        if mode == "sequential":
            return sequential_positions(*input_ids_BL.shape, device=input_ids_BL.device)
        return mrope_positions(
            input_ids_BL,
            attention_mask_BL,
            image_grid_thw_N3,
            self.config.image_token_id,
            self.config.vision_config.spatial_merge_size,
            video_grid_thw_N3=video_grid_thw_N3,
            video_token_id=self.config.video_token_id,
        )

    def _prepare_generation_targets(
        self,
        input_ids: torch.Tensor,
        pixel_gen_values: torch.Tensor | None,
        generator: torch.Generator | None,
        labels_NLd: torch.Tensor | None = None,
        resolution: int | None = None,
        noise: bool = False,
    ) -> dict:
        """Tokenise the targets into bits and build the LLM inputs of their pad slots (teacher forcing).

        Random draws happen in a fixed order (bit-flip strengths, flipped bits, condition dropout) so that two
        passes sharing `generator` see the same noise."""
        schedule = self._target_schedule(pixel_gen_values, resolution)
        N = pixel_gen_values.shape[0] if pixel_gen_values is not None else labels_NLd.shape[0]
        starts, pad_mask, pads_per_image = self._generation_slots(input_ids, N, schedule)
        if pixel_gen_values is not None:
            labels_NLd, inputs_NLd = self._tokenise_targets(pixel_gen_values, schedule, generator, noise)
        else:
            if labels_NLd.dim() != 3 or labels_NLd.shape[1] != schedule.num_tokens:
                raise ValueError(
                    f"image_gen_labels must be [N, {schedule.num_tokens}, bits] for this resolution, got "
                    f"{tuple(labels_NLd.shape)}"
                )
            inputs_NLd = inputs_from_bits(labels_NLd, schedule)
        cond_ND = self._training_condition(N, generator, noise)
        decoder_dtype = self.vargpt_gen.word_embed.weight.dtype
        x_NLC = torch.cat(
            [self.vargpt_gen.start_tokens(cond_ND), self.vargpt_gen.embed_inputs(inputs_NLd.to(decoder_dtype))], dim=1
        )
        x_NLC = F.pad(x_NLC, (0, 0, 0, pads_per_image - schedule.num_tokens))
        return {
            "schedule": schedule,
            "num_tokens": schedule.num_tokens,
            "pads_per_image": pads_per_image,
            "pad_mask_BL": pad_mask,
            "llm_inputs": self.image_gen_projector(x_NLC).reshape(-1, self.config.text_config.hidden_size),
            "labels_NLd": labels_NLd,
            "cond_ND": cond_ND,
            "starts": starts,
        }

    def _target_schedule(self, pixel_gen_values: torch.Tensor | None, resolution: int | None) -> Schedule:
        """The schedule of the batch's targets: the pixels' size, else `resolution` (default: the model's)."""
        if pixel_gen_values is None:
            return self.generation_schedule(resolution)
        if pixel_gen_values.dim() != 4 or pixel_gen_values.shape[1] != 3:
            raise ValueError(f"pixel_gen_values must be [N, 3, H, W], got {tuple(pixel_gen_values.shape)}")
        H, W = pixel_gen_values.shape[-2:]
        if H != W:
            raise ValueError(f"generation targets must be square for now, got {H}x{W}")
        return self.generation_schedule(H)

    def _generation_slots(
        self, input_ids_BL: torch.Tensor, num_images: int, schedule: Schedule
    ) -> tuple[list[tuple[int, int]], torch.Tensor, int]:
        """`(starts, pad_mask_BL, pads_per_image)`: where each target's `<|image_gen_start|>` is (row, position) and
        its pad slots, checked to give every image the same number of slots, at least its token count."""
        cfg = self.config
        starts = (input_ids_BL == cfg.image_gen_start_token_id).nonzero().tolist()
        if len(starts) != num_images:
            raise ValueError(
                f"{num_images} generation targets but {len(starts)} <|image_gen_start|> tokens in the batch"
            )
        pad_mask = input_ids_BL == cfg.image_gen_pad_token_id
        num_pads = int(pad_mask.sum())
        pads_per_image = num_pads // num_images if num_images else 0
        if pads_per_image * num_images != num_pads or pads_per_image < schedule.num_tokens:
            raise ValueError(
                f"each <|image_gen_start|> block must hold the same number (>= {schedule.num_tokens}) of "
                f"<|image_gen_pad|> tokens; the batch has {num_pads} for {num_images} images"
            )
        return [tuple(start) for start in starts], pad_mask, pads_per_image

    def _tokenise_targets(
        self, pixel_gen_values: torch.Tensor, schedule: Schedule, generator: torch.Generator | None, noise: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(labels_NLd, inputs_NLd)` of target images: their bits and the next-scale inputs, with bitwise
        self-correction (random bit flips) when `noise` is on."""
        cfg = self.config
        vae_dtype = self.vae_local.encoder.conv_in.conv.weight.dtype
        with torch.no_grad():
            f_NdHW = self.vae_local.encode(pixel_gen_values.to(vae_dtype))
        flip_probs = None
        if noise and cfg.bit_flip_max_prob > 0:
            flip_probs = sample_flip_probs(len(schedule), cfg.bit_flip_max_prob, cfg.bit_flip_prob_step, generator)
        return teacher_forcing(f_NdHW.float(), schedule, flip_probs=flip_probs, generator=generator)

    def _training_condition(self, num_images: int, generator: torch.Generator | None, noise: bool) -> torch.Tensor:
        """AdaLN condition of each target, replaced by the unconditional one at `cond_drop_rate` when `noise`."""
        cond_ND = self.image_condition(num_images)
        drop = self.config.visual_decoder_config.cond_drop_rate
        if noise and drop > 0:
            u = torch.rand(num_images, generator=generator, device=generator.device if generator else None)
            dropped = (u.to(cond_ND.device) < drop).view(num_images, 1)
            cond_ND = torch.where(dropped, self.image_condition(num_images, unconditional=True), cond_ND)
        return cond_ND

    def _decode_generation_targets(
        self, hidden_BLH: torch.Tensor, attention_mask_BL: torch.Tensor, generation: dict
    ) -> torch.Tensor:
        N = len(generation["starts"])
        slots = hidden_BLH[generation["pad_mask_BL"]].view(N, generation["pads_per_image"], -1)
        h_NLC = self.image_gen_projector_out(slots[:, : generation["num_tokens"]])
        context, mask = self.context_for_decoder(hidden_BLH, attention_mask_BL, generation["starts"])
        return self.vargpt_gen(h_NLC, generation["cond_ND"], context, mask, generation["schedule"])

    # -- loading and saving in the original layout -------------------------------------------------
    @classmethod
    def check_checkpoint(cls, directory: str | os.PathLike, config: VARGPTConfig | None = None) -> CheckpointReport:
        """Compare a checkpoint's tensors (headers only: names, shapes, dtypes) with the model its config describes."""
        config = config or VARGPTConfig.from_pretrained(directory)
        on_disk, dtypes = read_tensor_headers(directory)
        expected, kinds = expected_tensor_layout(lambda: cls(config))
        return compare(on_disk, expected, dtypes, kinds)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        *model_args,
        strict: bool = True,
        quantization: str | None = None,
        **kwargs,
    ):
        """transformers' `from_pretrained` (dtype, device_map, max_memory all apply), preceded by a check that
        the directory holds exactly this model's tensors: any missing, unexpected or mis-shaped tensor raises
        one `CheckpointMismatchError` that lists them, before a byte of weights is read.

        `quantization="int8"` or `"int4"` stores the LLM's layers and the visual decoder's blocks in 8 or 4
        bits as they load (bitsandbytes; see `vargpt.quantization` for what stays in high precision)."""
        # a folder, a shipped model name or a Hub repo id (hub arguments as transformers names them)
        path = resolve_checkpoint(
            pretrained_model_name_or_path,
            **pop_hub_arguments(kwargs),
        )
        config = kwargs.pop("config", None)
        if not isinstance(config, VARGPTConfig):
            config = VARGPTConfig.from_pretrained(path)
        if strict:
            report = cls.check_checkpoint(path, config)
            if not report.ok:
                raise CheckpointMismatchError(
                    f"checkpoint {path} does not match the model its config.json describes:\n{report.describe()}"
                )
        kwargs.setdefault("dtype", "auto")
        if quantization is not None:
            if "quantization_config" in kwargs:
                raise ValueError("give quantization= or quantization_config=, not both")
            kwargs.update(quantization_load_kwargs(cls, config, quantization, kwargs["dtype"]))
        placement = kwargs.pop("device_map", None)
        max_memory = kwargs.pop("max_memory", None)
        dtype = storage_dtype(kwargs["dtype"], config)
        device_map = resolve_device_map(cls, config, placement, max_memory, dtype, kwargs.get("quantization_config"))
        if device_map is not None:
            kwargs["device_map"] = device_map
        if max_memory is not None and device_map is placement:
            kwargs["max_memory"] = max_memory  # an explicit map: transformers decides what max_memory means
        if isinstance(device_map, dict) and "disk" in device_map.values() and not kwargs.get("offload_folder"):
            raise ValueError("part of the model is offloaded to disk: pass offload_folder=DIR (--offload-folder)")
        with warnings.catch_warnings():
            # the map names single tensors (the decoder's `cfg_uncond`, `pos_start`) that accelerate's check
            # looks for among modules only; they are placed all the same
            warnings.filterwarnings("ignore", message="The following device_map keys do not match any submodules")
            converts = kwargs.get("quantization_config") is not None or dtype != storage_dtype("auto", config)
            # A converting load reads each tensor once instead of keeping every mapped shard page resident. Not
            # under DeepSpeed ZeRO-3, where transformers partitions each shard as it reads it, nor under FSDP's
            # CPU-RAM-efficient loading: a state dict read up front would hold the whole model in the process (the
            # other ranks do not load at all: `training.finetune.load_for_training` builds them on meta).
            if converts and not (is_deepspeed_zero3_enabled() or is_fsdp_enabled()):
                with ShardReader(path) as shards:
                    model = super().from_pretrained(
                        None, *model_args, config=config, state_dict=shards.state_dict, **kwargs
                    )
                model.name_or_path = str(path)
                release_freed_memory()
            else:
                model = super().from_pretrained(path, *model_args, config=config, **kwargs)
        if strict:  # NaN / inf weights named now, not as a vague sampling error later (one cheap pass)
            check_finite(model, path)
        return model

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """Write config and safetensors (original tensor names) atomically: a crash never leaves a
        half-written checkpoint at `save_directory`.

        A quantized model is refused: its packed weights and scales are not the original layout, and a
        checkpoint that loads only with bitsandbytes would break every other reader. Save the unquantized
        model and quantize when loading (`quantization=`)."""
        if is_quantized(self):
            raise ValueError(
                "a quantized model cannot be saved in the original layout: save the unquantized model and pass "
                "quantization= when loading it"
            )
        atomic_directory_write(
            save_directory,
            lambda staging: super(VARGPTForConditionalGeneration, self).save_pretrained(staging, *args, **kwargs),
        )

    # -- inference ---------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        *,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        generation_mode: str = "text",
        image_config: ImageGenerationConfig | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | Sequence[int] | None = None,
        return_dict_in_generate: bool = False,
        max_new_tokens: int = 256,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        eos_token_id: int | Sequence[int] | None = None,
        on_token=None,
        mm_token_type_ids=None,
        null_prompt_ids: torch.Tensor | None = None,
        cache_implementation: str | None = None,
        compile: bool = False,
        **image_settings,
    ):
        """Decode text, images, or both.

        * `generation_mode="text"` (default): answers in text, like any transformers model; returns the sequences
          `[B, prompt + new]` (a `VARGPTGenerateOutput` with `return_dict_in_generate=True`).
        * `"interleaved"`: the model decides: when it samples `<|image_gen_start|>` it draws an image by next-scale
          prediction, then continues with text until EOS.
        * `"image"`: an image is forced first (text-to-image and editing), then text continues.
        Image modes always return a `VARGPTGenerateOutput` (`sequences`, `images`, `image_bits`).
        Image settings (`cfg_scale`, `tau`, `top_k` of bits as `image_top_k`, `image_top_p`, `resolution`,
        `aspect_ratio`, `uncond_mode`, `position_mode`) come from `image_config` or keyword arguments.
        `uncond_mode="null_prompt"` guidance needs `null_prompt_ids` (`VARGPTProcessor.null_prompt_ids()`).
        `seed` or `generator` makes results reproducible. A list of seeds (or generators), one per row, makes each
        row's result independent of the rest of the batch: row i draws from its own seed only.
        `cache_implementation="static"` preallocates the LLM's KV cache (fixed shapes per step) and `compile=True`
        (which implies it) runs the LLM calls and decoder blocks through `torch.compile`, CUDA graphs on CUDA: equal
        to the default path up to float summation order (see `vargpt.generation.static_cache`).
        `pixel_values_videos` / `video_grid_thw` (from `VARGPTProcessor(videos=...)`) are understood in the prefill
        through Qwen2-VL's video path (the ViT and M-RoPE time positions), as in `forward`.
        """
        from .generation import FastDecoding, TextSamplingConfig, generate_interleaved

        _check_generate_inputs(input_ids, pixel_values_videos, video_grid_thw)
        moved = _on_device(self.device, input_ids, attention_mask, pixel_values, image_grid_thw, null_prompt_ids)
        input_ids, attention_mask, pixel_values, image_grid_thw, null_prompt_ids = moved
        pixel_values_videos, video_grid_thw = _on_device(self.device, pixel_values_videos, video_grid_thw)
        image_config = _image_config_with(image_config, image_settings)
        generator = _seeded_generators(generator, seed, input_ids.shape[0], input_ids.device)
        text_config = TextSamplingConfig(
            **_text_sampling(max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, eos_token_id)
        )
        out = generate_interleaved(
            self,
            input_ids,
            attention_mask,
            pixel_values,
            image_grid_thw,
            generation_mode=generation_mode,
            text_config=text_config,
            image_config=image_config,
            generator=generator,
            on_token=on_token,
            null_prompt_ids=null_prompt_ids,
            fast=FastDecoding.from_flags(cache_implementation, compile),
            pixel_values_videos=pixel_values_videos,
            video_grid_thw=video_grid_thw,
        )
        if generation_mode == "text" and not return_dict_in_generate:
            return out.sequences
        return out


def _check_generate_inputs(
    input_ids: torch.Tensor | None, pixel_values_videos: torch.Tensor | None, video_grid_thw: torch.Tensor | None
) -> None:
    if input_ids is None:
        raise ValueError("generate needs input_ids (build them with VARGPTProcessor)")
    if (pixel_values_videos is None) != (video_grid_thw is None):
        raise ValueError("give pixel_values_videos and video_grid_thw together")


def _on_device(device: torch.device, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Processor outputs live on the CPU; they follow the model to its device as in transformers' generate."""
    return tuple(None if t is None else t.to(device) for t in tensors)


def _text_sampling(
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float,
    eos_token_id: int | Sequence[int] | None,
) -> dict:
    """`TextSamplingConfig` keywords from `generate`'s text arguments (one eos id or several)."""
    eos = (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id or ())
    return {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "repetition_penalty": repetition_penalty,
        "eos_token_ids": eos,
    }


def _image_config_with(config: ImageGenerationConfig | None, settings: dict) -> ImageGenerationConfig:
    """`config` (default: the class defaults) updated by `generate`'s image keywords, whose bit-sampling names
    (`image_top_k`, `image_top_p`) differ from the text ones."""
    renamed = {"image_top_k": "top_k", "image_top_p": "top_p"}
    return (config or ImageGenerationConfig()).updated(**{renamed.get(k, k): v for k, v in settings.items()})


def _seeded_generators(
    generator: torch.Generator | list[torch.Generator] | None,
    seed: int | Sequence[int] | None,
    batch_size: int,
    device: torch.device,
) -> torch.Generator | list[torch.Generator] | None:
    """The given generator(s), else ones seeded from `seed`: one per row for a list of seeds."""
    if generator is not None or seed is None:
        return generator
    if not isinstance(seed, (list, tuple)):
        return torch.Generator(device=device).manual_seed(int(seed))
    if len(seed) != batch_size:
        raise ValueError(f"{len(seed)} seeds for a batch of {batch_size} prompts")
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seed]
