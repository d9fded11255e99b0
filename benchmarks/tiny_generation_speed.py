"""Wall time of text-to-image generation on the tiny preset (CPU), batch 1 and batch 8.

Run: python benchmarks/tiny_generation_speed.py
"""

from __future__ import annotations

import statistics
import time

import torch

from vargpt import VARGPTPipeline


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    pipe = VARGPTPipeline.from_pretrained("tiny", device="cpu")
    pipe.generate("warm up", seed=0)
    for batch in (1, 8):
        runs = []
        for r in range(5):
            t0 = time.perf_counter()
            pipe.generate(["a red circle above a blue square"] * batch, seed=r)
            runs.append(time.perf_counter() - t0)
        median = statistics.median(runs)
        print(
            f"batch {batch}: {median * 1000:.1f} ms per call, {median / batch * 1000:.1f} ms per image "
            f"(median of {len(runs)}, {torch.get_num_threads()} threads)"
        )


if __name__ == "__main__":
    main()
