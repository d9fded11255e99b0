"""Write tiny VARGPT weights whose scales resemble trained ones, for golden data from the original code.

Small random init (std 0.02, zero biases, unit norms) keeps every activation near zero, so rounding
differences between two implementations stay tiny and flatter the comparison. This script builds the
fidelity test's tiny config with our code, then rescales every tensor from a fixed seed so activations
and logits have trained-like spreads, and stores them with our `save_pretrained` (original tensor names,
bf16). Run it in the project's environment; `make_golden.py` then loads the result into the original.

    python tools/original_golden/make_weights.py OUT_DIR [--seed 7]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from vargpt import VARGPTForConditionalGeneration

OUTPUT_HEADS = ("lm_head.weight", "vargpt_gen.head.weight")
ROOT = Path(__file__).resolve().parents[2]


def fidelity_config():
    """The config the parity test uses (imported from the test so the two cannot drift apart)."""
    sys.path.insert(0, str(ROOT))
    from tests.fidelity.test_original_parity import fidelity_config as config_of_test

    return config_of_test()


def rescale_(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Trained-like scales: matrices N(0, 1/fan_in), biases N(0, 0.1^2), norm weights 1 + N(0, 0.2^2).

    Why these: a trained layer keeps activations at unit scale (std ~ 1/sqrt(fan_in) per matrix), and its
    norms and biases have moved away from their 1 / 0 init. Decoder-specific tensors get hand-chosen spreads
    well away from their init (not measured on a real checkpoint): the AdaLN gates (`ada_gss`) 0.3, the
    attention temperature `scale_mul_1H11` around ln 4 (its clamp is ln 100), embeddings 0.5. The two output
    heads get twice the unit-preserving scale, so logits spread over several units as a trained head's do
    (an independent check on other random weights saw a largest head logit of 5.2; these give 9).
    """
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            continue
        if name in dict(model.named_buffers()):
            continue  # rotary tables, masks: fixed by the architecture
        noise = torch.randn(tensor.shape, generator=generator)
        if name.endswith("scale_mul_1H11"):
            new = math.log(4.0) + 0.3 * noise
        elif name.endswith("ada_gss"):
            new = 0.3 * noise
        elif tensor.ndim == 1 and ("norm" in name or name.endswith("ln_q.weight")) and name.endswith("weight"):
            new = 1.0 + 0.2 * noise
        elif tensor.ndim == 1:
            new = 0.1 * noise
        elif name in OUTPUT_HEADS:
            new = 2.0 * noise / math.sqrt(tensor[0].numel())
        elif "embed" in name or "pos_start" in name or "cfg_uncond" in name:
            new = 0.5 * noise
        else:
            fan_in = tensor[0].numel()
            new = noise / math.sqrt(fan_in)
        tensor.copy_(new.to(tensor.dtype))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="checkpoint folder to write")
    parser.add_argument("--seed", type=int, default=7, help="construction seed")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    model = VARGPTForConditionalGeneration(fidelity_config()).eval()
    with torch.no_grad():
        rescale_(model, torch.Generator().manual_seed(args.seed))
    model.to(torch.bfloat16).save_pretrained(args.out)
    print(f"wrote {args.out} (seed {args.seed})")


if __name__ == "__main__":
    main()
