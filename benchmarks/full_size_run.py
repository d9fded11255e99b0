"""Load a checkpoint, answer about an image, draw one image: wall time, peak memory and where the time goes.

Three phases, each with its own memory peak (a sampling thread reads VmRSS from /proc/self/status, and the
kernel's VmHWM is reset at each phase start where /proc/self/clear_refs allows it):
  * load: `VARGPTPipeline.from_pretrained(path, dtype=..., quantization=..., device="cpu")`;
  * chat: a question about a synthetic 256x256 image, `--new-tokens` tokens (greedy, text only): prefill time
    (processor, ViT, LLM over the prompt) and time per generated token;
  * generate: one image with classifier-free guidance: time per scale of the schedule and the share of the time
    spent in the LLM, the visual decoder and the VAE decoder.
Time per component comes from forward hooks on `model.model` (LLM), `model.lm_head`, `model.visual` (ViT) and
wrappers of `model.vargpt_gen.forward_scale` and `model.vae_local.decode` on this instance (the scale loop
calls them once per scale / once per image); nothing in the package is changed.

Run:  python benchmarks/full_size_run.py --model runs/vargpt-v1.1-synthetic --quantization int8 \
          --json runs/full_size_run_int8.json
      python benchmarks/full_size_run.py --model DIR --dry-run      # a scaled-down checkpoint (tests)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw


def read_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon and RssFile of this process in bytes (Linux)."""
    values: dict[str, int] = {}
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    values[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return values


def reset_peak() -> bool:
    """Reset the kernel's VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class MemoryMonitor:
    """Samples this process's RSS every `interval` seconds and keeps the peak of each phase."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.phases: dict[str, dict[str, Any]] = {}
        self._current: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        status = read_status()
        with self._lock:
            phase = self._current
            if phase is not None and status.get("VmRSS", 0) > phase["peak_rss_sampled"]:
                phase["peak_rss_sampled"] = status["VmRSS"]
                phase["rss_anon_at_peak"] = status.get("RssAnon", 0)
                phase["rss_file_at_peak"] = status.get("RssFile", 0)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[dict[str, Any]]:
        hwm_reset = reset_peak()
        start = read_status()
        record = {
            "rss_at_start": start.get("VmRSS", 0),
            "peak_rss_sampled": start.get("VmRSS", 0),
            "rss_anon_at_peak": start.get("RssAnon", 0),
            "rss_file_at_peak": start.get("RssFile", 0),
            "hwm_reset": hwm_reset,
        }
        with self._lock:
            self._current = record
        t0 = time.perf_counter()
        try:
            yield record
        finally:
            record["seconds"] = time.perf_counter() - t0
            self._sample()
            end = read_status()
            with self._lock:
                self._current = None
            record["rss_at_end"] = end.get("VmRSS", 0)
            # VmHWM is exact for the phase when it was reset at its start; otherwise it is the process's peak so far
            record["peak_rss_hwm"] = end.get("VmHWM", 0)
            record["peak_rss"] = max(record["peak_rss_sampled"], record["peak_rss_hwm"] if hwm_reset else 0)
            self.phases[name] = record

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Event:
    component: str
    start: float
    end: float
    tokens: int = 0  # sequence length of an LLM call


@dataclass
class ComponentTimer:
    """Wall time of every call of the model's big components, in call order."""

    events: list[Event] = field(default_factory=list)
    _handles: list[Any] = field(default_factory=list)

    def attach(self, model: torch.nn.Module) -> None:
        for name, module in (("llm", model.model), ("lm_head", model.lm_head), ("vit", model.visual)):
            self._hook(name, module)
        self._wrap("decoder", model.vargpt_gen, "forward_scale")
        self._wrap("vae", model.vae_local, "decode")

    def _hook(self, name: str, module: torch.nn.Module) -> None:
        starts: list[tuple[float, int]] = []

        def pre(_module, args, kwargs):
            x = kwargs.get("inputs_embeds")
            if x is None:
                x = kwargs.get("input_ids", args[0] if args else None)
            tokens = int(x.shape[1]) if isinstance(x, torch.Tensor) and x.dim() >= 2 else 0
            starts.append((time.perf_counter(), tokens))

        def post(_module, _args, _kwargs, _output):
            t0, tokens = starts.pop()
            self.events.append(Event(name, t0, time.perf_counter(), tokens))

        self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        self._handles.append(module.register_forward_hook(post, with_kwargs=True))

    def _wrap(self, name: str, owner: torch.nn.Module, method: str) -> None:
        inner = getattr(owner, method)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.events.append(Event(name, t0, time.perf_counter()))

        setattr(owner, method, timed)  # an instance attribute: shadows the class's method for this model only

    def between(self, t0: float, t1: float) -> list[Event]:
        return sorted((e for e in self.events if e.start >= t0 and e.end <= t1), key=lambda e: e.start)


def totals(events: list[Event]) -> dict[str, float]:
    out: dict[str, float] = {}
    for event in events:
        out[event.component] = out.get(event.component, 0.0) + event.end - event.start
    return out


def shares(events: list[Event], wall: float) -> dict[str, float]:
    """Share of `wall` in each component; "other" is the rest (sampling, projectors, Python, preprocessing)."""
    parts = totals(events)
    result = {name: seconds / wall for name, seconds in sorted(parts.items())}
    result["other"] = max(0.0, 1.0 - sum(result.values()))
    return result


def test_image(size: int) -> Image.Image:
    """A fixed synthetic picture: a red disc and a blue square on a light background."""
    image = Image.new("RGB", (size, size), (235, 235, 225))
    draw = ImageDraw.Draw(image)
    draw.ellipse((size * 0.1, size * 0.1, size * 0.45, size * 0.45), fill=(200, 30, 30))
    draw.rectangle((size * 0.55, size * 0.55, size * 0.9, size * 0.9), fill=(30, 60, 200))
    return image


def run_chat(pipe, timer: ComponentTimer, question: str, image: Image.Image, new_tokens: int) -> dict[str, Any]:
    token_times: list[float] = []
    t0 = time.perf_counter()
    answer = pipe.chat(
        question,
        images=[image],
        max_new_tokens=new_tokens,
        allow_images=False,
        on_token=lambda _ids: token_times.append(time.perf_counter()),
    )
    t1 = time.perf_counter()
    events = timer.between(t0, t1)
    llm = [e for e in events if e.component == "llm"]
    steps = [e.end - e.start for e in llm[1:]]
    decode = t1 - token_times[0] if token_times else 0.0
    return {
        "answer": answer,
        "new_tokens": len(token_times),
        "prompt_tokens": llm[0].tokens if llm else None,
        "wall_s": t1 - t0,
        # until the first token is chosen: processor, ViT, LLM over the prompt, text head
        "prefill_s": (token_times[0] - t0) if token_times else None,
        "prefill_llm_s": (llm[0].end - llm[0].start) if llm else None,
        "vit_s": totals(events).get("vit", 0.0),
        # each generated token is fed back through the LLM once (the last one too, as the loop does)
        "per_token_s": decode / len(token_times) if token_times else None,
        "per_token_llm_step_median_s": statistics.median(steps) if steps else None,
        "component_seconds": totals(events),
        "shares": shares(events, t1 - t0),
    }


def run_generate(pipe, timer: ComponentTimer, prompt: str, resolution: int, cfg: float, seed: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    images = pipe.generate(prompt, resolution=resolution, cfg_scale=cfg, seed=seed)
    t1 = time.perf_counter()
    events = timer.between(t0, t1)
    schedule = pipe.model.generation_schedule(resolution)
    decoder = [e for e in events if e.component == "decoder"]
    llm = [e for e in events if e.component == "llm"]
    vae = [e for e in events if e.component == "vae"]
    # scale k runs from the start of the LLM call before its decoder call to the start of the next scale's
    # (the last scale ends where the VAE decode begins): LLM, projectors, decoder, sampling, next input
    starts = []
    for dec in decoder:
        before = [e for e in llm if e.start <= dec.start]
        starts.append(before[-1].start if before else dec.start)
    ends = [*starts[1:], vae[0].start if vae else t1]
    scales = []
    for k, (start, end) in enumerate(zip(starts, ends, strict=True)):
        inside = [e for e in events if e.start >= start and e.end <= end]
        part = totals(inside)
        h, w = schedule[k] if k < len(schedule) else (0, 0)
        scales.append(
            {
                "scale": k,
                "grid": [h, w],
                "tokens": h * w,
                "wall_s": end - start,
                "llm_s": part.get("llm", 0.0),
                "decoder_s": part.get("decoder", 0.0),
            }
        )
    first_scale = starts[0] if starts else t1
    image = images[0]
    return {
        "size": list(image.size),
        "resolution": resolution,
        "cfg_scale": cfg,
        "scales": scales,
        "scale_count": len(scales),
        "image_tokens": sum(s["tokens"] for s in scales),
        "wall_s": t1 - t0,
        "before_first_scale_s": first_scale - t0,  # processor, LLM over the prompt and <|image_gen_start|>
        "vae_decode_s": sum(e.end - e.start for e in vae),
        "component_seconds": totals(events),
        "shares": shares(events, t1 - t0),
        "image_mean_pixel": sum(image.convert("L").tobytes()) / (image.size[0] * image.size[1]),
    }


def load(path: str, dtype: torch.dtype, quantization: str | None):
    from vargpt import VARGPTPipeline

    kwargs: dict[str, Any] = {"dtype": dtype, "device": "cpu"}
    if quantization is not None:
        kwargs["quantization"] = quantization
    return VARGPTPipeline.from_pretrained(path, **kwargs)


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    quantization = None if args.quantization == "none" else args.quantization
    monitor = MemoryMonitor()
    timer = ComponentTimer()
    report: dict[str, Any] = {
        "model": str(args.model),
        "dtype": args.dtype,
        "quantization": quantization,
        "threads": torch.get_num_threads(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
    }
    try:
        with monitor.phase("load") as record:
            pipe = load(args.model, dtype, quantization)
        report["load"] = {"seconds": record["seconds"], "weight_bytes_in_memory": weight_bytes(pipe.model)}
        log(f"load: {record['seconds']:.1f} s, peak RSS {record['peak_rss'] / 2**30:.2f} GiB")
        timer.attach(pipe.model)
        resolution = args.resolution or pipe.model.config.image_resolution
        phases = set(args.phases.split(","))
        if "chat" in phases:
            with torch.inference_mode(), monitor.phase("chat"):
                report["chat"] = run_chat(pipe, timer, args.question, test_image(args.image_size), args.new_tokens)
            chat = report["chat"]
            log(
                f"chat: {chat['wall_s']:.1f} s, prefill {chat['prefill_s']:.2f} s ({chat['prompt_tokens']} prompt "
                f"tokens), {chat['per_token_s']:.3f} s per token over {chat['new_tokens']} tokens; "
                f"answer {chat['answer']!r}"
            )
        if "generate" in phases:
            with torch.inference_mode(), monitor.phase("generate"):
                report["generate"] = run_generate(pipe, timer, args.prompt, resolution, args.cfg, args.seed)
            gen = report["generate"]
            per_scale = ", ".join(f"{s['grid'][0]}x{s['grid'][1]} {s['wall_s']:.2f}" for s in gen["scales"])
            log(f"generate: {gen['wall_s']:.1f} s at {resolution} px; per scale (s): {per_scale}")
            log("generate shares: " + ", ".join(f"{k} {v:.1%}" for k, v in gen["shares"].items()))
    finally:
        monitor.stop()
        report["memory"] = monitor.phases
        report["peak_rss_ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for name, phase in monitor.phases.items():
        log(
            f"memory {name}: peak {phase['peak_rss'] / 2**30:.2f} GiB "
            f"(sampled {phase['peak_rss_sampled'] / 2**30:.2f}, "
            f"anon {phase['rss_anon_at_peak'] / 2**30:.2f} + file {phase['rss_file_at_peak'] / 2**30:.2f} at the "
            f"sampled peak), {phase['seconds']:.1f} s"
        )
    log(f"process peak RSS (ru_maxrss): {report['peak_rss_ru_maxrss'] / 2**30:.2f} GiB")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {args.json}")
    return report


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="runs/vargpt-v1.1-synthetic", help="checkpoint directory")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--quantization", default="none", choices=["none", "int8", "int4"])
    p.add_argument("--question", default="What shapes and colours are in this picture?")
    p.add_argument("--prompt", default="a red circle above a blue square")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--image-size", type=int, default=256, help="side of the synthetic input image")
    p.add_argument("--resolution", type=int, default=256, help="generated image side (0: the model's default)")
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", default=None, help="write the report here too")
    p.add_argument("--phases", default="load,chat,generate", help="after loading: chat and/or generate (or neither)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="scaled-down settings for a small checkpoint: 4 tokens, a 64 px input, the model's own resolution",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.dry_run:
        args.new_tokens, args.image_size, args.resolution = min(args.new_tokens, 4), 64, 0
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
