"""Small building blocks of the decoder: norms, the feed-forward net, drop path and the AdaLN head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def ffn_hidden_size(embed_dim: int, mlp_ratio: float, multiple: int) -> int:
    """Infinity's FFN width: embed_dim * mlp_ratio rounded to the nearest multiple (8192 for 2048 x 4).

    A width below one multiple would round to zero; it is kept unrounded so that tiny models still work.
    """
    width = embed_dim * mlp_ratio
    rounded = round(width / multiple) * multiple
    return rounded if rounded > 0 else max(1, round(width))


def ada_layer_norm(x_BLC: torch.Tensor, scale_B1C: torch.Tensor, shift_B1C: torch.Tensor, eps: float) -> torch.Tensor:
    """Affine-free LayerNorm (computed in fp32, cast back), then modulated: LN(x) * (1 + scale) + shift."""
    normed = F.layer_norm(x_BLC.float(), (x_BLC.shape[-1],), eps=eps).to(x_BLC.dtype)
    return normed * (1 + scale_B1C) + shift_B1C


class RMSNorm(nn.Module):
    """RMS norm with a learned gain (the original's `FastRMSNorm`, used as `text_norm`)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight).to(x.dtype)


class FeedForward(nn.Module):
    """fc1 -> GELU (tanh approximation) -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a residual branch per sample with probability `rate`.

    Kept samples are scaled by 1 / (1 - rate) so the expectation is unchanged; identity in eval mode.
    """

    def __init__(self, rate: float) -> None:
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {rate}")
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate:g}"


class AdaLNBeforeHead(nn.Module):
    """Condition-modulated LayerNorm before the output head: scale and shift from SiLU -> Linear(D, 2C)."""

    def __init__(self, dim: int, cond_dim: int, eps: float) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale_B1C, shift_B1C = self.ada_lin(cond_BD).view(-1, 1, 2, self.dim).unbind(2)
        return ada_layer_norm(x_BLC, scale_B1C, shift_B1C, self.eps)


def linear_with_bias(linear: nn.Linear, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`x @ W.T + bias` for a bias-free linear layer whose bias lives elsewhere (the decoder's q/v biases).

    A plain `nn.Linear` whose weight is here takes the fused `F.linear` path (its float results are what the
    fidelity tests pin). Anything else is called as a module and the bias added after: a quantized layer (no
    usable `.weight`), an adapter wrapping the layer, or a layer offloaded by accelerate (its weight is on the
    meta device until its own hook loads it, which happens only when the module is called).
    """
    if type(linear) is nn.Linear and linear.weight.device.type != "meta":
        return F.linear(x, linear.weight, bias)
    return linear(x) + bias.to(x.dtype)
