"""Teacher forcing on the inference path: the scale loop with given bits in place of drawn ones.

`vargpt.teacher_forcing` is its public, checked face; here is only the loop call, so that the logits it returns
are the sampler's own: the same prefill, the same forced `<|image_gen_start|>` step and the same `scale_loop`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import ImageGenerationConfig
from .guidance import guidance_for
from .scale_loop import ScaleLoopResult, forced_draw, scale_loop
from .state import DecodingState


@torch.no_grad()
def forced_scale_loop(
    model,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None,
    pixel_values: torch.Tensor | None,
    image_grid_thw: torch.Tensor | None,
    bits_per_scale: Sequence[torch.Tensor],
    image_config: ImageGenerationConfig,
    null_prompt_ids: torch.Tensor | None = None,
) -> ScaleLoopResult:
    """`generate(generation_mode="image")`'s path with the given bits in place of drawn ones.

    The same prefill, the same forced `<|image_gen_start|>` step and the same scale loop as sampling (eager
    caches), so the logits are the ones the sampler would have seen had it drawn these bits. The VAE is not run
    (`result.latent` is what it would decode). Inputs are on the model's device;
    `vargpt.teacher_forcing.score_image_bits` is the checked public entry.
    """
    B = input_ids.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    num_scales = len(model.generation_schedule(image_config.resolution, image_config.aspect_ratio))
    if len(bits_per_scale) != num_scales:
        raise ValueError(
            f"bits were given for {len(bits_per_scale)} scales, but the schedule of this resolution and aspect "
            f"ratio has {num_scales}"
        )
    state = DecodingState(model, input_ids, attention_mask, pixel_values, image_grid_thw)
    every_row = torch.ones(B, dtype=torch.bool, device=input_ids.device)
    start = torch.full((B,), model.config.image_gen_start_token_id, dtype=torch.long, device=input_ids.device)
    state.step(state.embed_tokens(start), every_row)
    return scale_loop(
        model,
        state,
        every_row,
        image_config,
        guidance_for(image_config, null_prompt_ids),
        forced_draw(bits_per_scale),
        continue_text=False,
        decode=False,
    )
