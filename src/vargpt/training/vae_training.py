"""Training the BSQ image tokenizer (the original never released this part).

Objective: reconstruction through the full multi-scale bit coder (straight-through estimator), so the
decoder learns to read exactly what the scale loop will produce, plus a commitment term that keeps the
continuous latent near its coded value. With no perceptual or adversarial model available offline,
reconstruction is L1 + MSE in pixel space, which suffices for flat-coloured scenes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainingArguments

from ..image_tokenizer import BSQVAE, encode_to_bits
from ..schedule import scale_schedule
from .resume import CompleteCheckpointCallback
from .stage_trainer import train_resuming
from .trainer import VARGPTTrainer


@dataclass(frozen=True)
class TokenizerLossWeights:
    l1: float = 1.0
    mse: float = 1.0
    commitment: float = 0.25


class TokenizerTrainingModel(nn.Module):
    """Wraps a `BSQVAE` so `Trainer` can optimise it: `forward(pixel_values) -> {"loss", ...}`."""

    def __init__(self, vae: BSQVAE, weights: TokenizerLossWeights | None = None) -> None:
        super().__init__()
        self.vae = vae
        self.weights = weights or TokenizerLossWeights()

    def forward(self, pixel_values: torch.Tensor, **_: object) -> dict[str, torch.Tensor]:
        H, W = pixel_values.shape[-2:]
        if H != W:
            raise ValueError(f"tokenizer training uses square images, got {H}x{W}")
        schedule = scale_schedule(H, stride=self.vae.stride)
        f_BdHW = self.vae.encode(pixel_values)
        _, coded_BdHW = encode_to_bits(f_BdHW, schedule)
        recon = self.vae.decoder(coded_BdHW.to(pixel_values.dtype))
        l1 = (recon - pixel_values).abs().mean()
        mse = F.mse_loss(recon, pixel_values)
        commitment = F.mse_loss(f_BdHW, coded_BdHW.detach())
        w = self.weights
        loss = w.l1 * l1 + w.mse * mse + w.commitment * commitment
        return {"loss": loss, "l1": l1.detach(), "mse": mse.detach(), "commitment": commitment.detach()}


@torch.no_grad()
def reconstruct(vae: BSQVAE, images_B3HW: torch.Tensor) -> torch.Tensor:
    """Images coded to bits and decoded back, on the VAE's device (a trainer may have moved it to a GPU)."""
    images_B3HW = images_B3HW.to(next(vae.parameters()).device)
    schedule = scale_schedule(images_B3HW.shape[-1], stride=vae.stride)
    _, coded = encode_to_bits(vae.encode(images_B3HW), schedule)
    return vae.decode(coded.to(images_B3HW.dtype))


def psnr_db(recon_B3HW: torch.Tensor, images_B3HW: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (mapped to [0, 1])."""
    mse = float(((recon_B3HW - images_B3HW.to(recon_B3HW.device)) / 2).pow(2).mean())
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def reconstruction_psnr(vae: BSQVAE, images_B3HW: torch.Tensor) -> float:
    """PSNR (dB) of images coded to bits and decoded back."""
    return psnr_db(reconstruct(vae, images_B3HW), images_B3HW)


class ImageRows(torch.utils.data.Dataset):
    """Images `[N, 3, H, W]` in [-1, 1] as Trainer rows (`{"pixel_values": [3, H, W]}`)."""

    def __init__(self, images_N3HW: torch.Tensor) -> None:
        self.images = images_N3HW

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[index]}


def stack_pixels(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.stack([r["pixel_values"] for r in rows])}


def train_vae(vae: BSQVAE, images_N3HW: torch.Tensor, args: TrainingArguments) -> VARGPTTrainer:
    """Train `vae` in place on `images_N3HW` (resuming from the newest complete checkpoint in `args.output_dir`)
    and leave it in eval mode; returns the trainer, whose `state.log_history` holds the losses."""
    trainer = VARGPTTrainer(
        model=TokenizerTrainingModel(vae),
        args=args,
        train_dataset=ImageRows(images_N3HW),
        data_collator=stack_pixels,
        callbacks=[CompleteCheckpointCallback()],
    )
    train_resuming(trainer, args.output_dir)
    vae.eval()
    return trainer
